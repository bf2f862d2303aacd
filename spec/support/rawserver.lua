-- support.rawserver: a loopback HTTP/1.1 server with one misbehaviour, for
-- the transport specs (things the simulator cannot do: read a request body
-- slowly, send an endless body). Run as a script:
--   lua5.4 spec/support/rawserver.lua MODE PORT
-- MODE: slowread (reads each request body in small slices, then answers {}),
-- endless (a 200 with an endless chunked body), biglength (Content-Length of
-- 1 GB, then streams), hang (reads the request, never answers), dup and
-- dup-late (keep-alive; every GET .../statuses/ID/unsubscribe-all is answered
-- for ID, unsubscribed when ID starts with "u", and then the same answer is
-- sent once more: at once, or 20 ms later), dieafter1 (keep-alive: answers
-- the first request of each connection, reads the second and closes without
-- answering; every answer's body is {"n": requests received so far}),
-- twolengths (a 200 with Content-Length: 2 and Content-Length: 3).
-- Used from a spec: `local srv = require("support.rawserver").start(mode)`
-- -> {url=, port=, pid=}; `srv:stop()`. It exits by itself after 120 s.
local socket = require "socket"

local M = {}

local function read_request(c)
  local len, first = 0, nil
  while true do
    local line = c:receive("*l")
    if not line then return nil end
    if line == "" then break end
    first = first or line
    local v = line:lower():match("^content%-length:%s*(%d+)")
    if v then len = tonumber(v) end
  end
  return len, first
end

-- The answer HubSpot gives a GET of statuses/ID/unsubscribe-all.
local function status_answer(request_line)
  local id = (request_line or ""):match("/statuses/([^/?]+)/unsubscribe%-all") or "none"
  id = id:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
  local body = string.format('{"status":"COMPLETE","results":[{"subscriberIdString":"%s","wideStatusType":'
    .. '"PORTAL_WIDE","status":"%s","channel":"EMAIL","timestamp":"2026-01-01T00:00:00Z"}],'
    .. '"startedAt":"2026-01-01T00:00:00Z","completedAt":"2026-01-01T00:00:00Z"}',
    id, id:sub(1, 1) == "u" and "UNSUBSCRIBED" or "SUBSCRIBED")
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
end

local ANSWER = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

local received = 0

local function counted_answer()
  local body = string.format('{"n":%d}', received)
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
end

local function serve(mode, port)
  local srv = assert(socket.bind("127.0.0.1", port))
  srv:settimeout(1)
  local deadline = socket.gettime() + 120
  while socket.gettime() < deadline do
    local c = srv:accept()
    if c then
      c:settimeout(30)
      local on_this = 0
      while true do
        local len, first = read_request(c)
        if not len then break end
        received, on_this = received + 1, on_this + 1
        if mode == "dieafter1" then
          if len > 0 then c:receive(len) end
          if on_this > 1 then break end
          if not c:send(counted_answer()) then break end
        elseif mode == "twolengths" then
          if len > 0 then c:receive(len) end
          c:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x")
        elseif mode == "dup" or mode == "dup-late" then
          if len > 0 then c:receive(len) end
          local answer = status_answer(first)
          if not c:send(answer) then break end
          if mode == "dup-late" then socket.sleep(0.02) end
          if not c:send(answer) then break end
        elseif mode == "slowread" then
          local left = len
          while left > 0 do
            local n = math.min(left, 256 * 1024)
            if not c:receive(n) then break end
            left = left - n
            socket.sleep(0.002)
          end
          c:send(ANSWER)
        else
          if len > 0 then c:receive(len) end
          if mode == "hang" then
            socket.sleep(60)
            break
          end
          local head = mode == "endless"
            and "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            or "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n"
          if not c:send(head) then break end
          local piece = string.rep("x", 65536)
          local chunk = mode == "endless" and string.format("%x\r\n%s\r\n", #piece, piece) or piece
          while c:send(chunk) do end
          break
        end
      end
      c:close()
    end
  end
end

if arg and arg[0] and arg[0]:match("rawserver%.lua$") then
  serve(arg[1], tonumber(arg[2]))
  os.exit(0)
end

function M.start(mode)
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  local f = io.popen(string.format("lua5.4 spec/support/rawserver.lua %s %d >/dev/null 2>&1 & echo $!", mode, port))
  local pid = f:read("*l")
  f:close()
  for _ = 1, 200 do
    local c = socket.connect("127.0.0.1", port)
    if c then c:close(); break end
    socket.sleep(0.02)
  end
  return setmetatable({ url = "http://127.0.0.1:" .. port, port = port, pid = pid }, {
    __index = { stop = function(self) os.execute("kill " .. self.pid .. " 2>/dev/null") end } })
end

return M
