-- commprefs.ngx.transport: the cosocket transport, used inside OpenResty/nginx
-- where libcurl would block the worker. Owns HTTP/1.1 over ngx.socket.tcp:
-- building requests, the keep-alive pools (setkeepalive; one pool per base
-- host:port and TLS settings, never per token), TLS through sslhandshake
-- with verification on by default, per-attempt timeouts, and concurrency
-- with ngx.thread. It keeps the contract of the libcurl transport
-- (csrc/transport.c): perform(source, on_done) with the same result tables.
-- Every attempt goes through the pacer (commprefs.pacer), which drives the
-- governor (csrc/governor.c: when an attempt may start, what its end
-- decides, every count, the call's deadline) and the shared backing;
-- responses are parsed by core.http1_response (csrc/http1.c). Nothing here
-- decides a rule.
--
-- One transport (its pools, pacer and governor) may serve several clients
-- (inside nginx, every client of a worker's bundle: commprefs.shared). Each
-- call carries its client's profile (M.profile: the client's policy,
-- csrc/policy.c, and what this file reads of it: retries, timeouts, TLS
-- verification, answer size, User-Agent), so a call keeps its own client's
-- policy on the shared governor; a call without one takes the governor's.
--
-- An attempt's timeout covers DNS too: nginx's resolver waits for its own
-- resolver_timeout (30 s by default) whatever a socket's connect timeout
-- says, so a connect to a name runs in a light thread that is killed when
-- the attempt's connect timeout passes first (nginx then cancels the lookup).
--
-- A client may be created anywhere (init_by_lua included) and used from any
-- request or timer, by several at once: no socket outlives one perform
-- (cosockets cannot cross requests), except idle keep-alive connections,
-- which nginx keeps in its per-worker pool.
local core = require "commprefs.core"
local choice = require "commprefs.transport"
local semaphore = require "ngx.semaphore"
local nap = choice.nap

local M = { YIELDABLE = choice.YIELDABLE, in_nginx = choice.in_nginx, check_phase = choice.check_phase }

local READ_CHUNK = 65536
local PARSERS_KEPT = 16 -- reset parsers a transport keeps for its next answers

-- nginx's functions, looked up once (this module is loaded inside nginx only
-- for use there; outside, ngx is absent and nothing here runs).
local ngx_ = rawget(_G, "ngx") or {}
local ngx_now, ngx_update_time, ngx_sleep = ngx_.now, ngx_.update_time, ngx_.sleep
local tcp = ngx_.socket and ngx_.socket.tcp
local http1_response = core.http1_response
local min, type, tostring, format = math.min, type, tostring, string.format

-- Milliseconds on the governor's clock (CLOCK_MONOTONIC, as cp_now_ms in
-- csrc/util.c): read through the FFI, so that the GET path's traces do not
-- stop at a C function (nginx's ngx.update_time also formats its cached
-- time strings). Without the FFI: nginx's clock, freshly read.
local now_ms
do
  local ok, ffi = pcall(require, "ffi")
  if ok and pcall(ffi.cdef, [[
    struct commprefs_timespec { long tv_sec; long tv_nsec; };
    int commprefs_clock_gettime(int clk, struct commprefs_timespec *ts) __asm__("clock_gettime");
  ]]) then
    local C, ts = ffi.C, ffi.new("struct commprefs_timespec")
    local MONOTONIC = 1 -- CLOCK_MONOTONIC on Linux
    now_ms = function()
      C.commprefs_clock_gettime(MONOTONIC, ts)
      return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    end
  else
    now_ms = function()
      ngx_update_time()
      return ngx_now() * 1000
    end
  end
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
    literal = host == "localhost" or host:find("^[%d.]+$") ~= nil or host:find(":", 1, true) ~= nil,
    -- nginx resolves names only through its `resolver` directive; localhost is loopback by definition
    addr = host == "localhost" and "127.0.0.1" or host,
    pool = { pool = string.format("commprefs:%s:%s:%d:%s:%d", scheme, host, port,
      tls and (verify_tls and "verify" or "noverify") or "", generation) } }
end

-- The path+query of a request URL past its origin (fragment dropped).
local function path_of(path)
  if path == "" or path:byte(1) ~= 47 then path = "/" .. path end -- 47: "/"
  return path:find("#", 1, true) and path:gsub("#.*$", "") or path
end

-- The target of a request URL (parsed once per origin and TLS
-- verification) and its path+query. The last origin is tried first, by a
-- prefix compare (no pattern: the GET path's trace goes on).
local function target(t, url, verify_tls)
  local last = t.last_origin
  if last and t.last_verify == verify_tls then
    local n = #last
    local b = url:byte(n + 1)
    -- the origin ends where the URL ends or at "/", "?" or "#" (47, 63, 35)
    if (b == nil or b == 47 or b == 63 or b == 35) and url:sub(1, n) == last then
      return t.last_tg, path_of(url:sub(n + 1))
    end
  end
  local origin, path = url:match("^(https?://[^/?#]*)(.*)$")
  if not origin then return nil end
  local known = t.targets[verify_tls]
  local tg = known[origin]
  if tg == nil then
    tg = parse_origin(origin, verify_tls, t.generation) or false
    if known.n < 16 then known[origin], known.n = tg, known.n + 1 end
  end
  if not tg then return nil end
  t.last_origin, t.last_verify, t.last_tg = origin, verify_tls, tg
  return tg, path_of(path)
end

-- A reset parser of the profile's own (its max_response_size; made once,
-- reset between answers: no new userdata per request); given back with
-- give_parser.
local function take_parser(prof)
  local pool, n = prof.parsers, prof.nparsers
  if n > 0 then
    local p = pool[n]
    pool[n], prof.nparsers = nil, n - 1
    return p
  end
  return http1_response { max_body = prof.settings.max_response_size }
end

-- fresh: p is reset already (take completed an answer).
local function give_parser(prof, p, fresh)
  if prof.nparsers < PARSERS_KEPT then
    if not fresh then p:reset() end
    prof.nparsers = prof.nparsers + 1
    prof.parsers[prof.nparsers] = p
  else
    p:close()
  end
end

local function no_answer(err, what, started)
  if err == "timeout" then
    return { kind = "timeout", message = string.format("%s timed out after %d ms", what, now_ms() - started) }
  end
  return { kind = "network", message = what .. " failed: " .. tostring(err) }
end

------------------------------------------------------------------ one attempt

local function connect_and_post(sock, addr, port, pool, done)
  local ok, err = sock:connect(addr, port, pool)
  done:post(1)
  return ok, err
end

-- sock:connect bounded by connect_ms, resolving included (see the top).
local function connect(sock, tg, connect_ms)
  if tg.literal then return sock:connect(tg.addr, tg.port, tg.pool) end
  local done = semaphore.new(0)
  local th = ngx.thread.spawn(connect_and_post, sock, tg.addr, tg.port, tg.pool, done)
  if not done:wait(connect_ms / 1000) then
    ngx.thread.kill(th)
    return nil, "timeout"
  end
  local _, ok, err = ngx.thread.wait(th)
  return ok, err
end

-- Sends one request on a pooled or new connection and reads the answer.
-- Returns the result (C2 fields, no attempts), whether it was on the wire, and
-- whether a pooled connection failed before any byte of an answer (stale: the
-- server had closed it). resent: the replacement of a stale attempt.
-- timeout_ms, connect_ms: this attempt's (its policy's, within the call's deadline).
local function exchange(t, req, pacer, resent, timeout_ms, connect_ms, prof)
  local s = prof.settings
  local tg, path = target(t, req.url, s.verify_tls)
  if not tg then return { kind = "network", message = "bad URL: " .. req.url }, false end
  local tls, host, port = tg.tls, tg.host, tg.port
  local started = now_ms()
  local deadline = started + timeout_ms
  local sock = tcp()
  sock:settimeouts(connect_ms, timeout_ms, timeout_ms)
  local ok, err = connect(sock, tg, connect_ms)
  if not ok then return no_answer(err, "connect to " .. host .. ":" .. port, started), false end
  -- whether the connection came from the pool: asked only where it matters
  -- (a TLS handshake, a failure that may be a stale pooled connection)
  if tls and sock:getreusedtimes() == 0 then
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
  local bytes, serr = sock:send(t.head(prof.ua, post and "POST" or (req.method or "GET"), path, tg.authority,
    post and (body or "") or nil))
  if not bytes then
    local reused = sock:getreusedtimes() > 0
    sock:close()
    return no_answer(serr, "sending to " .. host, started), true, reused and serr ~= "timeout"
  end
  local parser = take_parser(prof)
  local got = 0
  local res, keep, kind
  while true do
    local left = deadline - now_ms()
    if left < 1 then left = 1 end
    -- the read timeout set above stands while less than a millisecond has passed
    if left < timeout_ms - 1 then sock:settimeout(left) end
    local data, rerr = sock:receiveany(READ_CHUNK)
    if data then
      got = got + #data
      res, keep, kind = parser:take(data) -- feed, result and reset in one call
    elseif rerr == "closed" then
      res, keep, kind = parser:take("")
    else
      local reused = sock:getreusedtimes() > 0
      sock:close()
      give_parser(prof, parser)
      return no_answer(rerr, format("reading the answer from %s (%d bytes received)", host, got), started),
        true, reused and got == 0 and rerr ~= "timeout"
    end
    if res == nil then
      local reused = sock:getreusedtimes() > 0
      sock:close()
      give_parser(prof, parser)
      return { kind = kind, message = keep }, true, reused and got == 0 and rerr == "closed"
    end
    if res then break end
  end
  give_parser(prof, parser, true)
  -- keep: false too when bytes came after the answer (never reused); the
  -- result has location= only on a redirect (C2)
  if keep then sock:setkeepalive() else sock:close() end
  return res, true
end

-- What an attempt got, for the deadline result's message.
local function last_outcome(res)
  if not res then return nil end
  return res.status and ("HTTP " .. res.status) or res.kind
end

-- Waits while the pacer says so (wait: what it said last), then starts the
-- attempt (the backing's turn, the attempt's timeouts): timeout_ms,
-- connect_ms; or nil, nil, stop, why.
local function wait_and_start(pacer, gov, deadline, policy, wait, stop, why)
  while wait and wait > 0 do
    nap(wait)
    wait, stop, why = pacer:wait(deadline)
  end
  if not stop then
    local started, err = pacer:start()
    if not started then stop, why = "budget", err end
  end
  if not stop then
    local timeout_ms, connect_ms = gov:attempt_timeout(deadline, policy)
    if timeout_ms then return timeout_ms, connect_ms end
    pacer:unsent() -- started, never sent
    stop = "deadline"
  end
  return nil, nil, stop, why
end

-- One request to its final result (and why perform must stop, or nil):
-- attempts as the pacer lets them start, and the retries the governor
-- decides, all within the call's deadline (the governor's clock; nil =
-- none): a request not sent by then is not sent. A reused connection the
-- server had already closed is replaced at once (not an attempt), as
-- libcurl does. prof: the calling client's (M.profile).
-- new_call: the call's gov:new_call is still to be made (perform_one).
-- One attempt of run (attempts and last: those before it): the result and
-- stop reason when the request is done, else nil, nil, the attempts so far
-- and the result to retry. A function of its own so that a call that needs
-- one attempt enters no loop (a root trace cannot record an inner loop).
local function attempt(t, req, pacer, deadline, prof, new_call, attempts, last)
  local gov = t.gov
  do
    local timeout_ms, connect_ms, wait, stop, why, ready_at
    if not pacer.shared then -- no backing to ask: the governor's next, begin and attempt_timeout at once
      timeout_ms, connect_ms, wait, stop, why = gov:try_start(deadline, prof.policy, new_call)
      new_call = false
      if wait then -- paced: wait as below
        ready_at = now_ms() -- for the pacing-wait metric
        timeout_ms, connect_ms, stop, why = wait_and_start(pacer, gov, deadline, prof.policy, wait, stop, why)
      end
    else
      if new_call then gov:new_call(); new_call = false end
      wait, stop, why = pacer:wait(deadline)
      ready_at = now_ms() -- for the pacing-wait metric
      timeout_ms, connect_ms, stop, why = wait_and_start(pacer, gov, deadline, prof.policy, wait, stop, why)
    end
    if stop then
      if stop == "deadline" then return gov:deadline_result(attempts, last_outcome(last)), stop end
      return last or { stopped = stop, attempts = 0, message = why }, stop
    end
    local t0 = now_ms()
    if ready_at then gov:paced(t0 - ready_at) end
    local res, replays, was_sent = nil, 0, false
    for _ = 1, 4 do
      local on_wire, stale
      res, on_wire, stale = exchange(t, req, pacer, was_sent, timeout_ms, connect_ms, prof)
      was_sent = was_sent or on_wire
      if not stale then break end
      -- A pooled connection the server had closed: replaced at once. A GET is
      -- only replaced; a POST it had sent may have been acted on, so its
      -- replay is an attempt, sent only while retries are left (as libcurl's).
      if on_wire and req.method == "POST" then
        if attempts + replays + 1 > prof.settings.max_retries then
          res.message = "the connection closed before an answer; not sent again (no retries left)"
          break
        end
        replays = replays + 1
        gov:resent()
      end
    end
    if not was_sent then pacer:unsent() end
    attempts = attempts + 1 + replays
    res.attempts = attempts
    local retry, delay_ms, refused = pacer:finish(res, was_sent, now_ms() - t0, deadline, prof.policy)
    if refused then return gov:deadline_result(attempts, last_outcome(res)), "deadline" end
    if not retry then return res end
    if delay_ms and delay_ms > 0 then nap(delay_ms) end
    return nil, nil, attempts, res
  end
end

local function run(t, req, pacer, deadline, prof, new_call)
  local res, stop, attempts, last = attempt(t, req, pacer, deadline, prof, new_call, 0, nil)
  while res == nil do
    res, stop, attempts, last = attempt(t, req, pacer, deadline, prof, false, attempts, last)
  end
  return res, stop
end

-- The one request of a single call, checked as pull() checks each request.
local function check_request(req, i)
  if type(req) ~= "table" then error(format("perform: request %d is a %s, not a table", i, type(req)), 0) end
  if type(req.url) ~= "string" then error(format("perform: request %d has no url", i), 0) end
end

-- perform_one(req[, deadline[, profile]]) -> result: one request, no
-- thread, no closure, no wrapper table (every single call: init.lua's _request).
local function perform_one(t, req, deadline, prof)
  check_request(req, 1)
  M.check_phase(ngx.get_phase())
  return (run(t, req, t.pacer, deadline, prof or t.default, true))
end

------------------------------------------------------------------ perform

local function target_of(t)
  return math.max(1, t.gov:target())
end

-- perform(source, on_done[, deadline[, profile]]): the C2 contract (see
-- transport.c for the libcurl twin); profile: the calling client's (M.profile).
local function perform(t, source, on_done, deadline, prof)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("bad argument #1 to 'perform' (table or function expected)", 2)
  end
  if on_done ~= nil and type(on_done) ~= "function" then
    error("bad argument #2 to 'perform' (function expected)", 2)
  end
  M.check_phase(ngx.get_phase())
  local pacer = t.pacer
  prof = prof or t.default
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

  if type(source) == "table" and source[2] == nil then -- one request: no thread
    local i, req = pull()
    if i then
      local res, stop = run(t, req, pacer, deadline, prof)
      st.stop = st.stop or stop
      deliver(i, res)
    end
    return ending()
  end

  -- One light thread per request in flight; results are delivered here, in
  -- the caller's coroutine, as they complete. The threads report through a
  -- queue and a semaphore, never through a wait on several threads at once:
  -- lua-nginx-module leaves the threads such a wait did not return flagged
  -- as waited for, and hands the result of one finishing later to whatever
  -- this coroutine yields on meanwhile (a socket in on_done or in source, a
  -- credentials refresh). A finished thread is reaped at once (it is dead:
  -- no yield). After an error nothing more is pulled or delivered; what is
  -- in flight finishes first.
  local finished, ready = {}, semaphore.new(0)
  local function one(i, req)
    local ok, res, stop = pcall(run, t, req, pacer, deadline, prof)
    finished[#finished + 1] = { th = coroutine.running(), i = i, ok = ok, res = res, stop = stop }
    ready:post(1)
  end
  local live = 0
  while true do
    while live < target_of(t) do
      local i, req = pull()
      if not i then break end
      ngx.thread.spawn(one, i, req)
      live = live + 1
    end
    if live == 0 then break end
    local wake = t.gov:start_wake() -- the start rule (governor.c) may let one more go before an answer
    if wake then
      if #finished == 0 then ready:wait(wake / 1000 + 0.001) end
    else
      while #finished == 0 do ready:wait(60) end
    end
    local f = table.remove(finished, 1)
    if f then
      ngx.thread.wait(f.th) -- reap the dead thread
      live = live - 1
      if f.ok then
        st.stop = st.stop or f.stop -- pull no more
        if not st.err then deliver(f.i, f.res) end
      else -- a request raised (the client was closed meanwhile, ...): let the others end, then raise
        st.err = st.err or f.res
      end
    end
  end
  return ending()
end

-- Forgets this transport's pooled connections: new ones are made under a
-- new pool name (the old ones idle out in nginx's pool, never reused).
local function no_targets()
  return { [true] = { n = 0 }, [false] = { n = 0 } } -- by TLS verification
end

local function drop_connections(t)
  t.generation = t.generation + 1
  t.targets = no_targets()
  t.last_origin, t.last_verify, t.last_tg = nil, nil, nil
  return true
end

-- profile(governor[, policy]) -> what a client's calls carry (perform's
-- last argument): its policy (commprefs.core.policy; nil: the governor's
-- own), the settings read from it, its User-Agent line and its parsers.
-- Made once per policy, kept by the client (or its bundle).
function M.profile(gov, policy)
  local s = gov:settings(policy)
  return { policy = policy, settings = s, ua = "User-Agent: " .. s.user_agent .. "\r\n", parsers = {}, nparsers = 0 }
end

-- new(governor, pacer, credentials[, form]) -> transport with :perform(source, on_done).
-- Each request head carries the token credentials (commprefs.credentials)
-- hold when it is written; without credentials none (an OAuth token
-- endpoint: form = true sends form bodies).
function M.new(gov, pacer, credentials, form)
  local accept = "Accept: application/json\r\n"
  local ctype = form and "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
    or "Content-Type: application/json\r\nContent-Length: "
  local t = { gov = gov, pacer = pacer, default = M.profile(gov), targets = no_targets(), generation = 0 }
  local auth_token, auth_line = nil, ""
  local function auth()
    if credentials and credentials:due() then credentials:current() end -- a refusal: the 401 tells
    local tok = credentials and credentials:value()
    if tok ~= auth_token then
      auth_token, auth_line = tok, tok and ("Authorization: Bearer " .. tok .. "\r\n") or ""
    end
    return auth_line
  end
  -- The head of a request without a body is one string: what follows its
  -- path is the same for every request of one authority, User-Agent and
  -- token, made once (a table would be measured and copied by nginx).
  local tail_authority, tail_ua, tail_auth, tail = nil, nil, nil, nil
  t.head = function(ua, method, path, authority, body)
    if body then
      return { method, " ", path, " HTTP/1.1\r\nHost: ", authority, "\r\n", ua, auth(), accept,
        ctype, #body, "\r\n\r\n", body }
    end
    local a = auth()
    if authority ~= tail_authority or ua ~= tail_ua or a ~= tail_auth then
      tail_authority, tail_ua, tail_auth = authority, ua, a
      tail = " HTTP/1.1\r\nHost: " .. authority .. "\r\n" .. ua .. a .. accept .. "\r\n"
    end
    return method .. " " .. path .. tail
  end
  return setmetatable(t, {
    __index = { perform = perform, perform_one = perform_one, drop_connections = drop_connections },
    __tostring = function() return "commprefs.ngx.transport" end,
  })
end

return M
