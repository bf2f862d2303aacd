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
-- twolengths (a 200 with Content-Length: 2 and Content-Length: 3), idle-dup
-- and idle408 (keep-alive; the status answer, then 50 ms later, the client's
-- connection idle in its pool by then, the same answer again, or a 408 and
-- a close, as some proxies do), faults
-- (keep-alive; every status GET answered for its ID as in dup, each with a
-- framing fault drawn from FAULTS by a random generator seeded with SEED,
-- the script's third argument; an idle connection is closed once another
-- one is waiting).
-- Used from a spec: `local srv = require("support.rawserver").start(mode[, seed])`
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

-- The answer HubSpot gives a GET of statuses/ID/unsubscribe-all (support.answers).
local answers = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "answers.lua")

local function status_answer(request_line)
  local id = (request_line or ""):match("/statuses/([^/?]+)/unsubscribe%-all") or "none"
  id = id:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
  local body = answers.status_body(id)
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
end

-- The status answer with a chunked body: random chunk sizes, hex in either
-- case, leading zeros, extensions and a trailer.
local function chunked_answer(request_line)
  local body = status_answer(request_line):match("\r\n\r\n(.*)$")
  local out, pos = { "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" }, 1
  while pos <= #body do
    local piece = body:sub(pos, pos + math.random(1, 80) - 1)
    local size = string.format(math.random(2) == 1 and "%x" or "%X", #piece)
    out[#out + 1] = (math.random(3) == 1 and "00" or "") .. size .. (math.random(3) == 1 and ";x=1" or "") .. "\r\n" .. piece .. "\r\n"
    pos = pos + #piece
  end
  out[#out + 1] = math.random(2) == 1 and "0\r\n\r\n" or "0\r\nX-Trailer: t\r\n\r\n"
  return table.concat(out)
end

-- The framing faults of mode faults: name -> function(c, request_line) that
-- sends the answer with that fault; false: the connection is to be closed.
local FAULTS = {
  ok = function(c, rl) return c:send(status_answer(rl)) ~= nil end,
  dup = function(c, rl) return c:send(status_answer(rl):rep(2)) ~= nil end,
  ["dup-late"] = function(c, rl)
    local a = status_answer(rl)
    if not c:send(a) then return false end
    socket.sleep(0.02)
    return c:send(a) ~= nil
  end,
  extra = function(c, rl) return c:send(status_answer(rl) .. "HTTP/1.1 200 OK\r\n\r\n") ~= nil end,
  split = function(c, rl) -- the answer in small writes, some a little apart
    local a, pos = status_answer(rl), 1
    while pos <= #a do
      local n = math.random(1, 40)
      if not c:send(a:sub(pos, pos + n - 1)) then return false end
      if math.random(4) == 1 then socket.sleep(0.001) end
      pos = pos + n
    end
    return true
  end,
  twolengths = function(c, rl)
    local a = status_answer(rl)
    local n = tonumber(a:match("Content%-Length: (%d+)"))
    return c:send((a:gsub("Content%-Length: %d+\r\n", "%0Content-Length: " .. n + 1 .. "\r\n", 1)) .. "x") ~= nil
  end,
  chunked = function(c, rl) return c:send(chunked_answer(rl)) ~= nil end,
  ["chunked-bad"] = function(c, rl) c:send((chunked_answer(rl):gsub("\r\n\r\n%x+", "\r\n\r\nzz", 1))); return false end,
  ["close-early"] = function(c, rl) local a = status_answer(rl); c:send(a:sub(1, math.random(1, #a - 1))); return false end,
  close = function(c, rl) c:send((status_answer(rl):gsub("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1))); return false end,
  wrongid = function(c, rl) -- another id's answer, with the opposite status
    return c:send(status_answer((rl:gsub("/statuses/(%a)", function(p) return "/statuses/" .. (p == "u" and "s" or "u") end, 1)))) ~= nil
  end,
}
local FAULT_NAMES = { "ok", "dup", "dup-late", "extra", "split", "twolengths", "chunked", "chunked-bad",
  "close-early", "close", "wrongid" }

local ANSWER = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

local received = 0

local function counted_answer()
  local body = string.format('{"n":%d}', received)
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
end

-- Whether c sends another request before a new connection comes: a client
-- that dropped c (an answer naming another id) may leave it idle in its
-- pool (nginx cannot close pooled cosockets), and this server serves one
-- connection at a time: an idle one is closed once another is waiting.
local function next_request_on(c, srv)
  local ready = socket.select({ c, srv }, nil, 30)
  for _, s in ipairs(ready) do if s == c then return true end end
  return false
end

local function serve(mode, port, seed)
  math.randomseed(seed or 1)
  local srv = assert(socket.bind("127.0.0.1", port))
  srv:settimeout(1)
  local deadline = socket.gettime() + 120
  while socket.gettime() < deadline do
    local c = srv:accept()
    if c then
      c:settimeout(30)
      local on_this = 0
      while true do
        if mode == "faults" and not next_request_on(c, srv) then break end
        local len, first = read_request(c)
        if not len then break end
        received, on_this = received + 1, on_this + 1
        if mode == "dieafter1" then
          if len > 0 then c:receive(len) end
          if on_this > 1 then break end
          if not c:send(counted_answer()) then break end
        elseif mode == "faults" then
          if len > 0 then c:receive(len) end
          if not FAULTS[FAULT_NAMES[math.random(#FAULT_NAMES)]](c, first) then break end
        elseif mode == "idle408" or mode == "idle-dup" then
          if len > 0 then c:receive(len) end
          local answer = status_answer(first)
          if not c:send(answer) then break end
          socket.sleep(0.05) -- the connection is idle in the client's pool by now
          if mode == "idle-dup" then
            if not c:send(answer) then break end
          else
            c:send("HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            break
          end
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
  serve(arg[1], tonumber(arg[2]), tonumber(arg[3]))
  os.exit(0)
end

function M.start(mode, seed)
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  local f = io.popen(string.format("lua5.4 spec/support/rawserver.lua %s %d %d >/dev/null 2>&1 & echo $!", mode, port, seed or 1))
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
