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
--   })
--   local summary, err = w:run{
--     idle_exit = 5,         -- return once nothing was read for 5 s and nothing is pending
--                            -- in the group (nil: run until stop)
--     stop = function() return false end,  -- polled between batches (ngx.worker.exiting)
--     signals = true,        -- plain Lua: SIGINT/SIGTERM stop it the same way (the CLI)
--     on_progress = function(summary) end,
--   }
--   -- summary: read, results, duplicates (commits skipped: the entry had its result),
--   -- failed, bad, batches, claimed, reconnects, elapsed, signal, the op's counts, and
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
-- unsubscribed/subscribed/failed for status) and `error` when failed.
--
-- Exactly once: results are appended by one server-side script (COMMIT below)
-- that, per entry, XACKs it and appends its result only when the XACK took it
-- off the group's pending list. The pending list is the record of "no result
-- yet": an entry acknowledged has its result, one pending has none, and the
-- script makes a second result impossible whoever commits second (a worker
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
local Error = require "commprefs.error"
local ops = require "commprefs.ops"
local outcome = require("commprefs.response").outcome

local M = {}

M.MAX_ENTRY = 1024 -- bytes of an entry (field names and values) accepted

local OPS = {
  ["unsubscribe-all"] = "unsubscribe_all",
  status = "get_unsubscribe_all_status",
}

-- KEYS[1] the source stream, KEYS[2] the results stream; ARGV[1] the group,
-- then per entry: entry id, address, outcome, error ("" when none). Returns
-- per entry 1 (result appended) or 0 (it already had one). A result is
-- appended only for an entry this call took off the pending list.
-- The results key's type is checked before the first write, so an error can
-- never leave a batch half committed.
M.COMMIT = [[
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE the results key holds a ' .. t .. ', not a stream')
end
local added = {}
for i = 2, #ARGV, 4 do
  added[#added + 1] = 0
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    if ARGV[i + 3] == '' then
      redis.call('XADD', KEYS[2], '*', 'id', ARGV[i + 1], 'entry', ARGV[i], 'outcome', ARGV[i + 2])
    else
      redis.call('XADD', KEYS[2], '*', 'id', ARGV[i + 1], 'entry', ARGV[i], 'outcome', ARGV[i + 2],
        'error', ARGV[i + 3])
    end
    added[#added] = 1
  end
end
return added
]]

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
  fill_wait = true, claim_idle = true, redis_wait = true }

-- Valid UTF-8 (utf8.len where there is one: LuaJIT has none).
local function valid_utf8(s)
  if utf8 and utf8.len then return utf8.len(s) ~= nil end
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len = c < 0x80 and 1 or (c >= 0xC2 and c < 0xE0) and 2 or (c >= 0xE0 and c < 0xF0) and 3
      or (c >= 0xF0 and c < 0xF5) and 4 or nil
    if not len or i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local b = s:byte(j)
      if b < 0x80 or b > 0xBF then return false end
    end
    i = i + len
  end
  return true
end

-- Why an entry cannot be sent (nil when it can), and its address.
-- fields: the flat {name, value, ...} array Redis returns.
function M.check_entry(fields)
  local id, size = nil, 0
  if type(fields) ~= "table" then return "the entry has no fields (deleted from the stream)" end
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
  if id == "" then return "field 'id' is empty", id end
  if not valid_utf8(id) then return "field 'id' is not valid UTF-8", id end
  if core.has_control(id) or id:find("%c") then return "field 'id' contains control characters", id end
  if id:find("%s") then return "field 'id' contains spaces", id end
  if not id:match("^[^@]+@[^@]+%.[^@.]+$") then return "field 'id' is not an email address", id end
  return nil, id
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
  local bu = opts.business_unit_id or client.business_unit_id or 0
  if type(bu) ~= "number" or bu ~= math.floor(bu) or bu < 0 then raise("bad option 'business_unit_id' (integer expected)") end
  local op = ops.BATCH[opname]
  local w = setmetatable({
    client = client, connect = connect, op = op, opname = opname,
    stream = check_name(opts, "stream", true), group = check_name(opts, "group", true),
    results = check_name(opts, "results", true),
    consumer = check_name(opts, "consumer") or default_consumer(),
    batch_size = size, block_ms = math.floor(block * 1000),
    fill_ms = math.floor(check_seconds(opts, "fill_wait", 0.05, true) * 1000),
    claim_idle_ms = math.floor(check_seconds(opts, "claim_idle", 30) * 1000),
    redis_wait = check_seconds(opts, "redis_wait", 30, true),
    url = client._prefix .. op.path .. ops.query(true, bu),
    held = {},           -- entry id -> true while its batch is in flight here
    recover = true,      -- the next read re-reads this consumer's own pending entries
    claim_cursor = "0-0", claim_due = 0,
    -- Inside nginx the client sends through cosockets in light threads, and its
    -- callbacks must not yield on a socket of their own (lua-nginx-module would
    -- hand a finished thread's results to that socket operation): there the
    -- worker reads a round of batches, sends them together, then commits them.
    rounds = ngx ~= nil and client:_has_cosockets(), round_size = client.max_concurrency or 8,
  }, Worker)
  if w.stream == w.results then raise("the results stream must not be the source stream") end
  w.summary = { read = 0, results = 0, duplicates = 0, failed = 0, bad = 0, batches = 0, claimed = 0, reconnects = 0 }
  for _, k in ipairs(op.counts) do w.summary[k] = 0 end
  return w
end

function Worker:__tostring()
  return string.format("commprefs.worker: %s -> %s (group %s, consumer %s)", self.stream, self.results,
    self.group, self.consumer)
end

function Worker:close()
  if self.conn then self.conn:close(); self.conn = nil end
end
Worker.__close = Worker.close

------------------------------------------------------------------ redis

local sleep
do
  if ngx and ngx.sleep then sleep = ngx.sleep
  else
    local ok, socket = pcall(require, "socket")
    sleep = ok and socket.sleep or function(s) os.execute("sleep " .. s) end
  end
end

local function message(err) return type(err) == "table" and tostring(err.message or err) or tostring(err) end

-- Error replies after which the same command may succeed once Redis (or a
-- new connection) is ready: retried like a lost connection.
local TRANSIENT = { LOADING = true, BUSY = true, MASTERDOWN = true, READONLY = true, NOAUTH = true,
  TRYAGAIN = true, CLUSTERDOWN = true }

-- The class of a reply error (the connection is fine), or nil when the
-- connection is gone (refused, reset, timeout, closed): err.code, never text.
local function reply_code(err)
  local code = type(err) == "table" and err.code or nil
  if code == "connection" or code == "auth_failed" then return nil end
  return code
end

local function redis_error(msg)
  return Error.new { kind = "redis", message = msg }
end

-- Opens the connection, retrying for redis_wait seconds.
function Worker:_connected()
  if self.conn then return self.conn end
  local deadline, delay, last = core.now() + self.redis_wait, 0.05, nil
  while true do
    local ok, conn, err = pcall(self.connect)
    if not ok then error(conn, 0) end -- a mistake (bad URL, bad option), not an outage
    if conn then
      self.conn = conn
      self.recover = true -- a read may have been delivered and its reply lost
      return conn
    end
    last = err
    if self.stop and self.stop() then return nil, redis_error("stopped while Redis was unreachable: " .. message(err)) end
    if type(err) == "table" and err.code == "auth_failed" then -- a wrong password does not heal
      return nil, redis_error(message(err))
    end
    if core.now() + delay > deadline then
      return nil, redis_error("Redis unreachable for " .. self.redis_wait .. " s: " .. message(last))
    end
    sleep(delay)
    delay = math.min(delay * 2, 1)
  end
end

-- One command: reply, or nil and the error reply (code = its first word) or,
-- when Redis stayed unreachable for redis_wait seconds, nil and that error.
-- Commands retried after a lost connection must be safe to run twice.
function Worker:_call(argv)
  local deadline = core.now() + self.redis_wait
  while true do
    local conn, cerr = self:_connected()
    if not conn then return nil, cerr end
    local reply, err = conn:command(argv)
    if reply ~= nil then return reply end
    local code = reply_code(err)
    if code and not TRANSIENT[code] then return nil, err, code end
    pcall(conn.close, conn)
    self.conn = nil
    self.summary.reconnects = self.summary.reconnects + 1
    if core.now() > deadline then
      return nil, redis_error("Redis failing for " .. self.redis_wait .. " s: " .. message(err))
    end
    if code then sleep(0.1) end
  end
end

function Worker:_create_group()
  local _, err, code = self:_call({ "XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM" })
  if err and code ~= "BUSYGROUP" then return nil, err end
  return true
end

-- A read command that needs the group: creates it (at 0, MKSTREAM) when missing.
function Worker:_group_call(argv)
  local reply, err, code = self:_call(argv)
  if code == "NOGROUP" then
    local ok, gerr = self:_create_group()
    if not ok then return nil, gerr end
    reply, err = self:_call(argv)
  end
  return reply, err
end

local NULL = core.redis_null

-- {id, fields} pairs of an XREADGROUP reply for one stream.
local function stream_entries(reply)
  if reply == nil or reply == NULL or type(reply) ~= "table" or not reply[1] then return {} end
  local entries = reply[1][2]
  return type(entries) == "table" and entries or {}
end

------------------------------------------------------------------ reading

-- Up to n entries: this consumer's own pending ones after a (re)start or
-- reconnect, then entries idle for claim_idle in other consumers' lists
-- (XAUTOCLAIM), then new ones (waiting up to block_ms when given).
function Worker:_read(n, block_ms)
  local out = {}
  while self.recover do -- pages through this consumer's pending list, past what is in flight here
    local reply, err = self:_group_call({ "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT",
      tostring(n), "STREAMS", self.stream, self.recover_from or "0" })
    if not reply then return nil, err end
    local list = stream_entries(reply)
    for _, e in ipairs(list) do
      self.recover_from = e[1]
      if not self.held[e[1]] then out[#out + 1] = e end
    end
    if #list == 0 then self.recover, self.recover_from = false, nil end
    if #out > 0 then return out end
  end
  if core.now() >= self.claim_due then
    local reply, err = self:_group_call({ "XAUTOCLAIM", self.stream, self.group, self.consumer,
      tostring(self.claim_idle_ms), self.claim_cursor, "COUNT", tostring(n) })
    if not reply then return nil, err end
    self.claim_cursor = type(reply[1]) == "string" and reply[1] or "0-0"
    if self.claim_cursor == "0-0" then -- the whole pending list was scanned
      self.claim_due = core.now() + math.min(self.claim_idle_ms / 2000, 1)
    end
    for _, e in ipairs(type(reply[2]) == "table" and reply[2] or {}) do
      if not self.held[e[1]] then out[#out + 1] = e; self.summary.claimed = self.summary.claimed + 1 end
    end
    if #out > 0 then return out end
  end
  local argv = { "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", tostring(n) }
  if block_ms and block_ms > 0 then argv[#argv + 1] = "BLOCK"; argv[#argv + 1] = tostring(block_ms) end
  argv[#argv + 1] = "STREAMS"; argv[#argv + 1] = self.stream; argv[#argv + 1] = ">"
  local reply, err = self:_group_call(argv)
  if not reply then return nil, err end
  return stream_entries(reply)
end

------------------------------------------------------------------ committing

-- Appends the results of entries ({entry=, id=, outcome=, error=}) and acknowledges
-- them in one atomic step. Safe to retry: an entry already acknowledged is skipped.
function Worker:_commit(results)
  if #results == 0 then return true end
  local args = { "2", self.stream, self.results, self.group }
  for _, r in ipairs(results) do
    args[#args + 1] = r.entry
    args[#args + 1] = r.id or ""
    args[#args + 1] = r.outcome
    args[#args + 1] = r.error or ""
  end
  local reply, err, code
  if not self.sha then
    self.sha, err = self:_call({ "SCRIPT", "LOAD", M.COMMIT })
    if not self.sha then return nil, err end
  end
  local argv = { "EVALSHA", self.sha }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  reply, err, code = self:_call(argv)
  if code == "NOSCRIPT" then -- SCRIPT FLUSH, or a restarted Redis
    argv[1], argv[2] = "EVAL", M.COMMIT
    reply, err, code = self:_call(argv)
  end
  if code == "NOGROUP" then -- the stream or group vanished (a Redis restarted empty): nothing to acknowledge
    self.summary.lost = (self.summary.lost or 0) + #results
    return true
  end
  if not reply then return nil, err end
  local s = self.summary
  for i, r in ipairs(results) do
    if type(reply) == "table" and reply[i] == 1 then
      s.results = s.results + 1
      s[r.outcome] = (s[r.outcome] or 0) + 1
    else
      s.duplicates = s.duplicates + 1
    end
  end
  return true
end

-- Splits entries into a batch to send and bad ones, committed at once as failed.
function Worker:_sort(entries)
  local batch, bad, seen = { entries = {}, ids = {} }, {}, {}
  for _, e in ipairs(entries) do
    local why, id = M.check_entry(e[2])
    if why then
      bad[#bad + 1] = { entry = e[1], id = id, outcome = "failed", error = why }
    else
      batch.entries[#batch.entries + 1] = { entry = e[1], id = id }
      local k = ops.key(id)
      if not seen[k] then seen[k] = true; batch.ids[#batch.ids + 1] = id end
    end
  end
  self.summary.read = self.summary.read + #entries
  self.summary.bad = self.summary.bad + #bad
  local ok, err = self:_commit(bad)
  if not ok then return nil, err end
  return #batch.ids > 0 and batch or false
end

-- The next batch to send: false when there is nothing to read now, nil, err
-- when Redis failed. block_ms: how long to wait for a first entry.
function Worker:_gather(block_ms)
  while true do
    local entries, err = self:_read(self.batch_size, block_ms)
    if not entries then return nil, err end
    if #entries == 0 then return false end
    if #entries < self.batch_size and self.fill_ms > 0 then
      local more, merr = self:_read(self.batch_size - #entries, self.fill_ms)
      if not more then return nil, merr end
      for _, e in ipairs(more) do entries[#entries + 1] = e end
    end
    local batch, serr = self:_sort(entries)
    if batch == nil then return nil, serr end
    if batch then
      for _, e in ipairs(batch.entries) do self.held[e.entry] = true end
      return batch
    end
    block_ms = nil -- only bad entries: look again without waiting
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

-- The outcome of every entry of a batch, from the batch request's result.
function Worker:_settle(batch, res)
  local by_id = {}
  local env, err = outcome({ method = "POST", url = self.url }, res)
  ops.classify(self.op, env, err, batch.ids, function(id, result, detail)
    by_id[ops.key(id)] = { outcome = result, error = result == "failed" and tostring(detail) or nil }
  end)
  local results = {}
  for i, e in ipairs(batch.entries) do
    local o = by_id[ops.key(e.id)]
    results[i] = { entry = e.entry, id = e.id, outcome = o.outcome, error = o.error }
  end
  local ok, err = self:_commit(results)
  for _, e in ipairs(batch.entries) do self.held[e.entry] = nil end
  self.summary.batches = self.summary.batches + 1
  return ok, err
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
    if not batch and gather and not stop() then
      local err
      batch, err = self:_gather(nil)
      if batch == nil then fatal = err end
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
  return tonumber(reply[1]) or 0
end

-- Runs until stop() returns true (checked between batches; the batches in
-- flight are finished and committed first), until nothing was read for
-- idle_exit seconds and nothing is pending in the group, or until HubSpot's
-- daily limit or the shared budget stops the client. opts.signals = true
-- (plain Lua, the CLI): SIGINT and SIGTERM are caught for the run and stop
-- it the same way (summary.signal: their number). Returns the summary
-- ({read, results, duplicates, failed, bad, batches, claimed, reconnects,
-- elapsed, signal, stopped = "stop"|"idle"|"signal"|"daily_limit"|"budget"|
-- "interrupted", and the op's counts}), or nil, err (err.summary) when Redis
-- stayed unreachable for redis_wait seconds: what was not committed stays
-- pending for the next run.
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
  local s = self.summary
  local started = core.now()
  local idle_since = started
  local function finish(reason, err)
    if signals then core.trap_signals(false) end
    self.stop = nil
    s.elapsed = core.now() - started
    s.signal = self.signal
    s.stopped = self.signal and "signal" or reason
    if err then err.summary = s; return nil, err end
    return s
  end
  while true do
    if stop() then return finish("stop") end
    local block = self.block_ms
    if idle_exit then block = math.max(1, math.min(block, math.floor((idle_since + idle_exit - core.now()) * 1000))) end
    local read_before = s.read
    local batch, err = self:_gather(block)
    if batch == nil then return finish("redis", err) end
    if batch then
      local fatal, reason = self:_drain_all(batch, stop, opts.on_progress, signals)
      if fatal then return finish("redis", fatal) end
      if reason then return finish(reason) end
    elseif s.read > read_before and opts.on_progress then
      opts.on_progress(s)
    end
    if s.read > read_before then
      idle_since = core.now()
    elseif idle_exit and core.now() - idle_since >= idle_exit then
      local pending, perr = self:_group_pending()
      if not pending then return finish("redis", perr) end
      if pending == 0 then return finish("idle") end
      idle_since = core.now() - idle_exit + math.min(idle_exit, 1) -- look again in a second
    end
  end
end

return M
