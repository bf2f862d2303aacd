-- commprefs.ngx.pacer: the one pacing contract the cosocket transport uses
-- (INTERFACES.md C5), with three backings:
--   * the C window in the client handle (default): per worker, each worker
--     of an nginx paces alone;
--   * a lua_shared_dict (`shared_dict = "name"`): every worker paces through
--     ONE rolling window kept in the dict, and limits learned from HubSpot's
--     headers are stored there, so all workers learn at once;
--   * Redis (`redis = url`, `key =`): the budget of commprefs.ngx.redis_budget,
--     one window for every process and host using the key.
-- The C window is always kept too (h:decide updates it, and it paces a worker
-- before the shared backings are asked). The window arithmetic (the margin
-- added to the interval, the sane range of learned limits) comes from C:
-- core.window_margin_ms and core.sane_window.
--
--   local p = pacer.new(handle, { shared_dict = "name", rate_limit = { max =,
--     interval = seconds, redis = url, key =, redis_timeout =, redis_wait = } })
--   (rate_limit is the client's option as given; max/interval set by hand are
--   never replaced by learned limits; key names the window, one per HubSpot app)
--   p:wait()       -> ms before the next request may go (0 = now)[, "daily_limit"
--                     as h:pace_wait says]; never yields
--   p:start()      -> true, or nil, err when the budget is gone for good (the
--                     transport then stops with "budget"). An attempt will be
--                     sent: takes its slot; may yield (ngx.sleep) until the slot
--                     is really free when another worker took the one wait saw.
--   p:sent()       the attempt is on the wire now
--   p:unsent()     the attempt ended before it was sent (its slot is freed)
--   p:learn(max, interval_ms)   limits from X-HubSpot-RateLimit-* headers
--   p:throttled(hold_ms)        a 429 arrived: hold every sender that long
--                               (<= 0: until a slot of the full window frees)
--
-- The shared window, with atomic dict operations only: every attempt takes a
-- ticket n = incr(seq); ticket n may go once ticket n - max was sent at least
-- interval + margin ago (or never was: an unsent ticket is deleted, an
-- expired one is gone). Each ticket key is written by its one owner (pending
-- mark at start, send time at sent), so there is no read-modify-write. A
-- ticket waits for a still-pending n - max, so any max + 1 tickets in a row
-- span more than one window. (An unsent ticket frees the turn of ticket
-- n + max, not of the very next one: rare attempts that never reached the
-- wire cost a little speed, never a 429.) A 429 sets a "blocked" key with `add` (the first
-- hold wins, it is never shortened) whose ttl every worker reads.
local core = require "commprefs.core"

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

------------------------------------------------------------------ shared_dict backing

local Dict = {}
Dict.__index = Dict

local function new_dict(name, rl, settings)
  local dict = ngx.shared[name]
  if not dict then
    error("commprefs: no lua_shared_dict '" .. name .. "' (add `lua_shared_dict " .. name
      .. " 1m;` to the http block of nginx.conf)", 0)
  end
  local ns = "commprefs:" .. (rl.key or "window") .. ":"
  local self = setmetatable({
    dict = dict, name = name, seq_key = ns .. "seq", limit_key = ns .. "limit", blocked_key = ns .. "blocked",
    ticket_prefix = ns .. "t:", owned = setmetatable({}, { __mode = "k" }), queue = {},
    pending_ttl = (settings.connect_timeout_ms or 10000) / 1000 + 10,
  }, Dict)
  if rl.max and rl.interval then -- set by hand: never learned
    self.manual_max, self.manual_interval = rl.max, math.floor(rl.interval * 1000 + 0.5)
  end
  return self
end

-- max, interval_ms of the shared window (nil when not known yet).
function Dict:limit()
  if self.manual_max then return self.manual_max, self.manual_interval end
  local v = self.dict:get(self.limit_key)
  if not v then return nil end
  local max, interval = v:match("^(%d+)/(%d+)$")
  return tonumber(max), tonumber(interval)
end

-- ms until ticket n may be sent (0 = now).
function Dict:wait_for(n, now)
  local wait = 0
  local hold = self.dict:ttl(self.blocked_key)
  if hold and hold > 0 then wait = hold * 1000 end
  local max, interval = self:limit()
  if max and n > max then
    local sent = self.dict:get(self.ticket_prefix .. (n - max))
    if sent and sent < 0 then
      wait = math.max(wait, 1) -- that attempt is not on the wire yet: it lands first
    elseif sent then
      wait = math.max(wait, sent + interval + margin_ms(interval) - now)
    end
  end
  return wait > 0 and wait or 0
end

function Dict:wait()
  return self:wait_for((self.dict:get(self.seq_key) or 0) + 1, now_ms())
end

function Dict:start()
  local n, err = self.dict:incr(self.seq_key, 1, 0)
  if not n then return nil, "lua_shared_dict '" .. self.name .. "': " .. tostring(err) end
  local key = self.ticket_prefix .. n
  self.dict:set(key, -1, self.pending_ttl)
  self.owned[coroutine.running() or self] = n
  self.queue[#self.queue + 1] = n
  while true do
    local w = self:wait_for(n, now_ms())
    if w <= 0 then return true end
    ngx.sleep(w / 1000)
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
      return q
    end
  end
  return n
end

function Dict:sent()
  local n = self:take_ticket()
  if not n then return end
  local _, interval = self:limit()
  interval = interval or 10000 -- not learned yet: HubSpot's usual window
  local ttl = (interval + margin_ms(interval)) / 1000 + 1
  self.dict:set(self.ticket_prefix .. n, now_ms(), ttl)
end

function Dict:unsent()
  local n = self:take_ticket()
  if n then self.dict:delete(self.ticket_prefix .. n) end
end

function Dict:learn(max, interval_ms)
  if self.manual_max then return end
  local m, i = core.sane_window(max, interval_ms)
  if not m then return end
  local v = string.format("%d/%d", m, i)
  if self.dict:get(self.limit_key) ~= v then self.dict:set(self.limit_key, v) end
end

function Dict:throttled(hold_ms)
  if not hold_ms or hold_ms <= 0 then
    hold_ms = self:wait()
    if hold_ms <= 0 then hold_ms = 1000 end
  end
  self.dict:add(self.blocked_key, true, hold_ms / 1000)
end

------------------------------------------------------------------ Redis backing

local Redis = {}
Redis.__index = Redis

local function new_redis(rl)
  local budget = require("commprefs.ngx.redis_budget").new { url = rl.redis, key = rl.key,
    timeout = rl.redis_timeout, wait = rl.redis_wait }
  return setmetatable({ budget = budget }, Redis)
end

function Redis:wait() return 0 end -- asked in start: asking counts a request

function Redis:start()
  while true do
    local ms, err = self.budget:acquire()
    if ms == nil then return nil, err end
    if ms <= 0 then return true end
    ngx.sleep(ms / 1000)
  end
end

function Redis:sent() end
function Redis:unsent() end
function Redis:learn(max, interval_ms) self.budget:learn(max, interval_ms) end
function Redis:throttled(hold_ms) self.budget:throttled(hold_ms) end

------------------------------------------------------------------ the pacer

local Pacer = {}
Pacer.__index = Pacer

function Pacer:wait()
  local w, why = self.handle:pace_wait() -- why: "daily_limit" while HubSpot's daily limit is spent
  local shared = self.shared
  if shared and w <= 0 and not why then w = shared:wait() end
  return w, why
end

function Pacer:start()
  local shared = self.shared
  if shared then
    local ok, err = shared:start()
    if not ok then return nil, err end
  end
  self.handle:pace_start()
  return true
end

function Pacer:sent()
  self.handle:pace_sent()
  if self.shared then self.shared:sent() end
end

function Pacer:unsent()
  self.handle:pace_unsent()
  if self.shared then self.shared:unsent() end
end

function Pacer:learn(max, interval_ms) -- the C window learns in h:decide
  if self.shared and max and interval_ms then self.shared:learn(max, interval_ms) end
end

function Pacer:throttled(hold_ms) -- the C window is held by h:decide
  if self.shared then self.shared:throttled(hold_ms) end
end

-- pacer.new(handle, opts): see the top of the file.
function M.new(handle, opts)
  opts = opts or {}
  local settings = handle.settings and handle:settings() or {}
  local rl = opts.rate_limit or {}
  local shared, backing = nil, "window"
  if rl.redis then
    shared, backing = new_redis(rl), "redis"
  elseif opts.shared_dict then
    shared, backing = new_dict(opts.shared_dict, rl, settings), "shared_dict"
  end
  return setmetatable({ handle = handle, shared = shared, backing = backing }, Pacer)
end

return M
