-- support.redis: a real redis-server (Debian's) for the specs. start() runs one on
-- a free loopback port in its own temporary directory with no persistence
-- (--save "" --appendonly no); a watchdog shell stops it and removes the
-- directory when the test process ends, even on kill -9. stop()/restart() keep
-- the same port and password, for "Redis lost mid-job" tests. cli() runs
-- redis-cli against an instance (the password is passed without a warning).
--
--   local redis = require "support.redis"
--   local r = redis.start{ password = "s3cret" }  -- {url=, port=, pid=, dir=, password=}
--   redis.cli(r, "SCRIPT", "FLUSH"); redis.stop(r); redis.restart(r)
local socket = require "socket"

local M = {}

local proc = require "support.proc"
local my_pid, alive = proc.my_pid, proc.alive


local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function run(cmd)
  local f = io.popen(cmd)
  local out = f:read("*a")
  f:close()
  return out
end


-- redis-cli against inst: returns its output (trailing newline removed).
function M.cli(inst, ...)
  local args = {}
  for i = 1, select("#", ...) do args[#args + 1] = shell_quote((select(i, ...))) end
  local auth = inst.password and ("-a " .. shell_quote(inst.password) .. " --no-auth-warning ") or ""
  local out = run(string.format("redis-cli -h 127.0.0.1 -p %d %s%s 2>&1", inst.port, auth,
    table.concat(args, " ")))
  return (out:gsub("\n$", ""))
end

-- Whether the server answering on inst.port is inst's own (on a busy machine
-- another suite's redis-server may hold a port free_port gave out).
local function ours(inst)
  return M.cli(inst, "INFO", "server"):match("process_id:(%d+)") == inst.pid
end

-- true once inst's server answers; nil, its log when it died or never answered.
local function wait_ready(inst)
  for _ = 1, 200 do
    if not alive(inst.pid) then break end
    if M.cli(inst, "PING") == "PONG" and ours(inst) then return true end
    socket.sleep(0.025)
  end
  return nil, run("cat " .. shell_quote(inst.dir .. "/redis.log") .. " 2>&1")
end

-- Launches redis-server for inst (port, dir, password already set) and its watchdog.
local function launch(inst, dir)
  inst.dir = dir or run("mktemp -d \"${TMPDIR:-/tmp}/cpredis.XXXXXX\""):gsub("%s+$", "")
  local pass = inst.password and (" --requirepass " .. shell_quote(inst.password)) or ""
  -- env -u: a sanitizer run preloads libasan into this process only, not into redis-server
  local cmd = string.format(
    "env -u LD_PRELOAD -u ASAN_OPTIONS redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no" ..
    " --dir %s --logfile %s --daemonize no --protected-mode no --enable-debug-command local%s" ..
    " >/dev/null 2>&1 </dev/null & " ..
    "pid=$!; echo pid=$pid; " ..
    "( while kill -0 %s 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 0.5; done; " ..
    "kill $pid 2>/dev/null; sleep 0.5; " ..
    "rm -rf %s ) >/dev/null 2>&1 </dev/null &",
    inst.port, shell_quote(inst.dir), shell_quote(inst.dir .. "/redis.log"), pass,
    inst.watch, shell_quote(inst.dir))
  local out = run(cmd)
  inst.pid = assert(out:match("pid=(%d+)"), "support.redis: could not launch redis-server: " .. out)
  return wait_ready(inst)
end

local function failed(inst, log)
  error("support.redis: redis-server did not start on port " .. inst.port .. ":\n" .. tostring(log), 3)
end

local function url_of(inst)
  local auth = inst.password and (":" .. inst.password .. "@") or ""
  return "redis://" .. auth .. "127.0.0.1:" .. inst.port
end

-- start{password=} -> {url=, port=, pid=, dir=, password=}
function M.start(opts)
  opts = opts or {}
  local inst = { password = opts.password, watch = my_pid() }
  for _ = 1, 5 do -- a port another process bound first: take another (unless given)
    inst.port = opts.port or proc.free_port()
    inst.url = url_of(inst)
    local ok, log = launch(inst)
    if ok then return inst end
    if opts.port or not log:find("already in use", 1, true) then failed(inst, log) end
    M.stop(inst)
  end
  failed(inst, "every port tried was taken")
end

-- Stops the server and waits until it is gone (the port is free again); its
-- watchdog removes its directory. Each launch gets a fresh directory.
function M.stop(inst)
  if not inst.pid then return end
  local pid = inst.pid
  inst.pid = nil
  os.execute("kill " .. pid .. " 2>/dev/null")
  for _ = 1, 400 do
    if not alive(pid) then return end
    socket.sleep(0.025)
  end
  os.execute("kill -9 " .. pid .. " 2>/dev/null")
end

-- Starts a stopped instance again on the same port (empty: no persistence).
-- restart(inst, {keep_data = true}): with the data it held when stopped (it
-- writes a snapshot as it stops; the snapshot moves to the new directory
-- before the old one's watchdog, 0.5 s after the stop, removes that).
function M.restart(inst, opts)
  local dir, old = nil, inst.dir
  if opts and opts.keep_data and inst.pid then
    dir = run("mktemp -d \"${TMPDIR:-/tmp}/cpredis.XXXXXX\""):gsub("%s+$", "")
    assert(M.cli(inst, "CONFIG", "SET", "save", "3600 1") == "OK")
  end
  M.stop(inst)
  if dir then assert(os.rename(old .. "/dump.rdb", dir .. "/dump.rdb")) end
  local ok, log = launch(inst, dir)
  if not ok then failed(inst, log) end
  return inst
end

-- A stream as a list of {field = value} tables (its entry id as _id), read
-- through conn (a commprefs.core.redis_connect connection) 5,000 at a time.
function M.entries(conn, key)
  local out, from = {}, "-"
  while true do
    local page = assert(conn:command({ "XRANGE", key, from, "+", "COUNT", "5000" }))
    for _, e in ipairs(page) do
      local t = { _id = e[1] }
      for i = 1, #e[2], 2 do t[e[2][i]] = e[2][i + 1] end
      if e[1] ~= from then out[#out + 1] = t end
    end
    if #page < 5000 then return out end
    from = page[#page][1]
  end
end

-- A command on conn that must succeed: its reply (the specs' Redis setup steps).
function M.must(conn, argv)
  local reply, err = conn:command(argv)
  assert(reply ~= nil, err and tostring(err))
  return reply
end

-- Fresh key names for one test (tag: one letter per spec file): stream,
-- results, dead letters and group.
local key_seq = 0
function M.fresh_keys(tag)
  key_seq = key_seq + 1
  local p = string.format("%s%d-%d:", tag, key_seq, math.random(1e6))
  return { stream = p .. "in", results = p .. "out", dead = p .. "dead", group = "g" }
end

return M
