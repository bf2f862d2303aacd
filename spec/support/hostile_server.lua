-- spec/support/hostile_server.lua: a deliberately hostile HTTP/1.1 server on
-- loopback, for spec/support/hostile.lua (which starts it). Run:
--   lua5.4 spec/support/hostile_server.lua PORT WATCH_PID
-- It prints "ready" once listening and exits when process WATCH_PID ends.
-- One connection at a time (each answer ends with Connection: close; a
-- client that gives up closes the socket and the server moves on). The first
-- path segment picks the behaviour, so a client's base_url selects it:
--   /echo401-json  /echo401-html  /echo401-plain   401 repeating the Authorization header
--   /respond/STATUS/CTYPE/=BODY    STATUS with percent-encoded CTYPE ("-": none) and BODY
--   /endless-chunked[-404]  /endless-length[-404]   a body that never ends
--   /giant-headers     200 whose headers never end (1 KB lines)
--   /slow              a valid 200, one byte a second
--   /absurd-rate       a valid 200 with X-HubSpot-RateLimit-Max: 1 / Interval-Milliseconds: 86400000
--   /redirect          302 to http://user:secret@elsewhere.invalid/x?token=<the Authorization header>
--   /hang              reads the request, never answers
local socket = require "socket"

local port, watch = tonumber(arg[1]), arg[2]
local ENVELOPE = '{"status":"COMPLETE","results":[{"subscriberIdString":"a@b.co","wideStatusType":"PORTAL_WIDE",'
  .. '"status":"SUBSCRIBED","channel":"EMAIL","timestamp":"2026-01-01T00:00:00Z"}],'
  .. '"startedAt":"2026-01-01T00:00:00Z","completedAt":"2026-01-01T00:00:00Z"}'

local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then f:close() return true end
  return false
end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- Reads the request head and body; returns method, path, headers (lower-case names).
local function read_request(c)
  c:settimeout(10)
  local line = c:receive("*l")
  if not line then return nil end
  local method, target = line:match("^(%S+)%s+(%S+)")
  local headers = {}
  while true do
    local h = c:receive("*l")
    if not h or h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.*)$")
    if k then headers[k:lower()] = v end
  end
  local n = tonumber(headers["content-length"] or "0") or 0
  if n > 0 then c:receive(n) end
  return method, target, headers
end

local function send(c, status, reason, headers, body)
  local out = { string.format("HTTP/1.1 %d %s\r\n", status, reason) }
  for _, h in ipairs(headers) do out[#out + 1] = h .. "\r\n" end
  if body then out[#out + 1] = "Content-Length: " .. #body .. "\r\n" end
  out[#out + 1] = "Connection: close\r\n\r\n"
  out[#out + 1] = body or ""
  return c:send(table.concat(out))
end

local function json_escape(s)
  return (s:gsub('[%c"\\]', function(ch) return string.format("\\u%04x", ch:byte()) end))
end

local B = {}

B["echo401-json"] = function(c, h)
  local a = json_escape(h.authorization or "")
  send(c, 401, "Unauthorized", { "Content-Type: application/json" }, string.format(
    '{"status":"error","message":"Bad credentials: %s","correlationId":"%s","category":"INVALID_AUTHENTICATION",'
      .. '"subCategory":"%s","context":{"authorization":["%s"],"%s":["x"]},'
      .. '"errors":[{"message":"header %s","in":"%s","code":"%s","context":{"h":["%s"]}}],"policyName":"%s"}',
    a, a, a, a, a, a, a, a, a, a))
end
B["echo401-html"] = function(c, h)
  send(c, 401, "Unauthorized", { "Content-Type: text/html" },
    "<html><body><h1>401</h1><p>Authorization: " .. (h.authorization or "") .. "</p></body></html>")
end
B["echo401-plain"] = function(c, h)
  send(c, 401, "Unauthorized", { "Content-Type: text/plain" }, "denied for " .. (h.authorization or ""))
end

B.respond = function(c, _, rest)
  local status, ctype, body = rest:match("^/(%d+)/([^/]*)/=([^/]*)")
  local headers = {}
  if ctype ~= "-" then headers[1] = "Content-Type: " .. unescape(ctype) end
  send(c, tonumber(status), "Whatever", headers, unescape(body))
end

local CHUNK = string.rep("x", 65536)
local function endless(c, status, chunked)
  local head = string.format("HTTP/1.1 %d Endless\r\nContent-Type: application/json\r\n%s\r\n", status,
    chunked and "Transfer-Encoding: chunked\r\n" or "Content-Length: 1000000000000\r\n")
  if not c:send(head .. (chunked and "" or "[")) then return end
  local piece = chunked and string.format("%x\r\n%s\r\n", #CHUNK, CHUNK) or CHUNK
  while c:send(piece) do end
end
B["endless-chunked"] = function(c) endless(c, 200, true) end
B["endless-chunked-404"] = function(c) endless(c, 404, true) end
B["endless-length"] = function(c) endless(c, 200, false) end
B["endless-length-404"] = function(c) endless(c, 404, false) end

B["giant-headers"] = function(c)
  if not c:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n") then return end
  local line = "X-Filler: " .. string.rep("y", 1024) .. "\r\n"
  while c:send(line) do end
end

B.slow = function(c)
  local text = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #ENVELOPE
    .. "\r\nConnection: close\r\n\r\n" .. ENVELOPE
  for i = 1, #text do
    if not c:send(text:sub(i, i)) then return end
    socket.sleep(1)
  end
end

B["absurd-rate"] = function(c)
  send(c, 200, "OK", { "Content-Type: application/json", "X-HubSpot-RateLimit-Max: 1",
    "X-HubSpot-RateLimit-Remaining: 0", "X-HubSpot-RateLimit-Interval-Milliseconds: 86400000" }, ENVELOPE)
end

B.redirect = function(c, h)
  send(c, 302, "Found", { "Location: http://user:secret@elsewhere.invalid/x?token="
    .. (h.authorization or ""):gsub("%s", "+") }, "")
end

B.hang = function(c)
  c:settimeout(1)
  while true do
    local _, err = c:receive(1)
    if err == "closed" or not alive(watch) then return end
  end
end

local server = assert(socket.bind("127.0.0.1", port))
server:settimeout(0.5)
io.write("ready\n")
io.flush()
while alive(watch) do
  local c = server:accept()
  if c then
    local ok, err = pcall(function()
      local _, target, headers = read_request(c)
      if not target then return end
      local name, rest = target:match("^/([^/?]+)(.*)$")
      local behave = B[name or ""]
      if behave then behave(c, headers, rest or "")
      else send(c, 404, "Not Found", { "Content-Type: text/plain" }, "no behaviour " .. tostring(name)) end
    end)
    if not ok then io.stderr:write("hostile_server: ", tostring(err), "\n") end
    c:close()
  end
end
