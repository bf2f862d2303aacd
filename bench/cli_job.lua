-- bench/cli_job.lua: the command line's CPU on a --file job against the
-- library's streaming job over the same ids (issue 19: goal CLI <= 1.3x).
--
--   lua5.4 bench/cli_job.lua URL N [ROUNDS] [journal|nojournal]
--
-- URL: a running simulator (rate off and latency 0 are set here, through
-- /__sim/config); N: how many distinct addresses the file holds; ROUNDS
-- (default 3): rounds, each runs (a) then (b) against a fresh simulator state
-- and a fresh journal:
--   (a) the library: a Lua process calling client:bulk_unsubscribe_all over
--       io.lines(FILE) with the CLI's defaults (no max_concurrency, no
--       batch_size) and the journal;
--   (b) the CLI: lua5.4 bin/commprefs --base-url URL unsubscribe-all
--       --file FILE --journal J --quiet (off a terminal: its log lines on).
-- "nojournal" runs both without a journal. CPU = user + sys of the child (the
-- shell's `times`), wall from socket.gettime. BENCH_LUA=luajit runs both
-- children on LuaJIT (build/luajit). Prints one line per round and then
--   cli_vs_lib n=N rounds=R journal=yes lib_cpu=S cli_cpu=S ratio=X lib_wall=S cli_wall=S
-- (medians; ratio: the median of the rounds' cli/lib). Exit 1 if a job did
-- not end with all N done and 0 failed.
--
-- Internal: lua5.4 bench/cli_job.lua --lib URL FILE JOURNAL|- is job (a).
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
package.cpath = (os.getenv("COMMPREFS_BUILD") or "build/lua5.4") .. "/?.so;" .. package.cpath

if arg[1] == "--lib" then
  local commprefs = require "commprefs"
  local client = commprefs.new { token = "sim-token", base_url = arg[2] }
  local s = client:bulk_unsubscribe_all(io.lines(arg[3]), { journal = arg[4] ~= "-" and arg[4] or nil })
  client:close()
  print(string.format("done=%d failed=%d", s.done, s.failed))
  return
end

local socket = require "socket"
local http = require "socket.http"
local ltn12 = require "ltn12"

local url, n, rounds = arg[1], tonumber(arg[2] or ""), tonumber(arg[3] or "3")
local journal = (arg[4] or "journal") ~= "nojournal"
if not url or not n or not rounds then
  io.stderr:write("usage: lua5.4 bench/cli_job.lua URL N [ROUNDS] [journal|nojournal]\n")
  os.exit(2)
end
local vm = os.getenv("BENCH_LUA") or "lua5.4"
local env = vm == "luajit" and "COMMPREFS_BUILD=build/luajit " or ""

local function admin(path, body)
  local out = {}
  local _, code = http.request { url = url .. "/__sim/" .. path, method = "POST",
    source = ltn12.source.string(body), sink = ltn12.sink.table(out),
    headers = { ["content-length"] = #body, ["content-type"] = "application/json" } }
  assert(code == 200, "admin " .. path .. " answered " .. tostring(code) .. ": " .. table.concat(out))
end
local function fresh()
  admin("reset", "{}")
  admin("config", '{"rate":"off","latency":0}')
end

local function sh_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Runs cmd (its stdout and stderr to out); CPU seconds of it, wall seconds, its output.
local function measure(cmd, out)
  local w0 = socket.gettime()
  local p = io.popen("sh -c " .. sh_quote(cmd .. " >" .. out .. " 2>&1; times"))
  local t = p:read("*a")
  p:close()
  local wall = socket.gettime() - w0
  -- times: this shell's user/sys, then its children's ("0m1.234000s 0m0.100000s")
  local secs = {}
  for m, s in t:gmatch("(%d+)m([%d.]+)s") do secs[#secs + 1] = tonumber(m) * 60 + tonumber(s) end
  assert(#secs == 4, "no times from: " .. cmd .. "\n" .. t)
  local f = io.open(out)
  local text = f and f:read("*a") or ""
  if f then f:close() end
  return secs[3] + secs[4], wall, text
end

local file = os.tmpname()
local jpath = os.tmpname()
local outp = os.tmpname()
do
  local f = assert(io.open(file, "w"))
  local buf = {}
  for i = 1, n do
    buf[#buf + 1] = "cli" .. i .. "@example.com"
    if #buf == 10000 then f:write(table.concat(buf, "\n"), "\n"); buf = {} end
  end
  if #buf > 0 then f:write(table.concat(buf, "\n"), "\n") end
  f:close()
end

local function median(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c[math.floor((#c + 1) / 2)]
end

local lib_cpu, cli_cpu, ratios, lib_wall, cli_wall = {}, {}, {}, {}, {}
local failed = false
for r = 1, rounds do
  fresh()
  os.remove(jpath)
  local lc, lw, lout = measure(string.format("%s%s bench/cli_job.lua --lib %s %s %s", env, vm, sh_quote(url),
    sh_quote(file), journal and sh_quote(jpath) or "-"), outp)
  if not lout:find("done=" .. n .. " failed=0", 1, true) then
    failed = true
    io.stderr:write("the library job did not finish:\n", lout, "\n")
  end
  fresh()
  os.remove(jpath)
  local cc, cw, cout = measure(string.format("%sHUBSPOT_ACCESS_TOKEN=sim-token %s bin/commprefs --base-url %s"
    .. " unsubscribe-all --file %s%s --quiet", env, vm, sh_quote(url), sh_quote(file),
    journal and " --journal " .. sh_quote(jpath) or ""), outp)
  local done, cfailed = cout:match("\n(%d+) done, %d+ changed, %d+ unchanged, (%d+) failed\n")
  if tonumber(done) ~= n or cfailed ~= "0" then
    failed = true
    io.stderr:write("the CLI job did not finish:\n", cout, "\n")
  end
  lib_cpu[r], cli_cpu[r], ratios[r], lib_wall[r], cli_wall[r] = lc, cc, cc / lc, lw, cw
  print(string.format("round %d: lib_cpu=%.2f cli_cpu=%.2f ratio=%.3f lib_wall=%.2f cli_wall=%.2f", r, lc, cc,
    cc / lc, lw, cw))
  io.stdout:flush()
end
os.remove(file); os.remove(jpath); os.remove(outp)
print(string.format("cli_vs_lib n=%d rounds=%d journal=%s lib_cpu=%.2f cli_cpu=%.2f ratio=%.3f lib_wall=%.2f cli_wall=%.2f",
  n, rounds, journal and "yes" or "no", median(lib_cpu), median(cli_cpu), median(ratios), median(lib_wall),
  median(cli_wall)))
os.exit(failed and 1 or 0)
