-- The libcurl transport and the retry policy (csrc/transport.c, csrc/policy.c)
-- against the simulator and small misbehaving loopback servers: issue 10's
-- defects 1 (retry storm on 5xx), 2 (use after free of a request body),
-- 3 (unbounded answers), 4 (waits that ignore SIGINT/SIGTERM, absurd learned
-- windows) and 10 (a client left busy), and the governor (csrc/governor.c)
-- that both transports drive.
local sim = require "support.sim"
local rawserver = require "support.rawserver"
local socket = require "socket"
local commprefs = require "commprefs"
local core = require "commprefs.core"

local VM = sim.vm
local BUILD = os.getenv("COMMPREFS_BUILD") or ("build/" .. VM)
local CLI_BUILD = (BUILD:gsub("luajit", "lua5.4")) -- bin/commprefs runs on lua5.4
local GET = "/communication-preferences/2026-03/statuses/a%40example.com/unsubscribe-all?channel=EMAIL"

local function handle(opts)
  local o = { token = "sim-token", backoff_base = 0.1, backoff_max = 1 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return core.new(o)
end

local function governor(opts)
  local o = { backoff_base = 0.1, backoff_max = 1 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return core.governor(o)
end

local function tmpfile(name) return require("support.proc").tmpfile("transport", name) end

local proc = require "support.proc"
local slurp, alive = proc.slurp, proc.alive


-- Runs `code` in a child VM of the same kind (commprefs on its paths) in the background.
local function spawn(code, env)
  local script, out = tmpfile("child.lua"), tmpfile("out")
  local f = assert(io.open(script, "w"))
  f:write(string.format("package.path = 'lua/?.lua;lua/?/init.lua;spec/?.lua;' .. package.path\n"
    .. "package.cpath = %q .. '/?.so;' .. package.cpath\n", BUILD), code)
  f:close()
  local p = io.popen(string.format("%s %s %s >%s 2>&1 & echo $!", env or "", VM, script, out))
  local pid = p:read("*l")
  p:close()
  return { pid = pid, out = out, script = script }
end

-- Waits up to `limit` s for the child to end; returns seconds it took (nil if it did not) and its output.
local function wait_child(child, limit)
  local t0 = socket.gettime()
  while alive(child.pid) do
    if socket.gettime() - t0 > limit then
      os.execute("kill -9 " .. child.pid .. " 2>/dev/null")
      socket.sleep(0.1)
      return nil, slurp(child.out)
    end
    socket.sleep(0.01)
  end
  local out = slurp(child.out)
  os.remove(child.out)
  os.remove(child.script)
  return socket.gettime() - t0, out
end

describe("transport", function()
  before_each(function() sim.reset() end)

  describe("retries (issue 10, defect 1)", function()
    it("backs off between attempts at a 5xx without Retry-After, and reports no retry_after", function()
      sim.fault { kind = "status", status = 503, count = 6 }
      local h = handle { max_retries = 5, backoff_base = 0.05, backoff_max = 0.05 }
      local res = h:perform({ { method = "GET", url = sim.url .. GET } })[1]
      assert.equal(503, res.status)
      assert.equal(6, res.attempts)
      assert.is_nil(res.retry_after)
      local log = sim.log()
      assert.equal(6, #log)
      for i = 2, #log do
        -- backoff is base/2 .. base with jitter: at least 25 ms between attempts
        assert.is_true(log[i].time - log[i - 1].time >= 0.02,
          string.format("attempt %d came %.4f s after the previous", i, log[i].time - log[i - 1].time))
      end
      h:close()
    end)

    it("gives retry_after only when the server sent a valid Retry-After", function()
      local h = handle()
      local ok = h:perform({ { method = "GET", url = sim.url .. GET } })[1]
      assert.equal(200, ok.status)
      assert.is_nil(ok.retry_after)
      sim.fault { kind = "429", retry_after = 1 }
      local res = h:perform({ { method = "GET", url = sim.url .. GET } })[1]
      assert.equal(200, res.status)
      assert.equal(2, res.attempts)
      h:close()
    end)

    it("parses Retry-After by one rule: delta-seconds or HTTP-date, garbage is nil", function()
      assert.equal(3, core.retry_after("3"))
      assert.equal(0, core.retry_after("0"))
      assert.is_nil(core.retry_after("soon"))
      assert.is_nil(core.retry_after("-1"))
      assert.is_nil(core.retry_after("1.5"))
      assert.is_nil(core.retry_after("99999999999999999999"))
      assert.equal(0, core.retry_after("Wed, 21 Oct 2015 07:28:00 GMT"))
    end)

    it("a 429 with a garbage Retry-After and no rate headers backs off briefly and learns nothing", function()
      sim.fault { kind = "429", retry_after = "garbage" }
      local h = handle { backoff_base = 0.2, backoff_max = 1 }
      local t0 = socket.gettime()
      local res = h:perform({ { method = "GET", url = sim.url .. GET } })[1]
      local took = socket.gettime() - t0
      assert.equal(200, res.status)
      assert.equal(2, res.attempts)
      assert.is_true(took < 2, "the retry waited " .. took .. " s")
      -- the learned window is the simulator's (from the 200), never a max of 1
      assert.equal(100, h:governor():stats().rate_max)
      h:close()
    end)
  end)

  describe("sane learned windows (issue 10, defect 4)", function()
    it("ignores rate headers outside the documented range", function()
      assert.is_nil(core.sane_window(1, 86400000))
      assert.is_nil(core.sane_window(0, 1000))
      assert.is_nil(core.sane_window(100, 50))
      assert.is_nil(core.sane_window(20000, 1000))
      assert.same({ 100, 10000 }, { core.sane_window(100, 10000) })
      assert.same({ 1, 100 }, { core.sane_window(1, 100) })
      assert.same({ 10000, 60000 }, { core.sane_window(10000, 60000) })
      local g = governor()
      local retry, _, _, learn_max = g:finish({ status = 200, attempts = 1, rate_max = 1, rate_interval_ms = 86400000 })
      assert.is_false(retry)
      assert.is_nil(learn_max) -- nothing for a shared backing either
      assert.equal(0, g:stats().rate_max)
      assert.equal(0, g:next())
      g:begin(); g:on_wire()
      assert.equal(0, g:next()) -- no one-a-day window was learned
      assert.same({ false, 0, nil, 2, 1000 }, { g:finish({ status = 200, attempts = 1, rate_max = 2, rate_interval_ms = 1000 }) })
      assert.equal(2, g:stats().rate_max)
      g:close()
    end)
  end)

  describe("request bodies (issue 10, defect 2)", function()
    it("survive the caller dropping them while libcurl still sends", function()
      local srv = rawserver.start("slowread")
      local child = spawn(string.format([[
local core = require "commprefs.core"
local h = core.new { token = "sim-token", max_concurrency = 2, rate_max = 100, rate_interval = 1 }
local slow = { method = "POST", url = %q, body = string.rep("a", 64 * 1024 * 1024) }
local fast = { method = "GET", url = %q }
local calls = 0
local res, reason = h:perform(function()
  calls = calls + 1
  if calls == 1 then return slow end
  if calls == 2 then return fast end
  if calls == 3 then slow.body = nil; collectgarbage(); collectgarbage() end
  return nil
end)
print("status", res[1].status or res[1].kind, res[2].status, reason)
]], srv.url .. "/slow", sim.url .. GET))
      local took, out = wait_child(child, 60)
      srv:stop()
      assert.is_truthy(took, "the child did not finish:\n" .. out)
      assert.matches("status\t200\t200\tnil", out, 1, true)
    end)
  end)

  describe("a client after an error (issue 10, defect 10)", function()
    it("is not left busy when building an attempt raises", function()
      local h = handle()
      local bad = setmetatable({}, { __index = function() error("boom from __index") end })
      local ok, err = pcall(h.perform, h, { bad })
      assert.is_false(ok)
      assert.matches("boom from __index", tostring(err))
      local ok2, err2 = pcall(h.perform, h, function() error("boom from source") end)
      assert.is_false(ok2)
      assert.matches("boom from source", tostring(err2))
      local res = h:perform({ { method = "GET", url = sim.url .. GET } })
      assert.equal(200, res[1].status)
      h:close()
    end)
  end)

  describe("answer size (issue 10, defect 3)", function()
    it("fails an endless answer with kind too_large, bounded in memory and not retried", function()
      local srv = rawserver.start("endless")
      local h = handle { max_response_size = 1024 * 1024 }
      local t0 = socket.gettime()
      local res = h:perform({ { method = "GET", url = srv.url .. "/x" } })[1]
      srv:stop()
      assert.equal("too_large", res.kind)
      assert.equal(1, res.attempts)
      assert.matches("max_response_size", res.message)
      assert.is_true(socket.gettime() - t0 < 10)
      h:close()
    end)

    it("fails a too long Content-Length at once, through the client API as an Error", function()
      local srv = rawserver.start("biglength")
      local c = commprefs.new { token = "sim-token", base_url = srv.url }
      local env, err = c:get_definitions()
      srv:stop()
      assert.is_nil(env)
      assert.equal("too_large", err.kind)
      assert.equal(1, err.attempts)
      assert.equal(16 * 1024 * 1024, c._gov:settings().max_response_size)
      c:close()
    end)

    it("rejects a bad max_response_size at new", function()
      assert.has_error(function() commprefs.new { token = "t", max_response_size = 10 } end,
        "commprefs.new: bad option 'max_response_size' (an integer from 1024 to 1073741824 expected)")
      assert.has_error(function() commprefs.new { token = "t", max_response_size = "big" } end)
    end)
  end)

  describe("proxies (issue 19: libcurl looks for one only when the environment names one)", function()
    -- The simulator's nginx serves an absolute-form request line as a proxy
    -- would pass it on: a request for a host that does not resolve is
    -- answered only when it went through the proxy of http_proxy.
    local function child_get(env)
      local child = spawn(string.format([[
local core = require "commprefs.core"
local h = core.new { token = 'sim-token', max_retries = 0, connect_timeout = 2 }
local res = h:perform { { method = 'GET', url = %q } }
io.write("status=", tostring(res[1].status), " kind=", tostring(res[1].kind), "\n")
]], "http://hubapi.invalid" .. GET), env)
      local _, out = wait_child(child, 10)
      return out
    end

    it("a proxy configured in the environment is used", function()
      assert.matches("status=200", child_get("http_proxy=" .. sim.url), 1, true)
    end)

    it("without one, requests go straight to the host", function()
      assert.matches("status=nil kind=network", child_get("http_proxy= https_proxy= all_proxy= HTTPS_PROXY= ALL_PROXY= no_proxy= NO_PROXY="), 1, true)
    end)
  end)

  describe("the single GET path (issue 19, item 2)", function()
    it("perform_one gives perform's one result itself, with the User-Agent and the token sent", function()
      local h = handle { user_agent = "ua-test/1" }
      local one, stop = h:perform_one({ method = "GET", url = sim.url .. GET })
      assert.is_nil(stop)
      local res = h:perform({ { method = "GET", url = sim.url .. GET } })[1]
      assert.equal(200, one.status)
      assert.same(res.body and "string", type(one.body))
      assert.equal(res.content_type, one.content_type)
      assert.equal(1, one.attempts)
      local log = sim.log()
      assert.equal(2, #log)
      for _, r in ipairs(log) do
        assert.equal("ua-test/1", r.headers["user-agent"])
        assert.equal("application/json", r.headers.accept)
        assert.is_truthy(r.headers.authorization)
      end
      assert.has_error(function() h:perform_one("x") end)
      h:close()
    end)

    it("core.escape_id escapes a printable-ASCII id as core.escape does, and leaves the rest to the checks", function()
      for _, id in ipairs { "a@b.co", "a b+c/d%e~_.-", ".", "..", "...", "x" } do
        assert.equal(core.escape(id), core.escape_id(id, 1024))
      end
      for _, id in ipairs { "", "a\tb", "a\127", "\195\169@b.co", 12, false } do
        assert.is_nil(core.escape_id(id, 1024))
      end
      assert.is_nil(core.escape_id("abc", 2))
    end)

    it("core.suspects finds as plain finds of pieces in s, and of folded pieces in s:lower(), do", function()
      local function suspects(s, entries, n)
        return core.suspects(s, core.suspect_index(entries, n), entries)
      end
      local s = string.rep("x", 3000) .. "AbC-Token and Exact"
      local a = { pieces = { "nothere" }, folded_pieces = { "abc-token" } }
      local b = { pieces = { "zz", "Exact" }, folded_pieces = {} }
      local c = { pieces = { "exact" }, folded_pieces = { "abc-tokens" } } -- case counts for pieces
      local entries = { a, b, c }
      assert.same({ a, b }, suspects(s, entries, 3))
      assert.same({ a }, suspects(s, entries, 1)) -- only entries[1..n]
      assert.is_nil(suspects(s, { c }, 1))
      assert.is_nil(suspects("", entries, 3))
      assert.same({ b }, suspects(s, { nil, b }, 2)) -- a hole (a collected entry) is skipped
      -- a hole made after the index was built: skipped too
      local later = { a, b, c }
      local pidx = core.suspect_index(later, 3)
      later[1] = nil
      assert.same({ b }, core.suspects(s, pidx, later))
      -- pieces are copied: changing the lists afterwards changes nothing
      local d = { pieces = { "Exact" } }
      local held = { d }
      pidx = core.suspect_index(held, 1)
      d.pieces[1] = "nothere"
      assert.same({ d }, core.suspects(s, pidx, held))
      -- a piece at the very start and at the very end of s
      local head, tail = { pieces = { "xxx" } }, { folded_pieces = { "exact" } }
      assert.same({ head, tail }, suspects("xxx-middle-EXACT", { head, tail }, 2))
      assert.same({ head }, suspects("xxx", { head, tail }, 2))
      assert.same({ tail }, suspects("eXaCt", { head, tail }, 2))
      -- an upper-case text against a folded piece; an exact piece differing only in case
      local f, x = { folded_pieces = { "sim-to" } }, { pieces = { "sim-to" } }
      assert.same({ f }, suspects('{"A":"SIM-TOKEN"}', { f, x }, 2))
      assert.same({ f, x }, suspects('{"A":"sim-token"}', { f, x }, 2))
      assert.is_nil(suspects('{"A":"Sim-Token"}', { x }, 1))
      -- a text of 0 bytes; NUL bytes in text and pieces
      assert.is_nil(suspects("", { f, x }, 2))
      local z = { pieces = { "a\0b" }, folded_pieces = { "\0\0c" } }
      assert.same({ z }, suspects("xx\0a\0b", { z }, 1))
      assert.same({ z }, suspects("\0\0C", { z }, 1))
      assert.is_nil(suspects("a\0c\0\0", { z }, 1))
      -- an empty piece holds for every text, as string.find finds "" (redact makes none)
      local empty = { pieces = { "" } }
      assert.same({ empty }, suspects("", { empty }, 1))
      -- non-string pieces and non-table lists or entries are skipped
      assert.is_nil(suspects("12 true", { { pieces = { 12, true } }, 5, { pieces = "12" } }, 3))
      -- 40 entries with many pieces: each found by its own pieces alone
      local many, text = {}, {}
      for i = 1, 40 do
        local ps, fs = {}, {}
        for k = 1, 12 do
          ps[k] = ("E%02d-%02d"):format(i, k)
          fs[k] = ("f%02d.%02d"):format(i, k)
        end
        many[i] = { pieces = ps, folded_pieces = fs }
      end
      pidx = core.suspect_index(many, 40)
      assert.is_nil(core.suspects(("e01-01 F41.01 "):rep(20), pidx, many))
      for i = 1, 40, 3 do text[#text + 1] = (i % 2 == 0 and "E%02d-12" or "F%02d.07"):format(i) end
      local want = {}
      for i = 1, 40, 3 do want[#want + 1] = many[i] end
      assert.same(want, core.suspects(table.concat(text, " "), pidx, many))
      assert.matches("^commprefs.core.suspect_index", tostring(pidx))
      assert.has_error(function() core.suspects("x", {}, many) end)
    end)

    it("core.decode reads what cjson reads, the same way", function()
      local cases = {
        { '{"a":1,"b":[1,2,{"c":null}],"d":"x","e":true,"f":false}', { a = 1, b = { 1, 2, {} }, d = "x", e = true, f = false } },
        { ' { "numErrors" : 3 , "status":"COMPLETE" } ', { numErrors = 3, status = "COMPLETE" } },
        { '{"s":"caf\\u00e9 \\"q\\""}', { s = 'caf\195\169 "q"' } },
        { '{"x":1.5,"y":-0,"z":1e2,"w":1234567890123456789}', { x = 1.5, y = 0, z = 100, w = 1234567890123456789.0 } },
        { '{"a":1,"a":2}', { a = 2 } },
      }
      for _, c in ipairs(cases) do assert.same(c[2], core.decode(c[1])) end
      local keys = {}
      for i = 1, 40 do keys[i] = string.format('"k%d":%d', i, i) end
      local v = core.decode("{" .. table.concat(keys, ",") .. "}")
      for i = 1, 40 do assert.equal(i, v["k" .. i]) end
      if math.type then assert.equal("integer", math.type(core.decode('{"numErrors":3}', "envelope").numErrors)) end
      for _, bad in ipairs { "", "{", '{"a":}', "[1,]", "01", '{"a":1}x', '"a\0b"', "nul" } do
        local got, err = core.decode(bad)
        assert.is_nil(got, bad)
        assert.is_string(err)
      end
    end)
  end)

  describe("signals (issue 10, defect 4)", function()
    -- A child that keeps signals (core.trap_signals, as the CLI's bulk jobs do) and
    -- reports how perform stopped; without the trap the signal does its usual action.
    local function interrupted_child(setup, sig, no_trap)
      local child = spawn([[
local core = require "commprefs.core"
local socket = require "socket"
]] .. (no_trap and "" or "core.trap_signals(true)\n") .. setup .. [[
local t0 = socket.gettime()
local res, reason = h:perform(reqs)
io.write("reason=", tostring(reason), " stopped=", tostring(res[#res].stopped), " signal=",
  tostring(core.caught_signal()), "\n")
]])
      socket.sleep(1.0)
      local t0 = socket.gettime()
      os.execute("kill -" .. sig .. " " .. child.pid)
      local _, out = wait_child(child, 5)
      return socket.gettime() - t0, out
    end

    it("stop a perform waiting on a hung server within a fraction of a second (SIGINT)", function()
      sim.fault { kind = "hang", seconds = 25 }
      local took, out = interrupted_child(string.format(
        "local h = core.new { token = 'sim-token' }\nlocal reqs = { { method = 'GET', url = %q } }\n", sim.url .. GET), "INT")
      assert.matches("reason=interrupted stopped=interrupted signal=2", out, 1, true)
      assert.is_true(took < 1.5, "took " .. took .. " s after SIGINT")
    end)

    it("stop a perform paced at one request a day (SIGTERM)", function()
      local took, out = interrupted_child(string.format(
        "local h = core.new { token = 'sim-token', rate_max = 1, rate_interval = 86400 }\n"
        .. "local reqs = { { method = 'GET', url = %q }, { method = 'GET', url = %q } }\n", sim.url .. GET, sim.url .. GET), "TERM")
      assert.matches("reason=interrupted stopped=interrupted signal=15", out, 1, true)
      assert.is_true(took < 1.5, "took " .. took .. " s after SIGTERM")
    end)

    it("without a trap, do their usual action as soon as perform has returned", function()
      sim.fault { kind = "hang", seconds = 25 }
      local setup = string.format(
        "local h = core.new { token = 'sim-token' }\nlocal reqs = { { method = 'GET', url = %q } }\n", sim.url .. GET)
      local took, out = interrupted_child(setup, "INT", true)
      assert.matches("interrupted!", out, 1, true) -- the interpreter's own SIGINT error
      assert.is_nil(out:find("reason=", 1, true))
      assert.is_true(took < 1.5, "took " .. took .. " s after SIGINT")
      sim.fault { kind = "hang", seconds = 25 }
      took, out = interrupted_child(setup, "TERM", true)
      assert.equal("", out) -- terminated by SIGTERM, as without commprefs
      assert.is_true(took < 1.5, "took " .. took .. " s after SIGTERM")
    end)
  end)

  describe("the governor both transports drive", function()
    it("settings never include the token", function()
      local h = handle { timeout = 5, max_concurrency = 3 }
      local s = h:governor():settings()
      assert.equal(5000, s.timeout_ms)
      assert.equal(3, s.max_concurrency)
      assert.equal(16 * 1024 * 1024, s.max_response_size)
      for _, v in pairs(s) do assert.is_not.equal("sim-token", v) end
      assert.is_nil(governor():settings().max_concurrency) -- adaptive
    end)

    it("finish: 5xx retried with backoff, 4xx not, daily limit not, budget of attempts respected", function()
      local g = governor { max_retries = 2, backoff_base = 0.1, backoff_max = 0.1 }
      local retry, ms = g:finish({ status = 503, attempts = 1 })
      assert.is_true(retry)
      assert.is_true(ms >= 50 and ms <= 100)
      assert.is_false((g:finish({ status = 503, attempts = 3 })))
      assert.is_false((g:finish({ status = 404, attempts = 1 })))
      assert.is_false((g:finish({ kind = "too_large", attempts = 1 }, false)))
      assert.is_true((g:finish({ kind = "timeout", attempts = 1 })))
      local r = { status = 429, attempts = 1, daily_remaining = 0 }
      local _, _, hold = g:finish(r)
      assert.is_true(r.daily_limit)
      assert.is_nil(hold) -- the daily limit holds no shared backing
      assert.same({ nil, "daily_limit" }, { g:next() })
      retry, ms, hold = g:finish({ status = 429, attempts = 1, retry_after = 2 })
      assert.is_true(retry)
      assert.equal(2000, ms)
      assert.equal(2000, hold) -- what a shared backing is told
      assert.same({ 2, 3 }, { g:stats().throttled, g:stats().retries })
    end)

    it("a call's policy decides its own retries and timeouts on a shared governor; a wrong or closed one raises", function()
      local g = governor { max_retries = 2, timeout = 5 }
      local none = core.policy({ max_retries = 0, timeout = 2, connect_timeout = 1 }, "spec")
      assert.is_true((g:finish({ status = 503, attempts = 1 }))) -- the governor's own: 2 retries
      assert.is_false((g:finish({ status = 503, attempts = 1 }, true, 1, nil, none))) -- the call's: none
      assert.same({ 5000 }, { (g:attempt_timeout()) })
      assert.same({ 2000, 1000 }, { g:attempt_timeout(nil, none) })
      local total, connect = g:try_start(nil, none, true)
      assert.same({ 2000, 1000 }, { total, connect })
      g:unsent()
      assert.equal(2000, g:settings(none).timeout_ms)
      for _, bad in ipairs { {}, "policy", 1, g, io.stdout } do
        assert.has_error(function() g:finish({ status = 503, attempts = 1 }, true, 1, nil, bad) end)
        assert.has_error(function() g:attempt_timeout(nil, bad) end)
        assert.has_error(function() g:try_start(nil, bad) end)
        assert.has_error(function() g:settings(bad) end)
      end
      none:close()
      assert.has_error(function() g:finish({ status = 503, attempts = 1 }, true, 1, nil, none) end, "commprefs: the policy is closed")
      assert.has_error(function() g:attempt_timeout(nil, none) end, "commprefs: the policy is closed")
      assert.has_error(function() g:settings(none) end, "commprefs: the policy is closed")
    end)

    it("a new call while nothing is in flight forgets a spent daily limit, on both transports", function()
      local g = governor()
      g:begin(); g:on_wire()
      g:finish({ status = 429, attempts = 1, daily_remaining = 0 })
      assert.same({ nil, "daily_limit" }, { g:next() })
      g:new_call() -- HubSpot's day may have turned
      assert.equal(0, g:next())
      -- and not while a request is still in flight
      g:begin(); g:on_wire()
      g:finish({ status = 429, attempts = 1, daily_remaining = 0 }, false)
      g:new_call()
      assert.equal(10, g:next()) -- the answer in flight may say some remain
    end)

    it("never learns over a window set by hand, and says so to no backing", function()
      local g = governor { rate_max = 50, rate_interval = 10 }
      assert.same({ 50, 10000 }, { g:manual() })
      local _, _, _, learn_max = g:finish({ status = 200, attempts = 1, rate_max = 100, rate_interval_ms = 10000 })
      assert.is_nil(learn_max)
      assert.equal(50, g:stats().rate_max)
      assert.is_nil(governor():manual())
    end)

    it("target: one until the window is known, then rate x latency", function()
      local g = governor()
      assert.equal(1, g:target())
      g:finish({ status = 200, attempts = 1, rate_max = 100, rate_interval_ms = 1000 }, true, 1000)
      local n = g:target()
      assert.is_true(n >= 97 and n <= 256, "target " .. n)
      for _ = 1, 30 do g:finish({ status = 200, attempts = 1 }, true, 10) end
      assert.is_true(g:target() <= 5)
      local capped = governor { max_concurrency = 3 }
      capped:finish({ status = 200, attempts = 1, rate_max = 100, rate_interval_ms = 1000 }, true, 1000)
      assert.equal(3, capped:target())
      assert.is_true(core.window_margin_ms(1000) > 0)
    end)

    it("names the option the user wrote when a value is out of range", function()
      local ok, err = pcall(commprefs.new, { token = "t", rate_limit = { max = 1e6, interval = 1 } })
      assert.is_false(ok)
      assert.matches("bad option 'rate_limit.max' (an integer from 1 to 10000 expected)", err, 1, true)
      ok, err = pcall(commprefs.new, { token = "t", max_retries = 1000 })
      assert.matches("bad option 'max_retries' (an integer from 0 to 100 expected)", err, 1, true)
      assert.equal(100, core.limits.max_retries.max)
    end)
  end)
end)
