-- support.proc: the process and file helpers the specs share: a free port,
-- this process's pid for the watchdogs of every loopback server (simulator,
-- nginx, redis-server, the hostile server), whether a pid still runs, a file's
-- text, a fresh temporary path, a journal's records.
local socket = require "socket"
local cjson = require "cjson"

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

-- A path under $TMPDIR (or /tmp) no file holds yet, named after the spec (tag) and VM.
-- Unique per process and call: this pid and a counter (LuaJIT's math.random
-- starts from the same seed in every process, so two LuaJIT suites side by
-- side once got the same journal path and removed each other's records).
local tmp_count, tmp_pid = 0, nil
function M.tmpfile(tag, name)
  tmp_pid = tmp_pid or M.my_pid()
  tmp_count = tmp_count + 1
  local p = string.format("%s/commprefs-%s-%s-%s-%d-%.0f-%s", os.getenv("TMPDIR") or "/tmp", tag,
    jit and "luajit" or "lua5.4", tmp_pid, tmp_count, socket.gettime() * 1e6 % 1e12, name)
  os.remove(p)
  return p
end

-- A journal's records (one JSON object per line), in order. A line torn by a
-- kill -9 in the middle of an append (ended with "\n" when the journal was
-- next opened, see csrc/journal.c) is no record: skipped, as the library skips it.
function M.read_journal(path)
  local recs = {}
  for line in io.lines(path) do
    local ok, rec = pcall(cjson.decode, line)
    if ok and type(rec) == "table" then recs[#recs + 1] = rec end
  end
  return recs
end

return M
