-- spec/feature/worker_spec.lua: commprefs.worker and `commprefs worker` against a real
-- redis-server (support.redis, one per run) and the simulator: exactly one
-- result per source entry through bad entries, SIGKILL, Redis restarts,
-- failing requests and signals.
local sim = require "support.sim"
local redis = require "support.redis"
local proc = require "support.proc"
local commprefs = require "commprefs"
local core = require "commprefs.core"
local worker = require "commprefs.worker"
local socket = require "socket"

local TMP = os.getenv("TMPDIR") or "/tmp"
local NULL = core.redis_null
-- bin/commprefs runs under lua5.4: give it the lua5.4 twin of this run's build
local CLI_BUILD = (os.getenv("COMMPREFS_BUILD") or ("build/" .. sim.vm)):gsub("luajit", "lua5.4")

local R -- the redis-server of this file
local conn

local function client(opts) return sim.client(opts) end

local function cmd(argv) return redis.must(conn, argv) end

local function keys() return redis.fresh_keys("t") end

-- XADDs entries (tables of fields, or addresses) to stream; returns their ids in order.
local function add(stream, entries)
  local out = {}
  for first = 1, #entries, 500 do
    local cmds = {}
    for i = first, math.min(first + 499, #entries) do
      local e = entries[i]
      local argv = { "XADD", stream, "*" }
      if type(e) == "string" then e = { "id", e } end
      for _, v in ipairs(e) do argv[#argv + 1] = v end
      cmds[#cmds + 1] = argv
    end
    local replies = assert(conn:pipeline(cmds))
    for _, r in ipairs(replies) do assert(type(r) == "string", tostring(r)); out[#out + 1] = r end
  end
  return out
end

local function addresses(n, prefix)
  local t = {}
  for i = 1, n do t[i] = (prefix or "w") .. i .. "@example.com" end
  return t
end

-- The results stream as a list of {field = value} tables.
local function results(key) return redis.entries(conn, key) end

-- Asserts one result per source entry (no more, no less); returns entry id -> result.
local function one_each(k, source_ids)
  local by_entry = {}
  local list = results(k.results)
  for _, r in ipairs(list) do
    assert.is_nil(by_entry[r.entry], "two results for entry " .. tostring(r.entry))
    by_entry[r.entry] = r
  end
  for _, id in ipairs(source_ids) do assert.is_not_nil(by_entry[id], "no result for entry " .. id) end
  assert.equal(#source_ids, #list)
  return by_entry
end

local function group_pending(k)
  local reply, err = conn:command({ "XPENDING", k.stream, k.group })
  if not reply then return tostring(err) end
  return reply[1]
end

------------------------------------------------------------------ processes

local function exec(c)
  local a, _, code = os.execute(c)
  if type(a) == "number" then return a >= 256 and math.floor(a / 256) or a end
  return code
end

-- Starts `commprefs worker ARGS` in the background (support.proc.spawn): {pid=, dir=}.
local function spawn(args, env)
  return proc.spawn(string.format("env COMMPREFS_BUILD=%s HUBSPOT_ACCESS_TOKEN=sim-token COMMPREFS_BASE_URL=%s %s"
    .. " bin/commprefs worker --redis %s %s", CLI_BUILD, sim.url, env or "", R.url, args))
end

-- Waits for a spawned worker to end: exit code, stdout, stderr.
local wait = proc.wait

local function worker_args(k, extra)
  return string.format("--stream %s --group %s --results %s %s", k.stream, k.group, k.results, extra or "")
end

-- Runs the command line in the foreground: exit code, stdout, stderr.
local function cli(args, env)
  local p = spawn(args, env)
  return wait(p)
end

------------------------------------------------------------------ specs

describe("commprefs.worker", function()
  setup(function()
    R = redis.start()
    conn = assert(core.redis_connect(R.url, { timeout = 10 }))
  end)
  before_each(function() sim.reset() end)

  it("gives every entry one result, bad entries a failed one with a clear error, and sends nothing for them", function()
    local k = keys()
    local good = addresses(230, "api")
    local entries = {}
    for i, a in ipairs(good) do entries[i] = a end
    entries[#entries + 1] = good[1] -- the same address twice: two entries, two results
    local bad = {
      { { "email", "x@example.com" }, "the entry has no field 'id'" },
      { "not-an-address", "field 'id': not an email address" },
      { "ctl\1@example.com", "field 'id': invisible or control character U+0001 inside the id" },
      { "new\nline@example.com", "field 'id': invisible or control character U+000A inside the id" },
      { "sp ace@example.com", "field 'id': invisible or control character U+0020 inside the id" },
      { "bad\255utf8@example.com", "field 'id': not valid UTF-8" },
      { string.rep("a", 1100) .. "@example.com", "the entry is 1114 bytes, over the 1024-byte limit" },
      { { "id", "ok@example.com", "note", string.rep("n", 1020) }, "the entry is 1040 bytes, over the 1024-byte limit" },
      { "", "field 'id': empty" },
    }
    for _, b in ipairs(bad) do entries[#entries + 1] = b[1] end
    local ids = add(k.stream, entries)
    local c = client()
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results,
      consumer = "api", batch_size = 50 })
    local s = assert(w:run { idle_exit = 0.3 })
    w:close()
    c:close()
    assert.equal("idle", s.stopped)
    assert.equal(#entries, s.read)
    assert.equal(#entries, s.results)
    assert.equal(#bad, s.bad)
    assert.equal(#bad, s.failed)
    assert.equal(231, s.changed + s.unchanged)
    local by_entry = one_each(k, ids)
    for i = 1, 231 do
      local r = by_entry[ids[i]]
      assert.equal(entries[i], r.id)
      assert.is_true(r.outcome == "changed" or r.outcome == "unchanged", r.outcome)
      assert.is_nil(r.error)
    end
    assert.equal("changed", by_entry[ids[2]].outcome)
    for j, b in ipairs(bad) do
      local r = by_entry[ids[231 + j]]
      assert.equal("failed", r.outcome)
      assert.equal(b[2], r.error)
    end
    assert.equal(string.rep("a", 1024), by_entry[ids[231 + 7]].id) -- a huge id is cut in its result
    assert.equal(0, group_pending(k))
    -- nothing was sent for the bad entries; every good address once, in batches of at most 50
    local sent = {}
    for _, req in ipairs(sim.log()) do
      local body = req.body and require("cjson").decode(req.body)
      assert.is_true(#body.inputs <= 50)
      for _, id in ipairs(body.inputs) do
        assert.is_true(sent[id] == nil or id == good[1], id .. " sent twice") -- good[1]: in two entries
        sent[id] = true
      end
    end
    for _, a in ipairs(good) do assert.is_true(sent[a], a) end
    local n = 0
    for _ in pairs(sent) do n = n + 1 end
    assert.equal(#good, n)
    local state = sim.state()
    for _, a in ipairs(good) do assert.is_not_nil(state[a], a .. " not unsubscribed") end
  end)

  it("takes addresses by commprefs.ids' rule: padding trimmed, an invisible character inside failed and never sent", function()
    local k = keys()
    local NBSP, ZWSP, BOM = "\194\160", "\226\128\139", "\239\187\191"
    local entries = {
      NBSP .. "pad@example.com" .. NBSP,         -- sent as pad@example.com
      BOM .. "Pad@Example.com\t",                 -- the same address in other letters: sent once
      ZWSP .. "zw@example.com" .. ZWSP,           -- zero-width around it: trimmed, sent
      "ev" .. ZWSP .. "e@example.com",            -- zero-width inside: another address, failed
      "nb" .. NBSP .. "sp@example.com",           -- NBSP inside: failed
      NBSP .. NBSP,                               -- nothing but padding: failed (empty)
    }
    local ids = add(k.stream, entries)
    local c = client()
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results })
    local s = assert(w:run { idle_exit = 0.3 })
    w:close()
    c:close()
    assert.equal(3, s.bad)
    assert.equal(3, s.failed)
    local by_entry = one_each(k, ids)
    for i, want in ipairs { "pad@example.com", "Pad@Example.com", "zw@example.com" } do
      assert.equal(want, by_entry[ids[i]].id)
      assert.is_true(by_entry[ids[i]].outcome == "changed" or by_entry[ids[i]].outcome == "unchanged")
      assert.is_nil(by_entry[ids[i]].error)
    end
    for i, why in pairs { [4] = "invisible or control character U+200B inside the id",
      [5] = "invisible or control character U+00A0 inside the id", [6] = "empty" } do
      assert.equal("failed", by_entry[ids[i]].outcome)
      assert.equal("field 'id': " .. why, by_entry[ids[i]].error)
      assert.equal(entries[i], by_entry[ids[i]].id) -- the field as it was
    end
    local sent = {}
    for _, req in ipairs(sim.log()) do
      for _, id in ipairs(require("cjson").decode(req.body).inputs) do sent[#sent + 1] = id end
    end
    table.sort(sent)
    assert.same({ "pad@example.com", "zw@example.com" }, sent)
  end)

  it("answers status entries with unsubscribed or subscribed", function()
    local k = keys()
    local c = client()
    assert(c:batch_unsubscribe_all({ "st1@example.com", "st3@example.com" }))
    local ids = add(k.stream, { "st1@example.com", "st2@example.com", "st3@example.com", "nope" })
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results, op = "status" })
    local s = assert(w:run { idle_exit = 0.2 })
    c:close()
    assert.equal(2, s.unsubscribed)
    assert.equal(1, s.subscribed)
    local by_entry = one_each(k, ids)
    assert.equal("unsubscribed", by_entry[ids[1]].outcome)
    assert.equal("subscribed", by_entry[ids[2]].outcome)
    assert.equal("unsubscribed", by_entry[ids[3]].outcome)
    assert.equal("failed", by_entry[ids[4]].outcome)
  end)

  it("raises on bad arguments and touches nothing", function()
    local c = client()
    local k = keys()
    local base = { redis = R.url, stream = k.stream, group = k.group, results = k.results }
    local function with(over)
      local o = {}
      for key, v in pairs(base) do o[key] = v end
      for key, v in pairs(over) do if v == false then o[key] = nil else o[key] = v end end
      return o
    end
    local cases = {
      { with { stream = false }, "bad option 'stream'" },
      { with { group = "" }, "bad option 'group'" },
      { with { results = "a\nb" }, "bad option 'results'" },
      { with { results = k.stream }, "must not be the source stream" },
      { with { op = "delete" }, "bad option 'op'" },
      { with { batch_size = 0 }, "bad option 'batch_size'" },
      { with { claim_idle = -1 }, "bad option 'claim_idle'" },
      { with { redis = "http://x" }, "bad option 'redis'" },
      { with { redis = "redis://127.0.0.1:port" }, "bad option 'redis' (redis://[user:pass@]host:port[/db] expected: bad port" },
      { with { redis = false }, "exactly one of 'redis'" },
      { with { color = "red" }, "unknown option 'color'" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(worker.new, c, case[1])
      assert.is_false(ok)
      assert.matches("commprefs.worker.new: .*" .. case[2]:gsub("%p", "%%%0"), err)
    end
    assert.has_error(function() worker.new({}, base) end)
    c:close()
    assert.equal(0, cmd({ "EXISTS", k.stream, k.results }))
  end)

  it("never appends a second result: a commit of entries already committed is skipped", function()
    local k = keys()
    local ids = add(k.stream, addresses(120, "dup"))
    -- a consumer that dies holding 40 entries
    cmd({ "XGROUP", "CREATE", k.stream, k.group, "0", "MKSTREAM" })
    local held = cmd({ "XREADGROUP", "GROUP", k.group, "dead", "COUNT", "40", "STREAMS", k.stream, ">" })
    assert.equal(40, #held[1][2])
    local c = client()
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results,
      claim_idle = 0.2, batch_size = 30 })
    socket.sleep(0.25)
    local s = assert(w:run { idle_exit = 0.5 })
    assert.equal(40, s.claimed)
    assert.equal(120, s.results)
    one_each(k, ids)
    -- the dead consumer comes back and commits its 40 entries: nothing is appended
    local late = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results, consumer = "dead" })
    local list = {}
    for i, e in ipairs(held[1][2]) do list[i] = { entry = e[1], id = e[2][2], outcome = "changed" } end
    assert.equal(0, late:_commit(list)) -- none left pending for another delivery
    assert.equal(0, late.summary.results)
    assert.equal(40, late.summary.duplicates)
    late:close()
    w:close()
    c:close()
    one_each(k, ids)
    assert.equal(0, group_pending(k))
  end)

  it("leaves a batch whose retries are spent on a 503 pending, and delivers it again: no failed result", function()
    local k = keys()
    local ids = add(k.stream, addresses(30, "fail"))
    sim.fault { kind = "status", status = 503, match = "batch", count = 3 }
    local c = client { max_retries = 2 }
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results })
    local events = {}
    local s = assert(w:run { idle_exit = 0.2, on_event = function(name, info) events[#events + 1] = { name, info } end })
    c:close()
    assert.equal(0, s.failed)
    assert.equal(30, s.changed)
    assert.equal(30, s.redelivered)
    assert.equal(4, #sim.log()) -- one try and two retries, then the second delivery
    local holds = 0
    for _, e in ipairs(events) do
      if e[1] == "hold" then holds = holds + 1; assert.equal(30, e[2].entries); assert.matches("503", e[2].error) end
    end
    assert.equal(1, holds)
    local by_entry = one_each(k, ids)
    for _, id in ipairs(ids) do assert.equal("changed", by_entry[id].outcome) end
    assert.equal(0, group_pending(k))
  end)

  it("gives a per-id refusal from HubSpot a failed result at once, without another delivery", function()
    local k = keys()
    sim.reset { invalid_match = "^refused%-" }
    local ids = add(k.stream, { "ok1@example.com", "refused-1@example.com", "ok2@example.com" })
    local c = client()
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results })
    local s = assert(w:run { idle_exit = 0.2 })
    c:close()
    local by_entry = one_each(k, ids)
    assert.equal("changed", by_entry[ids[1]].outcome)
    assert.equal("changed", by_entry[ids[3]].outcome)
    assert.equal(0, s.redelivered)
    assert.equal(1, #sim.log())
    assert.equal("failed", by_entry[ids[2]].outcome)
    assert.matches("Invalid subscriber id", by_entry[ids[2]].error)
    assert.equal(1, s.failed)
    assert.equal(0, group_pending(k))
  end)

  it("keeps one result per entry when the simulator fails 10% of requests", function()
    local k = keys()
    local ids = add(k.stream, addresses(3000, "flaky"))
    sim.fault { kind = "status", status = 503, match = "batch", p = 0.05, count = 1000 }
    sim.fault { kind = "reset", match = "batch", p = 0.05, count = 1000 }
    local c = client { max_retries = 8, max_concurrency = 4 }
    local w = worker.new(c, { redis = R.url, stream = k.stream, group = k.group, results = k.results, batch_size = 20 })
    local s = assert(w:run { idle_exit = 0.3 })
    local st = c:stats()
    c:close()
    assert.is_true(st.retries > 0, "no fault was injected")
    assert.equal(3000, s.results)
    local by_entry = one_each(k, ids)
    local state = sim.state()
    for i, id in ipairs(ids) do
      if by_entry[id].outcome ~= "failed" then assert.is_not_nil(state["flaky" .. i .. "@example.com"]) end
    end
    assert.equal(0, s.failed) -- 9 tries each: a failure would be a 1e-9 event
    assert.equal(0, group_pending(k))
  end)
end)


describe("commprefs.worker when Redis is unreachable", function()
  it("gives up after redis_wait with a clear error and sends nothing", function()
    local port = (function()
      local srv = assert(socket.bind("127.0.0.1", 0))
      local _, p = srv:getsockname()
      srv:close()
      return p
    end)()
    sim.reset()
    local c = client()
    local w = worker.new(c, { redis = "redis://127.0.0.1:" .. port, stream = "s", group = "g", results = "r",
      redis_wait = 0.5 })
    local t0 = socket.gettime()
    local s, err = w:run { idle_exit = 5 }
    c:close()
    assert.is_nil(s)
    assert.equal("redis", err.kind)
    assert.matches("Redis unreachable for 0.5 s: .*cannot connect", err.message)
    assert.equal("redis", err.summary.stopped)
    assert.is_true(socket.gettime() - t0 < 4)
    assert.equal(0, #sim.log())
  end)
end)

describe("commprefs worker (command line)", function()
  setup(function()
    R = R or redis.start()
    conn = conn or assert(core.redis_connect(R.url, { timeout = 10 }))
  end)
  before_each(function() sim.reset() end)

  it("rejects bad usage with status 2 and touches nothing", function()
    local k = keys()
    local cases = {
      { "--stream s --group g", "--results is required" },
      { worker_args(k, "--op delete"), "--op must be unsubscribe-all or status" },
      { worker_args(k, "--idle-exit soon"), "--idle-exit must be a number of seconds" },
      { worker_args(k, "--claim-idle 0"), "--claim-idle must be above 0" },
      { worker_args(k, "extra"), "unexpected argument 'extra'" },
      { worker_args(k, "--stream " .. k.results), "must not be the source stream" },
      { worker_args(k, "--redis redis://:pw-in-url-77@127.0.0.1:notaport"), "bad port in the redis URL" },
      { worker_args(k, "--redis http://127.0.0.1:6379"), "bad option 'redis'" },
    }
    for _, case in ipairs(cases) do
      local code, out, err = cli(case[1])
      assert.equal(2, code, err)
      assert.equal("", out)
      assert.matches(case[2]:gsub("%p", "%%%0"), err)
      assert.is_nil(err:find("pw-in-url-77", 1, true))
    end
    assert.equal(0, cmd({ "EXISTS", k.stream, k.results }))
    assert.equal(0, #sim.log())
  end)

  it("drains 10,000 entries with two workers on one budget, one killed with SIGKILL and restarted", function()
    local k = keys()
    sim.reset({ rate = "20/1000", latency = 150 })
    local budget = "budget-" .. k.stream
    local list = addresses(10000, "kill")
    local ids = add(k.stream, list)
    local args = worker_args(k, "--budget-key " .. budget .. " --idle-exit 2 --quiet")
    local a = spawn(args .. " --consumer a")
    local b = spawn(args .. " --consumer b")
    socket.sleep(0.5 + math.random() * 2.5)
    assert.equal(0, exec("kill -9 " .. a.pid))
    local code_a = wait(a)
    assert.equal(137, code_a)
    local a2 = spawn(args .. " --consumer a")
    local code_b, _, err_b = wait(b, 180)
    local code_a2, _, err_a2 = wait(a2, 180)
    assert.equal(0, code_b, err_b)
    assert.equal(0, code_a2, err_a2)
    assert.matches("worker b: %d+ entries read, %d+ results", err_b)
    one_each(k, ids)
    assert.equal(0, group_pending(k))
    local state = sim.state()
    for _, addr in ipairs(list) do assert.is_not_nil(state[addr], addr .. " not unsubscribed") end
    assert.equal(0, sim.admin("GET", "log").throttled)
  end)

  it("takes over the entries of a worker killed for good once they are idle --claim-idle seconds", function()
    local k = keys()
    sim.reset({ rate = "20/1000", latency = 150 })
    local ids = add(k.stream, addresses(2000, "orphan"))
    local args = worker_args(k, "--batch-size 20 --idle-exit 2 --claim-idle 1 --quiet --budget-key orphan-budget")
    local a = spawn(args .. " --consumer doomed")
    local b = spawn(args .. " --consumer survivor")
    socket.sleep(1.2)
    assert.equal(0, exec("kill -9 " .. a.pid))
    wait(a)
    local code, _, err = wait(b, 120)
    assert.equal(0, code, err)
    local claimed = tonumber(err:match("(%d+) taken over"))
    assert.is_true(claimed > 0, err)
    one_each(k, ids)
    assert.equal(0, group_pending(k))
    assert.equal(0, sim.admin("GET", "log").throttled)
  end)

  it("keeps one result per entry when Redis is restarted mid-run", function()
    local k = keys()
    sim.reset({ rate = "20/1000", latency = 100 })
    local ids = add(k.stream, addresses(2000, "restart"))
    local p = spawn(worker_args(k, "--batch-size 20 --idle-exit 2 --quiet --budget-key restart-budget"))
    socket.sleep(1.5)
    conn:close()
    redis.restart(R, { keep_data = true }) -- the data as it was when Redis stopped
    conn = assert(core.redis_connect(R.url, { timeout = 10 }))
    local code, _, err = wait(p, 180)
    assert.equal(0, code, err)
    assert.matches("[1-9]%d* Redis reconnects", err)
    one_each(k, ids)
    assert.equal(0, group_pending(k))
  end)

  it("fails at once on a wrong Redis password (exit 1) and never prints it", function()
    local R2 = redis.start { password = "pw-right-8431" }
    local p = spawn(string.format("--redis redis://:pw-wrong-5517@127.0.0.1:%d --stream s --group g --results r"
      .. " --idle-exit 1", R2.port))
    local code, out, err = wait(p, 20)
    redis.stop(R2)
    assert.equal(1, code, err)
    assert.equal("", out)
    assert.matches("authentication failed", err)
    assert.is_nil(err:find("pw-wrong-5517", 1, true))
    assert.is_nil(err:find("pw-right-8431", 1, true))
    assert.equal(0, #sim.log())
  end)

  it("stops at HubSpot's daily limit (exit 3) leaving the rest pending, and a second run finishes once each", function()
    local k = keys()
    sim.reset({ daily = 3 })
    local ids = add(k.stream, addresses(1000, "daily"))
    local code, _, err = cli(worker_args(k, "--idle-exit 1 --quiet --claim-idle 1"))
    assert.equal(3, code, err)
    assert.matches("daily limit is spent", err)
    assert.equal(300, #results(k.results)) -- three requests answered, nothing failed for the limit
    for _, r in ipairs(results(k.results)) do assert.equal("changed", r.outcome) end
    sim.reset({ daily = 100 }) -- a new day
    local code2, _, err2 = cli(worker_args(k, "--idle-exit 1 --quiet --claim-idle 1"))
    assert.equal(0, code2, err2)
    local by_entry = one_each(k, ids)
    for _, id in ipairs(ids) do assert.is_true(by_entry[id].outcome ~= "failed", by_entry[id].error) end
    assert.equal(0, group_pending(k))
  end)

  it("carries on when Redis comes back empty (no persistence): nothing to commit, exit 0", function()
    local k = keys()
    sim.reset({ rate = "20/1000", latency = 100 })
    add(k.stream, addresses(2000, "empty"))
    local p = spawn(worker_args(k, "--batch-size 20 --idle-exit 2 --quiet"))
    socket.sleep(1.5)
    conn:close()
    redis.restart(R)
    conn = assert(core.redis_connect(R.url, { timeout = 10 }))
    local code, _, err = wait(p, 60)
    assert.equal(0, code, err)
    assert.matches("stopped: idle", err)
    assert.equal(0, cmd({ "XLEN", k.results })) -- the results went with the rest of the data
    assert.equal(0, cmd({ "XLEN", k.stream })) -- the group was created again on an empty stream
  end)

  it("finishes the Redis commands a signal arrives in the middle of, leaving nothing pending", function()
    -- DEBUG SLEEP stops the server answering for 1.5 s: the worker is waiting
    -- on a commit or a read when SIGTERM comes (CI once saw 70 entries left
    -- pending: a commit cut short by the signal stopped the drain as if Redis
    -- had failed, and the batches in flight were never finished)
    local k = keys()
    sim.reset({ rate = "20/1000", latency = 100 })
    local ids = add(k.stream, addresses(800, "slowredis"))
    local p = spawn(worker_args(k, "--batch-size 10 --consumer s --quiet"))
    socket.sleep(1.5)
    exec(string.format("redis-cli -p %d DEBUG SLEEP 1.5 >/dev/null 2>&1 &", R.port))
    socket.sleep(0.5)
    exec("kill -TERM " .. p.pid)
    local code, _, err = wait(p, 30)
    assert.equal(0, code, err)
    assert.matches("stopped: signal", err)
    assert.equal(0, group_pending(k)) -- every entry read was settled
    local done = #results(k.results)
    assert.is_true(done > 0 and done < 800, done .. " results")
    local code2, _, err2 = cli(worker_args(k, "--batch-size 100 --idle-exit 0.5 --quiet --claim-idle 1"))
    assert.equal(0, code2, err2)
    one_each(k, ids)
  end)

  it("finishes and commits the batches in flight on SIGTERM (exit 0) and SIGINT (exit 130)", function()
    for _, sig in ipairs { { "TERM", 0 }, { "INT", 130 } } do
      local k = keys()
      sim.reset({ rate = "20/1000", latency = 300 })
      local ids = add(k.stream, addresses(1500, "sig" .. sig[1]))
      local p = spawn(worker_args(k, "--batch-size 10 --consumer s --quiet"))
      socket.sleep(1.5)
      exec("kill -" .. sig[1] .. " " .. p.pid)
      local code, _, err = wait(p, 30)
      assert.equal(sig[2], code, err)
      assert.matches("stopped: signal", err)
      assert.equal(0, group_pending(k)) -- nothing read was left uncommitted
      local done = #results(k.results)
      assert.is_true(done > 0 and done < 1500, done .. " results")
      -- every result was committed with its batch; a second worker finishes the rest, once each
      local code2, _, err2 = cli(worker_args(k, "--batch-size 100 --idle-exit 0.5 --quiet --claim-idle 1"))
      assert.equal(0, code2, err2)
      one_each(k, ids)
      assert.equal(0, group_pending(k))
    end
  end)
end)

describe("commprefs.worker inside OpenResty", function()
  setup(function()
    R = R or redis.start()
    conn = conn or assert(core.redis_connect(R.url, { timeout = 10 }))
  end)
  before_each(function() sim.reset() end)

  it("drains a stream through cosockets (commprefs.ngx.redis and the cosocket transport)", function()
    local nginx = require "support.nginx"
    local inst = nginx.start { env = { SIM_URL = sim.url, REDIS_URL = R.url } }
    local k = keys()
    local ids = add(k.stream, addresses(250, "ngx"))
    local status, body = nginx.run(inst, string.format([[
      local commprefs = require "commprefs"
      local worker = require "commprefs.worker"
      local redis = require "commprefs.ngx.redis"
      local client = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL") }
      local url = os.getenv("REDIS_URL")
      local w = worker.new(client, { connect = function() return redis.connect(url) end,
        stream = %q, group = %q, results = %q, batch_size = 50 })
      -- idle_exit: a margin a busy machine cannot eat (the run still ends by itself, as "idle")
      local s = assert(w:run { idle_exit = 1, stop = function() return ngx.worker.exiting() end })
      w:close()
      return { results = s.results, changed = s.changed, batches = s.batches, stopped = s.stopped,
        cosockets = client._ngx ~= nil }
    ]], k.stream, k.group, k.results), 120)
    local errors, log = inst:errors(), inst:log()
    inst:stop()
    assert.equal(200, status, tostring(body) .. "\nnginx's error log:\n" .. log)
    local s = require("cjson").decode(body)
    assert.same({ results = 250, changed = 250, batches = 5, stopped = "idle", cosockets = true }, s)
    assert.equal("", table.concat(errors, "\n"))
    one_each(k, ids)
    assert.equal(0, group_pending(k))
    assert.equal(5, #sim.log())
  end)
end)
