-- support.nginx: the specs' handle on a real nginx + lua-nginx-module from
-- Debian (contract C5 in INTERFACES.md). Each start() writes a configuration
-- into its own prefix directory, takes a free loopback port and launches
-- nginx through sim/daemon (the project's one launcher, shared with sim/run):
-- no root needed, and a watchdog stops it and removes the prefix when this
-- test process ends, even on kill -9.
--
--   local nginx = require "support.nginx"
--   local inst = nginx.start {
--     conf = "lua_shared_dict pace 1m;",          -- lines inside http {}
--     server = "location /x { return 200; }",     -- lines inside the test server {}
--     workers = 1,                                -- worker_processes
--     env = { SIM_URL = sim.url },                -- environment; each gets an `env NAME;`
--     trusted_ca = sim.ca_file,                   -- copied into the prefix, used as
--   }                                             -- lua_ssl_trusted_certificate
--   inst.url, inst.port, inst.pid (master), inst.prefix, inst.tmp (writable by workers)
--   inst:stop()   inst:log() (the whole error log)   inst:errors() (lines at [error] or worse)
--   inst:warnings() (lines at [warn] or worse: normal operation must log none)
--   local status, body = nginx.run(inst, "return 1 + 1")   --> 200, "2"
--   local status, body, headers, seconds = nginx.request(inst, "GET", "/x")
--   local answers = nginx.concurrent(inst, { "/x", "/x" })  --> {status=, body=, seconds=} each
--
-- run(inst, code): POSTs `code` to the location /__run, whose content_by_lua
-- handler compiles it with loadstring and calls it inside that request (so
-- cosockets, ngx.thread and ngx.sleep work). A returned string or number is
-- the body; a returned table is sent as JSON; nothing returned leaves the body
-- to ngx.say/ngx.print in the code. A compile error or a raised error gives
-- status 500 with the message and traceback as the body.
--
-- Who the workers are: the invoking user, always. A root master would hand
-- them to `nobody`, who cannot read a checkout under a mode-700 directory
-- (root's home, any `mktemp -d`), nor its build, nor the prefix: as root the
-- configuration says `user root root;` (as anyone else nginx cannot switch).
-- M.place_problem() says, in one line, why this checkout cannot serve nginx
-- at all (spec/helper.lua stops the suite with it before the first spec).
--
-- The Lua paths inside nginx: this checkout's lua/ and spec/, then the system's.
-- The C path: the LuaJIT build of the core (nginx runs LuaJIT), chosen as
-- COMMPREFS_NGX_BUILD, else COMMPREFS_BUILD when this process is LuaJIT, else
-- COMMPREFS_BUILD with "lua5.4" replaced by "luajit" when that build exists,
-- else build/luajit (`make all LUA=luajit`, which `make test` runs).
local socket = require "socket"

local M = {}

local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function capture(cmd)
  local f = assert(io.popen(cmd))
  local out = f:read("*a")
  f:close()
  return out
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

local proc = require "support.proc"

-- This checkout's root: two directories above this file, made absolute.
local function checkout_root()
  local src = debug.getinfo(1, "S").source:sub(2)
  local dir = src:match("^(.*)/spec/support/[^/]*$") or "."
  return (capture("cd " .. shell_quote(dir) .. " && pwd"):gsub("%s+$", ""))
end

local ROOT = checkout_root()

-- The directory holding commprefs/core.so built for LuaJIT (see the top).
function M.luajit_build()
  local build = os.getenv("COMMPREFS_NGX_BUILD")
  local given = os.getenv("COMMPREFS_BUILD")
  if not build and given and jit then build = given end
  if not build and given and given:find("lua5.4", 1, true) then
    local twin = given:gsub("lua5%.4", "luajit")
    if exists(twin .. "/commprefs/core.so") or exists(ROOT .. "/" .. twin .. "/commprefs/core.so") then build = twin end
  end
  build = build or "build/luajit"
  if build:sub(1, 1) ~= "/" then build = ROOT .. "/" .. build end
  assert(exists(build .. "/commprefs/core.so"), "support.nginx: no LuaJIT build of the core in " .. build
    .. " (nginx runs LuaJIT: make all LUA=luajit, or set COMMPREFS_NGX_BUILD)")
  return build
end

local my_pid = proc.my_pid

-- `user NAME GROUP;` naming this process's user when it is root, else "" (a
-- non-root master cannot switch users: its workers are already this user).
-- nil, why when root has no name nginx could look up.
local function user_line()
  local uid = capture("id -u"):gsub("%s+$", "")
  if uid ~= "0" then return "" end
  local name, group = capture("id -un 2>/dev/null"):gsub("%s+$", ""), capture("id -gn 2>/dev/null"):gsub("%s+$", "")
  if name == "" or group == "" then return nil, "uid 0 has no user or group name for nginx's `user` directive" end
  return string.format("user %s %s;", name, group)
end

local USER, USER_PROBLEM = user_line()
M.USER = USER or ""

-- Characters nginx's configuration or Lua's package paths cannot carry
-- (";" and "?" are path syntax, the rest break nginx's quoting or tokens).
local UNSAFE = "[%s;?\"'\\{}$#]"

-- nil when nginx can run this checkout's code from here, else one line saying
-- why not. root and tmp (default: this checkout and $TMPDIR) let a spec ask about other places.
function M.place_problem(root, tmp)
  if USER_PROBLEM then return USER_PROBLEM end
  tmp = tmp or os.getenv("TMPDIR")
  if not tmp or tmp == "" then tmp = "/tmp" end
  for what, path in pairs { ["the checkout"] = root or ROOT, ["TMPDIR"] = tmp } do
    local bad = path:match(UNSAFE)
    if bad then
      return string.format("%s %s has %q in its path, which nginx's configuration or Lua's"
        .. " package path cannot hold: clone it elsewhere", what, path, bad)
    end
  end
  local probe = capture(string.format("mktemp -d %s 2>&1", shell_quote(tmp .. "/commprefs-place.XXXXXX")))
    :gsub("%s+$", "")
  if not probe:match("^/") then return "TMPDIR " .. tmp .. " has no room for nginx's prefix: " .. probe end
  os.execute("rm -rf " .. shell_quote(probe))
  return nil
end

local RUN_HANDLER = [[
      ngx.req.read_body()
      local code = ngx.req.get_body_data()
      local file = not code and ngx.req.get_body_file()
      if file then local f = io.open(file); code = f:read("*a"); f:close() end
      local fn, err = loadstring(code or "", "=run")
      if not fn then ngx.status = 500; ngx.print("run: ", err); return end
      local ok, res = xpcall(fn, debug.traceback)
      if not ok then ngx.status = 500; ngx.print("run: ", tostring(res)); return end
      if type(res) == "table" then res = require("cjson").encode(res) end
      if res ~= nil then ngx.print(tostring(res)) end
]]

local function render(opts, prefix, port, build)
  local tls = opts.trusted_ca and ("  lua_ssl_trusted_certificate " .. prefix .. "/conf/trusted_ca.pem;\n"
    .. "  lua_ssl_verify_depth 3;") or ""
  local envs = {}
  for k in pairs(opts.env or {}) do envs[#envs + 1] = "env " .. k .. ";" end
  table.sort(envs)
  return table.concat({
    "load_module /usr/lib/nginx/modules/ndk_http_module.so;",
    "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;",
    M.USER,
    "worker_processes " .. (opts.workers or 1) .. ";",
    "pid " .. prefix .. "/logs/nginx.pid;",
    "error_log " .. prefix .. "/logs/error.log " .. (opts.log_level or "warn") .. ";",
    table.concat(envs, " "),
    "events { worker_connections 4096; }",
    "http {",
    "  access_log off;",
    "  client_body_temp_path " .. prefix .. "/tmp/body;",
    "  proxy_temp_path " .. prefix .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. prefix .. "/tmp/fastcgi;",
    "  uwsgi_temp_path " .. prefix .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. prefix .. "/tmp/scgi;",
    "  client_body_buffer_size 4m;",
    "  client_max_body_size 16m;",
    "  keepalive_requests 1000000;",
    string.format('  lua_package_path "%s/lua/?.lua;%s/lua/?/init.lua;%s/spec/?.lua;;";', ROOT, ROOT, ROOT),
    string.format('  lua_package_cpath "%s/?.so;;";', build),
    tls,
    opts.conf or "",
    "  server {",
    "    listen 127.0.0.1:" .. port .. ";",
    "    server_tokens off;",
    '    location = /__health { return 200 "ok"; }',
    "    location = /__run { content_by_lua_block {",
    RUN_HANDLER,
    "    } }",
    opts.server or "",
    "  }",
    "}",
    "",
  }, "\n")
end

local Instance = {}
Instance.__index = Instance

-- Stops nginx (fast shutdown), waits for the master to go and removes the prefix.
function Instance:stop()
  if self.stopped then return end
  self.stopped = true
  os.execute("kill " .. self.pid .. " 2>/dev/null")
  for _ = 1, 100 do
    if not os.execute("kill -0 " .. self.pid .. " 2>/dev/null") then break end
    socket.sleep(0.05)
  end
  os.execute("rm -rf " .. shell_quote(self.prefix))
end

function Instance:log()
  local f = io.open(self.prefix .. "/logs/error.log")
  if not f then return "" end
  local text = f:read("*a")
  f:close()
  return text
end

-- The error log's lines at level warn or worse.
function Instance:warnings()
  local out = {}
  for line in self:log():gmatch("[^\n]+") do
    if line:find("%[warn%]") or line:find("%[error%]") or line:find("%[crit%]") or line:find("%[alert%]")
      or line:find("%[emerg%]") then
      out[#out + 1] = line
    end
  end
  return out
end

-- The error log's lines at level error or worse (what a spec asserts is empty).
function Instance:errors()
  local out = {}
  for line in self:log():gmatch("[^\n]+") do
    if line:find("%[error%]") or line:find("%[crit%]") or line:find("%[alert%]") or line:find("%[emerg%]") then
      out[#out + 1] = line
    end
  end
  return out
end

-- A copy of `path` at `to` (trusted_ca lives in the prefix, as the top says).
local function copy_file(path, to)
  local ok = os.execute(string.format("cp %s %s", shell_quote(path), shell_quote(to)))
  assert(ok == true or ok == 0, "support.nginx.start: cannot copy " .. path)
end

-- Writes the configuration for port and runs sim/daemon: the master's pid, or nil and what it said.
local function launch(opts, prefix, conf, port, build)
  local f = assert(io.open(conf, "w"))
  f:write(render(opts, prefix, port, build))
  f:close()
  local vars = {}
  for k, v in pairs(opts.env or {}) do vars[#vars + 1] = k .. "=" .. shell_quote(v) end
  -- env -u: a sanitizer run preloads libasan into this process only, not into nginx
  local cmd = string.format("cd %s && env -u LD_PRELOAD -u ASAN_OPTIONS %s sim/daemon %s %s %s %s 2>&1",
    shell_quote(ROOT), table.concat(vars, " "), shell_quote(prefix), shell_quote(conf),
    shell_quote("http://127.0.0.1:" .. port .. "/__health"), my_pid())
  local out = capture(cmd)
  return out:match("pid=(%d+)"), out
end

-- opts: conf, server, workers, env, trusted_ca, log_level (see the top of the file).
function M.start(opts)
  opts = opts or {}
  assert(type(opts) == "table", "support.nginx.start: opts must be a table")
  local build = M.luajit_build()
  local prefix = capture("mktemp -d \"${TMPDIR:-/tmp}/commprefs-nginx.XXXXXX\""):gsub("%s+$", "")
  assert(prefix ~= "", "support.nginx.start: mktemp failed")
  -- the workers are this user (see the top): the prefix may stay private
  os.execute(string.format("mkdir -p %s/logs %s/conf %s/tmp %s/work",
    shell_quote(prefix), shell_quote(prefix), shell_quote(prefix), shell_quote(prefix)))
  if opts.trusted_ca then copy_file(opts.trusted_ca, prefix .. "/conf/trusted_ca.pem") end
  local conf = prefix .. "/conf/nginx.conf"
  local port, pid, out
  -- free_port's port is free only until someone binds it: on a busy machine
  -- another suite may take it first, then nginx cannot listen; take another
  for _ = 1, 5 do
    port = proc.free_port()
    pid, out = launch(opts, prefix, conf, port, build)
    if pid or not out:find("Address already in use", 1, true) then break end
  end
  if not pid then
    os.execute("rm -rf " .. shell_quote(prefix))
    error("support.nginx.start: nginx did not start:\n" .. out, 2)
  end
  return setmetatable({
    url = "http://127.0.0.1:" .. port, port = port, pid = pid, prefix = prefix,
    tmp = prefix .. "/work", conf_file = conf, error_log = prefix .. "/logs/error.log",
    root = ROOT, build = build,
  }, Instance)
end

function M.stop(inst) return inst:stop() end

-- One HTTP/1.0 exchange on a fresh connection: status, body, headers (lower-case
-- names), seconds it took. nil, message when the connection fails or times out.
function M.request(inst, method, path, body, timeout)
  local t0 = socket.gettime()
  local c = socket.tcp()
  c:settimeout(timeout or 30)
  local ok, err = c:connect("127.0.0.1", inst.port)
  if not ok then return nil, "connect: " .. tostring(err) end
  local req = method .. " " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n"
  if body then req = req .. "Content-Length: " .. #body .. "\r\n" end
  ok, err = c:send(req .. "\r\n" .. (body or ""))
  if not ok then c:close(); return nil, "send: " .. tostring(err) end
  local raw, rerr, partial = c:receive("*a")
  c:close()
  raw = raw or partial
  if rerr and rerr ~= "closed" then return nil, "receive: " .. tostring(rerr) end
  local head, rest = raw:match("^(.-)\r\n\r\n(.*)$")
  if not head then return nil, "no HTTP answer: " .. raw end
  local status = tonumber(head:match("^HTTP/%d%.%d (%d+)"))
  local headers = {}
  for k, v in head:gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  return status, rest, headers, socket.gettime() - t0
end

-- run(inst, code [, timeout]) -> status, body (see the top of the file).
function M.run(inst, code, timeout)
  assert(type(code) == "string", "support.nginx.run: code must be a string")
  local status, body = M.request(inst, "POST", "/__run", code, timeout)
  if not status then error("support.nginx.run: " .. body .. "\n" .. inst:log(), 2) end
  return status, body
end

-- Sends GET `paths[i]` on one connection each, all at once, and waits for every
-- answer (at most `timeout` seconds, default 30). Returns a list of
-- {status=, body=, seconds=} in the order of `paths` (status nil and err= when
-- the exchange failed). opts.after = {delay = s, path = p}: one more GET sent
-- `delay` seconds after the others, reported as answers.after.
function M.concurrent(inst, paths, timeout, opts)
  timeout = timeout or 30
  local t0 = socket.gettime()
  local pending, answers = {}, {}
  local function open(i, path)
    local c = socket.tcp()
    c:settimeout(5)
    local ok, err = c:connect("127.0.0.1", inst.port)
    if ok then ok, err = c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n") end
    if not ok then answers[i] = { err = tostring(err) }; c:close(); return end
    c:settimeout(0)
    pending[c] = { i = i, start = socket.gettime(), chunks = {} }
  end
  for i, path in ipairs(paths) do open(i, path) end
  local after = opts and opts.after
  while next(pending) or after do
    if after and socket.gettime() - t0 >= after.delay then open("after", after.path); after = nil end
    local list = {}
    for c in pairs(pending) do list[#list + 1] = c end
    local left = timeout - (socket.gettime() - t0)
    if left <= 0 then break end
    local readable = socket.select(list, nil, math.min(left, 0.01))
    for _, c in ipairs(readable) do
      local p = pending[c]
      local data, err, partial = c:receive(65536)
      data = data or partial
      if data and #data > 0 then p.chunks[#p.chunks + 1] = data end
      if err == "closed" or (err and err ~= "timeout") then
        pending[c] = nil
        c:close()
        local raw = table.concat(p.chunks)
        answers[p.i] = { status = tonumber(raw:match("^HTTP/%d%.%d (%d+)")), body = raw:match("\r\n\r\n(.*)$"),
          seconds = socket.gettime() - p.start, err = err ~= "closed" and err or nil }
      end
    end
  end
  for c, p in pairs(pending) do c:close(); answers[p.i] = { err = "timeout" } end
  return answers
end

return M
