-- spec/support/fakeredis.lua: a scripted RESP server on loopback with one
-- misbehaviour, for the Redis deadline and worker-shape specs. Run:
--   lua5.4 spec/support/fakeredis.lua MODE PORT WATCH_PID COUNT_FILE
-- It prints "ready" once listening, serves one connection at a time, writes
-- the number of commands it has read to COUNT_FILE after each one, and exits
-- when process WATCH_PID ends. PING, AUTH, SELECT and XGROUP answer +OK /
-- +PONG; every other command gets the MODE's answer:
--   drip          "$1000000\r\n" then one byte every 0.5 s, forever
--   huge          "$314572800\r\n" (300 MB: over the 64 MiB cap), its digits
--                 split over two writes, then the bytes as fast as they go
--   huge_array    "*2000000\r\n" (over the 1048576-element cap), then ":1\r\n"s
--   arr_int       *1 :5                     (an XREADGROUP reply that is no stream list)
--   entry_int     [[s, [7]]]                (an entry that is an integer)
--   id_table      [[s, [[[1], [id, x@y.co]]]]] (an entry id that is an array)
--   entry_str     [[s, ["junk"]]]           (the same malformed entry, again and again)
-- Used from a spec: require("support.fakeredis").start(mode) -> {url=, port=, pid=, count=fn}; :stop().
local socket = require "socket"

local M = {}

local function encode(v)
  if type(v) == "number" then return ":" .. v .. "\r\n" end
  if type(v) == "string" then return "$" .. #v .. "\r\n" .. v .. "\r\n" end
  local out = { "*" .. #v .. "\r\n" }
  for _, x in ipairs(v) do out[#out + 1] = encode(x) end
  return table.concat(out)
end

local ANSWERS = {
  arr_int = encode({ 5 }),
  entry_int = encode({ { "s", { 7 } } }),
  id_table = encode({ { "s", { { { 1 }, { "id", "x@y.co" } } } } }),
  entry_str = encode({ { "s", { "junk" } } }),
}

-- One command (RESP array of bulk strings); nil when the client went away.
local function read_command(c)
  local line = c:receive("*l")
  if not line then return nil end
  local n = tonumber(line:match("^%*(%d+)"))
  if not n then return { line } end
  local argv = {}
  for i = 1, n do
    local len = tonumber((c:receive("*l") or ""):match("^%$(%d+)"))
    if not len then return nil end
    argv[i] = c:receive(len + 2)
    if not argv[i] then return nil end
    argv[i] = argv[i]:sub(1, len)
  end
  return argv
end

local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then f:close() return true end
  return false
end

-- The huge bulk string: the header in two writes, then 300 MB in 64 KiB
-- writes until the client hangs up (or all is sent).
local HUGE = {
  huge = { "$31457", "2800\r\n", string.rep("x", 65536), 314572800 / 65536, "\r\n" },
  huge_array = { "*20000", "00\r\n", string.rep(":1\r\n", 16384), 2000000 / 16384, "" },
}

-- A huge reply: the header in two writes, then its body in 64 KiB writes
-- until the client hangs up (or all is sent).
local function stream_huge(c, watch, mode)
  local head1, head2, chunk, chunks, tail = (table.unpack or unpack)(HUGE[mode])
  c:send(head1)
  socket.sleep(0.1)
  c:send(head2)
  for _ = 1, chunks do
    if not c:send(chunk) or not alive(watch) then return end
  end
  c:send(tail)
end

local function serve(mode, port, watch, count_file)
  local srv = assert(socket.bind("127.0.0.1", port))
  srv:settimeout(0.2)
  io.write("ready\n"); io.flush()
  local count = 0
  while alive(watch) do
    local c = srv:accept()
    if c then
      c:settimeout(60)
      while true do
        local argv = read_command(c)
        if not argv then break end
        count = count + 1
        local f = io.open(count_file, "w"); f:write(count); f:close()
        local cmd = (argv[1] or ""):upper()
        if cmd == "PING" then c:send("+PONG\r\n")
        elseif cmd == "AUTH" or cmd == "SELECT" or cmd == "XGROUP" then c:send("+OK\r\n")
        elseif HUGE[mode] then
          stream_huge(c, watch, mode)
          break
        elseif mode == "drip" then
          c:send("$1000000\r\n")
          local ok = true
          while ok and alive(watch) do
            socket.sleep(0.5)
            ok = c:send("x")
          end
          break
        else
          c:send(ANSWERS[mode] or "-ERR unknown mode\r\n")
        end
      end
      c:close()
    end
  end
end

if arg and arg[0] and arg[0]:match("fakeredis%.lua$") and arg[1] then
  serve(arg[1], tonumber(arg[2]), arg[3], arg[4])
  os.exit(0)
end

function M.start(mode)
  local proc = require "support.proc"
  local port = proc.free_port()
  local count_file = proc.tmpfile("fakeredis", "count")
  local lua = jit and "luajit" or "lua5.4"
  local f = io.popen(string.format("%s spec/support/fakeredis.lua %s %d %s %s & echo pid=$!", lua, mode, port,
    proc.my_pid(), count_file))
  -- "pid=" (the shell's echo) and "ready" (the server) may come in either order
  local pid, ready
  repeat
    local line = f:read("*l")
    if line then
      pid = pid or line:match("^pid=(%d+)$")
      ready = ready or line == "ready"
    end
  until not line or (pid and ready)
  local inst = { url = "redis://127.0.0.1:" .. port, port = port, pid = pid }
  function inst.count() return tonumber(proc.slurp(count_file)) or 0 end
  function inst.stop() os.execute("kill " .. pid .. " 2>/dev/null"); os.remove(count_file) end
  inst.pipe = f
  return inst
end

return M
