-- The cosocket transport inside a real nginx (support.nginx) against the
-- simulator: every shared expectation (support.expectations, the same cases
-- spec/contract/client_spec.lua runs with libcurl), the phase rules, clients crossing
-- requests, and the sans-I/O HTTP/1 reader it parses with (core.http1_response).
local sim = require "support.sim"
local nginx = require "support.nginx"
local expectations = require "support.expectations"
local cjson = require "cjson"
local core = require "commprefs.core"
local commprefs = require "commprefs"

describe("core.http1_response", function()
  local parse = require("support.http1").parse

  it("reads a Content-Length answer byte by byte, with the headers commprefs keeps", function()
    local raw = "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json;charset=utf-8\r\n"
      .. "Retry-After: 3\r\nX-HubSpot-RateLimit-Max: 110\r\nx-hubspot-ratelimit-interval-milliseconds: 10000\r\n"
      .. "X-HubSpot-RateLimit-Daily-Remaining: 0\r\nX-Other: 1\r\nContent-Length: 2\r\n\r\n{}"
    local bytes = {}
    for i = 1, #raw do bytes[i] = raw:sub(i, i) end
    local p, done = parse(bytes)
    assert.is_true(done)
    assert.same({ status = 429, body = "{}", content_type = "application/json;charset=utf-8", retry_after = 3,
      rate_max = 110, rate_interval_ms = 10000, daily_remaining = 0, keepalive = true }, p:result())
  end)

  it("undoes chunked encoding across feeds and skips 1xx answers", function()
    local p, done = parse { "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
      "lo\r\n6\r\n world\r\n0\r\n\r\n" }
    assert.is_true(done)
    local r = p:result()
    assert.equal(200, r.status)
    assert.equal("hello world", r.body)
    assert.is_true(r.keepalive)
  end)

  it("a body that runs to EOF needs feed(\"\") and is not kept alive", function()
    local p, done = parse { "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nabc" }
    assert.is_false(done)
    assert.is_true(p:feed(""))
    assert.same({ status = 200, body = "abc", content_type = "text/html", keepalive = false }, p:result())
  end)

  it("Connection: close, HTTP/1.0 and bytes after the answer mean no keep-alive", function()
    for _, raw in ipairs {
      "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200",
    } do
      local p, done = parse { raw }
      assert.is_true(done)
      assert.is_false(p:result().keepalive, raw)
    end
  end)

  it("EOF before the end is a network error", function()
    local p = core.http1_response()
    assert.is_false(p:feed("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    local done, err, kind = p:feed("")
    assert.is_nil(done)
    assert.equal("network", kind)
    assert.matches("closed before the response was complete", err)
    assert.has_error(function() p:result() end)
    local _, d2, _, k2 = parse { "" }
    assert.is_nil(d2)
    assert.equal("network", k2)
  end)

  it("garbage is a network error naming the problem", function()
    local _, done, err, kind = parse { "SSH-2.0-OpenSSH\r\n\r\n" }
    assert.is_nil(done)
    assert.equal("network", kind)
    assert.matches("^invalid HTTP response: ", err)
    for _, raw in ipairs { "HTTP/1.1 000 x\r\nContent-Length: 0\r\n\r\n", "HTTP/1.0 5 x\r\n\r\n" } do
      _, done, err, kind = parse { raw } -- found by fuzz/http1_fuzz.c
      assert.is_nil(done, raw)
      assert.equal("network", kind)
      assert.matches("status is not three digits", err)
    end
  end)

  it("enforces max_body whether the length is announced or chunked", function()
    local _, done, err, kind = parse({ "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" }, { max_body = 10 })
    assert.is_nil(done)
    assert.equal("too_large", kind)
    assert.matches("max_response_size", err)
    _, done, _, kind = parse({ "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n123456\r\n",
      "6\r\n789012\r\n0\r\n\r\n" }, { max_body = 10 })
    assert.is_nil(done)
    assert.equal("too_large", kind)
    local p, ok = parse({ "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789" }, { max_body = 10 })
    assert.is_true(ok)
    assert.equal("0123456789", p:result().body)
  end)

  it("ignores invalid numbers and Retry-After, keeps the last of a repeated header", function()
    local p = parse { "HTTP/1.1 503 x\r\nRetry-After: soon\r\nX-HubSpot-RateLimit-Max: -5\r\n"
      .. "Content-Type: a/b\r\nContent-Type: c/d\r\nContent-Length: 0\r\n\r\n" }
    local r = p:result()
    assert.is_nil(r.retry_after)
    assert.is_nil(r.rate_max)
    assert.equal("c/d", r.content_type)
  end)

  it("a bad max_body raises; close frees and is safe twice", function()
    assert.has_error(function() core.http1_response { max_body = "x" } end)
    local p = core.http1_response()
    p:close()
    p:close()
    assert.matches("commprefs.core.http1", tostring(p))
  end)
end)

describe("the transport option outside nginx", function()
  it("\"ngx\" raises at new, \"auto\" and \"curl\" use libcurl, anything else raises", function()
    local ok, err = pcall(commprefs.new, { token = "t", transport = "ngx" })
    assert.is_false(ok)
    assert.matches("commprefs%.new: bad option 'transport' %(\"ngx\" needs OpenResty", err)
    ok, err = pcall(commprefs.new, { token = "t", transport = "libcurl" })
    assert.is_false(ok)
    assert.matches("commprefs%.new: bad option 'transport'", err)
    assert.is_table(commprefs.new { token = "t", transport = "curl" })
    assert.is_table(commprefs.new { token = "t", transport = "auto" })
  end)
end)

describe("the cosocket transport in nginx", function()
  local insts = {}
  setup(function()
    sim.start()
    local env = { SIM_URL = sim.url, SIM_TLS_URL = expectations.urls(sim).tls_url }
    local phases = [[
      location = /phase/log { return 200 "x"; log_by_lua_block { require("support.ngx_phases").try("log") } }
      location = /phase/header_filter { return 200 "x"; header_filter_by_lua_block { require("support.ngx_phases").try("header_filter") } }
      location = /phase/set { set_by_lua_block $phase_set { require("support.ngx_phases").try("set") return "1" } return 200 $phase_set; }
      location = /phase/body_filter { return 200 "x"; body_filter_by_lua_block { require("support.ngx_phases").try("body_filter") } }
      location = /phase/access { access_by_lua_block { require("support.ngx_phases").try("access") } content_by_lua_block { ngx.print("x") } }
      location = /kept { content_by_lua_block {
        local env, err = package.loaded.spec_kept_client:get_status("y@example.com")
        ngx.print(env and #env.results or tostring(err))
      } }
    ]]
    local conf = "lua_shared_dict spec_phases 1m;\n"
      .. "init_by_lua_block { require('support.ngx_phases').try('init') }\n"
      .. "init_worker_by_lua_block { require('support.ngx_phases').try('init_worker') }\n"
    -- nginx's workers are this user (support.nginx): they read the simulator's CA where it is
    insts.ca = nginx.start { env = env, server = phases,
      conf = conf .. "lua_ssl_trusted_certificate " .. sim.ca_file .. ";" }
    insts.none = nginx.start { env = env }
  end)
  teardown(function()
    if insts.ca then insts.ca:stop() end
    if insts.none then insts.none:stop() end
  end)
  before_each(function() sim.reset() end)

  describe("meets every shared expectation", function()
    for _, case in ipairs(expectations.cases) do
      it(case.name, function()
        if case.setup then case.setup(sim) end
        case.check(expectations.run_ngx(insts, case, sim), sim, "ngx")
      end)
    end

    it("and nginx's error logs never show the token", function()
      for _, inst in ipairs { insts.ca, insts.none } do
        assert.is_nil(inst:log():find(expectations.TOKEN, 1, true))
      end
    end)
  end)

  local function run(code, inst)
    local status, body = nginx.run(inst or insts.ca, "local SIM_URL = os.getenv('SIM_URL')\n" .. code)
    assert.equal(200, status, body)
    return body
  end

  describe("phases", function()
    local function outcome(phase)
      return run(("return ngx.shared.spec_phases:get(%q) or 'nothing recorded'"):format(phase))
    end

    for _, phase in ipairs { "init_worker", "set", "log", "header_filter", "body_filter" } do
      it(phase .. " raises, naming the phase and ngx.timer.at, and sends nothing", function()
        if phase ~= "init_worker" then nginx.request(insts.ca, "GET", "/phase/" .. phase) end
        local text
        for _ = 1, 50 do -- log_by_lua runs after the answer went out
          text = outcome(phase)
          if text ~= "nothing recorded" then break end
          require("socket").sleep(0.02)
        end
        assert.matches("^raised: commprefs: cannot send requests in nginx's " .. phase .. " phase", text)
        assert.matches("ngx.timer.at", text, 1, true)
        for _, entry in ipairs(sim.log()) do assert.is_nil(entry.path:find(phase .. "%40", 1, true)) end
      end)
    end

    it("init_by_lua (nginx's master) takes libcurl with transport auto", function()
      assert.equal("ok 3", outcome("init"))
    end)

    it("access and timers use cosockets", function()
      nginx.request(insts.ca, "GET", "/phase/access")
      assert.equal("ok 3", outcome("access"))
      assert.equal("ok 3", run([[
        ngx.timer.at(0, function() require("support.ngx_phases").try("timer") end)
        for _ = 1, 100 do
          local v = ngx.shared.spec_phases:get("timer")
          if v then return v end
          ngx.sleep(0.02)
        end
        return "timer never ran"]]))
    end)

    it("transport = \"ngx\" raises at new on ca_file, \"auto\" at its first use in nginx", function()
      local text = run([[
        local commprefs = require "commprefs"
        local ok, e1 = pcall(commprefs.new, { token = "sim-token", base_url = SIM_URL, transport = "ngx",
          ca_file = "/etc/passwd" })
        local c = commprefs.new { token = "sim-token", base_url = SIM_URL, ca_file = "/etc/passwd" }
        local ok2, e2 = pcall(c.get_status, c, "x@example.com")
        return tostring(ok) .. "|" .. e1 .. "|" .. tostring(ok2) .. "|" .. e2]])
      local ok, e1, ok2, e2 = text:match("^(.-)|(.-)|(.-)|(.*)$")
      assert.equal("false", ok)
      assert.matches("commprefs.new: bad option 'ca_file' (inside nginx", e1, 1, true)
      assert.matches("lua_ssl_trusted_certificate", e1, 1, true)
      assert.equal("false", ok2)
      assert.matches("lua_ssl_trusted_certificate", e2, 1, true)
      assert.same({}, sim.log())
    end)

    it("transport = \"curl\" is honoured inside nginx (it blocks: the user's choice)", function()
      assert.equal("3", run([[
        local c = require("commprefs").new { token = "sim-token", base_url = SIM_URL, transport = "curl" }
        return #assert(c:get_status("x@example.com")).results]]))
    end)
  end)

  -- Clients with a budget of their own (rate_limit, max_concurrency set by
  -- hand) use API version 2026-09 and close at the end: clients of one
  -- worker with the same token, base URL and version share one budget
  -- (commprefs.shared), and must state the same one.
  describe("paced waits (issue 19)", function()
    it("never pass the caller's timeout: a call the rate limit would hold longer fails at once, unsent", function()
      sim.reset()
      local out = run([[
        local c = require("commprefs").new { token = "sim-token", base_url = SIM_URL, timeout = 1,
          api_version = "2026-09", rate_limit = { max = 1, interval = 10 } }
        assert(c:get_status("x@example.com"))
        ngx.update_time()
        local t0 = ngx.now()
        local env, err = c:get_status("y@example.com")
        ngx.update_time()
        c:close()
        return string.format("%s %s %.2f", tostring(env), err and err.kind, ngx.now() - t0)]])
      local env, kind, took = out:match("^(%S+) (%S+) (%S+)$")
      assert.equal("nil", env)
      assert.equal("timeout", kind)
      assert.is_true(tonumber(took) < 0.5, out)
      local log = sim.log()
      assert.equal(1, #log) -- nothing was sent for the second call
      assert.truthy(log[1].path:find("x%40example.com", 1, true))
    end)
  end)

  describe("a client across requests", function()
    it("made in one request, used in later ones, and by several requests at once", function()
      run([[
        -- a window set by hand wide enough for 40 at once: even pacing under the simulator's
        -- HubSpot window (100 per 10 s: one per ~100 ms after a burst of 4) would spread them over 4 s
        -- (localhost and 2026-09: a bundle of its own, kept)
        package.loaded.spec_kept_client = require("commprefs").new { token = "sim-token",
          base_url = SIM_URL:gsub("127%.0%.0%.1", "localhost"), api_version = "2026-09",
          rate_limit = { max = 1000, interval = 1 } }
        return "made"]])
      assert.equal("3", run([[return #assert(package.loaded.spec_kept_client:get_status("x@example.com")).results]]))
      -- 40 requests at once through the one client, the simulator taking 200 ms each:
      -- they overlap (cosockets never block the worker) and /__health answers meanwhile
      sim.reset { latency = 200 }
      local paths = {}
      for i = 1, 40 do paths[i] = "/kept" end
      local answers = nginx.concurrent(insts.ca, paths, 10, { after = { delay = 0.1, path = "/__health" } })
      sim.reset()
      for i = 1, 40 do
        assert.equal(200, answers[i].status, answers[i].err)
        assert.equal("3", answers[i].body)
        assert.is_true(answers[i].seconds < 1.0, "answer " .. i .. " took " .. answers[i].seconds)
      end
      assert.equal(200, answers.after.status)
      assert.is_true(answers.after.seconds < 0.1, "/__health took " .. answers.after.seconds)
    end)

    it("the client made in init_by_lua serves requests over cosockets", function()
      assert.equal("3", run([[
        local c = assert(package.loaded.spec_phases_client, "no client from init_by_lua")
        return #assert(c:get_status("z@example.com")).results]]))
    end)
  end)

  describe("keep-alive pools", function()
    it("are named by host and TLS settings, never by token: two tokens share a connection", function()
      assert.equal("3 3", run([[
        local commprefs = require "commprefs"
        local a = commprefs.new { token = "sim-token", base_url = SIM_URL }
        local b = commprefs.new { token = "sim-read-only", base_url = SIM_URL }
        return #assert(a:get_status("p@example.com")).results .. " " .. #assert(b:get_status("p@example.com")).results]]))
      local log = sim.log()
      assert.equal(2, #log)
      assert.equal(log[1].port, log[2].port)
    end)

    it("a connection made without verification is never reused by a verifying client", function()
      local text = run([[
        local commprefs = require "commprefs"
        local url = os.getenv("SIM_TLS_URL")
        local loose = commprefs.new { token = "sim-token", base_url = url, verify_tls = false }
        local strict = commprefs.new { token = "sim-token", base_url = url, max_retries = 0 }
        assert(loose:get_status("p@example.com"))
        local env, err = strict:get_status("p@example.com")
        return env and "reused!" or err.kind]], insts.none)
      assert.equal("tls", text)
      assert.equal(1, #sim.log())
    end)
  end)

  describe("concurrency", function()
    it("a client closed by another request while a batch runs: the batch raises once its requests end", function()
      sim.reset { latency = 200 }
      local text = run([[
        local c = require("commprefs").new { token = "sim-token", base_url = SIM_URL, max_concurrency = 2, batch_size = 1,
          api_version = "2026-09" }
        ngx.thread.spawn(function() ngx.sleep(0.05); c:close() end)
        local ok, err = pcall(c.batch_get_unsubscribe_all_status, c, { "a@x.com", "b@x.com", "c@x.com", "d@x.com" })
        return tostring(ok) .. " " .. tostring(err)]])
      sim.reset()
      assert.matches("^false .*commprefs: the client is closed", text)
    end)

    it("runs batches in parallel up to max_concurrency (ngx.thread)", function()
      sim.reset { latency = 200 }
      local text = run([[
        local c = require("commprefs").new { token = "sim-token", base_url = SIM_URL, max_concurrency = 4, batch_size = 1,
          api_version = "2026-09" }
        local t0 = ngx.now()
        local env = assert(c:batch_get_unsubscribe_all_status({ "a@x.com", "b@x.com", "c@x.com", "d@x.com" }))
        ngx.update_time()
        c:close()
        return #env.results .. " " .. (ngx.now() - t0)]])
      local n, secs = text:match("^(%d+) (%S+)$")
      assert.equal("4", n)
      assert.is_true(tonumber(secs) < 0.6, text) -- one after another would take 0.8 s
      sim.reset()
    end)
  end)
end)
