-- support.sim: the test suite's handle on the local HubSpot simulator:
-- starts it on free loopback ports (stopped when the test process ends, even
-- if killed), and speaks its /__sim/ admin API (faults, log, state, config).
local socket = require "socket"
local http = require "socket.http"
local ltn12 = require "ltn12"
local cjson = require "cjson"

local M = { vm = jit and "luajit" or "lua5.4" }

local proc = require "support.proc"
local my_pid = proc.my_pid


function M.start(env)
  if M.url and not env then return M end
  local vars = ""
  for k, v in pairs(env or {}) do vars = vars .. k .. "=" .. v .. " " end
  local port, tls, pid, out
  for _ = 1, 5 do -- a port another process bound first (a busy machine): take others
    port, tls = proc.free_port(), proc.free_port()
    -- env -u: a sanitizer run preloads libasan into this process only, not into the simulator
    local f = io.popen(string.format("env -u LD_PRELOAD -u ASAN_OPTIONS %sSIM_PORT=%d SIM_TLS_PORT=%d"
      .. " sim/run --daemon --watch %s 2>&1", vars, port, tls, my_pid()))
    out = f:read("*a")
    f:close()
    pid = out:match("pid=(%d+)")
    if pid or not out:find("Address already in use", 1, true) then break end
  end
  assert(pid, "the simulator did not start:\n" .. out)
  local inst = {
    url = "http://127.0.0.1:" .. port, tls_url = "https://127.0.0.1:" .. tls,
    ca_file = out:match("ca_file=(%S+)"), pid = pid, port = port,
  }
  if env then return setmetatable(inst, { __index = M }) end
  for k, v in pairs(inst) do M[k] = v end
  return M
end

function M.stop(inst)
  os.execute("kill " .. inst.pid .. " 2>/dev/null")
end

-- One admin call: returns the decoded JSON answer.
function M.admin(method, path, body, inst)
  local out = {}
  local src = body and cjson.encode(body) or nil
  local _, code = http.request {
    url = (inst or M).url .. "/__sim/" .. path, method = method,
    source = src and ltn12.source.string(src) or nil,
    headers = src and { ["content-length"] = #src, ["content-type"] = "application/json" } or nil,
    sink = ltn12.sink.table(out),
  }
  assert(code == 200, "admin " .. path .. " answered " .. tostring(code) .. ": " .. table.concat(out))
  return cjson.decode(table.concat(out))
end

-- A commprefs client of the simulator with fast retries; opts override any default.
function M.client(opts, defaults)
  local o = { token = "sim-token", base_url = M.url, backoff_base = 0.01, backoff_max = 0.05 }
  for k, v in pairs(defaults or {}) do o[k] = v end
  for k, v in pairs(opts or {}) do o[k] = v end
  return require("commprefs").new(o)
end

function M.reset(config)
  M.admin("POST", "reset", {})
  if config then M.admin("POST", "config", config) end
end
function M.fault(f) return M.admin("POST", "faults", f) end
function M.new_day() return M.admin("POST", "day", {}) end -- daily limit counts start again
function M.log() return M.admin("GET", "log").requests end
-- {throttled=, expired=, unauthorized=, forbidden=, tokens_issued=}: answers of each kind so far
function M.counts() local l = M.admin("GET", "log"); l.requests = nil; return l end
-- {token = T} (a static token) | {app = true} (the OAuth app: its refresh and access tokens)
function M.revoke(what) return M.admin("POST", "revoke", what) end
-- The simulator's OAuth app (POST /oauth/2026-03/token)
M.oauth_app = { client_id = "sim-client", client_secret = "sim-secret", refresh_token = "sim-refresh" }
function M.state() return M.admin("GET", "state").subscribers end

-- A raw HTTP exchange with the API (not through commprefs): status, body, headers.
function M.raw(method, path, opts)
  opts = opts or {}
  local out = {}
  local headers = { authorization = opts.token ~= false and ("Bearer " .. (opts.token or "sim-token")) or nil }
  local src = opts.body
  if src then headers["content-length"] = #src; headers["content-type"] = "application/json" end
  local _, code, h = http.request {
    url = M.url .. path, method = method, headers = headers,
    source = src and ltn12.source.string(src) or nil, sink = ltn12.sink.table(out),
  }
  return code, table.concat(out), h
end

return M
