-- support.hostile: the hostile-server cases, shared by every transport's specs.
--
--   local hostile = require "support.hostile"
--   local srv = hostile.start()          -- spec/support/hostile_server.lua on a free
--                                        -- loopback port, stopped when this process ends
--   for _, case in ipairs(hostile.CASES) do
--     hostile.run_case(case.name, srv.url, { transport = "curl" })   -- raises on failure
--   end
--   hostile.stop(srv)
--
-- Each case builds its own client (token hostile.TOKEN, base_url = srv.url ..
-- "/" .. behaviour, plus the case's options and the caller's extra options),
-- makes one or more calls and checks them with plain `assert`, so it runs
-- anywhere commprefs loads: under busted (spec/feature/hostile_spec.lua, libcurl
-- transport) and inside nginx for the cosocket transport, e.g. with
-- spec/support/nginx.lua: start nginx with spec/ on lua_package_path, then
--   nginx.run(inst, ('return require("support.hostile").run_case(%q, %q, { transport = "ngx" })')
--     :format(case.name, srv.url))
-- run_case returns the string "ok" (or raises with the case's name and why).
-- The server itself needs only luasocket; start it from the test process.
local M = {}

M.TOKEN = "hostile-test-token-4c1d2e"

------------------------------------------------------------------ server

local proc = require "support.proc"
local my_pid = proc.my_pid


-- Launches the server on port: its pid once it listens there, or nil when it
-- died (the port was taken by another process in the meantime).
local function launch(port)
  local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec/support"
  local cmd = string.format("env -u LD_PRELOAD -u ASAN_OPTIONS lua5.4 %s/hostile_server.lua %d %s"
    .. " >/dev/null 2>&1 & echo $!", here, port, my_pid())
  local f = io.popen(cmd)
  local pid = f:read("*l")
  f:close()
  local socket = require "socket"
  for _ = 1, 200 do
    if not proc.alive(pid) then return nil end
    local c = socket.connect("127.0.0.1", port)
    -- alive after the connect: whoever answered, the server held the port (it exits when bind fails)
    if c then c:close(); socket.sleep(0.05); if proc.alive(pid) then return pid end end
    socket.sleep(0.05)
  end
  error("support.hostile: the server did not start on port " .. port)
end

-- Starts the server (Lua 5.4 + luasocket) on a free port; it exits when this process ends.
function M.start()
  for _ = 1, 5 do
    local port = proc.free_port()
    local pid = launch(port)
    if pid then return { url = "http://127.0.0.1:" .. port, port = port, pid = pid } end
  end
  error("support.hostile: the server did not start: every port tried was taken")
end

function M.stop(inst)
  os.execute("kill " .. inst.pid .. " 2>/dev/null")
end

------------------------------------------------------------------ checks

local function pct(s)
  return (s:gsub("[^%w%-_.~]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- A base path making the server answer status with ctype (nil: no header) and body.
function M.respond(status, ctype, body)
  return string.format("respond/%d/%s/=%s", status, ctype and pct(ctype) or "-", pct(body))
end

-- Asserts that the token appears nowhere in v (strings, keys, nested tables, tostring).
local function assert_no_token(v, what, seen)
  seen = seen or {}
  if type(v) == "string" then
    assert(not v:find(M.TOKEN, 1, true), what .. " holds the token: " .. v)
  elseif type(v) == "table" and not seen[v] then
    seen[v] = true
    for k, x in pairs(v) do
      assert_no_token(k, what .. " key", seen)
      assert_no_token(x, what .. "." .. tostring(k), seen)
    end
  end
end
M.assert_no_token = assert_no_token

-- Asserts a failed call: nil, err with err a commprefs.Error of one of kinds;
-- tostring and pretty work and show no token.
local function assert_error(commprefs, kinds, what, env, err)
  assert(env == nil, what .. ": expected nil, err; got a " .. type(env))
  assert(commprefs.Error.is(err), what .. ": err is not a commprefs.Error: " .. tostring(err))
  local ok_kind = false
  for _, k in ipairs(kinds) do ok_kind = ok_kind or err.kind == k end
  assert(ok_kind, what .. ": err.kind " .. tostring(err.kind) .. ", expected " .. table.concat(kinds, "|")
    .. " (" .. tostring(err) .. ")")
  local text, pretty = tostring(err), commprefs.pretty(err)
  assert(type(text) == "string" and type(pretty) == "string", what .. ": no text")
  assert_no_token(err, what .. ": err")
  assert_no_token(text, what .. ": tostring(err)")
  assert_no_token(pretty, what .. ": pretty(err)")
  return err
end
M.assert_error = assert_error

local function clock()
  local ok, socket = pcall(require, "socket")
  if ok then return socket.gettime() end
  return os.time()
end

------------------------------------------------------------------ cases

local ID = "a@b.co"

-- Wrong types in 2xx answers: every call that reads them returns nil, err (kind decode).
M.WRONG_2XX = {
  '{"results":5}', '{"results":[5]}', '{"results":7}', '{"results":[1]}', '{"results":[3]}',
  '{"results":[],"numErrors":"x"}', '{"results":"many"}', '{"results":{"a":1}}',
  '{"results":[{"wideStatuses":5}]}', '{"results":[{"statuses":[7]}]}', '{"results":[{"status":{"x":1}}]}',
  '{"results":[{"subscriberIdString":["a"]}]}', '{"results":[],"errors":[4]}',
  '{"results":[],"errors":[{"context":{"subscriberIdString":"a@b.co"}}]}',
  '{"results":[{"subscriptionId":9007199254740993}]}', '{"results":[{"businessUnitId":1.5}]}',
  '[1,2,3]', '"text"', '5', 'null', 'true',
}

-- Wrong types in error bodies: still one Error whose tostring/pretty work.
M.WRONG_ERROR_BODIES = {
  '{"category":{"a":1},"correlationId":true,"message":"m"}',
  '{"category":[1],"correlationId":{"x":{}},"message":{"x":1}}',
  '{"message":"m","context":{"a":{"b":[1]},"c":[{"d":1}],"e":5},"errors":[{"in":{"x":1},"message":{"y":2}},5,"s"]}',
  '{"message":"m","errors":{"not":"an array"},"subCategory":[1]}',
  '[1]', '"x"', '{"message":null,"category":null}',
}

local function client_for(commprefs, base, path, opts, extra)
  local o = { token = M.TOKEN, base_url = base .. "/" .. path, max_retries = 0, timeout = 10 }
  for k, v in pairs(opts or {}) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return commprefs.new(o)
end

M.CASES = {
  { name = "401 echoing the token (JSON)", path = "echo401-json", run = function(c, commprefs)
      local env, err = c:get_unsubscribe_all_status(ID)
      err = assert_error(commprefs, { "http" }, "echo401-json", env, err)
      assert(err.status == 401, "status " .. tostring(err.status))
      assert(err.message:find("<redacted>", 1, true), "message not redacted: " .. err.message)
      assert(type(err.correlation_id) == "string" and type(err.context) == "table" and type(err.errors) == "table")
      local e2, err2 = c:batch_get_status({ ID, "c@d.co" })
      assert_error(commprefs, { "http" }, "echo401-json batch", e2, err2)
    end },
  { name = "401 echoing the token (HTML)", path = "echo401-html", run = function(c, commprefs)
      local env, err = c:is_unsubscribed_from_all(ID)
      err = assert_error(commprefs, { "http" }, "echo401-html", env, err)
      assert(err.message:find("<redacted>", 1, true), "message not redacted: " .. err.message)
    end },
  { name = "401 echoing the token (plain text)", path = "echo401-plain", run = function(c, commprefs)
      local env, err = c:get_status(ID)
      err = assert_error(commprefs, { "http" }, "echo401-plain", env, err)
      assert(err.message:find("<redacted>", 1, true), "message not redacted: " .. err.message)
    end },
  { name = "wrong JSON types in 2xx answers are decode errors", run = function(_, commprefs, base, extra)
      for _, body in ipairs(M.WRONG_2XX) do
        local c = client_for(commprefs, base, M.respond(200, "application/json", body), nil, extra)
        local what = "200 " .. body
        assert_error(commprefs, { "decode" }, what .. " is_unsubscribed_from_all", c:is_unsubscribed_from_all(ID))
        assert_error(commprefs, { "decode" }, what .. " get", c:get_unsubscribe_all_status(ID))
        local env, err = c:batch_get_unsubscribe_all_status({ ID, "c@d.co" })
        assert_error(commprefs, { "decode" }, what .. " batch", env, err)
        assert(#err.failed_inputs == 2, what .. ": failed_inputs")
        local s = c:bulk_get_unsubscribe_all_status({ ID, "c@d.co" })
        assert(s.failed == 2 and s.done == 2, what .. ": bulk job did not mark both ids failed")
        c:close()
      end
    end },
  { name = "wrong JSON types in error bodies still give one clean Error", run = function(_, commprefs, base, extra)
      for _, body in ipairs(M.WRONG_ERROR_BODIES) do
        local c = client_for(commprefs, base, M.respond(400, "application/json", body), nil, extra)
        local env, err = c:get_unsubscribe_all_status(ID)
        err = assert_error(commprefs, { "http" }, "400 " .. body, env, err)
        assert(type(err.message) == "string" and not err.message:find("table: 0x", 1, true), "message " .. tostring(err.message))
        for _, k in ipairs { "category", "correlation_id" } do
          assert(err[k] == nil or type(err[k]) == "string", k .. " is a " .. type(err[k]))
        end
        c:close()
      end
    end },
  { name = "an empty 2xx answer to a read is an error, not false", path = M.respond(200, "application/json", ""),
    run = function(c, commprefs)
      assert_error(commprefs, { "decode" }, "empty 200", c:is_unsubscribed_from_all(ID))
    end },
  { name = "a redirect is reported, not followed, without credentials", path = "redirect", run = function(c, commprefs)
      local env, err = c:get_unsubscribe_all_status(ID)
      err = assert_error(commprefs, { "http" }, "redirect", env, err)
      assert(err.status == 302, "status " .. tostring(err.status))
      assert(err.message:find("does not follow redirects", 1, true), "message: " .. err.message)
      assert(not err.message:find("secret", 1, true), "credentials of the Location in: " .. err.message)
      if err.message:find("redirect to", 1, true) then -- the transport gave the Location
        assert(err.message:find("redirect to http://elsewhere.invalid/x?token=", 1, true), err.message)
      end
    end },
  { name = "an endless chunked body stops at max_response_size", path = "endless-chunked",
    opts = { max_response_size = 1048576 }, run = function(c, commprefs)
      assert_error(commprefs, { "too_large" }, "endless chunked", c:get_unsubscribe_all_status(ID))
    end },
  { name = "an endless Content-Length body stops at max_response_size", path = "endless-length",
    opts = { max_response_size = 1048576 }, run = function(c, commprefs)
      assert_error(commprefs, { "too_large" }, "endless length", c:get_unsubscribe_all_status(ID))
    end },
  { name = "an endless 404 body stops at max_response_size", path = "endless-chunked-404",
    opts = { max_response_size = 1048576 }, run = function(c, commprefs)
      assert_error(commprefs, { "too_large" }, "endless 404", c:get_unsubscribe_all_status(ID))
    end },
  { name = "giant headers fail the call", path = "giant-headers", run = function(c, commprefs)
      assert_error(commprefs, { "network", "too_large" }, "giant headers", c:get_unsubscribe_all_status(ID))
    end },
  { name = "one byte a second hits the timeout", path = "slow", opts = { timeout = 2 }, run = function(c, commprefs)
      local t0 = clock()
      assert_error(commprefs, { "timeout" }, "slow", c:get_unsubscribe_all_status(ID))
      assert(clock() - t0 < 10, "the timeout did not bound a trickling answer")
    end },
  { name = "absurd rate headers do not make the client pace at one a day", path = "absurd-rate",
    run = function(c)
      local t0 = clock()
      for _ = 1, 3 do assert(c:get_unsubscribe_all_status(ID)) end
      assert(clock() - t0 < 10, "three calls took " .. (clock() - t0) .. " s after Max 1 / Interval 86400000")
    end },
}

M.BY_NAME = {}
for _, case in ipairs(M.CASES) do M.BY_NAME[case.name] = case end

-- Runs one case against the server at base (its url); extra: more client options.
function M.run_case(name, base, extra)
  local case = assert(M.BY_NAME[name], "no hostile case named " .. tostring(name))
  local commprefs = require "commprefs"
  local c = client_for(commprefs, base, case.path or "respond/404/-/=none", case.opts, extra)
  local ok, err = pcall(case.run, c, commprefs, base, extra)
  c:close()
  if not ok then error(name .. ": " .. tostring(err), 0) end
  return "ok"
end

return M
