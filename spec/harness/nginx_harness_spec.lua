-- spec/harness/nginx_harness_spec.lua: the nginx test harness (spec/support/nginx.lua)
-- itself: it starts a real nginx with this checkout's Lua and LuaJIT core on
-- its paths, runs code inside a request, reports errors with the error log,
-- and leaves nothing behind, even when the test process is killed with -9.
local nginx = require "support.nginx"
local socket = require "socket"

local function sh(cmd) local r = os.execute(cmd); return r == true or r == 0 end
local function alive(pid) return sh("kill -0 " .. pid .. " 2>/dev/null") end
local function dir_exists(path) return sh("test -d '" .. path .. "'") end

describe("support.nginx", function()
  local inst
  setup(function()
    inst = nginx.start {
      conf = "lua_shared_dict harness 1m;",
      server = "location = /hello { return 200 'hello'; }",
      workers = 2,
      env = { HARNESS_VALUE = "it's here" },
    }
  end)
  teardown(function() if inst then inst:stop() end end)

  it("serves the caller's locations on a free loopback port", function()
    assert.matches("^http://127%.0%.0%.1:%d+$", inst.url)
    local status, body = nginx.request(inst, "GET", "/hello")
    assert.equals(200, status)
    assert.equals("hello", body)
  end)

  it("runs code inside a request, with this checkout's modules and the LuaJIT core", function()
    local status, body = nginx.run(inst, [[
      local core = require "commprefs.core"
      local commprefs = require "commprefs"
      return { jit = jit ~= nil, core = type(core), commprefs = type(commprefs.new),
               phase = ngx.get_phase(), env = os.getenv("HARNESS_VALUE"),
               dict = ngx.shared.harness ~= nil, workers = ngx.worker.count() }
    ]])
    assert.equals(200, status, body)
    local t = require("cjson").decode(body)
    assert.same({ jit = true, core = "table", commprefs = "function", phase = "content",
      env = "it's here", dict = true, workers = 2 }, t)
  end)

  it("runs its workers as the invoking user, who reads what only this user can", function()
    -- a mode-700 directory, as root's home and every `mktemp -d` are
    local dir = io.popen("mktemp -d"):read("*l")
    finally(function() os.execute("rm -rf '" .. dir .. "'") end)
    local f = assert(io.open(dir .. "/private.txt", "w"))
    f:write("only for me")
    f:close()
    local uid = io.popen("id -u"):read("*l")
    local status, body = nginx.run(inst, string.format([[
      local status = io.open("/proc/self/status"):read("*a")
      local f, err = io.open(%q)
      return { uid = status:match("\nUid:%%s+(%%d+)"), text = f and f:read("*a") or err,
               module = type(require("support.hostile").run_case) }
    ]], dir .. "/private.txt"))
    assert.equals(200, status, body)
    assert.same({ uid = uid, text = "only for me", module = "function" }, require("cjson").decode(body))
  end)

  it("says in one line why a place cannot serve nginx, and nothing here", function()
    assert.is_nil(nginx.place_problem())
    for _, bad in ipairs { "/home/a;b/p", "/home/a b/p", "/home/what?/p", '/home/"q"/p' } do
      local why = nginx.place_problem(bad)
      assert.is_string(why)
      assert.is_nil(why:find("\n"), why)
      assert.matches("the checkout " .. bad:gsub("%p", "%%%0"), why)
    end
    assert.matches("TMPDIR /no/such/dir has no room", nginx.place_problem(nil, "/no/such/dir"))
  end)

  it("lets the code yield (cosockets, ngx.sleep)", function()
    local status, body = nginx.run(inst, [[
      ngx.sleep(0.01)
      local s = ngx.socket.tcp()
      assert(s:connect("127.0.0.1", ngx.var.server_port))
      s:close()
      return "yielded"
    ]])
    assert.equals(200, status, body)
    assert.equals("yielded", body)
  end)

  it("reports a raised error with status 500, its message and a traceback", function()
    local status, body = nginx.run(inst, "error('boom from the spec')")
    assert.equals(500, status)
    assert.matches("boom from the spec", body)
    assert.matches("traceback", body)
    status, body = nginx.run(inst, "this is not lua")
    assert.equals(500, status)
    assert.matches("run:", body)
  end)

  it("exposes the error log", function()
    nginx.run(inst, "ngx.log(ngx.ERR, 'marker-in-the-log')")
    assert.matches("marker%-in%-the%-log", inst:log())
    local found = false
    for _, line in ipairs(inst:errors()) do if line:find("marker-in-the-log", 1, true) then found = true end end
    assert.is_true(found)
  end)

  it("sends requests side by side", function()
    local t0 = socket.gettime()
    local answers = nginx.concurrent(inst, { "/hello", "/hello", "/nothing-here" }, 5)
    assert.equals(200, answers[1].status)
    assert.equals("hello", answers[2].body)
    assert.equals(404, answers[3].status)
    assert.is_true(socket.gettime() - t0 < 5)
  end)

  it("lets workers read the simulator's CA, given as trusted_ca or in conf", function()
    local sim = require "support.sim"
    local s = sim.start { SIM_RATE = "off" }
    local code = [[
      local port = tonumber(os.getenv("SIM_TLS"):match(":(%d+)$"))
      local s = ngx.socket.tcp()
      assert(s:connect("127.0.0.1", port))
      local ok, err = s:sslhandshake(nil, "127.0.0.1", true)
      s:close()
      return ok and "verified" or tostring(err)
    ]]
    for _, opts in ipairs {
      { trusted_ca = s.ca_file, env = { SIM_TLS = s.tls_url } },
      { conf = "lua_ssl_trusted_certificate " .. s.ca_file .. ";", env = { SIM_TLS = s.tls_url } },
    } do
      local other = nginx.start(opts)
      local status, body = nginx.run(other, code)
      other:stop()
      assert.equals(200, status, body)
      assert.equals("verified", body)
    end
    s:stop()
  end)

  it("takes another port when another process binds its port first", function()
    local proc = require "support.proc"
    local taken = assert(socket.bind("127.0.0.1", 0)) -- what another suite beside this one holds
    local _, busy = taken:getsockname()
    local real, calls = proc.free_port, 0
    proc.free_port = function() calls = calls + 1; return calls == 1 and tonumber(busy) or real() end
    local ok, other = pcall(nginx.start, {})
    proc.free_port = real
    taken:close()
    assert.is_true(ok, other)
    finally(function() other:stop() end)
    assert.equals(2, calls)
    assert.are_not.equal(tonumber(busy), other.port)
    assert.equals(200, (nginx.request(other, "GET", "/__health")))
  end)

  it("fails clearly on a bad configuration, leaving no prefix behind", function()
    local ok, err = pcall(nginx.start, { conf = "this_is_no_directive on;" })
    assert.is_false(ok)
    assert.matches("did not start", err)
    assert.matches("unknown directive", err)
  end)

  it("stops nginx and removes its prefix", function()
    local other = nginx.start {}
    assert.is_true(alive(other.pid))
    other:stop()
    assert.is_false(alive(other.pid))
    assert.is_false(dir_exists(other.prefix))
    other:stop() -- twice is fine
  end)

  it("stops nginx when the test process is killed with -9, with its whole process group", function()
    local lua = jit and "luajit" or "lua5.4"
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write(string.format([[
      package.path = %q .. "/spec/?.lua;" .. package.path
      local inst = require("support.nginx").start {}
      io.stdout:write(inst.pid, " ", inst.prefix, "\n"); io.stdout:flush()
      while true do require("socket").sleep(1) end
    ]], inst.root))
    f:close()
    local out = os.tmpname()
    -- setsid: the child leads a process group of its own, as a test run under CI does
    os.execute(string.format("setsid %s %s > %s 2>&1 & echo $! > %s.pid", lua, script, out, out))
    local line
    for _ = 1, 200 do
      local h = io.open(out); line = h:read("*l"); h:close()
      if line then break end
      socket.sleep(0.05)
    end
    assert.truthy(line, "the child did not start nginx")
    local pid, prefix = line:match("^(%d+) (%S+)$")
    assert.truthy(pid, line)
    assert.is_true(alive(pid))
    local h = io.open(out .. ".pid"); local child = h:read("*l"); h:close()
    assert.is_true(sh("kill -9 -" .. child)) -- the whole group (dash: no "--")
    for _ = 1, 60 do
      if not alive(pid) and not dir_exists(prefix) then break end
      socket.sleep(0.1)
    end
    os.remove(script); os.remove(out); os.remove(out .. ".pid")
    assert.is_false(alive(pid))
    assert.is_false(dir_exists(prefix))
  end)
end)
