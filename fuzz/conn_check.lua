-- fuzz/conn_check.lua: owns the connection model that fuzz/conn_fuzz.c runs
-- on every input. A client reads, in turn, an unsubscribed ("u<i>@x.io")
-- and a subscribed ("s<i>@x.io") address over keep-alive HTTP/1.1
-- connections the way the cosocket transport does
-- (lua/commprefs/ngx/transport.lua, exchange: one core.http1_response,
-- reset between answers, fed what each read gives; the connection kept
-- only when the parser says keepalive; a pooled connection closed before
-- any byte is replaced), with the client's rule on top (init.lua, _request:
-- the answer through commprefs.response.outcome; one naming another id,
-- commprefs.ops.names_other, drops the connections and the read goes once
-- more; twice is an error). The server is the input: for every request it
-- answers with a framing (Content-Length, chunked with odd sizes,
-- extensions and trailers, a 1xx first, HTTP/1.0, Connection: close, a
-- body to EOF) and a fault (a duplicate at once or late, bytes after the
-- answer or before it, two Content-Lengths, a wrong Content-Length,
-- chunked and Content-Length, a cut answer, another id's answer, no
-- answer), its bytes split into reads of any size.
--
-- Properties (a failed assert aborts: a finding):
--  * no read returns an answer naming another id than its own, nor its own
--    id with another status than that id's;
--  * a well-formed answer at the start of a connection's unread bytes is
--    read exactly: its status and body, ending where it ends; the bytes
--    fed after it are flagged (extra = exactly those), and the connection
--    is kept only when nothing followed and the answer allows it.
-- The server's stray bytes never hold "{" or "[": they cannot make a JSON
-- answer of their own, so an answer can only come from an answer sent.
local core = require "commprefs.core"
local response = require "commprefs.response"
local ops = require "commprefs.ops"

local MAX_BODY = 1048576

-- The input as a stream of bytes; 0 once it is used up (a plain answer).
local function reader(data)
  local pos = 0
  local r = {}
  function r.byte()
    pos = pos + 1
    return data:byte(pos) or 0
  end
  function r.raw(n) -- stray bytes: no "{" or "["
    local s = data:sub(pos + 1, pos + n)
    pos = pos + n
    return (s:gsub("[{%[]", "x"))
  end
  return r
end

local function unsubscribed(id) return id:sub(1, 1):lower() == "u" end

-- HubSpot's answer to GET statuses/ID/unsubscribe-all (spec/support/answers.lua).
local body_for = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "../spec/support/answers.lua").status_body

-- body in chunks of input-chosen sizes, hex in either case, leading zeros,
-- extensions, and a trailer or none.
local function chunked(body, r)
  local out, pos = {}, 1
  while pos <= #body do
    local n, b = r.byte() % 64 + 1, r.byte()
    local piece = body:sub(pos, pos + n - 1)
    local size = string.format(b % 2 == 0 and "%x" or "%X", #piece)
    if b % 4 >= 2 then size = "00" .. size end
    if b % 8 >= 4 then size = size .. ";ext=" .. b % 3 end
    out[#out + 1] = size .. "\r\n" .. piece .. "\r\n"
    pos = pos + n
  end
  out[#out + 1] = r.byte() % 2 == 0 and "0\r\n\r\n" or "0\r\nX-Trailer: t\r\n\r\n"
  return table.concat(out)
end

-- One answer naming id: {bytes=, body=, keep= (may the connection carry
-- another request), eof= (the server closes after it), exact= (well
-- formed: a parser must read exactly it)}. fault: nil, "twocl", "offby",
-- "chunked_cl" (framings that are no well-formed answer).
local function answer(id, r, fault)
  local body = body_for(id)
  local v = r.byte() % 8
  local a = { body = body, keep = true, exact = fault == nil }
  local status, head, pre, framed = "HTTP/1.1 200 OK\r\n", "Content-Type: application/json\r\n", "", nil
  local length = "Content-Length: " .. #body .. "\r\n"
  if fault == "twocl" then
    length = length .. "Content-Length: " .. #body + r.byte() % 3 .. "\r\n"
  elseif fault == "offby" then
    local d = r.byte() % 6 - 3
    length = "Content-Length: " .. math.max(0, #body + (d >= 0 and d + 1 or d)) .. "\r\n"
  elseif fault == "chunked_cl" then
    v = 1
  end
  if v == 1 then
    head = head .. "Transfer-Encoding: chunked\r\n" .. (fault == "chunked_cl" and length or "")
    framed = chunked(body, r)
  elseif v == 2 then
    pre = r.byte() % 2 == 0 and "HTTP/1.1 100 Continue\r\n\r\n" or "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
  elseif v == 3 then
    status, head = "HTTP/1.0 200 OK\r\n", head .. "Connection: keep-alive\r\n"
  elseif v == 4 then
    head, a.keep = head .. "Connection: close\r\n", false
  elseif v == 5 and not fault then -- the body runs to the end of the connection
    head, length, a.keep, a.eof = head .. "Connection: close\r\n", "", false, true
  elseif v == 6 then
    status, a.keep = "HTTP/1.0 200 OK\r\n", false
  elseif v == 7 then
    head = "content-type: application/json\r\nX-HubSpot-RateLimit-Max: 100\r\n"
    length = length:lower():gsub(": ", ":   ")
  end
  a.bytes = pre .. status .. head .. (framed and "" or length) .. "\r\n" .. (framed or body)
  return a
end

-- A connection: its unread reads (pieces), whether the server closed it.
local function new_conn() return { pieces = {}, server_closed = false } end

-- Queues bytes on conn as reads of input-chosen sizes (0: one read).
local function deliver(conn, bytes, r)
  local k = r.byte() % 65
  if k == 0 then k = #bytes end
  for pos = 1, #bytes, math.max(k, 1) do conn.pieces[#conn.pieces + 1] = bytes:sub(pos, pos + k - 1) end
end

-- The id an answer sent in place of id's names: the read before or after
-- it, or id itself in upper case (the same address: a right answer).
local function other_id(id, b)
  local n = tonumber(id:match("(%d+)@")) or 1
  if b % 3 == 2 then return id:upper() end
  local k = b % 3 == 0 and n + 1 or math.max(1, n - 1)
  if k == n then k = n + 1 end
  return (k % 2 == 0 and "u" or "s") .. k .. "@x.io"
end

-- The server's turn: its answer to a request for id on conn, by the
-- input's choice of fault. Sets conn.exact when that answer, well formed,
-- is the first of conn's unread bytes.
local function serve(conn, id, r)
  conn.exact = nil
  if conn.server_closed then return end
  local first = #conn.pieces == 0
  local op = r.byte() % 14
  local a, now, late
  if op == 7 then a = answer(id, r, "twocl")
  elseif op == 8 then a = answer(id, r, "offby")
  elseif op == 13 then a = answer(id, r, "chunked_cl")
  elseif op == 10 then a = answer(other_id(id, r.byte()), r)
  elseif op == 11 then conn.server_closed = true; return -- no answer: closed
  elseif op == 12 then return                              -- no answer: it hangs
  else a = answer(id, r) end
  now = a.bytes
  if a.eof then conn.server_closed = true
  elseif op == 3 then now = now .. now                     -- the answer twice, at once
  elseif op == 4 then late = now                           -- twice, the second later
  elseif op == 5 then now = now .. r.raw(r.byte() % 32 + 1)
  elseif op == 6 then now, first = r.raw(r.byte() % 32 + 1) .. now, false
  elseif op == 9 then now, first = now:sub(1, r.byte() % #now), false; conn.server_closed = true
  end
  if first and a.exact then conn.exact = a end
  deliver(conn, now, r)
  if late then conn.pieces[#conn.pieces + 1] = late end
end

-- The property of a well-formed first answer (conn.exact): read exactly.
local function check_exact(a, done, res, got)
  if not a then return end
  assert(done, "a well-formed answer was refused or never completed")
  assert(res.status == 200, "a well-formed answer read with another status")
  assert(res.body == a.body, "a well-formed answer read with another body")
  local extra = res.extra or 0
  assert(extra == got - #a.bytes, "the bytes after an answer are not flagged as extra")
  assert(res.keepalive == (a.keep and extra == 0), "keepalive wrong for a well-formed answer")
end

-- One read of an answer on conn, as exchange() does: the result (a parser
-- result or {kind=, message=}) and whether conn was a stale pooled one.
local function read_answer(st, conn, reused)
  local p, got, done, err, kind = st.parser, 0, false, nil, nil
  while done == false do
    local piece = table.remove(conn.pieces, 1)
    if piece then
      got = got + #piece
      done, err, kind = p:feed(piece)
    elseif conn.server_closed then
      done, err, kind = p:feed("")
      if done == false then done, err, kind = nil, "feed('') returned false", "network" end
    else
      done, err, kind = nil, "timed out", "timeout" -- the client closes it
      conn.exact = nil
    end
  end
  local res = done and p:result() or nil
  check_exact(conn.exact, done, res, got)
  p:reset()
  if not done then
    assert(kind == "network" or kind == "too_large" or kind == "timeout", tostring(kind))
    return { kind = kind, message = err }, reused and got == 0 and conn.server_closed
  end
  assert(res.extra == nil or not res.keepalive, "kept alive with bytes after the answer")
  if res.keepalive then st.pool = conn end
  res.keepalive, res.extra = nil, nil
  return res, false
end

-- One attempt: the pooled connection or a new one, a stale pooled one replaced at once.
local function exchange(st, id, r)
  local res
  for _ = 1, 4 do
    local conn = st.pool
    st.pool = nil
    local reused = conn ~= nil
    conn = conn or new_conn()
    serve(conn, id, r)
    local stale
    res, stale = read_answer(st, conn, reused)
    if not stale then return res end
  end
  return res
end

-- What a read returned must be about its own id, with that id's status.
local function check_read(env, id)
  if not env then return end
  for _, x in ipairs(env.results or {}) do
    local named = type(x) == "table" and x.subscriberIdString
    assert(named == nil or named:lower() == id:lower(), "the answer of another request was taken: " .. tostring(named))
    if named then assert(ops.unsubscribed(env.results) == unsubscribed(id), "a wrong status taken for " .. id) end
  end
end

return function(data)
  local r = reader(data)
  local st = { parser = core.http1_response { max_body = MAX_BODY } }
  for i = 1, r.byte() % 8 + 2 do
    local id = (i % 2 == 0 and "u" or "s") .. i .. "@x.io"
    local req = { method = "GET", url = "http://fuzz.invalid/communication-preferences/v4/statuses/" .. id .. "/unsubscribe-all" }
    local env
    for _ = 1, 2 do
      local e = response.outcome(req, exchange(st, id, r))
      if not (e and ops.names_other(e, id)) then env = e; break end
      st.pool = nil -- another id's answer: the connections are dropped, the read sent once more
    end
    check_read(env, id)
  end
  st.parser:close()
end
