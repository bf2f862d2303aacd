-- commprefs.worker: drains a Redis Stream of addresses through a commprefs
-- client, at HubSpot's rate, with exactly one result per source entry. Owns
-- reading the stream with a consumer group, taking over entries left pending
-- by dead consumers, checking entries, one batch request per batch, and the
-- one atomic step that appends results and acknowledges entries. The CLI's
-- `commprefs worker` is a thin shell around it.
--
--   local worker = require "commprefs.worker"
--   local w = worker.new(client, {
--     redis = "redis://127.0.0.1:6379",  -- or connect = function() return conn end
--     stream = "unsubs", group = "commprefs", results = "unsubs:results",
--     consumer = nil,        -- default "<hostname>-<pid>"; a restart with the same name
--                            -- resumes its own pending entries at once
--     op = "unsubscribe-all",-- or "status"
--     batch_size = nil,      -- default client.batch_size (ids per request)
--     business_unit_id = nil,-- default the client's
--     block = 1,             -- seconds one blocking read waits for new entries
--     fill_wait = 0.05,      -- seconds a partial batch waits to fill
--     claim_idle = 30,       -- seconds an entry stays pending before another worker takes it over
--     redis_wait = 30,       -- seconds Redis may stay unreachable before run() gives up
--     max_deliveries = 5,    -- deliveries of an entry whose batch keeps failing for a passing
--                            -- reason (network, 5xx, 429, ...) before it is dead-lettered
--     dead_letter = nil,     -- the dead-letter stream (id, entry, error, deliveries); without
--                            -- one, such an entry gets a failed result instead
--   })
--   local summary, err = w:run{
--     idle_exit = 5,         -- return once nothing was read for 5 s and nothing is pending
--                            -- in the group (nil: run until stop)
--     stop = function() return false end,  -- polled between batches (ngx.worker.exiting)
--     signals = true,        -- plain Lua: SIGINT/SIGTERM stop it the same way (the CLI)
--     on_progress = function(summary) end,
--     on_event = function(name, info) end, -- "redis_lost", "redis_back", "hold", "tick", ...
--   }
--   -- summary: read (deliveries read), results, duplicates (commits skipped: the entry
--   -- had its result), failed, bad, missing, dead, redelivered, batches, claimed,
--   -- removed_consumers, reconnects, elapsed, signal, the op's counts, and
--   -- stopped = "idle" | "stop" | "signal" | "daily_limit" | "budget" | "interrupted";
--   -- nil, err (err.summary) when Redis stayed unreachable for redis_wait seconds.
--   w:close()
--
-- Stopping finishes and commits what is in flight; batches a stop leaves
-- unanswered (daily limit, budget, a second signal) stay pending and are
-- made claimable at once. Inside nginx (the client's cosocket transport) the
-- worker reads, sends and commits in rounds of max_concurrency (or 8) batches.
--
-- Each entry carries the address in its field `id`. For every entry exactly
-- one entry is appended to the results stream: `id`, `entry` (the source
-- entry's id), `outcome` (changed/unchanged/failed for unsubscribe-all,
-- unsubscribed/subscribed/failed for status; missing for an entry deleted
-- from the stream while pending) and `error` when failed or missing; or one
-- to the dead-letter stream. A batch failing for a passing reason (M.passing)
-- leaves its entries pending: the worker pauses, then delivers them again.
--
-- Exactly once: results are appended by one server-side script (SETTLE below)
-- that, per entry, XACKs it and appends its result or dead letter only when
-- the XACK took it off the group's pending list. The pending list is the
-- record of "not settled yet": an entry acknowledged has its result, one
-- pending has none, and the script makes a second one impossible whoever
-- commits second (a worker
-- whose entries were taken over while it was slow, a commit retried after a
-- lost connection). A worker killed at any moment leaves its uncommitted
-- entries pending: it resumes them itself when restarted under the same
-- consumer name, and any worker takes them over with XAUTOCLAIM once they
-- have been idle claim_idle seconds. Re-sending to HubSpot is harmless (the
-- operations are idempotent); the results are not duplicated.
--
-- Connections: `redis = URL` uses commprefs.core's blocking hiredis connection
-- (plain Lua, `commprefs run` scripts); `connect = function() return conn end`
-- takes any connection with the same `conn:command(argv)` method (e.g.
-- commprefs.ngx.redis in an OpenResty timer, where the client's transport is
-- the cosocket one). A lost connection is reopened for up to redis_wait
-- seconds; a read retried after a reconnect first re-reads this consumer's
-- own pending entries, so nothing delivered during the outage is stranded.
local core = require "commprefs.core"
local ops = require "commprefs.ops"
local ids_rule = require "commprefs.ids"
local outcome = require("commprefs.response").outcome
local redis_eval = require "commprefs.redis_eval"
local id_after -- below

local M = {}

M.MAX_ENTRY = 1024 -- bytes of an entry (field names and values) accepted
M.MISSING = "the entry was deleted from the stream before it had a result"
M.HOLD_MAX = 30 -- the longest pause (s) after batches failed for a passing reason

local OPS = {
  ["unsubscribe-all"] = "unsubscribe_all",
  status = "get_unsubscribe_all_status",
}

-- The one atomic step that settles entries of a batch. KEYS[1] the source
-- stream, KEYS[2] the results stream, KEYS[3] the dead-letter stream (the
-- results stream again when there is none); ARGV[1] the group, ARGV[2] this
-- consumer, ARGV[3] max_deliveries, ARGV[4] "1" when KEYS[3] is a dead-letter
-- stream; then per entry: entry id, address, outcome, error ("" when none),
-- and "final" (the outcome is the answer) or "again" (a passing failure:
-- the entry stays pending for another delivery unless it has been delivered
-- max_deliveries times: then it is dead-lettered with its error, or without
-- a dead-letter stream gets a failed result). Returns per entry 1 (result
-- appended), 2 (dead-lettered), 3 (left pending) or 0 (it already had its
-- result or dead letter, or another consumer has it now). A result or dead
-- letter is appended only for an entry this call took off the pending list
-- (XACK), so no entry ever gets two, whoever commits second. The types of the
-- streams written are checked before the first write, so an error can never
-- leave a batch half settled.
M.SETTLE = [==[
for k = 2, 3 do
  local t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. t .. ', not a stream')
  end
end
local group, me, max, dead = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local out = {}
for i = 5, #ARGV, 5 do
  local entry, id, outcome, err, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local r = 0
  if mode == 'again' then
    local p = redis.call('XPENDING', KEYS[1], group, entry, entry, 1)
    if p[1] and p[1][2] == me then
      local deliveries = tonumber(p[1][4])
      if deliveries < max then
        r = 3
      elseif redis.call('XACK', KEYS[1], group, entry) == 1 then
        if dead then
          redis.call('XADD', KEYS[3], '*', 'id', id, 'entry', entry, 'error', err, 'deliveries', deliveries)
          r = 2
        else
          redis.call('XADD', KEYS[2], '*', 'id', id, 'entry', entry, 'outcome', 'failed',
            'error', err .. ' (after ' .. deliveries .. ' deliveries)')
          r = 1
        end
      end
    end
  elseif redis.call('XACK', KEYS[1], group, entry) == 1 then
    if err == '' then
      redis.call('XADD', KEYS[2], '*', 'id', id, 'entry', entry, 'outcome', outcome)
    else
      redis.call('XADD', KEYS[2], '*', 'id', id, 'entry', entry, 'outcome', outcome, 'error', err)
    end
    r = 1
  end
  out[#out + 1] = r
end
return out
]==]

-- Takes over entries idle for ARGV[3] ms in other consumers' pending lists
-- (XAUTOCLAIM from cursor ARGV[4], at most ARGV[5]). Entries deleted from the
-- stream meanwhile (XTRIM, XADD MAXLEN) leave the pending list in this same
-- step (Redis 7 returns their ids apart): each gets its `missing` result here,
-- so none is lost whatever happens to this worker next. When the scan is
-- complete, consumers with nothing pending that were idle that long (dead
-- workers, restarts under a new name) are removed from the group. KEYS[1]
-- the stream, KEYS[2] the results; ARGV[1] the group, ARGV[2] this consumer.
-- Returns {cursor, entries, missing, removed consumers}.
M.CLAIM = [==[
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' holds a ' .. t .. ', not a stream')
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local gone = r[3] or {}
for _, entry in ipairs(gone) do
  redis.call('XADD', KEYS[2], '*', 'id', '', 'entry', entry, 'outcome', 'missing',
    'error', 'the entry was deleted from the stream before it had a result')
end
local removed = {}
if r[1] == '0-0' then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f.name ~= ARGV[2] and tonumber(f.pending) == 0 and tonumber(f.idle) > tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f.name)
      removed[#removed + 1] = f.name
    end
  end
end
return { r[1], r[2], #gone, removed }
]==]

------------------------------------------------------------------ checks

-- Raises a mistake of worker.new's caller (depth: helpers between it and new).
local function raise(msg, depth) error("commprefs.worker.new: " .. msg, 3 + (depth or 0)) end

local function check_name(opts, k, required, depth)
  local v = opts[k]
  if v == nil and not required then return nil end
  if type(v) ~= "string" or v == "" or core.has_control(v) then
    raise("bad option '" .. k .. "' (non-empty string without control characters expected)", 1 + (depth or 0))
  end
  return v
end

local function check_seconds(opts, k, default, allow_zero, depth)
  local v = opts[k]
  if v == nil then return default end
  if type(v) ~= "number" or v < 0 or (v == 0 and not allow_zero) or v ~= v then
    raise("bad option '" .. k .. "' (" .. (allow_zero and "non-negative" or "positive") .. " number of seconds expected)",
      1 + (depth or 0))
  end
  return v
end

local ALLOWED = { redis = true, connect = true, redis_timeout = true, stream = true, group = true,
  results = true, consumer = true, op = true, batch_size = true, business_unit_id = true, block = true,
  fill_wait = true, claim_idle = true, redis_wait = true, max_deliveries = true, dead_letter = true }

-- Why an entry cannot be sent (nil when it can), and its address: the id
-- as commprefs.ids takes an address (trimmed; the field as it was when bad).
-- fields: the flat {name, value, ...} array Redis returns.
function M.check_entry(fields)
  local id, size = nil, 0
  if type(fields) ~= "table" then return M.MISSING end
  for i = 1, #fields - 1, 2 do
    local k, v = fields[i], fields[i + 1]
    size = size + #tostring(k) + #tostring(v)
    if k == "id" and id == nil then id = v end
  end
  if id == nil then return "the entry has no field 'id'" end
  id = tostring(id)
  if size > M.MAX_ENTRY then
    return string.format("the entry is %d bytes, over the %d-byte limit", size, M.MAX_ENTRY), id:sub(1, M.MAX_ENTRY)
  end
  local address, why = ids_rule.address(id)
  if not address then return "field 'id': " .. why, id end
  return nil, address
end

local function default_consumer()
  local host
  local f = io.open("/proc/sys/kernel/hostname")
  if f then host = f:read("*l"); f:close() end
  local pid
  f = io.open("/proc/self/stat")
  if f then pid = f:read("*l"):match("^(%d+)"); f:close() end
  return (host or "host") .. "-" .. (pid or tostring(math.random(1, 1e9)))
end

------------------------------------------------------------------ the worker

local Worker = {}
Worker.__index = Worker
Worker.__name = "commprefs.worker"

-- The function that opens a connection: opts.connect, or one over
-- core.redis_connect for opts.redis (checked here with the one URL parser,
-- which never echoes the password).
local function connector(opts, block)
  local connect = opts.connect
  if connect ~= nil and type(connect) ~= "function" then raise("bad option 'connect' (function expected)", 1) end
  if (connect == nil) == (opts.redis == nil) then raise("give exactly one of 'redis' (a URL) and 'connect'", 1) end
  if connect then return connect end
  local timeout = check_seconds(opts, "redis_timeout", 5, false, 1)
  local url = check_name(opts, "redis", true, 1)
  local ok, why = pcall(core.redis_url, url)
  if not url:match("^redis://") or not ok then
    raise("bad option 'redis' (redis://[user:pass@]host:port[/db] expected" ..
      (why and not ok and (": " .. tostring(why):match("%(([^()]*)%)%s*$") or "") or "") .. ")", 1)
  end
  return function()
    return core.redis_connect(url, { connect_timeout = timeout, timeout = timeout + block })
  end
end

local function check_deliveries(opts)
  local n = opts.max_deliveries
  if n == nil then return 5 end
  if type(n) ~= "number" or n ~= math.floor(n) or n < 1 or n > 1000 then
    raise("bad option 'max_deliveries' (integer from 1 to 1000 expected)", 1)
  end
  return n
end

function M.new(client, opts)
  if type(client) ~= "table" or type(client._perform) ~= "function" then
    raise("bad argument 'client' (a commprefs client expected)")
  end
  if type(opts) ~= "table" then raise("bad argument 'opts' (table expected, got " .. type(opts) .. ")") end
  for k in pairs(opts) do
    if not ALLOWED[k] then raise("unknown option '" .. tostring(k) .. "'") end
  end
  local block = check_seconds(opts, "block", 1)
  local connect = connector(opts, block)
  local opname = OPS[opts.op or "unsubscribe-all"]
  if not opname then raise("bad option 'op' (\"unsubscribe-all\" or \"status\" expected)") end
  local size = opts.batch_size or client.batch_size or 100
  if type(size) ~= "number" or size ~= math.floor(size) or size < 1 then
    raise("bad option 'batch_size' (positive integer expected)")
  end
  size = math.floor(size) -- an integer on Lua 5.4 too: it is sent as COUNT
  local bu = opts.business_unit_id or client.business_unit_id or 0
  if type(bu) ~= "number" or bu ~= math.floor(bu) or bu < 0 then raise("bad option 'business_unit_id' (integer expected)") end
  local op = ops.BATCH[opname]
  local w = setmetatable({
    client = client, op = op, opname = opname,
    stream = check_name(opts, "stream", true), group = check_name(opts, "group", true),
    results = check_name(opts, "results", true), dead_letter = check_name(opts, "dead_letter"),
    consumer = check_name(opts, "consumer") or default_consumer(),
    max_deliveries = check_deliveries(opts),
    batch_size = size, block_ms = math.floor(block * 1000),
    fill_ms = math.floor(check_seconds(opts, "fill_wait", 0.05, true) * 1000),
    claim_idle_ms = math.floor(check_seconds(opts, "claim_idle", 30) * 1000),
    redis_wait = check_seconds(opts, "redis_wait", 30, true),
    url = client._prefix .. op.path .. ops.query(true, bu),
    held = {},           -- entry id -> true while its batch is in flight here
    recover = true,      -- the next read re-reads this consumer's own pending entries
    claim_cursor = "0-0", claim_due = 0,
    hold_until = 0,      -- no new delivery before this time (after passing failures)
    failing = 0,         -- batches in a row that failed for a passing reason
    -- Inside nginx the client sends through cosockets in light threads, and its
    -- callbacks must not yield on a socket of their own (lua-nginx-module would
    -- hand a finished thread's results to that socket operation): there the
    -- worker reads a round of batches, sends them together, then commits them.
    rounds = ngx ~= nil and client:_has_cosockets(), round_size = client.max_concurrency or 8,
  }, Worker)
  if w.stream == w.results then raise("the results stream must not be the source stream") end
  if w.dead_letter and (w.dead_letter == w.stream or w.dead_letter == w.results) then
    raise("the dead-letter stream must be neither the source nor the results stream")
  end
  w.redis = redis_eval.new { connect = connect, wait = w.redis_wait,
    stop = function() return w.stop ~= nil and w.stop() end,
    on_event = function(name, info) w:_event(name, info) end }
  w.redis.on_open = function() w.recover = true end -- a read may have been delivered and its reply lost
  w.summary = { read = 0, results = 0, duplicates = 0, failed = 0, bad = 0, missing = 0, dead = 0,
    redelivered = 0, batches = 0, claimed = 0, reconnects = 0, removed_consumers = 0 }
  for _, k in ipairs(op.counts) do w.summary[k] = 0 end
  return w
end

function Worker:__tostring()
  return string.format("commprefs.worker: %s -> %s (group %s, consumer %s)", self.stream, self.results,
    self.group, self.consumer)
end

function Worker:close() self.redis:close() end
Worker.__close = Worker.close

function Worker:_event(name, info)
  if self.on_event then self.on_event(name, info or {}) end
end

------------------------------------------------------------------ redis

local sleep = redis_eval.sleep

-- Sleeps up to `seconds`, in steps short enough to notice stop() at once.
function Worker:_pause(seconds)
  local until_t = core.now() + seconds
  while core.now() < until_t do
    if self.stop and self.stop() then return false end
    sleep(math.min(0.1, until_t - core.now()))
  end
  return true
end

-- How a signal meets a wait for Redis (plain Lua: csrc/redis.c). A blocking
-- read stops at the first SIGINT/SIGTERM, so an idle worker stops at once;
-- every other command is finished despite one signal (a second stops it):
-- a commit or a read cut short by the signal that stops the worker would
-- leave entries pending that nobody settles.
local FINISH = { stop_after_signals = 2 }
local STOP_AT_SIGNAL = { stop_after_signals = 1 }

function Worker:_call(argv, opts)
  local reply, err, code = self.redis:call(argv, opts or FINISH)
  self.summary.reconnects = self.redis.reconnects
  return reply, err, code
end

function Worker:_eval(script, keys, args)
  local reply, err, code = self.redis:eval(script, keys, args, FINISH)
  self.summary.reconnects = self.redis.reconnects
  return reply, err, code
end

-- The group is missing. It is created (at 0: every entry of the stream) only
-- when it can never have existed: nothing in the results or dead-letter
-- stream. Otherwise creating it again would give old entries a second
-- result: the worker stops with an error that says where to recreate it.
function Worker:_missing_group()
  local last
  for _, key in ipairs { self.results, self.dead_letter } do
    local reply, err = self:_call({ "XREVRANGE", key, "+", "-", "COUNT", "1" })
    if not reply then return nil, err end
    if type(reply) ~= "table" then return nil, redis_eval.bad_reply("XREVRANGE") end
    if reply[1] then
      local e = reply[1]
      local fields = type(e) == "table" and e[2] or {}
      for i = 1, #fields - 1, 2 do
        if fields[i] == "entry" and (not last or id_after(fields[i + 1], last)) then last = fields[i + 1] end
      end
      last = last or "$"
    end
  end
  if last then
    return nil, redis_eval.error(string.format("the consumer group '%s' of stream '%s' is gone, but results of it"
      .. " exist: creating it again at 0 would give old entries a second result. Recreate it after the last"
      .. " entry with a result (redis-cli XGROUP CREATE %s %s %s) and start the worker again",
      self.group, self.stream, self.stream, self.group, last), "NOGROUP")
  end
  local _, err, code = self:_call({ "XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM" })
  if err and code ~= "BUSYGROUP" then return nil, err end
  if not err then self:_event("group_created", { group = self.group, stream = self.stream }) end
  return true
end

-- A command that needs the group (see _missing_group when it is missing).
function Worker:_group_call(argv, script_keys, script_args, opts)
  local function once()
    if script_keys then return self:_eval(argv, script_keys, script_args) end
    return self:_call(argv, opts)
  end
  local reply, err, code = once()
  if code == "NOGROUP" then
    local ok, gerr = self:_missing_group()
    if not ok then return nil, gerr, "NOGROUP" end
    reply, err, code = once()
  end
  return reply, err, code
end

local NULL = core.redis_null

-- Whether stream id a ("ms-seq") comes after b.
id_after = function(a, b)
  local am, as = tostring(a):match("^(%d+)%-(%d+)$")
  local bm, bs = tostring(b):match("^(%d+)%-(%d+)$")
  if not am or not bm then return false end
  if #am ~= #bm then return #am > #bm end
  if am ~= bm then return am > bm end
  if #as ~= #bs then return #as > #bs end
  return as > bs
end

-- The {id, fields} pairs of a list of entries, checked: nil when its shape is wrong.
local function entry_list(list)
  if type(list) ~= "table" then return nil end
  for _, e in ipairs(list) do
    if type(e) ~= "table" or type(e[1]) ~= "string" or not e[1]:match("^%d+%-%d+$")
      or (type(e[2]) ~= "table" and e[2] ~= NULL) then return nil end
  end
  return list
end

-- The entries of an XREADGROUP reply for one stream, or nil when its shape is wrong.
local function stream_entries(reply)
  if reply == NULL then return {} end
  if type(reply) ~= "table" then return nil end
  if reply[1] == nil then return {} end
  if type(reply[1]) ~= "table" or reply[1][1] ~= nil and type(reply[1][1]) ~= "string" then return nil end
  return entry_list(reply[1][2])
end

-- A wrong-shaped reply: the connection is dropped (a proxy or a fake may be
-- out of step) and the caller backs off.
function Worker:_bad_reply(what)
  self.redis:drop()
  return nil, redis_eval.bad_reply(what)
end

------------------------------------------------------------------ reading

-- This consumer's own pending entries after a (re)start, a reconnect or a
-- pause (redelivery), paged past what is in flight here. Entry ids must go
-- up: a reply repeating one is a bad reply, never a loop.
function Worker:_read_own(n, out)
  while self.recover do
    local reply, err, code = self:_group_call({ "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT",
      tostring(n), "STREAMS", self.stream, self.recover_from or "0" })
    if not reply then return nil, err, code end
    local list = stream_entries(reply)
    if not list then return self:_bad_reply("XREADGROUP") end
    for _, e in ipairs(list) do
      if self.recover_from and not id_after(e[1], self.recover_from) then return self:_bad_reply("XREADGROUP (an entry id repeated)") end
      self.recover_from = e[1]
      if not self.held[e[1]] then out[#out + 1] = e; self.summary.redelivered = self.summary.redelivered + 1 end
    end
    if #list == 0 then self.recover, self.recover_from = false, nil end
    if #out > 0 then return out end
  end
  return out
end

-- Entries idle for claim_idle in other consumers' lists (the CLAIM script).
function Worker:_read_claimed(n, out)
  local reply, err, code = self:_group_call(M.CLAIM, { self.stream, self.results }, { self.group, self.consumer,
    tostring(self.claim_idle_ms), self.claim_cursor, tostring(n) })
  if not reply then return nil, err, code end
  if type(reply) ~= "table" or type(reply[1]) ~= "string" or not entry_list(reply[2]) then
    return self:_bad_reply("the claim script")
  end
  self.claim_cursor = reply[1]
  if self.claim_cursor == "0-0" then -- the whole pending list was scanned
    self.claim_due = core.now() + math.min(self.claim_idle_ms / 2000, 1)
  end
  local s = self.summary
  s.missing = s.missing + (tonumber(reply[3]) or 0)
  s.results = s.results + (tonumber(reply[3]) or 0)
  if type(reply[4]) == "table" and #reply[4] > 0 then
    s.removed_consumers = s.removed_consumers + #reply[4]
    self:_event("consumers_removed", { names = reply[4] })
  end
  for _, e in ipairs(reply[2]) do
    if not self.held[e[1]] then out[#out + 1] = e; s.claimed = s.claimed + 1 end
  end
  return out
end

-- Up to n entries: this consumer's own pending ones when due (after a
-- (re)start, a reconnect, a pause), then entries idle for claim_idle in
-- other consumers' lists, then new ones (waiting up to block_ms when given).
-- Nothing while a pause after passing failures lasts.
function Worker:_read(n, block_ms)
  if core.now() < self.hold_until then return {} end
  local out, err, code = self:_read_own(n, {})
  if not out or #out > 0 then return out, err, code end
  if core.now() >= self.claim_due then
    out, err, code = self:_read_claimed(n, out)
    if not out or #out > 0 then return out, err, code end
  end
  local argv = { "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", tostring(n) }
  local blocking = block_ms and block_ms > 0
  if blocking then argv[#argv + 1] = "BLOCK"; argv[#argv + 1] = tostring(block_ms) end
  argv[#argv + 1] = "STREAMS"; argv[#argv + 1] = self.stream; argv[#argv + 1] = ">"
  local reply
  reply, err, code = self:_group_call(argv, nil, nil, blocking and STOP_AT_SIGNAL or FINISH)
  if not reply then return nil, err, code end
  local list = stream_entries(reply)
  if not list then return self:_bad_reply("XREADGROUP") end
  for _, e in ipairs(list) do
    if self.last_new and not id_after(e[1], self.last_new) then return self:_bad_reply("XREADGROUP (an entry id repeated)") end
    self.last_new = e[1]
  end
  return list
end

------------------------------------------------------------------ settling

-- Settles entries ({entry=, id=, outcome=, error=, again=}) in one atomic
-- step (M.SETTLE). Safe to retry: an entry already settled is skipped.
-- Returns the number left pending for another delivery.
function Worker:_commit(results)
  if #results == 0 then return 0 end
  local args = { self.group, self.consumer, tostring(self.max_deliveries), self.dead_letter and "1" or "0" }
  for _, r in ipairs(results) do
    args[#args + 1] = r.entry
    args[#args + 1] = r.id or ""
    args[#args + 1] = r.outcome
    args[#args + 1] = r.error or ""
    args[#args + 1] = r.again and "again" or "final"
  end
  local reply, err, code = self:_eval(M.SETTLE, { self.stream, self.results, self.dead_letter or self.results }, args)
  if code == "NOGROUP" then -- the stream or group vanished (a Redis restarted empty): nothing to acknowledge
    self.summary.lost = (self.summary.lost or 0) + #results
    return 0
  end
  if not reply then return nil, err end
  if type(reply) ~= "table" then return self:_bad_reply("the settle script") end
  local s, again = self.summary, 0
  for i, r in ipairs(results) do
    local v = reply[i]
    if v == 1 then
      s.results = s.results + 1
      local o = r.again and "failed" or r.outcome
      s[o] = (s[o] or 0) + 1
    elseif v == 2 then
      s.dead = s.dead + 1
    elseif v == 3 then
      again = again + 1
    else
      s.duplicates = s.duplicates + 1
    end
  end
  return again
end

-- Splits entries into a batch to send and the ones settled at once: bad
-- entries (a failed result) and entries deleted from the stream (missing).
function Worker:_sort(entries)
  local batch, now, seen = { entries = {}, ids = {} }, {}, {}
  local s = self.summary
  for _, e in ipairs(entries) do
    local why, id = M.check_entry(e[2])
    if why == M.MISSING then
      now[#now + 1] = { entry = e[1], id = "", outcome = "missing", error = why }
    elseif why then
      now[#now + 1] = { entry = e[1], id = id, outcome = "failed", error = why }
      s.bad = s.bad + 1
    else
      batch.entries[#batch.entries + 1] = { entry = e[1], id = id }
      local k = ops.key(id)
      if not seen[k] then seen[k] = true; batch.ids[#batch.ids + 1] = id end
    end
  end
  s.read = s.read + #entries
  local ok, err = self:_commit(now)
  if not ok then return nil, err end
  return #batch.ids > 0 and batch or false
end

-- The next batch to send: false when there is nothing to read now, nil, err
-- when Redis failed. block_ms: how long to wait for a first entry.
function Worker:_gather(block_ms)
  while true do
    if self.stop and self.stop() then return false end
    local entries, err = self:_read(self.batch_size, block_ms)
    if not entries then return nil, err end
    if #entries == 0 then return false end
    if #entries < self.batch_size and self.fill_ms > 0 then
      local more, merr, mcode = self:_read(self.batch_size - #entries, self.fill_ms)
      if not more and mcode ~= "interrupted" then return nil, merr end
      more = more or {} -- a signal ended the wait for more: the batch goes as it is
      for _, e in ipairs(more) do entries[#entries + 1] = e end
    end
    local batch, serr = self:_sort(entries)
    if batch == nil then return nil, serr end
    if batch then
      for _, e in ipairs(batch.entries) do self.held[e.entry] = true end
      return batch
    end
    block_ms = nil -- only bad or missing entries: look again without waiting
  end
end

-- Lets other workers take over entries read but never sent (a stop before
-- sending): they look idle for claim_idle at once.
function Worker:_release(batch)
  local argv = { "XCLAIM", self.stream, self.group, self.consumer, "0" }
  for _, e in ipairs(batch.entries) do argv[#argv + 1] = e.entry; self.held[e.entry] = nil end
  argv[#argv + 1] = "IDLE"; argv[#argv + 1] = tostring(self.claim_idle_ms + 1)
  argv[#argv + 1] = "JUSTID"
  self:_call(argv)
end

-- Whether a failure may pass, so that the entry stays pending for another
-- delivery instead of getting a failed result: what the client's retry
-- policy retries (csrc/policy.c: network, timeouts, 5xx, 429) once its
-- retries are spent, answers that could not be read or did not mention the
-- id, a request not sent (a lost budget), and the request-wide refusals a
-- fixed token or scope heals (401, 403, 408, 423). A per-id answer from
-- HubSpot (an error entry naming the id: kind "item") and other 4xx are final.
function M.passing(err)
  if type(err) ~= "table" then return false end
  local kind = err.kind
  if kind == "network" or kind == "timeout" or kind == "tls" or kind == "decode" or kind == "too_large"
    or kind == "stopped" then return true end
  if kind == "http" then
    local st = tonumber(err.status) or 0
    return st >= 500 or st == 429 or st == 401 or st == 403 or st == 408 or st == 423
  end
  return false
end

-- After batches failed for a passing reason: no new delivery for a while
-- (1 s, doubling per batch failing in a row, at most HOLD_MAX), then this
-- consumer's pending entries are read again first.
function Worker:_hold(entries, err)
  self.failing = self.failing + 1
  local seconds = math.min(2 ^ (self.failing - 1), M.HOLD_MAX)
  self.hold_until = math.max(self.hold_until, core.now() + seconds)
  self.recover, self.recover_from = true, nil
  self:_event("hold", { seconds = seconds, entries = entries, error = err and tostring(err) or nil })
end

-- The outcome of every entry of a batch, from the batch request's result.
function Worker:_settle(batch, res)
  local by_id = {}
  local env, err = outcome({ method = "POST", url = self.url }, res)
  local last_err
  ops.classify(self.op, env, err, batch.ids, function(id, result, detail)
    local again = result == "failed" and M.passing(detail)
    if again then last_err = detail end -- the batch failed (in part) for a passing reason
    by_id[ops.key(id)] = { outcome = result, error = result == "failed" and tostring(detail) or nil, again = again }
  end)
  local results = {}
  for i, e in ipairs(batch.entries) do
    local o = by_id[ops.key(e.id)]
    results[i] = { entry = e.entry, id = e.id, outcome = o.outcome, error = o.error, again = o.again }
  end
  local again, cerr = self:_commit(results)
  for _, e in ipairs(batch.entries) do self.held[e.entry] = nil end
  self.summary.batches = self.summary.batches + 1
  if not again then return nil, cerr end
  if again > 0 then self:_hold(again, last_err)
  elseif not last_err then self.failing = 0 end -- answered: pauses start from 1 s again
  return true
end

------------------------------------------------------------------ running

local function perform(client, source, on_done)
  return client:_perform(source, on_done)
end

-- Sends batches, as many in flight as the client allows: the batches of
-- `ready` first, then (when gather) new ones, until nothing is left to read
-- now, stop() says so, or Redis fails for good. Returns the fatal Redis
-- error or nil, perform's stop reason or nil, and the batches it stopped
-- before they were answered.
function Worker:_drain(ready, gather, stop, on_progress)
  local batches, seq, fatal, stopped, unanswered, answered = {}, 0, nil, nil, {}, {}
  if self.rounds and gather then -- cosockets: read a round of batches first (see M.new)
    while #ready < self.round_size and not stop() do
      local batch, err = self:_gather(nil)
      if batch == nil then return err, nil, ready end
      if not batch then break end
      ready[#ready + 1] = batch
    end
    gather = false
  end
  local function generate()
    if fatal or stopped then return nil end
    local batch = table.remove(ready, 1) -- read already: sent even after stop()
    if not batch and gather and not stop() and core.now() >= self.hold_until then
      local err
      batch, err = self:_gather(nil)
      if batch == nil and not (type(err) == "table" and err.code == "interrupted") then fatal = err end
    end
    if not batch then return nil end
    seq = seq + 1
    batches[seq] = batch
    return ops.batch_request(self.url, batch.ids)
  end
  local function on_done(i, res)
    local batch = batches[i]
    batches[i] = nil
    if res.stopped or res.daily_limit then -- not answered: the daily limit, the budget, an interrupt
      stopped = stopped or res.stopped or "daily_limit"
      self.summary.stop_message = self.summary.stop_message or res.message -- why, when the budget says
      unanswered[#unanswered + 1] = batch
      return
    end
    if self.rounds then answered[#answered + 1] = { batch, res }; return end
    local ok, err = self:_settle(batch, res)
    if not ok then fatal = fatal or err end
    if on_progress then on_progress(self.summary) end
  end
  local ok, perr, reason = pcall(perform, self.client, generate, on_done)
  if not ok then
    for _, b in pairs(batches) do self:_release(b) end -- whatever stopped perform, let others take these
    error(perr, 0)
  end
  for _, a in ipairs(answered) do
    local sok, err = self:_settle(a[1], a[2])
    if not sok then fatal = fatal or err end
    if on_progress then on_progress(self.summary) end
  end
  for _, b in ipairs(ready) do unanswered[#unanswered + 1] = b end
  return fatal, stopped or (type(perr) == "string" and perr or reason), unanswered
end

-- Drains from first on; on a signal (signals = true), finishes the batches
-- the signal stopped in one more perform (a second signal abandons them).
-- Batches left unanswered are released to the group.
function Worker:_drain_all(first, stop, on_progress, signals)
  local fatal, reason, unanswered = self:_drain({ first }, true, stop, on_progress)
  if reason == "interrupted" and signals and not fatal and #unanswered > 0 then
    self.signal = self.signal or core.caught_signal()
    core.trap_signals(true) -- clears the flag: a second signal stops this last perform too
    fatal, reason, unanswered = self:_drain(unanswered, false, function() return false end, on_progress)
    if reason == "interrupted" then self.signal = core.caught_signal() or self.signal end
  end
  for _, b in ipairs(unanswered) do self:_release(b) end
  return fatal, reason
end

-- The number of entries pending in the whole group (0 when it does not exist).
function Worker:_group_pending()
  local reply, err, code = self:_call({ "XPENDING", self.stream, self.group })
  if code == "NOGROUP" then return 0 end
  if not reply then return nil, err end
  if type(reply) ~= "table" or type(reply[1]) ~= "number" then
    return self:_bad_reply("XPENDING")
  end
  return tonumber(reply[1]) or 0
end

-- What is left for the group: entries pending (delivered, not settled) and
-- its lag (entries not yet delivered; nil when Redis cannot tell), or nil.
-- Never waits for Redis: nil at once while it is lost (the worker's own
-- commands wait for it); reconnect = true tries once to open a connection
-- when there is none (after run() has ended).
function Worker:backlog(reconnect)
  local reply = self.redis:try({ "XINFO", "GROUPS", self.stream }, FINISH, reconnect)
  if type(reply) ~= "table" then return nil end
  for _, g in ipairs(reply) do
    if type(g) == "table" then
      local f = {}
      for i = 1, #g - 1, 2 do f[g[i]] = g[i + 1] end
      if f.name == self.group then return tonumber(f.pending), tonumber(f.lag) end
    end
  end
  return nil
end

-- A Redis failure that run() waits out (interruptibly, up to redis_wait)
-- instead of stopping: a reply of the wrong shape.
function Worker:_wait_out(err)
  local now = core.now()
  self.bad_since = self.bad_since or now
  if now - self.bad_since >= self.redis_wait then return false end
  self.bad_delay = math.min((self.bad_delay or 0.05) * 2, 2)
  self:_event("bad_reply", { error = tostring(err), wait = self.bad_delay })
  return self:_pause(self.bad_delay)
end

-- Runs until stop() returns true (checked between batches; the batches in
-- flight are finished and committed first), until nothing was read for
-- idle_exit seconds and nothing is pending in the group, or until HubSpot's
-- daily limit or the shared budget stops the client. opts.signals = true
-- (plain Lua, the CLI): SIGINT and SIGTERM are caught for the run and stop
-- it the same way (summary.signal: their number). opts.on_event(name, info)
-- hears "redis_lost", "redis_back", "hold", "bad_reply", "group_created",
-- "consumers_removed" and, about once a second or per batch, "tick".
-- Returns the summary, or nil, err (err.summary) when Redis stayed
-- unreachable for redis_wait seconds or the group is gone: what was not
-- settled stays pending for the next run.
function Worker:run(opts)
  opts = opts or {}
  local user_stop = opts.stop or function() return false end
  local signals = opts.signals and not ngx
  local idle_exit = opts.idle_exit
  if idle_exit ~= nil and (type(idle_exit) ~= "number" or idle_exit < 0) then
    error("commprefs.worker:run: bad option 'idle_exit' (seconds expected)", 2)
  end
  local function stop()
    if signals and (self.signal or core.caught_signal()) then self.signal = self.signal or core.caught_signal(); return true end
    return user_stop()
  end
  if signals then core.trap_signals(true) end
  self.stop = stop -- also ends a wait for Redis
  self.on_event = opts.on_event
  local s = self.summary
  local started = core.now()
  local idle_since = started
  local function finish(reason, err)
    if signals then core.trap_signals(false) end
    self.stop = nil
    s.elapsed = core.now() - started
    s.signal = self.signal
    s.stopped = self.signal and "signal" or reason
    if err and not self.signal then err.summary = s; return nil, err end
    return s
  end
  local on_progress = opts.on_progress
  local function progress(sum)
    if on_progress then on_progress(sum) end
    self:_event("tick", sum)
  end
  while true do
    if stop() then return finish("stop") end
    self:_event("tick", s)
    if core.now() < self.hold_until then
      self:_pause(math.min(self.hold_until - core.now(), 1))
    else
      local block = self.block_ms
      if idle_exit then block = math.max(1, math.min(block, math.floor((idle_since + idle_exit - core.now()) * 1000))) end
      local read_before = s.read
      local batch, err = self:_gather(block)
      if batch == nil then
        if stop() then return finish("stop") end
        if not (type(err) == "table" and err.code == "bad_reply" and self:_wait_out(err)) then
          return finish("redis", err)
        end
      else
        self.bad_since, self.bad_delay = nil, nil
        if batch then
          local fatal, reason = self:_drain_all(batch, stop, progress, signals)
          if fatal then
            if stop() then return finish("stop") end
            if not (type(fatal) == "table" and fatal.code == "bad_reply" and self:_wait_out(fatal)) then
              return finish("redis", fatal)
            end
          end
          if reason then return finish(reason) end
        elseif s.read > read_before and on_progress then
          on_progress(s)
        end
        if s.read > read_before then
          idle_since = core.now()
        elseif idle_exit and core.now() - idle_since >= idle_exit then
          local pending, perr = self:_group_pending()
          if not pending then
            if not (type(perr) == "table" and perr.code == "bad_reply" and self:_wait_out(perr)) then
              return finish("redis", perr)
            end
          elseif pending == 0 then return finish("idle")
          else idle_since = core.now() - idle_exit + math.min(idle_exit, 1) end -- look again in a second
        end
      end
    end
  end
end

return M
