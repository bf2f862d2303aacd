-- support.proc: the process and file helpers the specs share: a free port,
-- this process's pid for the watchdogs of every loopback server (simulator,
-- nginx, redis-server, the hostile server), whether a pid still runs, a file's
-- text and lines, a fresh temporary path, a journal's records, and a command run in the
-- background with stdout and stderr in files (not a terminal).
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

-- The non-empty lines of s, in order.
function M.lines(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
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

-- Starts the shell command line cmd in the background, stdin /dev/null and
-- stdout/stderr in files of a fresh directory: {pid = the command's, dir =}.
function M.spawn(cmd)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir))
  local c = string.format("(%s >%s/out 2>%s/err & echo $! >%s/pid.tmp && mv %s/pid.tmp %s/pid;"
    .. " wait $!; echo $? >%s/rc.tmp; mv %s/rc.tmp %s/rc) >/dev/null 2>&1 </dev/null &",
    cmd, dir, dir, dir, dir, dir, dir, dir, dir)
  assert(os.execute(c))
  for _ = 1, 200 do
    local pid = M.slurp(dir .. "/pid")
    if pid ~= "" then return { pid = pid:match("%d+"), dir = dir } end
    socket.sleep(0.01)
  end
  error("did not start: " .. cmd)
end

-- Waits for a spawned command to end: exit code, stdout, stderr (kill -9
-- and an error after timeout seconds, default 120).
function M.wait(p, timeout)
  local deadline = socket.gettime() + (timeout or 120)
  while socket.gettime() < deadline do
    local rc = M.slurp(p.dir .. "/rc")
    if rc ~= "" then
      local out, err = M.slurp(p.dir .. "/out"), M.slurp(p.dir .. "/err")
      os.execute("rm -rf " .. p.dir)
      return tonumber(rc), out, err
    end
    socket.sleep(0.05)
  end
  os.execute("kill -9 " .. p.pid .. " 2>/dev/null")
  error("still running after " .. (timeout or 120) .. " s:\n" .. M.slurp(p.dir .. "/err"))
end

return M
