-- support.proc: the process helpers every loopback server of the specs needs
-- (simulator, nginx, redis-server, the hostile server): a free port, this
-- process's pid for the watchdogs, whether a pid still runs, a file's text.
local socket = require "socket"

local M = {}

function M.free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- The test process's pid: the parent of the shell io.popen starts.
function M.my_pid()
  local f = io.popen("echo $PPID")
  local pid = f:read("*l")
  f:close()
  return pid
end

-- Running (a zombie waiting for its reaper counts as ended).
function M.alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("*a")
  f:close()
  return stat:match("%) (%a)") ~= "Z"
end

-- A file's whole text, or "" when it cannot be read.
function M.slurp(path)
  local f = io.open(path)
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

return M
