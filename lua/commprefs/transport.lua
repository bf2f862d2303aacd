-- commprefs.transport: owns the one choice of transport for a call: libcurl
-- (the C core), or cosockets inside nginx wherever the phase can yield.
-- "auto" takes libcurl in plain Lua and in init_by_lua (nginx's master,
-- before any worker); a phase where cosockets are disabled raises, naming
-- it: nothing ever blocks a worker. init, lookup and the worker ask here.
local M = {}

-- Phases where cosockets, ngx.sleep and ngx.thread work (lua-nginx-module docs).
M.YIELDABLE = { rewrite = true, server_rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true, preread = true }

-- true inside nginx with lua-nginx-module (the ngx API is there).
function M.in_nginx()
  return type(ngx) == "table" and type(ngx.get_phase) == "function" and type(ngx.socket) == "table"
end

-- Raises (level 0: no position) when the running phase cannot yield.
function M.check_phase(phase)
  if not M.YIELDABLE[phase] then
    error("commprefs: cannot send requests in nginx's " .. tostring(phase) .. " phase: cosockets are"
      .. " disabled there and libcurl would block the worker; run the call from ngx.timer.at(0, function()"
      .. " ... end) (or a rewrite, access or content handler)", 0)
  end
end

-- The one rule of ca_file and cosockets, told at new() for transport = "ngx"
-- and at the first call that would take cosockets for "auto".
M.NGX_CA_FILE = "bad option 'ca_file' (inside nginx, cosockets verify TLS against nginx.conf's"
  .. " lua_ssl_trusted_certificate: set it there and drop ca_file, or use transport = \"curl\")"

-- "curl" or "ngx" for a call made now; `which` is the client's transport
-- option ("auto", "curl", "ngx"), has_cosockets whether it has a cosocket
-- transport. Raises in a phase that cannot yield, and for cosockets with a
-- ca_file.
function M.for_call(which, has_cosockets, has_ca_file)
  if which == "curl" or not has_cosockets then return "curl" end
  local phase = ngx.get_phase()
  if which == "auto" and phase == "init" then return "curl" end
  M.check_phase(phase)
  if has_ca_file then error("commprefs: " .. M.NGX_CA_FILE, 0) end
  return "ngx"
end

-- ngx.sleep(ms / 1000), never for less than 1 ms: nginx rounds a shorter
-- sleep to ngx.sleep(0), which Debian's nginx (no delayed-events patch) logs
-- as a warning each time. Every cosocket wait of commprefs sleeps here.
function M.nap(ms)
  ngx.sleep(ms >= 1 and ms / 1000 or 0.001)
end

-- Phases of a request (not a timer): a visitor is waiting there.
local REQUEST_PHASES = { rewrite = true, server_rewrite = true, access = true, content = true }

-- The seconds a single call made now may take: the deadline option; in a
-- request phase without one, the client's timeout (a visitor waits for the
-- page: no paced wait past it, nothing sent for a caller who has gone);
-- else nil (the governor's own rule: the deadline option, or none).
function M.call_seconds(deadline, timeout)
  if deadline then return deadline end
  if ngx == nil then return nil end -- plain Lua
  if type(ngx) == "table" and ngx.get_phase and REQUEST_PHASES[ngx.get_phase()] then return timeout end
  return nil
end

-- Whether a call made now goes over cosockets (never raises).
function M.is_cosocket(which, has_cosockets)
  if which == "curl" or not has_cosockets then return false end
  return M.YIELDABLE[ngx.get_phase()] == true
end

return M
