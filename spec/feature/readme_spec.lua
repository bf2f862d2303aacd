-- README.md's blocks run as pasted (issue 18): every ```lua and ```nginx
-- block is extracted, given the surroundings the README states (after the
-- OpenResty configuration: base_url pointing at the simulator, listen on
-- 127.0.0.1, resolver 127.0.0.1, the simulator's CA, this checkout's paths,
-- /run, /var/log/nginx and /var/lib/app moved into a scratch directory,
-- `client` made by commprefs.new {} when a block uses one), run against the
-- simulator - Lua blocks in Lua, nginx blocks in a real nginx - and checked
-- against what the README says they print or answer.
local sim = require "support.sim"
local nginx = require "support.nginx"
local redis = require "support.redis"
local proc = require "support.proc"

local ROOT = (io.popen("pwd"):read("*l"))
local VM = jit and "luajit" or "lua5.4"

local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local t = f:read("*a")
  f:close()
  return t
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- The fenced blocks of README.md in order: {lang =, code =, line =}.
local function blocks(readme)
  local out, lang, buf, line_no, start = {}, nil, nil, 0, 0
  for line in (readme .. "\n"):gmatch("([^\n]*)\n") do
    line_no = line_no + 1
    if buf then
      if line == "```" then
        out[#out + 1] = { lang = lang, code = table.concat(buf, "\n") .. "\n", line = start }
        buf = nil
      else buf[#buf + 1] = line end
    else
      local l = line:match("^```(%w*)%s*$")
      if l then lang, buf, start = l, {}, line_no end
    end
  end
  return out
end

-- What a user changes to reach the simulator (README, after the OpenResty configuration).
local function with_base_url(code, url)
  return (code:gsub("(commprefs\"?%)?%.new%s*%{)", "%1 base_url = " .. string.format("%q", url) .. ","))
end

local function nginx_surroundings(code, o)
  local subs = {
    { "/usr/local/share/lua/5%.1", o.root .. "/lua" },
    { "/usr/local/lib/lua/5%.1", o.build },
    { "listen 8080;", "listen 127.0.0.1:" .. o.port .. ";" },
    { "resolver 1%.1%.1%.1 8%.8%.8%.8", "resolver 127.0.0.1" },
    { "lua_ssl_trusted_certificate [^;]+;", "lua_ssl_trusted_certificate " .. o.prefix .. "/conf/ca.pem;" },
    { "pid /run/[^;]+;", "pid " .. o.prefix .. "/logs/nginx.pid;" },
    { "error_log /var/log/nginx/[^ ;]+", "error_log " .. o.prefix .. "/logs/error.log" },
    { "/var/lib/app/", o.prefix .. "/work/" },
    -- the workers as the invoking user (as support.nginx runs them): `nobody` cannot
    -- read a checkout under a mode-700 directory (root's home, mktemp -d, CI's clone)
    { "\nuser [^;]+;", "\n" .. nginx.USER },
  }
  for _, s in ipairs(subs) do
    local n
    code, n = code:gsub(s[1], (s[2]:gsub("%%", "%%%%")))
    if s[1]:find("listen") or s[1]:find("pid") or s[1]:find("error_log") then
      assert(n > 0, "the block has no " .. s[1] .. " (the README promises a complete nginx.conf)")
    end
  end
  return with_base_url(code, o.sim_url)
end

-- Starts nginx on a README block: the instance {prefix=, port=, pid=, log=}.
local function start_block(code, s, health_path)
  local prefix = io.popen("mktemp -d /tmp/commprefs-readme.XXXXXX"):read("*l")
  os.execute(string.format("chmod 755 %s && mkdir -p %s/logs %s/conf %s/work && chmod 1777 %s/work",
    prefix, prefix, prefix, prefix, prefix))
  os.execute(string.format("cp %s %s/conf/ca.pem && chmod 644 %s/conf/ca.pem", shell_quote(s.ca_file), prefix, prefix))
  local port = proc.free_port()
  local conf = nginx_surroundings(code, { root = ROOT, build = nginx.luajit_build(), port = port, prefix = prefix,
    sim_url = s.url })
  write(prefix .. "/conf/nginx.conf", conf)
  return { prefix = prefix, port = port, conf = conf, health = "http://127.0.0.1:" .. port .. health_path }
end

local function launch(inst)
  local out = io.popen(string.format("cd %s && HUBSPOT_ACCESS_TOKEN=sim-token sim/daemon %s %s %s %s 2>&1",
    shell_quote(ROOT), inst.prefix, inst.prefix .. "/conf/nginx.conf", shell_quote(inst.health), proc.my_pid())):read("*a")
  inst.pid = out:match("pid=(%d+)")
  assert(inst.pid, "nginx did not start on the README block:\n" .. out .. "\n" .. inst.conf)
  inst.url = "http://127.0.0.1:" .. inst.port
  function inst.log() return read(inst.prefix .. "/logs/error.log") end
  function inst.warnings()
    local w = {}
    for l in inst.log():gmatch("[^\n]+") do
      if not l:find("%[notice%]") and not l:find("%[info%]") then w[#w + 1] = l end
    end
    return w
  end
  return inst
end

local function stop(inst)
  if inst and inst.pid then
    os.execute("kill " .. inst.pid)
    for _ = 1, 50 do
      if not os.execute("kill -0 " .. inst.pid .. " 2>/dev/null") then break end
      os.execute("sleep 0.05")
    end
    os.execute("rm -rf " .. inst.prefix)
  end
end

local function get(inst, path) return nginx.request(inst, "GET", path) end

describe("README.md's blocks as pasted", function()
  local s, r, list
  local readme = read(ROOT .. "/README.md")
  setup(function()
    s = sim.start {}
    r = redis.start {}
    list = blocks(readme)
    local c = require("commprefs").new { token = "sim-token", base_url = s.url }
    assert(c:unsubscribe_all("opt1@example.com"))
    c:close()
  end)
  teardown(function()
    if s then s:stop() end
    if r then redis.stop(r) end
  end)

  local function of(lang, pattern)
    local found = {}
    for _, b in ipairs(list) do
      if b.lang == lang and (not pattern or b.code:find(pattern, 1, true)) then found[#found + 1] = b end
    end
    return found
  end

  it("every Lua block runs in Lua against the simulator and prints what the README says", function()
    local lua_blocks = of("lua")
    assert.is_true(#lua_blocks >= 4, #lua_blocks .. " Lua blocks")
    local dir = io.popen("mktemp -d /tmp/commprefs-readme-lua.XXXXXX"):read("*l")
    write(dir .. "/ids.txt", "a@example.com\nb@example.com\nc@example.com\n")
    for _, b in ipairs(lua_blocks) do
      local code = with_base_url(b.code, s.url)
      local prelude = 'local commprefs = require "commprefs"\n'
      if code:find("%f[%w_]client%f[^%w_]") and not code:find("local client =", 1, true) then
        prelude = prelude .. "local client = commprefs.new { base_url = " .. string.format("%q", s.url) .. " }\n"
      end
      if code:find("save(", 1, true) then prelude = prelude .. "local function save() end -- the app's own store\n" end
      local expect
      if code:find("bulk_unsubscribe_all", 1, true) then -- the README: the summary counts every id
        code = code .. '\nprint("done=" .. summary.done .. " failed=" .. summary.failed)\n'
        expect = "done=3 failed=0"
      elseif code:find("batch_unsubscribe_all", 1, true) then expect = "b@example.com" -- pretty(env) lists them
      end
      write(dir .. "/block.lua", prelude .. code)
      local cmd = string.format("cd %s && HUBSPOT_ACCESS_TOKEN=sim-token HUBSPOT_CLIENT_ID=sim-client "
        .. "HUBSPOT_CLIENT_SECRET=sim-secret HUBSPOT_REFRESH_TOKEN=sim-refresh COMMPREFS_REDIS_URL=%s REDIS=%s "
        .. "LUA_PATH=%s LUA_CPATH=%s timeout 30 %s block.lua 2>&1; echo rc=$?", dir, r.url, r.url,
        shell_quote(ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;;"),
        shell_quote(ROOT .. "/build/" .. VM .. "/?.so;;"), VM)
      local out = io.popen(cmd):read("*a")
      assert.matches("rc=0\n$", out, "README line " .. b.line .. ":\n" .. out)
      if expect then assert.is_truthy(out:find(expect, 1, true), "README line " .. b.line .. ":\n" .. out) end
    end
    os.execute("rm -rf " .. dir)
  end)

  it("the cache/coalesce nginx.conf: /may-email answers yes / no, 400 without an address, nothing logged", function()
    local b = of("nginx", "/may-email")
    assert.equals(1, #b)
    local inst = launch(start_block(b[1].code, s, "/may-email?email=health%40example.com"))
    finally(function() stop(inst) end)
    local st, body = get(inst, "/may-email?email=opt1%40example.com")
    assert.equals(200, st); assert.equals("no", body)
    st, body = get(inst, "/may-email?email=nobody%40example.com")
    assert.equals(200, st); assert.equals("yes", body)
    st = get(inst, "/may-email")
    assert.equals(400, st)
    st = get(inst, "/may-email?email=not%20an%20address")
    assert.equals(400, st) -- HubSpot's 400, not "unavailable"
    local warn = {}
    for _, l in ipairs(inst.warnings()) do
      if not l:find("Invalid", 1, true) and not l:find("VALIDATION", 1, true) then warn[#warn + 1] = l end
    end
    assert.same({}, warn)
  end)

  -- nginx's log once the opt-outs job has logged its line (up to 10 s).
  local function job_log(inst)
    local log
    for _ = 1, 100 do
      log = inst.log()
      if log:find("opt-outs:", 1, true) then break end
      os.execute("sleep 0.1")
    end
    return log
  end

  it("the OpenResty nginx.conf: /send checks, the background job logs its summary at notice", function()
    local b = of("nginx", "location = /send")
    assert.equals(1, #b)
    local inst = start_block(b[1].code, s, "/send?to=health%40example.com")
    write(inst.prefix .. "/work/optouts.txt", "j1@example.com\nj2@example.com\nj3@example.com\n")
    os.execute("chmod 666 " .. inst.prefix .. "/work/optouts.txt")
    launch(inst)
    finally(function() stop(inst) end)
    local st, body = get(inst, "/send?to=nobody%40example.com")
    assert.equals(200, st); assert.equals("ok to send\n", body)
    st = get(inst, "/send?to=opt1%40example.com")
    assert.equals(403, st)
    st = get(inst, "/send")
    assert.equals(400, st)
    local log = job_log(inst)
    assert.matches("%[notice%].-opt%-outs: 3 done, 0 failed", log)
    assert.same({}, inst.warnings())
  end)

  -- HOSTILE D19: during a reload the old worker's job still holds the journal
  it("the OpenResty nginx.conf: with its journal held by another job, the job logs why, nothing raises", function()
    local b = of("nginx", "location = /send")
    local inst = start_block(b[1].code, s, "/send?to=health%40example.com")
    write(inst.prefix .. "/work/optouts.txt", "j1@example.com\n")
    local holder = io.popen("flock -x " .. shell_quote(inst.prefix .. "/work/optouts.journal") .. " -c 'echo $$; exec sleep 60'")
    local holder_pid = holder:read("*l") -- the lock is held once the pid is printed
    finally(function() os.execute("kill " .. holder_pid); holder:close(); stop(inst) end)
    launch(inst)
    local log = job_log(inst)
    assert.matches("%[error%].-opt%-outs: .-in use by another job %(process %d+%)", log)
    assert.is_nil(log:find("attempt to index", 1, true), log)
    assert.is_nil(log:find("lua entry thread aborted", 1, true), log)
    assert.equals(200, (get(inst, "/send?to=nobody%40example.com")))
  end)
end)
