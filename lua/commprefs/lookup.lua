-- commprefs.lookup: client:is_unsubscribed_from_all(id, opts) at web scale.
-- Owns the `cache` and `coalesce` options of commprefs.new:
--   * cache: answers remembered for `ttl` seconds, keyed by API version,
--     business unit and id (never the token); in OpenResty shared by every
--     worker through a lua_shared_dict (`shared_dict`), elsewhere in a bounded
--     in-process map (`max_entries`, default 10,000). Errors are never cached.
--     Changes made through commprefs call client:_cache_note so the next read
--     agrees with them at once (unsubscribe-all -> true; anything that might
--     make the answer false -> the entry is forgotten).
--   * coalesce: in OpenResty (cosocket transport), concurrent callers of one
--     worker that arrive within `coalesce` seconds share one batch read
--     (statuses/batch/unsubscribe-all/read, up to batch_size ids, one business
--     unit per batch), sent through client:_perform like every other request.
--     In plain Lua (libcurl, one caller at a time) there is nothing to gather:
--     the option is accepted and each call is one GET.
-- Every caller gets the answer a single GET would have given: true / false,
-- or nil and a commprefs.Error (a per-id error of the batch read is that
-- caller's error alone; a failed request is every caller's error in it).
--
-- The state (M.state: the queue, the stores of cached answers, the counts)
-- belongs to a client, or inside nginx to its bundle (commprefs.shared):
-- every client of the bundle reads through its own view (M.view) with its
-- own options. Cached entries are shared and each client reads them with
-- its own ttl (an entry keeps the time its answer was read; it lives as
-- long as the longest ttl of its store's readers); a change made through
-- any client of the bundle updates every store of it. A batch read gathers
-- the callers of one business unit whose clients share a profile (the same
-- call policy: retries, timeouts, ...; commprefs.ngx.transport.profile) and
-- batch_size, and is sent through one of them, so every caller's answer
-- honours its own client's policy; each caller's coalesce window bounds how
-- long its group waits to gather more.
local core = require "commprefs.core"
local Error = require "commprefs.error"
local response = require "commprefs.response"
local ops = require "commprefs.ops"
local nap = require("commprefs.transport").nap

local M = { DEFAULT_MAX_ENTRIES = 10000 }

local now = core.now

------------------------------------------------------------------ options

local function raise(msg)
  error("commprefs.new: " .. msg, 4)
end

local function positive_number(v)
  return type(v) == "number" and v > 0 and v < math.huge
end

local CACHE_KEYS = { ttl = true, shared_dict = true, max_entries = true }

-- Raises (naming commprefs.new and the option) on a bad coalesce or cache.
function M.check(coalesce, cache)
  if coalesce ~= nil and not (positive_number(coalesce) and coalesce <= 1) then
    raise("bad option 'coalesce' (seconds expected: a number > 0 and <= 1, e.g. 0.01)")
  end
  if cache == nil then return end
  for k in pairs(cache) do
    if not CACHE_KEYS[k] then raise("bad option 'cache' (unknown field '" .. tostring(k) .. "')") end
  end
  if not positive_number(cache.ttl) then
    raise("bad option 'cache.ttl' (seconds expected: a number > 0)")
  end
  local n = cache.max_entries
  if n ~= nil and not (type(n) == "number" and n >= 1 and n == math.floor(n) and n < 2^31) then
    raise("bad option 'cache.max_entries' (positive integer expected)")
  end
  local dict = cache.shared_dict
  if dict ~= nil then
    if type(dict) ~= "string" or dict == "" then
      raise("bad option 'cache.shared_dict' (the name of a lua_shared_dict expected)")
    end
    if not (ngx and ngx.shared) then
      raise("bad option 'cache.shared_dict' (needs OpenResty; in plain Lua leave it out: the cache is in-process)")
    end
    if not ngx.shared[dict] then
      raise("bad option 'cache.shared_dict' (no lua_shared_dict '" .. dict .. "' in nginx.conf)")
    end
  end
end

------------------------------------------------------------------ stores

-- A bounded in-process map with expiry: two generations of at most max/2
-- entries each (the current one and the previous one); an entry read from
-- the previous generation moves to the current one, and when the current
-- one is full the previous one is dropped whole (O(1)). Recently used
-- entries stay, as in an LRU; never more than max entries.
local Bounded = {}
Bounded.__index = Bounded

local function bounded(max)
  local half = math.max(1, math.floor(max / 2))
  return setmetatable({ half = half, keep_old = 2 * half <= max, cur = {}, old = {}, n_cur = 0, n_old = 0 }, Bounded)
end

-- The largest bound any reader of the store asked for.
function Bounded:grow(max)
  local half = math.max(1, math.floor(max / 2))
  if half > self.half then self.half, self.keep_old = half, 2 * half <= max end
end

-- put(k, v, ttl, at): at = when the answer was read (nil: now).
function Bounded:put(k, v, ttl, at)
  local e = self.cur[k]
  if e then e[1], e[2], e[3] = v, now() + ttl, at or now(); return end
  if self.old[k] then self.old[k] = nil; self.n_old = self.n_old - 1 end
  if self.n_cur >= self.half then
    if self.keep_old then self.old, self.n_old = self.cur, self.n_cur
    else self.old, self.n_old = {}, 0 end
    self.cur, self.n_cur = {}, 0
  end
  self.cur[k] = { v, now() + ttl, at or now() }
  self.n_cur = self.n_cur + 1
end

-- v, age (seconds since it was read), or nil.
function Bounded:get(k)
  local e = self.cur[k]
  if not e then
    e = self.old[k]
    if not e then return nil end
    self.old[k] = nil
    self.n_old = self.n_old - 1
    if e[2] <= now() then return nil end
    self:put(k, e[1], e[2] - now(), e[3])
  end
  if e[2] <= now() then self:delete(k); return nil end
  return e[1], now() - e[3]
end

function Bounded:delete(k)
  if self.cur[k] then self.cur[k] = nil; self.n_cur = self.n_cur - 1 end
  if self.old[k] then self.old[k] = nil; self.n_old = self.n_old - 1 end
end

function Bounded:count()
  return self.n_cur + self.n_old
end

-- The same methods over a lua_shared_dict (which bounds itself by its
-- size, dropping the least recently used entries when full). When an
-- answer was read goes in the entry's flags (centiseconds modulo 2^31, what
-- the dict's int flags hold: ages are right up to 248 days), not its value:
-- a longer value would take the next slab size and halve what the dict holds.
local Shared = {}
Shared.__index = Shared
local WRAP = 2147483648

function Shared:grow() end -- the dict bounds itself

function Shared:put(k, v, ttl, at)
  local ok = self.dict:set(k, v, ttl, math.floor((at or now()) * 100) % WRAP)
  if not ok then self.dict:delete(k) end -- full of fresh entries: never leave an older answer
end

function Shared:get(k)
  local v, at = self.dict:get(k)
  if v == nil or not at then return v end -- no flags: no age known
  return v, ((math.floor(now() * 100) - at) % WRAP) / 100
end

function Shared:delete(k)
  self.dict:delete(k)
end

------------------------------------------------------------------ cache

-- Stored values: "t" / "f" answers of reads (the store keeps when they were
-- read); "T<time>" unsubscribed by a change made through commprefs at
-- <time>; "?<time>" changed at <time> in a way whose answer only HubSpot
-- knows. A read that started before a change never overwrites what the
-- change noted. A store (one per bundle and store kind: a dict, or the
-- in-process map) keeps entries for the longest ttl of its readers (ttl);
-- a Cache is one client's view of it, with that client's ttl.
local Cache = {}
Cache.__index = Cache

local function key_of(prefix, id, bu)
  return prefix .. string.format("%d", bu or 0) .. ":" .. id
end

-- The store of state for cache options opts (made at first use), grown to
-- this reader's ttl and bound.
local function store_for(state, opts)
  local name = opts.shared_dict and ("dict " .. opts.shared_dict) or "memory"
  local store = state.stores[name]
  if not store then
    if opts.shared_dict then store = setmetatable({ dict = ngx.shared[opts.shared_dict] }, Shared)
    else store = bounded(opts.max_entries or M.DEFAULT_MAX_ENTRIES) end
    store.ttl = 0
    state.stores[name] = store
    state.store_list[#state.store_list + 1] = store
  end
  if opts.ttl > store.ttl then store.ttl = opts.ttl end
  store:grow(opts.max_entries or M.DEFAULT_MAX_ENTRIES)
  return store
end

function Cache:key(id, bu)
  return key_of(self.prefix, id, bu)
end

-- true / false, or nil when the answer is not known (or older than this reader's ttl).
function Cache:get(key)
  local v, age = self.store:get(key)
  if v == nil then return nil end
  local mark = v:sub(1, 1)
  if mark == "t" or mark == "f" then
    if age and age >= self.ttl then return nil end
    return mark == "t"
  end
  if mark == "T" and now() - tonumber(v:sub(2)) < self.ttl then return true end
  return nil
end

-- Remembers in store the answer of a read that started at `started`,
-- unless a change noted since then (or the read took longer than any
-- reader's ttl) makes it stale.
local function remember(store, key, answer, started)
  local age = now() - started
  if age >= store.ttl then return end
  local v = store:get(key)
  if v then
    local mark = v:sub(1, 1)
    if (mark == "T" or mark == "?") and tonumber(v:sub(2)) >= started then return end
  end
  store:put(key, answer and "t" or "f", store.ttl - age, started)
end

function Cache:remember(key, answer, started)
  remember(self.store, key, answer, started)
end

-- What a read through any client of state answered, in every store of it.
local function remember_all(state, id, bu, answer, started)
  local key = key_of(state.prefix, id, bu)
  for _, store in ipairs(state.store_list) do remember(store, key, answer, started) end
end

-- A change made through any client of state: true (now unsubscribed from
-- all), or nil / false (the answer may have changed: forget it), in every
-- store of it.
local function note(state, id, bu, unsubscribed)
  local key = key_of(state.prefix, id, bu)
  local v = (unsubscribed and "T" or "?") .. string.format("%.6f", now())
  for _, store in ipairs(state.store_list) do store:put(key, v, store.ttl) end
end

------------------------------------------------------------------ answers

-- The answer a GET .../unsubscribe-all envelope (results = wide statuses) gives.
local answer_of = ops.unsubscribed

------------------------------------------------------------------ coalescing

-- Callers of one business unit and group key (their client's profile and
-- batch_size) join the open group (up to batch_size ids) and wait on their
-- own semaphore. Senders (ngx.timers, per state and worker) send batch
-- reads through the group's client:_perform (the client whose caller opened
-- it): the oldest group leaves once its window has passed (the earliest
-- end of its callers' coalesce windows) and no other batch is in flight (or
-- at once when full) AND the pacer would let a request go, so ids keep
-- joining it while HubSpot's rate limit holds it back. A batch carries only
-- ids whose callers will still wait when the answer returns. More senders
-- start while batches are in flight, up to the governor's in-flight target.

local BATCH_PATH = ops.BATCH.get_unsubscribe_all_status.path
local IDLE = 1 -- seconds the source waits for new callers before it ends

-- Whether this call runs where light threads can gather (cosockets in a
-- yieldable phase): exactly when client:_perform takes the cosocket transport.
local function gathering(client)
  return client:_uses_cosockets()
end

local function bu_text(bu)
  return bu == nil and "-" or string.format("%d", bu)
end

-- A group: the ids of one business unit and group key waiting to go out in
-- one batch read through client (the one whose caller opened it).
local function new_group(L, key, bu, client)
  local g = { key = key, bu = bu, client = client, size = client.batch_size, ids = {}, waiters = {}, sent = {},
    answered = {}, n = 0, due = now() + client._lookup.coalesce }
  L.groups[key] = g
  L.order[#L.order + 1] = g
  if L.idle_waiting then L.arrival:post(1) end
  return g
end

local function close_group(L, g)
  if L.groups[g.key] == g then L.groups[g.key] = nil end
end

-- Hands every waiter of id in batch b its answer (or err); remembers answers.
local function deliver(L, b, id, answer, err)
  if answer ~= nil then remember_all(L, id, b.bu, answer, b.started) end
  for _, g in ipairs(b.groups) do
    local list = g.waiters[id]
    if list then
      g.answered[id] = { answer, err }
      for _, w in ipairs(list) do
        w.done, w.answer, w.err = true, answer, err
        w.sema:post(1)
      end
    end
  end
end

-- The Error a caller gets for a per-id error of the batch read: what the
-- GET of that id would have returned (HTTP 400 with HubSpot's category and
-- message), not the 207 of the batch around it.
local function item_error(e, req)
  return Error.new { kind = "http", status = 400, category = e.category, message = e.message,
    sub_category = e.subCategory, context = e.context, method = req.method,
    url = response.error_url(req.url) }
end

-- Delivers the transport result res of batch b ({groups, bu, req, ids, started}).
local function settle(L, b, res)
  local req = b.req
  local env, err = response.outcome(req, res)
  if not env then
    for _, id in ipairs(b.ids) do deliver(L, b, id, nil, err) end
    return
  end
  ops.match(env, b.ids, function(id, r, e)
    if r then deliver(L, b, id, answer_of(r.wideStatuses))
    elseif e then deliver(L, b, id, nil, item_error(e, req))
    else
      deliver(L, b, id, nil, Error.new { kind = "decode", method = req.method,
        url = response.error_url(req.url), message = "the batch read did not mention this id" })
    end
  end)
end

-- The ids of g not sent yet that someone will still wait for at time
-- `cutoff` (an answer arriving later would be too late for all of them),
-- and not yet in `seen`; and the latest time any of them still waits.
local function hopeful_ids(g, cutoff, seen)
  local ids, latest = {}, 0
  for i = 1, g.n do
    local id = g.ids[i]
    if not seen[id] and not g.sent[id] and not g.answered[id] then
      local hopeful = false
      for _, w in ipairs(g.waiters[id]) do
        if not w.gone and not w.done and w.deadline > cutoff then
          hopeful = true
          if w.deadline > latest then latest = w.deadline end
        end
      end
      if hopeful then ids[#ids + 1] = id end
    end
  end
  return ids, latest
end

-- Sleeps until the pacer would let a request go. Where the workers share a
-- line (a lua_shared_dict) the sender takes its place in it first, so its
-- batch keeps gathering callers until its turn and no worker's turn is
-- taken by another that woke first.
local function wait_for_pacer(client)
  local p = client:_pacer()
  if not p then return end
  p:reserve() -- a failure shows when the batch starts
  local ms = p:wait()
  while ms and ms > 0 do
    nap(math.min(ms, 1000))
    ms = p:wait()
  end
end

-- Sleeps until group g may leave: at once when it is full; else once its
-- window has passed and no other batch is in flight (a partial batch waiting
-- for an answer to come back gathers more callers instead of using a slot
-- of the rate limit early).
local function wait_until_due(L, g)
  while g.n < g.size do
    local wait = g.due - now()
    if wait <= 0 and L.senders - L.ready == 0 then return end
    nap(wait > 0 and wait * 1000 or 2)
  end
end

-- The client a batch of group g is sent through: the one that opened it,
-- else (closed since) one of a caller still waiting (the same profile).
local function sending_client(g)
  if not g.client._closed then return g.client end
  for _, list in pairs(g.waiters) do
    for _, w in ipairs(list) do
      if not w.gone and not w.done and not w.client._closed then return w.client end
    end
  end
  return g.client -- every one closed: the send says so
end

-- Takes from the oldest groups (of the oldest group's key, in order) the
-- ids someone will still wait for when the answer comes back, up to its
-- batch_size (the last group may give only some; it stays first in line).
-- Groups with none left are dropped: their callers time out.
local function take_batch(L)
  local cutoff, first = now() + L.rtt, L.order[1]
  local client, size = sending_client(first), first.size
  local b = { groups = {}, ids = {}, bu = first.bu, client = client, until_time = 0 }
  local seen = {}
  while L.order[1] and #b.ids < size do
    local g = L.order[1]
    if g.key ~= first.key then break end
    local ids, latest = hopeful_ids(g, cutoff, seen)
    if latest > b.until_time then b.until_time = latest end
    local room = size - #b.ids
    if #ids <= room then
      table.remove(L.order, 1)
      close_group(L, g)
    end
    if #ids > 0 then b.groups[#b.groups + 1] = g end
    for i = 1, math.min(#ids, room) do
      local id = ids[i]
      b.ids[#b.ids + 1], seen[id], g.sent[id] = id, true, true
    end
  end
  if #b.ids == 0 then return nil end
  b.req = ops.batch_request(client._prefix .. BATCH_PATH .. ops.query(true, b.bu), b.ids)
  b.started = now()
  L.requests = L.requests + 1
  return b
end

-- The next batch read {groups=, bu=, client=, ids=, req=, started=}, once
-- the oldest group's window has passed (or it is full) and the pacer would
-- let it go; nil once no caller has come for IDLE seconds.
local function next_batch(L)
  local reserved -- the client whose pacer this sender holds a place in line of
  while true do
    local g = L.order[1]
    if not g then
      local p = reserved and reserved:_pacer()
      if p then p:release(); reserved = nil end -- nobody to send for: the place goes to others
      L.idle_waiting = true
      L.arrival:wait(IDLE)
      L.idle_waiting = false
      if not L.order[1] then return nil end
    else
      wait_until_due(L, g)
      reserved = g.client
      wait_for_pacer(g.client)
      local b = L.order[1] and take_batch(L)
      if b then return b end
    end
  end
end

local ensure_sender

-- A sender (an ngx.timer callback). Senders take turns to wait for the next
-- batch (one at a time, so a batch keeps growing until it may really go),
-- then send it through its client's _perform; while one is in flight another
-- takes the turn. Ends once no caller has come for IDLE seconds.
local function sender(premature, L)
  while not premature do
    local turn = L.turn:wait(IDLE + L.timeout)
    local ok, b = false, nil
    if turn then
      ok, b = pcall(next_batch, L)
      L.turn:post(1)
      if not ok then ngx.log(ngx.ERR, "commprefs: coalesced batch read: ", tostring(b)) end
    end
    if not ok or not b then break end
    L.ready = L.ready - 1
    local client = b.client
    if L.order[1] then ensure_sender(L, client) end -- someone to take the next turn
    -- the batch read's deadline: the last of its callers stops waiting then (the governor's clock)
    local deadline = client._gov:clock() + (b.until_time - now()) * 1000
    local sent, results = pcall(client._perform, client, { b.req }, nil, deadline)
    L.ready = L.ready + 1
    L.rtt = 0.7 * L.rtt + 0.3 * (now() - b.started) -- how long an answer takes to come back
    if sent then settle(L, b, results[1])
    else
      settle(L, b, { kind = "network", attempts = 0, message = "the batch read failed: " .. tostring(results) })
    end
  end
  L.senders, L.ready = L.senders - 1, L.ready - 1
  if premature then
    for _, g in ipairs(L.order) do
      for _, list in pairs(g.waiters) do
        for _, w in ipairs(list) do w.failed = "the nginx worker is exiting"; w.sema:post(1) end
      end
    end
  end
end

-- Starts a sender when none is free to take the next batch, up to as many
-- as the client would have requests in flight (its governor's target).
function ensure_sender(L, client)
  if L.ready > 0 then return true end
  local most = client:_in_flight_target()
  if L.senders >= math.max(1, most) then return true end
  local ok, err = ngx.timer.at(0, sender, L)
  if not ok then
    if L.senders > 0 then return true end
    return nil, err
  end
  L.senders, L.ready = L.senders + 1, L.ready + 1
  return true
end

local function timeout_error(id, seconds)
  return Error.new { kind = "timeout", code = "deadline",
    message = string.format("no answer for %s within %g s (the call's deadline): its batch read was still"
      .. " waiting for HubSpot's rate limit or answer", id, seconds) }
end

-- One caller's share of a batch read: waits for its answer or its deadline (seconds).
local function coalesced(L, client, id, bu, seconds)
  local semaphore = require "ngx.semaphore"
  if not L.arrival then -- made in the worker, at first use
    L.arrival, L.turn = semaphore.new(0), semaphore.new(1)
  end
  local key = bu_text(bu) .. client._lookup.group
  local g = L.groups[key]
  if not g then g = new_group(L, key, bu, client)
  else
    local due = now() + client._lookup.coalesce -- no caller's group waits past its own window
    if due < g.due then g.due = due end
  end
  local list = g.waiters[id]
  if not list then
    list = {}
    g.waiters[id] = list
    g.n = g.n + 1
    g.ids[g.n] = id
    if g.n >= g.size then close_group(L, g) end
  elseif g.answered[id] then -- a part of g went out already, with id: its fresh answer
    return g.answered[id][1], g.answered[id][2]
  end
  local w = { deadline = now() + seconds, sema = semaphore.new(0), client = client }
  list[#list + 1] = w
  local ok, terr = ensure_sender(L, client)
  if not ok then
    w.gone = true
    return nil, Error.new { kind = "network", message = "cannot start the batch reader: " .. tostring(terr) }
  end
  while not w.done and not w.failed do
    local left = w.deadline - now()
    if left <= 0 then break end
    w.sema:wait(left)
  end
  if w.done then return w.answer, w.err end
  w.gone = true
  if w.failed then return nil, Error.new { kind = "network", message = w.failed } end
  return nil, timeout_error(id, seconds)
end

------------------------------------------------------------------ API

-- The tag of an app's entries in a lua_shared_dict cache, the same in every
-- worker: a digest (HMAC-SHA1 under a fixed label, 64 bits in hex) of the
-- text naming the credentials and base URL, so two apps (portals, or the
-- simulator and HubSpot) sharing one dict never read each other's answers,
-- and the dict holds nothing the token could be read back from. Outside
-- nginx a cache is the client's own: "local".
local function app_tag(app)
  if not (app and ngx and ngx.hmac_sha1) then return "local" end
  local d = ngx.hmac_sha1("commprefs cache entries", app)
  return (d:sub(1, 8):gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- The lookup state of a client, or inside nginx of its bundle: the queue,
-- the stores of cached answers, the counts. api_version: the clients';
-- app: the text naming their credentials and base URL (inside nginx), kept
-- only as its digest.
function M.state(api_version, app)
  return {
    prefix = "commprefs:uall:" .. api_version .. ":" .. app_tag(app) .. ":", stores = {}, store_list = {},
    timeout = 0, groups = {}, order = {}, senders = 0, ready = 0, requests = 0, rtt = 0,
    hits = 0, misses = 0, coalesced = 0, -- for the metrics
  }
end

-- A client's view of state with its own options (nil when neither is
-- given): {state =, coalesce =, cache = a Cache with its ttl, group = the
-- key its coalesced reads share a batch under}. Needs client.batch_size,
-- client._timeout and client._profile (its call policy; absent outside nginx).
function M.view(state, client, coalesce, cache)
  if coalesce == nil and cache == nil then return nil end
  state.viewed = true
  if client._timeout > state.timeout then state.timeout = client._timeout end
  return {
    state = state, coalesce = coalesce,
    cache = cache and setmetatable({ store = store_for(state, cache), ttl = cache.ttl, prefix = state.prefix }, Cache),
    group = string.format("|%s|%d", tostring(client._profile), client.batch_size),
  }
end

-- The seconds a lookup may take (commprefs.transport's rule for a single call).
local call_seconds = require("commprefs.transport").call_seconds
local function lookup_seconds(client)
  return call_seconds(client._deadline, client._timeout)
end

-- client:is_unsubscribed_from_all(id, opts) once id and opts are checked.
function M.is_unsubscribed_from_all(client, id, opts)
  local V, L = client._lookup, client._lookup_state
  local cache = V and V.cache
  local bu = opts.business_unit_id
  if bu == nil then bu = client.business_unit_id end
  if cache then
    local hit = cache:get(cache:key(id, bu))
    if hit ~= nil then L.hits = L.hits + 1; return hit end
    L.misses = L.misses + 1
  end
  local seconds = lookup_seconds(client)
  if V and V.coalesce and gathering(client) then
    L.coalesced = L.coalesced + 1
    return coalesced(L, client, id, bu, seconds or client._timeout)
  end
  local started = L.store_list[1] and now() -- the clock read only when an answer is to be remembered
  local env, err = client:_get_unsubscribe_all(id, opts, seconds)
  if not env then return nil, err end
  local answer = answer_of(env.results)
  if L.store_list[1] then remember_all(L, id, bu, answer, started or now()) end
  return answer
end

-- client:_cache_note(id, bu, unsubscribed): see the top of the file.
function M.note(client, id, bu, unsubscribed)
  local L = client._lookup_state
  if not L.store_list[1] then return end
  if bu == nil then bu = client.business_unit_id end
  note(L, id, bu, unsubscribed)
end

-- After a batch change of ids (env: its envelope or the partial one, may be
-- nil). unsubscribe = true (unsubscribe-all): ids in the results are now
-- unsubscribed in business unit bu, the others are forgotten. false (status
-- writes that may resubscribe): every id is forgotten in the business unit
-- its results name and in bu.
function M.note_batch(client, ids, bu, env, unsubscribe)
  local L = client._lookup_state
  if not L.store_list[1] then return end
  if bu == nil then bu = client.business_unit_id end
  local done = {}
  for _, r in ipairs(type(env) == "table" and env.results or {}) do
    local id = type(r) == "table" and r.subscriberIdString
    if type(id) == "string" then
      if unsubscribe then
        note(L, id, bu, true)
        done[id] = true
      elseif type(r.businessUnitId) == "number" then
        note(L, id, r.businessUnitId, nil)
      end
    end
  end
  for _, id in ipairs(ids) do
    if not done[id] then note(L, id, bu, nil) end
  end
end

-- For client:stats() and the metrics, the counts of the client's state (its
-- bundle's inside nginx: every client of it tells the same; nil when no
-- client of it has either option): entries held in process (nil with only
-- a shared dict), batch reads sent, cache hits and misses, coalesced reads.
function M.stats(client)
  local L = client._lookup_state
  if not L.viewed then return nil end
  local store = L.stores.memory
  return { cache_entries = store and store:count() or nil, batch_reads = L.requests,
    cache_hits = L.hits, cache_misses = L.misses, coalesced_reads = L.coalesced }
end

return M
