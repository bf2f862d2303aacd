-- Bulk jobs and the command line against the simulator: faults on 10% of
-- requests, kill -9 and resume, bad input files, pacing under the rate limit.
local sim = require "support.sim"
local cjson = require "cjson"
local socket = require "socket"
local commprefs = require "commprefs"


local function client(opts) return sim.client(opts) end

local function ids(n)
  local t = {}
  for i = 1, n do t[i] = "bulk" .. i .. "@example.com" end
  return t
end

local function tmpfile(name) return require("support.proc").tmpfile("spec", name) end

local read_journal = require("support.proc").read_journal

local function write_lines(path, lines, sep)
  local f = assert(io.open(path, "wb"))
  f:write(table.concat(lines, sep or "\n"), "\n")
  f:close()
end

-- Every id's requests in the simulator's log; checks none came after its journal line.
local function assert_none_sent_after_journal(journal)
  local sent_at = {}
  for _, entry in ipairs(sim.log()) do
    if entry.body and entry.body ~= "" then
      for _, id in ipairs(cjson.decode(entry.body).inputs or {}) do
        sent_at[id] = math.max(sent_at[id] or 0, entry.time)
      end
    end
  end
  for _, rec in ipairs(journal) do
    if rec.outcome ~= "failed" then
      assert.is_true(sent_at[rec.id] ~= nil, rec.id .. " was never sent")
      assert.is_true(sent_at[rec.id] <= rec.t + 0.005, rec.id .. " was sent after its outcome was journaled")
    end
  end
end

local CLI = "bin/commprefs"

-- os.execute's exit code under Lua 5.4 (true/nil, "exit", code) and LuaJIT (raw wait status).
local function exec(cmd)
  local a, _, c = os.execute(cmd)
  if type(a) == "number" then return a >= 256 and math.floor(a / 256) or a end
  return c
end

-- Runs the command line; returns exit code, stdout, stderr.
local function cli(args, env)
  local out, err = tmpfile("out"), tmpfile("err")
  local cmd = string.format("%s HUBSPOT_ACCESS_TOKEN=sim-token COMMPREFS_BASE_URL=%s %s %s >%s 2>%s",
    env or "", sim.url, CLI, args, out, err)
  local code = exec(cmd)
  local function slurp(p) local f = io.open(p); local s = f:read("*a"); f:close(); os.remove(p); return s end
  return code, slurp(out), slurp(err)
end

describe("bulk jobs", function()
  before_each(function() sim.reset() end)

  it("give 20,000 ids with faults on 10% of requests each exactly one outcome", function()
    local c = client { max_concurrency = 8, max_retries = 6 }
    sim.fault { kind = "status", status = 503, match = "batch", p = 0.04, count = 1000 }
    sim.fault { kind = "reset", match = "batch", p = 0.03, count = 1000 }
    sim.fault { kind = "429", retry_after = 0, match = "batch", p = 0.03, count = 1000 }
    local journal = tmpfile("journal")
    local list = ids(20000)
    local seen, progress = {}, 0
    local s = c:bulk_unsubscribe_all(list, {
      journal = journal,
      on_result = function(id, outcome)
        assert.is_nil(seen[id], "two outcomes for " .. id)
        seen[id] = outcome.status
      end,
      on_progress = function(done, total) progress = done; assert.equal(20000, total) end,
    })
    assert.equal(20000, s.done, "stopped: " .. tostring(s.stopped) .. " " .. tostring(s.stop_message))
    assert.equal(20000, s.changed + s.unchanged + s.failed)
    assert.equal(20000, progress)
    for _, id in ipairs(list) do assert.is_not_nil(seen[id], id) end
    assert.is_true(c:stats().retries > 0, "no fault was injected")
    local recs = read_journal(journal)
    assert.equal(20000, #recs)
    local state = sim.state()
    for _, rec in ipairs(recs) do
      if rec.outcome ~= "failed" then assert.is_not_nil(state[rec.id], rec.id) end
    end
    assert_none_sent_after_journal(recs)
    os.remove(journal)
  end)

  it("records final failures with their errors and retries them on the next run", function()
    local c = client { max_retries = 0, batch_size = 10 }
    sim.fault { kind = "status", status = 500, match = "batch", count = 1 }
    local journal = tmpfile("journal")
    local s = c:bulk_unsubscribe_all(ids(30), { journal = journal })
    assert.equal(10, s.failed)
    assert.equal(500, s.failures[1].error.status)
    s = c:bulk_unsubscribe_all(ids(30), { journal = journal })
    assert.equal(20, s.skipped)
    assert.equal(10, s.done)
    assert.equal(0, s.failed)
    os.remove(journal)
  end)

  it("marks ids HubSpot rejects as failed, one by one", function()
    local c = client()
    local s = c:bulk_get_unsubscribe_all_status({ "ok@example.com", "not-an-email" })
    assert.equal(1, s.subscribed)
    assert.equal(1, s.failed)
    assert.equal("not-an-email", s.failures[1].id)
    assert.matches("Invalid subscriber id", tostring(s.failures[1].error))
  end)

  it("stream from an iterator and never hold more than the batches in flight", function()
    local c = client { max_concurrency = 2, batch_size = 50 }
    local pulled, completed, max_ahead = 0, 0, 0
    local n = 0
    local s = c:bulk_unsubscribe_all(function()
      n = n + 1
      if n > 1000 then return nil end
      pulled = pulled + 1
      max_ahead = math.max(max_ahead, pulled - completed)
      return "it" .. n .. "@example.com"
    end, { on_result = function() completed = completed + 1 end })
    assert.equal(1000, s.done)
    assert.is_true(max_ahead <= 2 * 50 + 50, "pulled " .. max_ahead .. " ids ahead")
  end)

  it("raise on bad arguments before sending", function()
    local c = client()
    assert.has_error(function() c:bulk_unsubscribe_all("a@example.com") end)
    assert.has_error(function() c:bulk_unsubscribe_all({ "a@example.com", 3 }) end)
    assert.has_error(function() c:bulk_unsubscribe_all({}, { bogus = 1 }) end)
    assert.has_error(function() c:bulk_unsubscribe_all({}, { on_result = "x" }) end)
    assert.same({}, sim.log())
  end)

  it("pace requests under the learned rate limit: no 429 in steady state", function()
    sim.admin("POST", "config", { rate = "10/500" })
    local c = client { max_concurrency = 4, batch_size = 10 }
    local s = c:bulk_unsubscribe_all(ids(400))
    assert.equal(400, s.changed)
    local st = c:stats()
    assert.equal(0, st.throttled)
    assert.equal(10, st.rate_max)
    assert.equal(500, st.rate_interval_ms)
    assert.equal(40, st.sent)
  end)

  it("pace requests under a rate limit set by hand", function()
    local c = client { max_concurrency = 4, batch_size = 10, rate_limit = { max = 5, interval = 0.25 } }
    local t0 = socket.gettime()
    local s = c:bulk_unsubscribe_all(ids(200))
    assert.equal(200, s.done)
    -- 20 requests at 5 per 0.25 s cannot take less than 3 windows
    assert.is_true(socket.gettime() - t0 >= 0.75)
  end)
end)

describe("the commprefs command", function()
  before_each(function() sim.reset() end)

  it("resumes after kill -9 at 5 random points: every id journaled exactly once", function()
    sim.admin("POST", "config", { latency = 20, jitter = 2, rate = "off" })
    local input, journal = tmpfile("ids"), tmpfile("journal")
    local list = ids(20000)
    write_lines(input, list)
    local args = string.format("unsubscribe-all --file %s --journal %s --concurrency 2 --quiet", input, journal)
    local function journal_lines()
      local f = io.open(journal)
      local n = 0
      if f then for _ in f:lines() do n = n + 1 end f:close() end
      return n
    end
    local before = 0
    for _ = 1, 5 do
      local p = io.popen(string.format("sh -c 'echo $$; HUBSPOT_ACCESS_TOKEN=sim-token exec %s %s --base-url %s >/dev/null 2>&1' 2>/dev/null",
        CLI, args, sim.url))
      local pid = p:read("*l")
      -- kill at a random point after this run has journaled something (machines differ in speed)
      local deadline = socket.gettime() + 60
      while journal_lines() <= before and socket.gettime() < deadline do socket.sleep(0.01) end
      socket.sleep(math.random() * 0.15)
      assert.equal(0, exec("kill -9 " .. pid), "the job had already ended")
      p:close()
      local n = journal_lines()
      assert.is_true(n > before and n < 20000, "journal lines after kill: " .. n)
      before = n
    end
    local code = cli(args)
    assert.equal(0, code)
    local recs = read_journal(journal)
    local count = {}
    for _, rec in ipairs(recs) do
      assert.is_not.equal("failed", rec.outcome)
      count[rec.id] = (count[rec.id] or 0) + 1
    end
    local state = sim.state()
    for _, id in ipairs(list) do
      assert.equal(1, count[id], id)
      assert.same({ ["0"] = state[id].wide["0"] }, state[id].wide)
    end
    assert.equal(20000, #recs)
    assert_none_sent_after_journal(recs)
    os.remove(input); os.remove(journal)
  end)

  it("reports each bad input line with its number and loses nothing else", function()
    local input = tmpfile("bad")
    local huge = string.rep("x", 100000) .. "@example.com"
    write_lines(input, { "good1@example.com", "", "not-an-address", "good2@example.com", "good1@example.com",
      huge, "bad\255byte@example.com", "good3@example.com" }, "\r\n")
    local code, out, err = cli("unsubscribe-all --file " .. input)
    assert.equal(1, code, out .. err)
    assert.matches(":2: blank line", err)
    assert.matches(":3: not an email address", err)
    assert.matches(":5: duplicate of line 1", err)
    assert.matches(":6: line longer than 1024 bytes", err)
    assert.matches(":7: not valid UTF%-8", err)
    assert.matches("3 done, 3 changed", err)
    local state = sim.state()
    for _, id in ipairs { "good1@example.com", "good2@example.com", "good3@example.com" } do
      assert.is_not_nil(state[id], id)
    end
    assert.equal(1, #sim.log())
    assert.same({ "good1@example.com", "good2@example.com", "good3@example.com" }, cjson.decode(sim.log()[1].body).inputs)
    os.remove(input)
  end)

  it("dry run sends nothing", function()
    local input = tmpfile("ids")
    write_lines(input, ids(250))
    local code, out = cli("unsubscribe-all --dry-run --file " .. input)
    assert.equal(0, code)
    assert.matches("250 ids would be sent in 3 requests", out)
    assert.same({}, sim.log())
    os.remove(input)
  end)

  it("reads ids from stdin and writes JSON lines", function()
    local input = tmpfile("ids")
    write_lines(input, { "s1@example.com", "s2@example.com" })
    local code, out = cli("unsubscribe-all --jsonl - <" .. input)
    assert.equal(0, code)
    local n = 0
    for line in out:gmatch("[^\n]+") do
      local rec = cjson.decode(line)
      assert.equal("changed", rec.outcome)
      n = n + 1
    end
    assert.equal(2, n)
    os.remove(input)
  end)

  it("status, check and definitions", function()
    assert.equal(0, (cli("unsubscribe-all u1@example.com")))
    local code, out = cli("status u1@example.com u2@example.com")
    assert.equal(0, code)
    assert.matches("u1@example%.com%s+yes%s+PORTAL_WIDE", out)
    assert.matches("u2@example%.com%s+no", out)
    local input = tmpfile("ids")
    write_lines(input, { "u1@example.com", "u2@example.com" })
    code, out = cli("check --file " .. input)
    assert.equal(0, code)
    assert.equal("u1@example.com\n", out)
    code, out = cli("definitions --json")
    assert.equal(0, code)
    assert.equal(3, #cjson.decode(out).results)
    code, out = cli("status u1@example.com --json")
    assert.equal(1, cjson.decode(out).unsubscribed)
    os.remove(input)
  end)

  it("exits 1 when ids failed", function()
    local code, _, err = cli("unsubscribe-all x@example.com", "COMMPREFS_BASE_URL=http://127.0.0.1:1")
    -- the environment's base url is overridden by the cli() helper; use --base-url instead
    code, _, err = cli("unsubscribe-all x@example.com --base-url http://127.0.0.1:1 --rate 100/1")
    assert.equal(1, code)
    assert.matches("1 failed", err)
    assert.matches("failed: x@example.com: commprefs: network", err)
  end)

  it("runs a Lua automation with a ready client", function()
    local script = tmpfile("script.lua")
    write_lines(script, {
      "assert(client:unsubscribe_all(arg[1]))",
      "print(commprefs.pretty(assert(client:get_unsubscribe_all_status(arg[1]))))",
      "return client:is_unsubscribed_from_all(arg[1])",
    })
    local code, out = cli("run " .. script .. " run@example.com")
    assert.equal(0, code)
    assert.matches("run@example%.com%s+UNSUBSCRIBED", out)
    write_lines(script, { "return false" })
    assert.equal(1, (cli("run " .. script)))
    os.remove(script)
  end)

  it("takes the token from a file, never from the command line", function()
    local code, _, err = cli("status a@example.com --token sim-token")
    assert.equal(2, code)
    assert.matches("never taken from the command line", err)
    local tf = tmpfile("token")
    write_lines(tf, { "sim-read-only" })
    code = cli("status a@example.com --token-file " .. tf, "HUBSPOT_ACCESS_TOKEN= ")
    assert.equal(0, code)
    assert.equal("Bearer ****", sim.log()[1].headers.authorization)
    os.remove(tf)
  end)

  it("sim runs the simulator in the foreground", function()
    -- both ports free (the TLS one defaults to port + 1, which another suite may hold)
    local proc = require "support.proc"
    local p, tls_port = proc.free_port(), proc.free_port()
    while tls_port == p do tls_port = proc.free_port() end
    local h = io.popen(string.format("sh -c 'echo $$; SIM_TLS_PORT=%d exec %s sim --port %s >/dev/null 2>&1' 2>/dev/null",
      tls_port, CLI, p))
    local pid = h:read("*l")
    local code
    for _ = 1, 600 do -- up to 30 s: nginx starts slowly on a busy machine
      local _, c = require("socket.http").request("http://127.0.0.1:" .. p .. "/__sim/health")
      code = c
      if code == 200 then break end
      socket.sleep(0.05)
    end
    exec("kill " .. pid)
    h:close()
    assert.equal(200, code)
    -- and it stops with the command, not left behind
    local after
    for _ = 1, 60 do
      local _, c = require("socket.http").request("http://127.0.0.1:" .. p .. "/__sim/health")
      after = c
      if c ~= 200 then break end
      socket.sleep(0.1)
    end
    assert.is_not.equal(200, after)
  end)

  it("draws a progress bar with rate and ETA on a terminal", function()
    local input = tmpfile("ids")
    write_lines(input, ids(300))
    local out = tmpfile("tty")
    local code = exec(string.format("HUBSPOT_ACCESS_TOKEN=sim-token script -qec '%s unsubscribe-all --file %s --base-url %s --batch-size 10' %s >/dev/null 2>&1",
      CLI, input, sim.url, out))
    local f = io.open(out); local text = f:read("*a"); f:close()
    assert.equal(0, code)
    assert.matches("%[#+%] 300/300 %d+ ids/s ETA %d+s", text)
    os.remove(input); os.remove(out)
  end)

  it("answers usage errors with 2 and --help with 0", function()
    for _, args in ipairs { "", "frobnicate", "status", "unsubscribe-all", "check", "status a@example.com --concurrency 0",
      "status a@example.com --bogus", "unsubscribe-all --rate fast a@example.com", "run" } do
      local code, _, err = cli(args)
      assert.equal(2, code, args)
      assert.matches("commprefs: ", err)
    end
    for _, c in ipairs { "--help", "status --help", "unsubscribe-all --help", "check --help", "definitions --help",
      "sim --help", "run --help" } do
      local code, out = cli(c)
      assert.equal(0, code, c)
      assert.matches("usage: commprefs", out)
    end
    assert.same({}, sim.log())
  end)
end)
