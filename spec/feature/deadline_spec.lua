-- The `deadline` option (issue 18): a whole call - DNS, connects, every
-- attempt, backoff and pacing waits - answers within it with
-- Error{kind = "timeout", code = "deadline"}, over libcurl and over
-- cosockets in a real nginx; a request not yet sent when it passes is not
-- sent; in nginx an attempt's timeout covers DNS (a resolver that never
-- answers), and is_unsubscribed_from_all in a request phase defaults to a
-- deadline of `timeout`. Bad values raise before anything is sent.
local commprefs = require "commprefs"
local core = require "commprefs.core"
local nginx = require "support.nginx"
local sim = require "support.sim"
local rawserver = require "support.rawserver"
local socket = require "socket"
local cjson = require "cjson"

local TOKEN = "sim-token"

describe("deadline over libcurl", function()
  local hang
  setup(function() hang = rawserver.start("hang") end)
  teardown(function() if hang then hang:stop() end end)

  it("a server that hangs every request: timeout = 2, max_retries = 5, deadline = 3 -> timeout within 4 s", function()
    local c = commprefs.new { token = TOKEN, base_url = hang.url, timeout = 2, max_retries = 5, deadline = 3 }
    local t0 = core.now()
    local v, err = c:is_unsubscribed_from_all("a@example.com")
    local took = core.now() - t0
    assert.is_nil(v)
    assert.equals("timeout", err.kind)
    assert.equals("deadline", err.code)
    assert.is_true(took >= 2.9 and took < 4, string.format("%.2f s", took))
    -- a batch read: the same bound for the whole call
    t0 = core.now()
    local env, berr = c:batch_get_unsubscribe_all_status { "a@example.com", "b@example.com" }
    took = core.now() - t0
    assert.is_nil(env)
    assert.equals("timeout", berr.kind)
    assert.is_true(took < 4, string.format("%.2f s", took))
    c:close()
  end)

  it("without a deadline the same client would retry past it (the test can fail)", function()
    local c = commprefs.new { token = TOKEN, base_url = hang.url, timeout = 0.5, max_retries = 3,
      backoff_base = 0.01, backoff_max = 0.01 }
    local t0 = core.now()
    local _, err = c:get_unsubscribe_all_status("a@example.com")
    assert.equals("timeout", err.kind)
    assert.is_nil(err.code)
    assert.equals(4, err.attempts)
    assert.is_true(core.now() - t0 >= 1.9)
    c:close()
  end)

  it("bad deadlines raise naming the option; nothing is sent", function()
    for _, bad in ipairs { 0, -1, 1e9, "3", true } do
      local ok, msg = pcall(commprefs.new, { token = TOKEN, base_url = hang.url, deadline = bad })
      assert.is_false(ok)
      assert.matches("deadline", msg)
    end
  end)
end)

describe("deadline against the simulator (libcurl)", function()
  local s
  setup(function() s = sim.start { SIM_RATE = "100/1000" } end)
  teardown(function() if s then s:stop() end end)

  it("a request not yet sent when the deadline passes is not sent (a pacing wait longer than it)", function()
    local c = commprefs.new { token = TOKEN, base_url = s.url, deadline = 0.5, rate_limit = { max = 1, interval = 10 } }
    local before = #sim.admin("GET", "log", nil, s).requests
    assert.is_false((c:is_unsubscribed_from_all("n1@example.com")))
    local t0 = core.now()
    local v, err = c:is_unsubscribed_from_all("n2@example.com")
    local took = core.now() - t0
    assert.is_nil(v)
    assert.equals("timeout", err.kind)
    assert.equals("deadline", err.code)
    assert.equals(0, err.attempts)
    assert.is_true(took < 0.5, string.format("%.2f s", took)) -- answered at once: the wait could never fit
    assert.equals(before + 1, #sim.admin("GET", "log", nil, s).requests) -- n2 never sent
    c:close()
  end)
end)

describe("deadline over cosockets in nginx", function()
  local hang, inst, udp, s
  setup(function()
    hang = rawserver.start("hang")
    s = sim.start {}
    udp = socket.udp() -- a resolver that never answers
    assert(udp:setsockname("127.0.0.1", 0))
    local _, uport = udp:getsockname()
    inst = nginx.start {
      env = { HANG_URL = hang.url, HANG_PORT = tostring(hang.port), SIM_URL = s.url },
      conf = "resolver 127.0.0.1:" .. uport .. " ipv6=off; resolver_timeout 30s;",
      server = [[
        location = /check { content_by_lua_block {
          local commprefs = require "commprefs"
          local c = commprefs.new { token = "sim-token", timeout = 2,
            base_url = "http://no-answer.example.test:" .. os.getenv("HANG_PORT") }
          local v, err = c:is_unsubscribed_from_all("a@example.com")
          ngx.print(tostring(v), " ", err and err.kind or "-", " ", err and tostring(err.code) or "-")
        } }
      ]],
    }
  end)
  teardown(function()
    if inst then inst:stop() end
    if hang then hang:stop() end
    if s then s:stop() end
    if udp then udp:close() end
  end)

  it("a server that hangs every request: timeout = 2, max_retries = 5, deadline = 3 -> timeout within 4 s", function()
    local status, body = nginx.run(inst, [[
      local c = require("commprefs").new { token = "sim-token", base_url = os.getenv("HANG_URL"),
        timeout = 2, max_retries = 5, deadline = 3 }
      ngx.update_time()
      local t0 = ngx.now()
      local v, err = c:get_unsubscribe_all_status("a@example.com")
      ngx.update_time()
      return { v = v ~= nil, kind = err.kind, code = err.code, seconds = ngx.now() - t0 }
    ]], 30)
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    assert.is_false(t.v)
    assert.equals("timeout", t.kind)
    assert.equals("deadline", t.code)
    assert.is_true(t.seconds >= 2.9 and t.seconds < 4, string.format("%.2f s", t.seconds))
  end)

  it("a resolver that never answers, timeout = 2: nil, err within 3 s (a request phase: deadline = timeout)", function()
    local status, body, _, seconds = nginx.request(inst, "GET", "/check", nil, 40)
    assert.equals(200, status, tostring(body))
    assert.equals("nil timeout deadline", body)
    assert.is_true(seconds < 3, string.format("%.2f s", seconds))
  end)

  it("in a timer (no request waits) the same lookup retries, each attempt bounded by timeout, DNS included", function()
    local status, body = nginx.run(inst, [[
      local c = require("commprefs").new { token = "sim-token", timeout = 0.5, max_retries = 1,
        backoff_base = 0.01, backoff_max = 0.01,
        base_url = "http://no-answer.example.test:" .. os.getenv("HANG_PORT") }
      local out = {}
      local done = require("ngx.semaphore").new(0)
      ngx.timer.at(0, function()
        ngx.update_time()
        local t0 = ngx.now()
        local _, err = c:is_unsubscribed_from_all("a@example.com")
        ngx.update_time()
        out = { kind = err.kind, attempts = err.attempts, seconds = ngx.now() - t0 }
        done:post(1)
      end)
      done:wait(20)
      return out
    ]], 30)
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    assert.equals("timeout", t.kind)
    assert.equals(2, t.attempts)
    assert.is_true(t.seconds >= 0.9 and t.seconds < 2, string.format("%.2f s", t.seconds))
  end)

  it("the simulator still answers over the same paths (deadline set, nothing to cut; no warning logged)", function()
    local logged = #inst:log() -- the hanging exchanges above logged their socket timeouts
    local status, body = nginx.run(inst, [[
      local c = require("commprefs").new { token = "sim-token", base_url = os.getenv("SIM_URL"), deadline = 5 }
      local v, err = c:is_unsubscribed_from_all("fine@example.com")
      return tostring(v) .. " " .. tostring(err)
    ]])
    assert.equals(200, status, body)
    assert.equals("false nil", body)
    assert.equals("", inst:log():sub(logged + 1))
  end)
end)
