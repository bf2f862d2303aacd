-- commprefs.ngx.backing_dict: the lua_shared_dict backing of the pacer
-- (commprefs.pacer): every worker of an nginx paces through ONE rolling
-- window kept in the dict, with atomic dict operations only. Every attempt
-- takes a ticket n = incr(seq); ticket n may go once ticket n - max was sent
-- at least interval + margin ago (or never was: an unsent ticket is deleted,
-- an expired one is gone). Each ticket key is written by its one owner
-- (pending mark at start, send time at sent), so there is no
-- read-modify-write; a ticket waits for a still-pending n - max, so any
-- max + 1 tickets in a row span more than one window. A 429 sets a
-- "blocked" key with `add` (the first hold wins) whose ttl every worker
-- reads. Tickets are also spaced evenly (ratelimit.c's rule, shared by all
-- workers): once ticket n - burst is in the window, ticket n goes no sooner
-- than (interval + margin) / max after ticket n - 1 was sent, so the workers
-- of an nginx take turns on one schedule instead of each spending the
-- window early. What is learned or held is decided by the governor, not here.
local core = require "commprefs.core"
local nap = require("commprefs.transport").nap -- never ngx.sleep(0)

local M = {}

local function now_ms()
  ngx.update_time()
  return ngx.now() * 1000
end

-- The window's margin from C, cached per interval.
local margins = {}
local function margin_ms(interval_ms)
  local m = margins[interval_ms]
  if not m then
    m = core.window_margin_ms(interval_ms)
    margins[interval_ms] = m
  end
  return m
end

local Dict = {}
Dict.__index = Dict

-- new(name, key, manual_max, manual_interval_ms, settings): raises when the dict is missing.
function M.new(name, key, manual_max, manual_interval, settings)
  local dict = ngx.shared[name]
  if not dict then
    error("commprefs: no lua_shared_dict '" .. name .. "' (add `lua_shared_dict " .. name
      .. " 1m;` to the http block of nginx.conf)", 0)
  end
  local ns = "commprefs:" .. (key or "window") .. ":"
  local self = setmetatable({
    dict = dict, name = name, seq_key = ns .. "seq", limit_key = ns .. "limit", blocked_key = ns .. "blocked",
    ticket_prefix = ns .. "t:", owned = setmetatable({}, { __mode = "k" }), queue = {},
    -- tickets of this worker not yet sent or unsent: ticket -> its coroutine (weak)
    mine = {}, holder = setmetatable({}, { __mode = "v" }),
    pending_ttl = 0,
  }, Dict)
  self:cover(settings)
  self.manual_max, self.manual_interval = manual_max, manual_interval -- set by hand: kept
  return self
end

-- A ticket not on the wire after the longest connect of the clients using
-- this backing, and 10 s more, belonged to a worker that died: it expires.
function Dict:cover(settings)
  local ttl = (settings.connect_timeout_ms or 10000) / 1000 + 10
  if ttl > self.pending_ttl then self.pending_ttl = ttl end
end

-- max, interval_ms of the shared window (nil when not known yet).
function Dict:limit()
  if self.manual_max then return self.manual_max, self.manual_interval end
  local v = self.dict:get(self.limit_key)
  if not v then return nil end
  local max, interval = v:match("^(%d+)/(%d+)")
  return tonumber(max), tonumber(interval)
end

local BURST = core.limits.pace_burst
local PENDING_POLL_MS = 10 -- the ticket before is not on the wire yet: ask again this soon

-- ms until ticket n may go by the even spacing (0 = now): while ticket
-- n - BURST is in the window, one spacing after ticket n - 1 was sent, less
-- how late n - 1 went after n - 2's schedule, but never sooner than half a
-- spacing after n - 1: the schedule catches up a late send as ratelimit.c's
-- does, instead of every late send pushing all later ones back, and a send
-- the window's bound held is not followed by another at once (which would
-- replay a burst at every window's edge).
function Dict:spacing_wait(n, now, spacing, bound)
  if n <= BURST then return 0 end
  local dict, prefix = self.dict, self.ticket_prefix
  local first = dict:get(prefix .. (n - BURST))
  if not first or (first >= 0 and first <= now - bound) then return 0 end -- a window's first few
  local prev = self:sent_at(n - 1)
  if not prev then return 0 end -- never sent: its turn is free
  if prev < 0 then return math.min(spacing, PENDING_POLL_MS) end
  local due = prev + spacing
  local before = self:sent_at(n - 2)
  if before and before >= 0 and before + 2 * spacing < due then -- n - 1 went late
    due = math.max(prev + spacing / 2, before + 2 * spacing)
  end
  return due - now
end

-- The send time of ticket m, nil when it never was (or was given up), or -1
-- while pending. A pending ticket of this worker whose attempt is gone (its
-- light thread killed, its request aborted: no exit path ran) is released
-- here, so it never stalls the tickets after it.
function Dict:sent_at(m)
  local key = self.ticket_prefix .. m
  local v = self.dict:get(key)
  if v and v < 0 and self.mine[m] then
    local co = self.holder[m]
    if co == nil or (co and coroutine.status(co) == "dead") then -- nil: collected
      self.dict:delete(key)
      self.mine[m], self.holder[m] = nil, nil
      for i, q in ipairs(self.queue) do
        if q == m then table.remove(self.queue, i); break end
      end
      return nil
    end
  end
  return v
end

-- ms until ticket n may be sent (0 = now).
function Dict:wait_for(n, now)
  local wait = 0
  local hold = self.dict:ttl(self.blocked_key)
  if hold and hold > 0 then wait = hold * 1000 end
  local max, interval = self:limit()
  if max then
    -- ratelimit.c's two rules: at most max in any interval + margin, spaced
    -- by (interval + margin) / max
    local bound = interval + margin_ms(interval)
    if n > max then
      local sent = self:sent_at(n - max)
      if sent and sent < 0 then
        wait = math.max(wait, 1) -- that attempt is not on the wire yet: it lands first
      elseif sent then
        wait = math.max(wait, sent + bound - now)
      end
    end
    wait = math.max(wait, self:spacing_wait(n, now, bound / max, bound))
  end
  return wait > 0 and wait or 0
end

-- ms until the running thread's ticket may go: the one it reserved, else the next one.
function Dict:wait()
  local n = self.owned[coroutine.running() or self]
  return self:wait_for(n or (self.dict:get(self.seq_key) or 0) + 1, now_ms())
end

-- Takes the running thread's place in line now (a ticket), without waiting
-- for its turn: a coalesced batch read keeps gathering callers until then
-- (commprefs.lookup), and the workers of an nginx take their turns in the
-- order they asked. start() then waits for this ticket; release() gives it up.
function Dict:reserve()
  local co = coroutine.running()
  if self.owned[co or self] then return true end
  local n, err = self.dict:incr(self.seq_key, 1, 0)
  if not n then return nil, "lua_shared_dict '" .. self.name .. "': " .. tostring(err) end
  self.dict:set(self.ticket_prefix .. n, -1, self.pending_ttl)
  self.owned[co or self] = n
  self.mine[n], self.holder[n] = true, co or false -- false: no coroutine to watch
  self.queue[#self.queue + 1] = n
  return true
end

function Dict:release()
  if self.owned[coroutine.running() or self] then self:unsent() end
end

function Dict:start()
  local ok, err = self:reserve()
  if not ok then return nil, err end
  local n = self.owned[coroutine.running() or self]
  while true do
    local w = self:wait_for(n, now_ms())
    if w <= 0 then return true end
    nap(w)
  end
end

-- The ticket of the running thread (else the oldest this worker holds).
function Dict:take_ticket()
  local co = coroutine.running() or self -- LuaJIT's main thread has no coroutine
  local n = self.owned[co]
  self.owned[co] = nil
  for i, q in ipairs(self.queue) do
    if n == nil or q == n then
      table.remove(self.queue, i)
      self.mine[q], self.holder[q] = nil, nil
      return q
    end
  end
  if n then self.mine[n], self.holder[n] = nil, nil end
  return n
end

function Dict:sent()
  local n = self:take_ticket()
  if not n then return end
  local _, interval = self:limit()
  interval = interval or core.limits.default_interval_ms -- not learned yet
  local ttl = (interval + margin_ms(interval)) / 1000 + 1
  self.dict:set(self.ticket_prefix .. n, now_ms(), ttl)
end

function Dict:unsent()
  local n = self:take_ticket()
  if n then self.dict:delete(self.ticket_prefix .. n) end
end

-- What may be learned is the governor's decision: a window it passes on is
-- stored, unless one set by hand (manual) is there: no learned one replaces it.
function Dict:learn(max, interval_ms, manual)
  local v = string.format(manual and "%d/%d/manual" or "%d/%d", max, interval_ms)
  local old = self.dict:get(self.limit_key)
  if old == v or (not manual and old and old:find("/manual", 1, true)) then return end
  self.dict:set(self.limit_key, v)
end

function Dict:throttled(hold_ms)
  if not hold_ms or hold_ms <= 0 then
    hold_ms = self:wait()
    if hold_ms <= 0 then hold_ms = 1000 end
  end
  self.dict:add(self.blocked_key, true, hold_ms / 1000)
end

return M
