-- Redis in commprefs (issue 9, contracts C3/C4): conns from core.redis_connect,
-- the sans-I/O reader and formatter, the budget script, and one HubSpot budget
-- shared by several processes through a real redis-server (spec/support/redis)
-- against the simulator: 0 429s, Redis lost and back, Redis gone for good,
-- SCRIPT FLUSH mid-job, Redis never started, a wrong password.
local sim = require "support.sim"
local R = require "support.redis"
local fakeredis = require "support.fakeredis"
local core = require "commprefs.core"
local commprefs = require "commprefs"

local cjson_decode = require("cjson").decode
local vm = sim.vm
local build = os.getenv("COMMPREFS_BUILD") or ("build/" .. vm)

local function tmpname(tag)
  local p = os.tmpname()
  os.remove(p)
  return p .. "-" .. tag
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- A bulk job in its own process: prints one JSON line with the summary, the
-- client's stats and its start/end (wall clock).
local JOB = [[
local base, rurl, key, prefix, n, journal, wait = ...
local commprefs = require "commprefs"
local core = commprefs.core
local opts = { token = "sim-token", base_url = base, max_retries = 0 }
if rurl ~= "-" then opts.rate_limit = { redis = rurl, key = key, redis_wait = tonumber(wait) } end
local c, err = commprefs.new(opts)
if not c then print(core.encode { new_error = tostring(err) }) return end
local ids = {}
for i = 1, tonumber(n) do ids[i] = prefix .. i .. "@example.com" end
local t0 = core.now()
local s = c:bulk_unsubscribe_all(ids, { journal = journal ~= "-" and journal or nil })
local st = c:stats()
print(core.encode { done = s.done, failed = s.failed, stopped = s.stopped or false,
  remaining = s.remaining or false, t0 = t0, t1 = core.now(), throttled = st.throttled, sent = st.sent,
  stop_message = s.stop_message or false })
]]
local job_file = tmpname("job.lua")
do
  local f = assert(io.open(job_file, "wb"))
  f:write(JOB)
  f:close()
end

local function lua_env()
  return string.format("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='%s/?.so;;' ", build)
end

-- Starts a job process; returns a handle whose :wait() gives the decoded JSON line.
local function spawn_job(base, redis_url, key, prefix, n, journal, wait)
  local cmd = string.format("%s%s %s %s %s %s %s %d %s %s 2>&1", lua_env(), vm, job_file, base,
    redis_url or "-", key or "-", prefix, n, journal or "-", wait or "30")
  local f = io.popen(cmd)
  return {
    wait = function()
      local out = f:read("*a")
      f:close()
      local line = out:match("(%b{})%s*$")
      assert(line, "the job printed no summary:\n" .. out)
      return core.decode(line), out
    end,
  }
end

local function rate_sim()
  return sim.start { SIM_RATE = "20/1000" }
end

local function sim_log(inst) return sim.admin("GET", "log", nil, inst) end

local function wait_until(pred, timeout)
  local deadline = core.now() + (timeout or 20)
  while core.now() < deadline do
    if pred() then return true end
    require("socket").sleep(0.02)
  end
  return false
end

describe("support.redis", function()
  it("starts a redis-server on a free port with no persistence, stops and restarts it", function()
    local r = R.start()
    assert.equal("PONG", R.cli(r, "PING"))
    assert.equal("", R.cli(r, "CONFIG", "GET", "save"):match("save\n(.*)$"))
    assert.equal("no", R.cli(r, "CONFIG", "GET", "appendonly"):match("appendonly\n(.*)$"))
    R.cli(r, "SET", "k", "v")
    R.stop(r)
    assert.matches("refused", R.cli(r, "PING"))
    R.restart(r)
    assert.equal("", R.cli(r, "GET", "k")) -- nothing persisted
    R.stop(r)
  end)

  it("stops the server when the test process dies, even on kill -9", function()
    local out = tmpname("child")
    local code = 'package.path="spec/?.lua;"..package.path; local r=require("support.redis").start();'
      .. 'io.write(r.port,"\\n"); io.stdout:flush(); os.execute("sleep 60")'
    local f = io.popen(string.format("%s -e '%s' > %s 2>&1 & echo $!", vm, code, out))
    local child = f:read("*l")
    f:close()
    local port
    assert.is_true(wait_until(function()
      port = tonumber((slurp(out) or ""):match("^(%d+)\n"))
      return port ~= nil
    end, 10), "the child did not start redis: " .. tostring(slurp(out)))
    assert.equal("PONG", R.cli({ port = port }, "PING"))
    os.execute("kill -9 " .. child)
    os.remove(out)
    assert.is_true(wait_until(function()
      return R.cli({ port = port }, "PING"):find("refused") ~= nil
    end, 5), "redis-server outlived its test process")
  end)
end)

describe("core.redis_connect (C4)", function()
  local r
  setup(function() r = R.start { password = "s3cr3t-pw" } end)
  teardown(function() R.stop(r) end)

  it("gives strings, integers, arrays, nil, status and error replies their Lua shapes", function()
    local c = assert(core.redis_connect(r.url, { connect_timeout = 1, timeout = 2 }))
    assert.same({ ok = "OK" }, c:command { "SET", "s", "v\0binary" })
    assert.equal("v\0binary", c:command { "GET", "s" })
    assert.equal(core.redis_null, c:command { "GET", "missing" })
    assert.equal(1, c:command { "INCR", "n" })
    assert.same({ "3", "2", "1" }, c:command { "LRANGE", (function() c:command { "RPUSH", "l", 3, 2, 1 } return "l" end)(), 0, -1 })
    local v, err = c:command { "NOSUCHCOMMAND" }
    assert.is_nil(v)
    assert.is_true(commprefs.Error.is(err))
    assert.equal("redis", err.kind)
    assert.matches("unknown command", err.message)
    c:close()
  end)

  it("pipelines commands, with an error reply as an Error in its place", function()
    local c = assert(core.redis_connect(r.url))
    local out = assert(c:pipeline { { "SET", "p", "1" }, { "INCR", "p" }, { "HGET", "p", "x" }, { "GET", "p" } })
    assert.same({ ok = "OK" }, out[1])
    assert.equal(2, out[2])
    assert.is_true(commprefs.Error.is(out[3]))
    assert.matches("WRONGTYPE", out[3].message)
    assert.equal("2", out[4])
    c:close()
  end)

  it("raises on programmer mistakes, before sending anything", function()
    local c = assert(core.redis_connect(r.url))
    assert.has_error(function() c:command {} end, "commprefs.redis: command: bad argument (non-empty array of strings expected)")
    assert.has_error(function() c:command { "GET", {} } end)
    assert.has_error(function() c:pipeline { { "SET", "q", "1" }, { true } } end)
    assert.equal(core.redis_null, c:command { "GET", "q" }) -- the pipeline sent nothing
    assert.has_error(function() core.redis_connect("http://x") end)
    assert.has_error(function() core.redis_connect("redis://h:99999") end)
    assert.has_error(function() core.redis_connect(r.url, { timeout = -1 }) end)
    c:close()
    assert.has_error(function() c:command { "PING" } end, "commprefs: the redis connection is closed")
  end)

  it("says clearly when the password is wrong or missing, never showing it", function()
    local bad = "redis://:wrong-pw-123@127.0.0.1:" .. r.port
    local c, err = core.redis_connect(bad)
    assert.is_nil(c)
    assert.equal("redis", err.kind)
    assert.matches("authentication failed", err.message)
    assert.is_nil(tostring(err):find("wrong-pw-123", 1, true))
    c, err = core.redis_connect("redis://127.0.0.1:" .. r.port)
    assert.is_nil(c)
    assert.matches("NOAUTH", err.message)
  end)

  it("says clearly when Redis is unreachable, and reconnects once it is back", function()
    local c = assert(core.redis_connect(r.url, { timeout = 1 }))
    R.stop(r)
    local v, err = c:command { "PING" }
    assert.is_nil(v)
    assert.matches("127.0.0.1:" .. r.port, err.message)
    v, err = core.redis_connect(r.url, { connect_timeout = 0.5 })
    assert.is_nil(v)
    assert.matches("cannot connect", err.message)
    R.restart(r)
    assert.same({ ok = "PONG" }, c:command { "PING" })
    c:close()
  end)

  it("a command on a Redis that stopped answering fails after the command timeout, then recovers", function()
    local c = assert(core.redis_connect(r.url, { timeout = 0.3 }))
    os.execute("kill -STOP " .. r.pid)
    local t0 = core.now()
    local v, err = c:command { "PING" }
    local took = core.now() - t0
    os.execute("kill -CONT " .. r.pid)
    assert.is_nil(v)
    assert.equal("redis", err.kind)
    assert.matches("connection lost", err.message)
    assert.is_true(took >= 0.25 and took < 3, "took " .. took .. " s")
    assert.same({ ok = "PONG" }, c:command { "PING" })
    c:close()
  end)

  it("authenticates an ACL user with redis://user:pass@ (AUTH user pass), percent-decoded", function()
    assert.equal("OK", R.cli(r, "ACL", "SETUSER", "app1", "on", ">p@ss/w:rd", "~*", "+@all"))
    local c = assert(core.redis_connect("redis://app1:p%40ss%2Fw%3Ard@127.0.0.1:" .. r.port))
    assert.equal("app1", c:command { "ACL", "WHOAMI" })
    c:close()
    local none, err = core.redis_connect("redis://app1:nope@127.0.0.1:" .. r.port)
    assert.is_nil(none)
    assert.matches("authentication failed", err.message)
  end)

  it("selects the database of the URL", function()
    local c1 = assert(core.redis_connect(r.url .. "/3"))
    c1:command { "SET", "db3", "x" }
    assert.equal("x", R.cli(r, "-n", "3", "GET", "db3"))
    assert.equal("", R.cli(r, "GET", "db3"))
    c1:close()
  end)

  it("closes with __close under Lua 5.4 and __gc everywhere", function()
    local c = assert(core.redis_connect(r.url))
    local mt = getmetatable(c)
    assert.is_function(mt.__gc)
    assert.is_function(mt.__close)
    c = nil
    collectgarbage()
    collectgarbage()
  end)
end)

describe("core.redis_reader / core.redis_format (sans-I/O, hiredis)", function()
  it("formats a command in the Redis protocol", function()
    assert.equal("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n", core.redis_format { "SET", "k", 12 })
    assert.has_error(function() core.redis_format {} end)
  end)

  it("reads replies fed in any pieces", function()
    local rd = core.redis_reader()
    local wire = "*3\r\n$1\r\na\r\n:5\r\n$-1\r\n+OK\r\n-ERR bad\r\n"
    local got = {}
    for i = 1, #wire do
      assert.is_true(rd:feed(wire:sub(i, i)))
      while true do
        local ok, v = rd:get()
        if not ok then break end
        got[#got + 1] = v
      end
    end
    assert.equal(3, #got)
    assert.same({ "a", 5, core.redis_null }, got[1])
    assert.same({ ok = "OK" }, got[2])
    assert.is_true(commprefs.Error.is(got[3]))
    assert.equal("ERR bad", got[3].message)
  end)

  it("turns protocol errors and absurd array sizes into nil, err", function()
    local rd = core.redis_reader()
    rd:feed("?what\r\n")
    local ok, err, code = rd:get()
    assert.is_nil(ok)
    assert.matches("[Pp]rotocol error", err)
    assert.equal("protocol", code)
    assert.is_nil((rd:feed("+OK\r\n"))) -- the stream stays failed
    local rd2 = core.redis_reader()
    rd2:feed("*2000000000\r\n")
    ok, err, code = rd2:get()
    assert.is_nil(ok)
    assert.matches("more than 1048576 elements", err)
    assert.equal("too_large", code)
  end)
end)

describe("the budget script", function()
  local r, c
  setup(function()
    r = R.start()
    c = assert(core.redis_connect(r.url))
  end)
  teardown(function() c:close(); R.stop(r) end)

  local function run(op, ...)
    return c:command { "EVAL", core.budget_script(), "2", "commprefs:{t}:window", "commprefs:{t}:limits", op, ... }
  end

  it("grants max requests per rolling window, then says how long to wait", function()
    assert.equal(0, run("learn", "3", "1000", "35"))
    assert.equal(0, run("acquire", "", "", ""))
    assert.equal(0, run("acquire", "", "", ""))
    assert.equal(0, run("acquire", "", "", ""))
    local w = run("acquire", "", "", "")
    assert.is_true(w > 900 and w <= 1035, "wait " .. tostring(w))
    assert.equal(3, c:command { "ZCARD", "commprefs:{t}:window" }) -- a refusal is not counted
    assert.is_true(c:command { "PTTL", "commprefs:{t}:window" } > 0) -- keys expire
    assert.is_true(c:command { "PTTL", "commprefs:{t}:limits" } > 0)
  end)

  it("holds everybody after a 429, and seeds the limits a participant knows into an empty Redis", function()
    c:command { "DEL", "commprefs:{t}:window", "commprefs:{t}:limits" }
    assert.equal(0, run("throttled", "600", "", ""))
    local w = run("acquire", "", "", "")
    assert.is_true(w > 500 and w <= 600, "wait " .. tostring(w))
    c:command { "DEL", "commprefs:{t}:limits" }
    assert.equal(0, run("acquire", "7", "2000", "45"))
    assert.same({ "7", "2000", "45" }, c:command { "HMGET", "commprefs:{t}:limits", "max", "interval", "margin" })
  end)
end)

describe("one budget across processes (rate_limit.redis)", function()
  local s, r
  setup(function()
    s = rate_sim()
    r = R.start()
  end)
  teardown(function()
    sim.stop(s)
    R.stop(r)
  end)
  before_each(function() sim.admin("POST", "reset", {}, s) end)

  local function three_jobs(redis_url, key)
    local jobs = {}
    for i = 1, 3 do jobs[i] = spawn_job(s.url, redis_url, key, "p" .. i .. "-", 3000) end
    local res, t0, t1 = {}, math.huge, 0
    for i = 1, 3 do
      res[i] = jobs[i]:wait()
      assert.is_nil(res[i].new_error)
      t0, t1 = math.min(t0, res[i].t0), math.max(t1, res[i].t1)
    end
    return res, t1 - t0
  end

  it("3 processes x 3,000 ids on one key at 20 per 1,000 ms, retries off: 0 failed, 0 429s, near the bound", function()
    local res, wall = three_jobs(r.url, "app-a")
    local bound = 90 / 20 -- ceil(9000 / 100) requests at 20 per second
    for i = 1, 3 do
      assert.equal(3000, res[i].done)
      assert.equal(0, res[i].failed)
      assert.equal(0, res[i].throttled)
    end
    assert.equal(0, sim_log(s).throttled)
    assert.is_true(wall <= bound / 0.85, string.format("%.2f s for a %.2f s bound", wall, bound))
    -- only numbers were written, under the key's hash tag; never the token
    local keys = R.cli(r, "KEYS", "*")
    for k in keys:gmatch("[^\n]+") do assert.matches("^commprefs:{app%-a}:", k) end
    local dump = R.cli(r, "HGETALL", "commprefs:{app-a}:limits") .. R.cli(r, "ZRANGE", "commprefs:{app-a}:window", "0", "-1", "WITHSCORES")
    assert.is_nil(dump:find("sim-token", 1, true))
    assert.matches("^[%d%.%a\n]+$", dump)
  end)

  it("without the shared budget the same jobs get 429s (the test can fail)", function()
    local res = three_jobs(nil)
    local failed = res[1].failed + res[2].failed + res[3].failed
    assert.is_true(failed > 0 and sim_log(s).throttled > 0)
  end)

  it("Redis stopped mid-job and started again: nothing is sent while it is away, every id is done once", function()
    local job = spawn_job(s.url, r.url, "app-b", "lost-", 6000)
    assert.is_true(wait_until(function() return #sim_log(s).requests >= 15 end))
    R.stop(r)
    local t_stop = core.now()
    require("socket").sleep(1.5)
    local t_back = core.now()
    R.restart(r)
    local res = job:wait()
    assert.equal(6000, res.done)
    assert.equal(0, res.failed)
    assert.is_false(res.stopped)
    local log = sim_log(s)
    assert.equal(0, log.throttled)
    assert.equal(60, #log.requests)
    for _, q in ipairs(log.requests) do
      assert.is_false(q.time > t_stop + 0.3 and q.time < t_back - 0.05, "a request was sent while Redis was away")
    end
  end)

  it("Redis gone for good: the job stops with 'budget' after redis_wait, every outcome journaled, nothing lost", function()
    local journal = tmpname("journal")
    local job = spawn_job(s.url, r.url, "app-c", "gone-", 6000, journal, 1)
    assert.is_true(wait_until(function() return #sim_log(s).requests >= 10 end))
    R.stop(r)
    local res = job:wait()
    R.restart(r)
    assert.equal("budget", res.stopped)
    assert.matches("the shared budget in Redis was unavailable for 1 s: 127%.0%.0%.1:%d+: ", res.stop_message)
    assert.equal(0, res.failed)
    assert.equal(6000, res.done + res.remaining)
    local journaled, lines = {}, 0
    for line in (slurp(journal) or ""):gmatch("[^\n]+") do
      local rec = core.decode(line)
      assert.is_nil(journaled[rec.id])
      journaled[rec.id] = rec.outcome
      lines = lines + 1
    end
    os.remove(journal)
    assert.equal(res.done, lines)
    -- what HubSpot saw is exactly what was journaled
    local sent = 0
    for _, q in ipairs(sim_log(s).requests) do
      for _, id in ipairs(core.decode(q.body).inputs) do
        assert.equal("changed", journaled[id])
        sent = sent + 1
      end
    end
    assert.equal(lines, sent)
  end)

  it("SCRIPT FLUSH mid-job: the script is loaded again (NOSCRIPT), no 429, nothing failed", function()
    local evals_before = tonumber(R.cli(r, "INFO", "commandstats"):match("cmdstat_eval:calls=(%d+)") or 0)
    local job = spawn_job(s.url, r.url, "app-d", "flush-", 4000)
    assert.is_true(wait_until(function() return #sim_log(s).requests >= 10 end))
    assert.equal("OK", R.cli(r, "SCRIPT", "FLUSH"))
    local res = job:wait()
    assert.equal(4000, res.done)
    assert.equal(0, res.failed)
    assert.equal(0, sim_log(s).throttled)
    local evals = tonumber(R.cli(r, "INFO", "commandstats"):match("cmdstat_eval:calls=(%d+)") or 0)
    assert.is_true(evals > evals_before, "the NOSCRIPT fallback was not exercised")
  end)
end)

describe("commprefs.new with rate_limit.redis", function()
  local s, r
  setup(function()
    s = rate_sim()
    r = R.start { password = "pa55-w0rd" }
  end)
  teardown(function()
    sim.stop(s)
    R.stop(r)
  end)

  local function new(rl)
    return commprefs.new { token = "sim-token", base_url = s.url, rate_limit = rl }
  end

  it("Redis never started: nil and a clear error, nothing sent", function()
    sim.admin("POST", "reset", {}, s)
    local free = require("socket").bind("127.0.0.1", 0)
    local _, fport = free:getsockname()
    free:close()
    local c, err
    c, err = new { redis = "redis://:pa55-w0rd@127.0.0.1:" .. fport, key = "k", redis_timeout = 0.5 }
    assert.is_nil(c)
    assert.equal("redis", err.kind)
    assert.matches("cannot connect", err.message)
    assert.is_nil(tostring(err):find("pa55-w0rd", 1, true))
    assert.equal(0, #sim_log(s).requests)
  end)

  it("wrong password: nil and a clear error that does not show it", function()
    local c, err = new { redis = "redis://:not-the-pw@127.0.0.1:" .. r.port, key = "k" }
    assert.is_nil(c)
    assert.matches("authentication failed", err.message)
    assert.is_nil(tostring(err):find("not-the-pw", 1, true))
  end)

  it("works with the right password and a database number", function()
    local c = assert(new { redis = r.url .. "/2", key = "k2" })
    assert.truthy(c:batch_unsubscribe_all { "db@example.com" })
    c:close()
    assert.equal("1", R.cli(r, "-n", "2", "EXISTS", "commprefs:{k2}:window"))
  end)

  it("limits set by hand (rate_limit.max/interval) are written to the budget for every participant", function()
    local c = assert(new { redis = r.url, key = "manual", max = 7, interval = 2 })
    c:close()
    assert.equal("7\n2000", R.cli(r, "HMGET", "commprefs:{manual}:limits", "max", "interval"))
  end)

  it("raises on bad options, naming them, without echoing the URL", function()
    assert.has_error(function() new { redis = r.url } end, "commprefs.new: bad option 'rate_limit.key' (required with rate_limit.redis)")
    assert.has_error(function() new { key = "k" } end)
    assert.has_error(function() new { redis = "http://:pa55-w0rd@x", key = "k" } end,
      "commprefs.new: bad option 'rate_limit.redis' (a redis://[user:pass@]host:port[/db] URL expected)")
    assert.has_error(function() new { redis = r.url, key = "a{b}" } end)
    assert.has_error(function() new { redis = r.url, key = "" } end)
    assert.has_error(function() new { redis = r.url, key = "k", colour = 1 } end)
    assert.has_error(function() new { redis = r.url, key = "k", redis_timeout = 0 } end)
    local ok, err = pcall(new, { redis = "redis://:pa55-w0rd@h:notaport", key = "k" })
    assert.is_false(ok)
    assert.is_nil(tostring(err):find("pa55-w0rd", 1, true))
  end)
end)

describe("the command line with --redis and --budget-key", function()
  local s, r
  setup(function()
    s = rate_sim()
    r = R.start { password = "cli-pw-xyz" }
  end)
  teardown(function()
    sim.stop(s)
    R.stop(r)
  end)

  local function cli(args, env) -- bin/commprefs runs on lua5.4: its build, whatever this VM is
    local f = io.popen(string.format("%sCOMMPREFS_BUILD=%s HUBSPOT_ACCESS_TOKEN=sim-token bin/commprefs --base-url %s %s 2>&1; echo \"exit=$?\"",
      env or "", (build:gsub("luajit", "lua5.4")), s.url, args))
    local out = f:read("*a")
    f:close()
    return out:gsub("exit=(%d+)\n$", ""), tonumber(out:match("exit=(%d+)\n$"))
  end

  it("runs a bulk command on the shared budget, from the flag or the environment", function()
    local out, code = cli("--redis " .. r.url .. " --budget-key app unsubscribe-all a@x.com b@x.com")
    assert.equal(0, code, out)
    assert.equal("1", R.cli(r, "EXISTS", "commprefs:{app}:window"))
    out, code = cli("--budget-key app2 status a@x.com", "COMMPREFS_REDIS_URL=" .. r.url .. " ")
    assert.equal(0, code, out)
    assert.equal("1", R.cli(r, "EXISTS", "commprefs:{app2}:window"))
  end)

  it("never prints the password: wrong password, Redis unreachable, bad URL", function()
    local out, code = cli("--redis redis://:cli-pw-WRONG@127.0.0.1:" .. r.port .. " --budget-key app unsubscribe-all a@x.com")
    assert.equal(1, code)
    assert.matches("authentication failed", out)
    assert.is_nil(out:find("cli-pw-WRONG", 1, true))
    out, code = cli("--redis redis://:cli-pw-xyz@127.0.0.1:1 --budget-key app unsubscribe-all a@x.com")
    assert.equal(1, code)
    assert.matches("cannot connect", out)
    assert.is_nil(out:find("cli-pw-xyz", 1, true))
    out, code = cli("--redis redis://:cli-pw-xyz@h:bad --budget-key app status a@x.com")
    assert.equal(2, code)
    assert.is_nil(out:find("cli-pw-xyz", 1, true))
  end)

  it("--redis without --budget-key and --budget-key without Redis are usage errors", function()
    local out, code = cli("--redis " .. r.url .. " unsubscribe-all a@x.com")
    assert.equal(2, code)
    assert.matches("%-%-redis needs %-%-budget%-key", out)
    out, code = cli("--budget-key k unsubscribe-all a@x.com")
    assert.equal(2, code)
    assert.matches("%-%-budget%-key needs %-%-redis", out)
  end)
end)

describe("the cosocket side inside nginx (commprefs.ngx.redis, commprefs.ngx.redis_budget)", function()
  local nginx = require "support.nginx"
  local r, inst
  setup(function()
    r = R.start { password = "ngx-pw-1" }
    inst = nginx.start { workers = 1, env = { REDIS_URL = r.url, REDIS_PORT = tostring(r.port) } }
  end)
  teardown(function()
    inst:stop()
    R.stop(r)
  end)

  local function run(code, timeout)
    local status, body = nginx.run(inst, code, timeout)
    assert.equal(200, status, body)
    return cjson_decode(body)
  end

  it("gives the same reply shapes as core.redis_connect", function()
    local got = run [[
      local core = require "commprefs.core"
      local c = assert(require("commprefs.ngx.redis").connect(os.getenv("REDIS_URL"), { timeout = 2 }))
      local set = c:command { "SET", "x", "1" }
      local incr = c:command { "INCR", "x" }
      local null = c:command { "GET", "nope" } == core.redis_null
      local v, err = c:command { "NOSUCH" }
      local p = c:pipeline { { "INCR", "x" }, { "HGET", "x", "y" }, { "LRANGE", "none", 0, -1 } }
      c:close()
      return { set = set, incr = incr, null = null, v = v == nil, kind = err.kind, msg = err.message,
        p1 = p[1], p2 = p[2].message, p3 = #p[3], closed_raises = not pcall(c.command, c, { "PING" }) }
    ]]
    assert.same({ ok = "OK" }, got.set)
    assert.equal(2, got.incr)
    assert.is_true(got.null and got.v and got.closed_raises)
    assert.equal("redis", got.kind)
    assert.matches("unknown command", got.msg)
    assert.equal(3, got.p1)
    assert.matches("^WRONGTYPE", got.p2)
    assert.equal(0, got.p3)
  end)

  it("refuses a reply announcing 300 MB at its header with code too_large, as core.redis_connect does", function()
    local fake = fakeredis.start("huge")
    local got = run(string.format([[
      local c = assert(require("commprefs.ngx.redis").connect(%q, { timeout = 10 }))
      local v, err = c:command { "GET", "k" }
      local status = io.open("/proc/self/status"):read("*a")
      return { v = v == nil, code = err.code, msg = err.message, hwm = tonumber(status:match("VmHWM:%%s*(%%d+)")) }
    ]], fake.url))
    fake.stop()
    assert.is_true(got.v)
    assert.equal("too_large", got.code)
    assert.equal("127.0.0.1:" .. fake.port .. ": protocol error: the server announced a string of more than 67108864 bytes", got.msg)
    assert.is_true(got.hwm < 128 * 1024, "nginx worker peak RSS " .. got.hwm .. " kB")
  end)

  it("times out a reply trickling one byte per 0.5 s at the command timeout, in all (HOSTILE D5)", function()
    local fake = fakeredis.start("drip")
    local got = run(string.format([[
      local c = assert(require("commprefs.ngx.redis").connect(%q, { timeout = 1 }))
      ngx.update_time()
      local t0 = ngx.now()
      local v, err = c:command { "GET", "k" }
      ngx.update_time()
      return { v = v == nil, code = err and err.code, msg = err and err.message, took = ngx.now() - t0 }
    ]], fake.url), 10)
    fake.stop()
    assert.is_true(got.v)
    assert.equal("connection", got.code)
    assert.matches("no whole reply within 1 s", got.msg)
    assert.is_true(got.took > 0.9 and got.took < 3, "took " .. got.took)
  end)

  it("says clearly when the password is wrong or Redis unreachable, never showing the password", function()
    local got = run [[
      local redis = require "commprefs.ngx.redis"
      local _, e1 = redis.connect("redis://:ngx-pw-WRONG@127.0.0.1:" .. os.getenv("REDIS_PORT"))
      local _, e2 = redis.connect("redis://:ngx-pw-1@127.0.0.1:1", { connect_timeout = 0.5 })
      return { e1 = tostring(e1), e2 = tostring(e2) }
    ]]
    assert.matches("authentication failed", got.e1)
    assert.is_nil(got.e1:find("ngx-pw", 1, true))
    assert.matches("cannot connect", got.e2)
    assert.is_nil(got.e2:find("ngx-pw", 1, true))
  end)

  it("runs the same budget script: limits, waits, 429 holds; a lost Redis gives waits, then nil, err", function()
    local got = run [[
      local rb = require "commprefs.ngx.redis_budget"
      local b = rb.new { url = os.getenv("REDIS_URL"), key = "nb" }
      b:learn(3, 1000)
      local a = {}
      for i = 1, 4 do a[i] = b:acquire() end
      b:throttled(300)
      a[5] = b:acquire()
      local gone = rb.new { url = "redis://127.0.0.1:1", key = "nb", wait = 0.3 }
      local waits, err = 0, nil
      for _ = 1, 20 do
        local w, e = gone:acquire()
        if not w then err = e break end
        waits = waits + 1
        ngx.sleep(w / 1000)
      end
      return { a = a, waits = waits, err = err,
        bad = not pcall(rb.new, { url = "redis://x", key = "a{b" }) and not pcall(rb.new, { url = "http://x", key = "k" }) }
    ]]
    assert.same({ 0, 0, 0 }, { got.a[1], got.a[2], got.a[3] })
    assert.is_true(got.a[4] > 900 and got.a[4] <= 1000 + core.budget_margin_ms(1000))
    assert.is_true(got.a[5] > 200 and got.a[5] <= 300)
    assert.is_true(got.waits >= 1)
    assert.matches("unavailable for 0.3 s", got.err)
    assert.is_true(got.bad)
    assert.equal("1", R.cli(r, "EXISTS", "commprefs:{nb}:window"))
  end)
end)

describe("two nginx workers and one Lua process on one key", function()
  local nginx = require "support.nginx"

  it("0 429s and every id done, at 20 requests per 1,000 ms with retries off", function()
    local s = rate_sim()
    local r = R.start()
    local inst = nginx.start { workers = 2, env = { SIM_URL = s.url, REDIS_URL = r.url }, conf = [[
      lua_shared_dict jobs 1m;
      init_worker_by_lua_block {
        ngx.timer.at(0, function()
          local commprefs = require "commprefs"
          local cjson = require "cjson"
          local w = ngx.worker.id()
          local c = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), max_retries = 0,
            rate_limit = { redis = os.getenv("REDIS_URL"), key = "mixed" } }
          local ids = {}
          for i = 1, 1500 do ids[i] = "w" .. w .. "-" .. i .. "@example.com" end
          local ok, summary = pcall(c.bulk_unsubscribe_all, c, ids)
          local st = c:stats()
          ngx.shared.jobs:set("job" .. w, cjson.encode { ok = ok, done = ok and summary.done,
            failed = ok and summary.failed, err = not ok and tostring(summary) or nil, throttled = st.throttled })
        end)
      }]] }
    local lua_job = spawn_job(s.url, r.url, "mixed", "lua-", 3000)
    local res = lua_job:wait()
    local jobs
    assert.is_true(wait_until(function()
      local status, body = nginx.run(inst, [[
        local a, b = ngx.shared.jobs:get("job0"), ngx.shared.jobs:get("job1")
        return a and b and ("[" .. a .. "," .. b .. "]") or ""
      ]])
      if status == 200 and body ~= "" then jobs = cjson_decode(body) end
      return jobs ~= nil
    end, 30), "the nginx jobs did not finish")
    local sim_429s, requests = sim_log(s).throttled, #sim_log(s).requests
    local errors = inst:errors()
    inst:stop()
    sim.stop(s)
    R.stop(r)
    assert.equal(3000, res.done)
    assert.equal(0, res.failed)
    for w = 1, 2 do
      assert.is_true(jobs[w].ok, jobs[w].err)
      assert.equal(1500, jobs[w].done)
      assert.equal(0, jobs[w].failed)
    end
    assert.equal(60, requests)
    assert.equal(0, sim_429s, errors)
  end)
end)

describe("the cosocket budget across a Redis restart", function()
  local nginx = require "support.nginx"

  it("goes on at once after a restart: NOSCRIPT (empty script cache) reloads it, pooled connections are replaced", function()
    local r = R.start()
    local inst = nginx.start { workers = 1, env = { REDIS_URL = r.url } }
    local code = [[
      local rb = require "commprefs.ngx.redis_budget"
      package.loaded.rb_restart = package.loaded.rb_restart or rb.new { url = os.getenv("REDIS_URL"), key = "rs" }
      local b = package.loaded.rb_restart
      local out = {}
      for i = 1, 3 do out[i] = b:acquire() end
      return out
    ]]
    local status, body = nginx.run(inst, code)
    assert.equal(200, status, body)
    assert.same({ 0, 0, 0 }, cjson_decode(body))
    R.restart(r) -- the worker's pooled connection is dead now, and the script cache empty
    status, body = nginx.run(inst, code)
    local errors = inst:errors()
    inst:stop()
    R.stop(r)
    assert.equal(200, status, body)
    assert.same({ 0, 0, 0 }, cjson_decode(body), errors)
  end)
end)
