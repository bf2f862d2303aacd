-- commprefs.ngx.transport: the cosocket transport, used inside OpenResty/nginx
-- where libcurl would block the worker. Owns HTTP/1.1 over ngx.socket.tcp:
-- building requests, the keep-alive pools (setkeepalive; one pool per base
-- host:port and TLS settings, never per token), TLS through sslhandshake
-- with verification on by default, per-attempt timeouts, and concurrency
-- with ngx.thread. It keeps the contract of the libcurl transport
-- (csrc/transport.c): perform(source, on_done) with the same result tables.
-- Every attempt goes through the pacer (commprefs.pacer), which drives the
-- client's governor (csrc/governor.c: when an attempt may start, what its
-- end decides, every count) and the shared backing; responses are parsed by
-- core.http1_response (csrc/http1.c). Nothing here decides a rule.
--
-- A client may be created anywhere (init_by_lua included) and used from any
-- request or timer, by several at once: no socket outlives one perform
-- (cosockets cannot cross requests), except idle keep-alive connections,
-- which nginx keeps in its per-worker pool.
local core = require "commprefs.core"
local choice = require "commprefs.transport"

local M = { YIELDABLE = choice.YIELDABLE, in_nginx = choice.in_nginx, check_phase = choice.check_phase }

local READ_CHUNK = 65536

local function now_ms()
  ngx.update_time()
  return ngx.now() * 1000
end

-- Where "scheme://authority" points: {tls=, host= (no brackets), addr= (what to
-- connect to), port=, authority= ("host[:port]" for the Host header), pool=},
-- or nil. The keep-alive pool is named by all that decides whether a
-- connection may be reused: scheme, host, port and TLS verification.
local function parse_origin(origin, verify_tls, generation)
  local scheme, authority = origin:match("^(https?)://(.*)$")
  authority = authority:gsub("^.*@", "")
  local host, port = authority:match("^%[([^%]]+)%]:?(%d*)$")
  if not host then host, port = authority:match("^([^:]+):?(%d*)$") end
  if not host or host == "" then return nil end
  local tls = scheme == "https"
  port = tonumber(port) or (tls and 443 or 80)
  return { tls = tls, host = host, port = port, authority = authority,
    -- nginx resolves names only through its `resolver` directive; localhost is loopback by definition
    addr = host == "localhost" and "127.0.0.1" or host,
    pool = { pool = string.format("commprefs:%s:%s:%d:%s:%d", scheme, host, port,
      tls and (verify_tls and "verify" or "noverify") or "", generation) } }
end

-- The target of a request URL (parsed once per origin) and its path+query.
local function target(t, url)
  local origin, path = url:match("^(https?://[^/?#]*)(.*)$")
  if not origin then return nil end
  local tg = t.targets[origin]
  if tg == nil then
    tg = parse_origin(origin, t.settings.verify_tls, t.generation) or false
    if t.ntargets < 16 then t.targets[origin], t.ntargets = tg, t.ntargets + 1 end
  end
  if not tg then return nil end
  if path == "" or path:byte(1) ~= 47 then path = "/" .. path end -- 47: "/"
  return tg, path:find("#", 1, true) and path:gsub("#.*$", "") or path
end

local function no_answer(err, what, started)
  if err == "timeout" then
    return { kind = "timeout", message = string.format("%s timed out after %d ms", what, now_ms() - started) }
  end
  return { kind = "network", message = what .. " failed: " .. tostring(err) }
end

------------------------------------------------------------------ one attempt

-- Sends one request on a pooled or new connection and reads the answer.
-- Returns the result (C2 fields, no attempts), whether it was on the wire, and
-- whether a pooled connection failed before any byte of an answer (stale: the
-- server had closed it). resent: the replacement of a stale attempt.
local function exchange(t, req, pacer, resent)
  local tg, path = target(t, req.url)
  if not tg then return { kind = "network", message = "bad URL: " .. req.url }, false end
  local tls, host, port = tg.tls, tg.host, tg.port
  local s = t.settings
  local started = now_ms()
  local deadline = started + s.timeout_ms
  local sock = ngx.socket.tcp()
  sock:settimeouts(math.min(s.connect_timeout_ms, s.timeout_ms), s.timeout_ms, s.timeout_ms)
  local ok, err = sock:connect(tg.addr, port, tg.pool)
  if not ok then return no_answer(err, "connect to " .. host .. ":" .. port, started), false end
  local reused = sock:getreusedtimes() > 0
  if tls and not reused then
    -- pcall: lua-resty-core 0.1.25 asserts (instead of returning nil, err) when a
    -- handshake that finished at once then failed verification
    local ok_call, sess, herr = pcall(sock.sslhandshake, sock, nil, host, s.verify_tls)
    if not ok_call then sess, herr = nil, "certificate verification failed" end
    if not sess then
      sock:close()
      if herr == "timeout" then return no_answer(herr, "TLS handshake with " .. host, started), false end
      return { kind = "tls", message = "TLS handshake with " .. host .. " failed: " .. tostring(herr) }, false
    end
  end
  local body = req.body
  local post = req.method == "POST"
  if not resent then pacer:sent() end -- a replacement for a stale pooled connection is the same send
  local bytes, serr = sock:send(t.head(post and "POST" or (req.method or "GET"), path, tg.authority, post and (body or "") or nil))
  if not bytes then
    sock:close()
    return no_answer(serr, "sending to " .. host, started), true, reused and serr ~= "timeout"
  end
  local parser = core.http1_response { max_body = s.max_response_size }
  local got = 0
  while true do
    local left = deadline - now_ms()
    if left < 1 then left = 1 end
    sock:settimeout(left)
    local data, rerr = sock:receiveany(READ_CHUNK)
    local done, perr, kind
    if data then
      got = got + #data
      done, perr, kind = parser:feed(data)
    elseif rerr == "closed" then
      done, perr, kind = parser:feed("")
    else
      sock:close()
      parser:close()
      return no_answer(rerr, string.format("reading the answer from %s (%d bytes received)", host, got), started),
        true, reused and got == 0 and rerr ~= "timeout"
    end
    if done == nil then
      sock:close()
      parser:close()
      return { kind = kind, message = perr }, true, reused and got == 0 and rerr == "closed"
    end
    if done then break end
  end
  local res = parser:result()
  parser:close()
  if res.keepalive then sock:setkeepalive() else sock:close() end
  res.keepalive, res.extra = nil, nil -- extra: bytes after the answer (never reused: keepalive is false)
  if res.status < 300 or res.status > 399 then res.location = nil end -- C2: location= only on a redirect
  return res, true
end

-- One request to its final result: attempts as the pacer lets them start,
-- and the retries the governor decides. A reused connection the server had
-- already closed is replaced at once (not an attempt), as libcurl does.
local function run(t, req, pacer, st)
  local attempts, last = 0, nil
  while true do
    local wait, stop, why = pacer:wait()
    while wait and wait > 0 do
      ngx.sleep(wait / 1000)
      wait, stop, why = pacer:wait()
    end
    if not stop then
      local started, err = pacer:start()
      if not started then stop, why = "budget", err end
    end
    if stop then
      st.stop = st.stop or stop -- pull no more
      return last or { stopped = stop, attempts = 0, message = why }
    end
    local t0 = now_ms()
    local res, on_wire, stale, was_sent
    for _ = 1, 4 do -- a pooled connection the server had closed: replaced at once, not an attempt
      res, on_wire, stale = exchange(t, req, pacer, was_sent)
      was_sent = was_sent or on_wire
      if not stale then break end
    end
    if not was_sent then pacer:unsent() end
    attempts = attempts + 1
    res.attempts = attempts
    local retry, delay_ms = pacer:finish(res, was_sent, now_ms() - t0)
    if not retry then return res end
    last = res
    if delay_ms and delay_ms > 0 then ngx.sleep(delay_ms / 1000) end
  end
end

------------------------------------------------------------------ perform

local function target_of(t)
  return math.max(1, t.gov:target())
end

-- perform(source, on_done): the C2 contract (see transport.c for the libcurl twin).
local function perform(t, source, on_done)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("bad argument #1 to 'perform' (table or function expected)", 2)
  end
  if on_done ~= nil and type(on_done) ~= "function" then
    error("bad argument #2 to 'perform' (function expected)", 2)
  end
  M.check_phase(ngx.get_phase())
  local pacer = t.pacer
  t.gov:new_call()
  local st = { next = 1 }
  local results = on_done == nil and {} or nil

  local function pull()
    if st.exhausted or st.err or st.stop then return nil end
    local req
    if type(source) == "function" then
      local ok, r = pcall(source)
      if not ok then st.err = r; return nil end
      req = r
    else
      req = source[st.next]
    end
    if req == nil then st.exhausted = true; return nil end
    if type(req) ~= "table" then st.err = string.format("perform: request %d is a %s, not a table", st.next, type(req)); return nil end
    if type(req.url) ~= "string" then st.err = string.format("perform: request %d has no url", st.next); return nil end
    local i = st.next
    st.next = i + 1
    return i, req
  end

  local function deliver(i, res)
    if results then results[i] = res; return end
    local ok, err = pcall(on_done, i, res)
    if not ok then st.err = st.err or err end
  end

  -- What perform returns once everything pulled is delivered (or raises).
  local function ending()
    if st.err then error(st.err, 0) end
    if results then return results, st.stop end
    return nil, st.stop
  end

  if type(source) == "table" and source[2] == nil then -- one request (every single call): no thread
    local i, req = pull()
    if i then deliver(i, run(t, req, pacer, st)) end
    return ending()
  end

  -- One light thread per request in flight; results are delivered here, in
  -- the caller's coroutine, as they complete. After an error nothing more is
  -- pulled or delivered; what is in flight finishes first.
  local function one(i, req) return i, run(t, req, pacer, st) end
  local live, slot_of = {}, {}
  local unpack = table.unpack or unpack
  while true do
    while #live < target_of(t) do
      local i, req = pull()
      if not i then break end
      live[#live + 1] = ngx.thread.spawn(one, i, req)
      slot_of[i] = live[#live]
    end
    if #live == 0 then break end
    local ok, i, res = ngx.thread.wait(unpack(live))
    if ok then
      for k = 1, #live do
        if live[k] == slot_of[i] then table.remove(live, k); break end
      end
      slot_of[i] = nil
      if not st.err then deliver(i, res) end
    else -- a request raised (the client was closed meanwhile, ...): let the others end, then raise
      st.err = st.err or i
      for k = #live, 1, -1 do
        if coroutine.status(live[k]) == "dead" then table.remove(live, k) end
      end
    end
  end
  return ending()
end

-- Forgets this transport's pooled connections: new ones are made under a
-- new pool name (the old ones idle out in nginx's pool, never reused).
local function drop_connections(t)
  t.generation = t.generation + 1
  t.targets, t.ntargets = {}, 0
  return true
end

-- new(governor, pacer, credentials[, form]) -> transport with :perform(source, on_done).
-- Each request head carries the token credentials (commprefs.credentials)
-- hold when it is written; without credentials none (an OAuth token
-- endpoint: form = true sends form bodies).
function M.new(gov, pacer, credentials, form)
  local settings = gov:settings()
  local ua = "User-Agent: " .. settings.user_agent .. "\r\n"
  local accept = "Accept: application/json\r\n"
  local ctype = form and "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
    or "Content-Type: application/json\r\nContent-Length: "
  local t = { gov = gov, pacer = pacer, settings = settings, targets = {}, ntargets = 0, generation = 0 }
  local auth_token, auth_line = nil, ""
  local function auth()
    if credentials and credentials:due() then credentials:current() end -- a refusal: the 401 tells
    local tok = credentials and credentials:value()
    if tok ~= auth_token then
      auth_token, auth_line = tok, tok and ("Authorization: Bearer " .. tok .. "\r\n") or ""
    end
    return auth_line
  end
  t.head = function(method, path, authority, body)
    if body then
      return { method, " ", path, " HTTP/1.1\r\nHost: ", authority, "\r\n", ua, auth(), accept,
        ctype, #body, "\r\n\r\n", body }
    end
    return { method, " ", path, " HTTP/1.1\r\nHost: ", authority, "\r\n", ua, auth(), accept, "\r\n" }
  end
  return setmetatable(t, {
    __index = { perform = perform, drop_connections = drop_connections },
    __tostring = function() return "commprefs.ngx.transport" end,
  })
end

return M
