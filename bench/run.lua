-- bench/run.lua (make bench): speed and memory figures on loopback against
-- the local simulator, each printed with its goal.
--   1. CPU and wall per request, 20,000 keep-alive GETs: commprefs versus a
--      plain luasocket + lua-cjson keep-alive client (goal: <= 0.5x CPU).
--   2. Decoding a 1,000-result batch envelope: commprefs.core.decode versus
--      cjson.decode alone (goal: <= 1.3x).
--   3. 100,000 ids, rate limit R per window, 150 ms latency: wall time against
--      the bound ceil(N / batch_size) / rate (goal: >= 0.95 of it, 0 lost), and
--      a sequential loop of the same calls for comparison.
--   4. Peak RSS of a bulk job streaming 100,000 versus 1,000,000 ids from a
--      file (goal: within 1.2x).
--   5. Bulk with default options (no max_concurrency) at 20 requests/s, 24,000 ids,
--      1,000 ms latency (jitter 0 and +-200), 150 and 50 ms: ratio to the bound +
--      one round trip (goal: >= 0.95, 0 429s, <= 4 sends within any 10 ms).
--   6. OpenResty: reads/s through the cosocket transport in one nginx worker versus
--      a proxy_pass location to the same simulator, wrk against both (goal >= 0.6x).
--   7. OpenResty: 40 concurrent reads at 200 ms latency in one worker: wall time and
--      /ping latency meanwhile (goals <= 1.0 s, <= 0.1 s), beside libcurl (blocking).
--   8. The request path: is_unsubscribed_from_all with the README's options in
--      one and two nginx workers, windows 100/10,000 and 10/1,000 ms, latency 50
--      and 150 ms, open loop at 200 / 1,000 / 3,000 reads/s for 15 s (goals at 200
--      and 1,000/s: >= 99.9 % answered, p99 <= 400 ms, 0 429s; 3,000/s: timeouts only).
--   9. Three processes on one token, default options, limit 20 per 1,000 ms, 150 ms
--      latency, BENCH_BUDGET_IDS (6,000) ids each: without and with the Redis budget
--      (rate_limit.redis): ratio to the bound and 429s (goal with it: >= 0.85, 0 429s).
--  11. commprefs worker draining a Redis Stream, one and two workers on one budget, limit
--      20 per 1,000 ms, 150 ms latency: entries/s as a ratio to the bound (goal >= 0.9).
--  12. The command line on 1,000,000 ids from a file against the library's streaming
--      job on the same ids: CPU (goal <= 1.3x).
-- Environment: BENCH_GETS, BENCH_BULK_IDS, BENCH_RATE (e.g. 100/1000),
-- BENCH_SEQ_IDS, BENCH_RSS_SMALL, BENCH_RSS_LARGE, BENCH_WORKER_ENTRIES override the sizes.
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
package.cpath = (os.getenv("COMMPREFS_BUILD") or "build/lua5.4") .. "/?.so;" .. package.cpath

local commprefs = require "commprefs"
local core = require "commprefs.core"
local cjson = require "cjson"
local socket = require "socket"
local sim = require "support.sim"

local function num(name, default) return tonumber(os.getenv(name) or "") or default end
local GETS = num("BENCH_GETS", 20000)
local BULK_IDS = num("BENCH_BULK_IDS", 100000)
local SEQ_IDS = num("BENCH_SEQ_IDS", 5000)
local RSS_SMALL, RSS_LARGE = num("BENCH_RSS_SMALL", 100000), num("BENCH_RSS_LARGE", 1000000)
local RATE = os.getenv("BENCH_RATE") or "100/1000"
local ONLY = os.getenv("BENCH_ONLY") -- e.g. "3" or "14"
local function part(n) return not ONLY or ONLY:find(tostring(n), 1, true) ~= nil end

local verdicts = {}
local function median(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c[(#c + 1) // 2]
end

-- {part, figure, ratio, anchor}: every figure as a ratio to its anchor measured in this run
FIGURES = {}
local function verdict(name, ok, text)
  verdicts[#verdicts + 1] = string.format("  %-4s %s: %s", ok and "MET" or "MISS", name, text)
end

-- user and system CPU seconds of this process, from /proc/self/stat
local function cpu_split()
  local f = io.open("/proc/self/stat")
  if not f then return 0, 0 end
  local stat = f:read("*a"); f:close()
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return tonumber(fields[12]) / 100, tonumber(fields[13]) / 100 -- clock ticks (USER_HZ = 100)
end

local last_split
local function timed(f)
  collectgarbage()
  local u0, s0 = cpu_split()
  local c0, w0 = os.clock(), socket.gettime()
  local r = f()
  local u1, s1 = cpu_split()
  last_split = { user = u1 - u0, sys = s1 - s0 }
  return os.clock() - c0, socket.gettime() - w0, r
end

print(string.format("commprefs %s bench, %s, %s", core._VERSION, _VERSION, core.curl_version))
sim.start()
sim.reset({ rate = "off", latency = 0 })
local host, port = sim.url:match("^http://([^:]+):(%d+)$")
local PATH = "/communication-preferences/2026-03/statuses/bench%40example.com/unsubscribe-all?channel=EMAIL"

------------------------------------------------------------ 1. GETs
if part(1) then

-- What a Lua user would write instead: luasocket keep-alive + cjson.
local function luasocket_client()
  local conn = assert(socket.connect(host, tonumber(port)))
  conn:setoption("tcp-nodelay", true)
  local req = "GET " .. PATH .. " HTTP/1.1\r\nHost: " .. host .. "\r\nAuthorization: Bearer sim-token\r\n"
    .. "Accept: application/json\r\n\r\n"
  return function()
    assert(conn:send(req))
    local status = assert(conn:receive("*l"))
    local code = tonumber(status:match("^HTTP/1%.1 (%d+)"))
    local len
    while true do
      local line = assert(conn:receive("*l"))
      if line == "" then break end
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k and k:lower() == "content-length" then len = tonumber(v) end
    end
    local body = assert(conn:receive(len))
    return code, cjson.decode(body)
  end
end

local c = commprefs.new { token = "sim-token", base_url = sim.url }
local get = luasocket_client()
for _ = 1, 500 do assert(c:get_unsubscribe_all_status("bench@example.com")); get() end -- warm up

local cp_cpu, cp_wall = timed(function()
  for _ = 1, GETS do assert(c:get_unsubscribe_all_status("bench@example.com")) end
end)
local cp_split = last_split
local ls_cpu, ls_wall = timed(function()
  for _ = 1, GETS do local code = get(); assert(code == 200) end
end)
local ls_split = last_split
-- What most Lua users write: socket.http.request (a new connection per call).
local shttp = require "socket.http"
local ltn12 = require "ltn12"
local HTTP_GETS = math.min(GETS, 5000) -- each leaves a socket in TIME_WAIT
local sh_cpu, sh_wall = timed(function()
  for _ = 1, HTTP_GETS do
    local out = {}
    local _, code = shttp.request { url = sim.url .. PATH, headers = { authorization = "Bearer sim-token" },
      sink = ltn12.sink.table(out) }
    assert(code == 200)
    cjson.decode(table.concat(out))
  end
end)
print(string.format("\n1. %d keep-alive GETs on loopback (simulator latency 0)", GETS))
print(string.format("   commprefs            CPU %6.1f us/req   wall %6.1f us/req   (user %.1f, kernel %.1f us/req)",
  cp_cpu / GETS * 1e6, cp_wall / GETS * 1e6, cp_split.user / GETS * 1e6, cp_split.sys / GETS * 1e6))
print(string.format("   luasocket + cjson    CPU %6.1f us/req   wall %6.1f us/req   (user %.1f, kernel %.1f us/req)",
  ls_cpu / GETS * 1e6, ls_wall / GETS * 1e6, ls_split.user / GETS * 1e6, ls_split.sys / GETS * 1e6))
print(string.format("   socket.http + cjson  CPU %6.1f us/req   wall %6.1f us/req  (%d requests, a connection each)",
  sh_cpu / HTTP_GETS * 1e6, sh_wall / HTTP_GETS * 1e6, HTTP_GETS))
local ratio = cp_cpu / ls_cpu
local ratio_http = (cp_cpu / GETS) / (sh_cpu / HTTP_GETS)
print(string.format("   CPU ratio commprefs / hand-written keep-alive luasocket = %.2f (goal <= 0.5)", ratio))
print(string.format("   CPU ratio commprefs / socket.http                       = %.2f (goal <= 0.5)", ratio_http))
verdict("GET CPU vs keep-alive luasocket", ratio <= 0.5, string.format(
  "%.2fx; its kernel time alone (%.1f us/req) is above 0.5x of its total (%.1f us/req)",
  ratio, ls_split.sys / GETS * 1e6, ls_cpu / GETS * 1e6 / 2))
verdict("GET CPU vs socket.http", ratio_http <= 0.5, string.format("%.2fx", ratio_http))
c:close()
end

-- 1b. the libcurl transport against its floor (bench/curl_floor.c, built by
-- make bench): CPU per GET of bench/get_loop.lua on each VM over the bare C
-- loop, in turn, one ratio per round (goal <= 1.2x).
if part(1) then
  local floor_bin = "build/curl_floor"
  local fh = io.open(floor_bin)
  if not fh then
    print("\n1b. skipped: build/curl_floor missing (make build/curl_floor)")
  else
    fh:close()
    local n, rounds = math.min(GETS, 5000), num("BENCH_ROUNDS", 5)
    local function cpu_of(cmd)
      local p = io.popen(cmd)
      local v = tonumber(p:read("*a"))
      p:close()
      return assert(v, "no figure from: " .. cmd)
    end
    local url = sim.url .. PATH
    local r54, rjit, f_us = {}, {}, {}
    for r = 1, rounds do
      local f = cpu_of(string.format("%s %s %d 300", floor_bin, url, n))
      local c = cpu_of(string.format("lua5.4 bench/get_loop.lua %s %d 300", sim.url, n))
      local j = cpu_of(string.format("COMMPREFS_BUILD=build/luajit luajit bench/get_loop.lua %s %d 300", sim.url, n))
      r54[r], rjit[r], f_us[r] = c / f, j / f, f / n * 1e6
    end
    local m54, mjit = median(r54), median(rjit)
    print(string.format("\n1b. libcurl transport vs the bare libcurl loop (C), %d GETs x %d rounds in turn", n, rounds))
    print(string.format("   floor CPU %.1f us/GET (median); commprefs Lua 5.4 %.2fx, LuaJIT %.2fx (goal <= 1.2)",
      median(f_us), m54, mjit))
    FIGURES[#FIGURES + 1] = { "1", "libcurl GET CPU, Lua 5.4", m54, "bare libcurl loop in C" }
    FIGURES[#FIGURES + 1] = { "1", "libcurl GET CPU, LuaJIT", mjit, "bare libcurl loop in C" }
    verdict("libcurl GET CPU vs bare libcurl loop", m54 <= 1.2, string.format("Lua 5.4 %.2fx, LuaJIT %.2fx", m54, mjit))
  end
end

------------------------------------------------------------ 2. decoding
if part(2) then

local results = {}
for i = 1, 1000 do
  local statuses = {}
  for s = 1, 3 do
    statuses[s] = { subscriberIdString = "user" .. i .. "@example.com", subscriptionId = 1000 + s,
      channel = "EMAIL", status = "UNSUBSCRIBED", source = "Public API", businessUnitId = 0,
      timestamp = "2026-11-23T08:00:00.000Z", setStatusSuccessReason = "UNSUBSCRIBE_FROM_ALL_OCCURRED",
      legalBasis = cjson.null, subscriptionName = "Marketing Information" }
  end
  results[i] = { subscriberIdString = "user" .. i .. "@example.com", statuses = statuses }
end
local envelope = cjson.encode { status = "COMPLETE", results = results, numErrors = 0,
  startedAt = "2026-11-23T08:00:00.000Z", completedAt = "2026-11-23T08:00:01.000Z" }
local N = 200
for _ = 1, 20 do cjson.decode(envelope); core.decode(envelope) end
local plain = timed(function() for _ = 1, N do cjson.decode(envelope) end end)
local ours = timed(function() for _ = 1, N do core.decode(envelope) end end)
print(string.format("\n2. decoding a 1,000-result batch envelope (%d KB), %d times", #envelope // 1024, N))
print(string.format("   cjson.decode             %7.2f ms each", plain / N * 1000))
print(string.format("   commprefs.core.decode    %7.2f ms each (decode + integers + nulls)", ours / N * 1000))
print(string.format("   ratio = %.2f (goal <= 1.3)", ours / plain))
verdict("decode cost", ours / plain <= 1.3, string.format("%.2fx of cjson.decode", ours / plain))
end

------------------------------------------------------------ 3. bulk at the rate limit
if part(3) then

local rmax, rms = RATE:match("^(%d+)/(%d+)$")
rmax, rms = tonumber(rmax), tonumber(rms)
sim.reset({ rate = RATE, latency = 150, jitter = 30 })
local ids = {}
for i = 1, BULK_IDS do ids[i] = "bulk" .. i .. "@example.com" end
local batch = 100
local requests = math.ceil(BULK_IDS / batch)
local bound = requests / (rmax / (rms / 1000))
local concurrency = math.max(4, math.ceil(rmax / (rms / 1000) * 0.15 * 2))
local bc = commprefs.new { token = "sim-token", base_url = sim.url, max_concurrency = concurrency }
local _, wall, summary = timed(function() return bc:bulk_unsubscribe_all(ids) end)
local state = sim.state()
local lost = 0
for _, id in ipairs(ids) do if not state[id] then lost = lost + 1 end end
local st = bc:stats()
print(string.format("\n3. %d ids, rate limit %d per %d ms, latency 150 ms (+-30), %d in flight", BULK_IDS, rmax, rms, concurrency))
print(string.format("   bound ceil(N/%d)/rate = %d requests / %.0f per s = %.2f s", batch, requests, rmax / (rms / 1000), bound))
print(string.format("   commprefs bulk        wall %.2f s = %.3f of the bound; %d done, %d failed, %d lost; %d requests, %d 429s, %d retries",
  wall, bound / wall, summary.done, summary.failed, lost, st.sent, st.throttled, st.retries))
verdict("bulk speed", bound / wall >= 0.95 and lost == 0 and summary.failed == 0,
  string.format("%.3f of the bound, %d lost", bound / wall, lost))
bc:close()

sim.reset({ rate = RATE, latency = 150, jitter = 30 })
local sc = commprefs.new { token = "sim-token", base_url = sim.url }
local _, swall = timed(function()
  for first = 1, SEQ_IDS, batch do
    local chunk = {}
    for i = first, math.min(first + batch - 1, SEQ_IDS) do chunk[#chunk + 1] = ids[i] end
    assert(sc:batch_unsubscribe_all(chunk))
  end
end)
local projected = swall / SEQ_IDS * BULK_IDS
print(string.format("   sequential loop       %d ids in %.2f s (%.0f ids/s): %d ids would take %.0f s, %.1fx the bulk job",
  SEQ_IDS, swall, SEQ_IDS / swall, BULK_IDS, projected, projected / wall))
sc:close()
end

------------------------------------------------------------ 5. default options at the limit
-- Issue 9: no max_concurrency, no rate_limit: one request until HubSpot's headers
-- give the window, then learned rate x observed latency in flight. Issue 19:
-- the sends spread evenly (no burst at a window edge), so 0 429s at any latency.
-- Cells: 20 requests/1,000 ms, BENCH_BULK5_IDS (24,000) ids, latency 1,000 ms
-- with jitter 0 and +-200 ms, 150 ms and 50 ms (jitter 0); BENCH_ROUNDS5 (3)
-- rounds. Goals: 0 429s in every run, >= 0.95 of (requests / rate + one round
-- trip) (median), no more than 4 sends within any 10 ms (the simulator's log).
local function densest_10ms(requests)
  local times = {}
  for _, r in ipairs(requests) do
    if r.path:find("/communication-preferences/", 1, true) then times[#times + 1] = r.time end
  end
  table.sort(times)
  local most, first = 0, 1
  for i = 1, #times do
    while times[i] - times[first] >= 0.010 - 1e-9 do first = first + 1 end
    if i - first + 1 > most then most = i - first + 1 end
  end
  return most
end

if part(5) then

local rate5, per_s = "20/1000", 20
local N5, rounds = num("BENCH_BULK5_IDS", 24000), num("BENCH_ROUNDS5", 3)
print(string.format("\n5. bulk with default options, rate limit %s (%d requests/s), %d ids, %d rounds (medians; 429s summed)",
  rate5, per_s, N5, rounds))
print("   bound = ceil(N/100) / rate + one round trip (the first request goes alone: its answer gives the window)")
print("   latency  jitter  bound s   wall s  of bound  429s  failed  most sends in 10 ms")
local worst = { ratio = math.huge, throttled = 0, failed = 0, dense = 0 }
for _, case in ipairs { { 1000, 0 }, { 1000, 200 }, { 150, 0 }, { 50, 0 } } do
  local latency, jitter = case[1], case[2]
  local ratios, walls, throttled, failed, dense = {}, {}, 0, 0, 0
  local bound = math.ceil(N5 / 100) / per_s + latency / 1000
  for r = 1, rounds do
    sim.reset({ rate = rate5, latency = latency, jitter = jitter })
    local ids = {}
    for i = 1, N5 do ids[i] = "d" .. latency .. "-" .. jitter .. "-" .. r .. "-" .. i .. "@example.com" end
    local dc = commprefs.new { token = "sim-token", base_url = sim.url }
    local _, wall, summary = timed(function() return dc:bulk_unsubscribe_all(ids) end)
    dc:close()
    local log = sim.admin("GET", "log")
    ratios[r], walls[r] = bound / wall, wall
    throttled, failed = throttled + (log.throttled or 0), failed + summary.failed
    dense = math.max(dense, densest_10ms(log.requests))
  end
  local m = median(ratios)
  print(string.format("   %4d ms  %4d ms  %7.2f  %7.2f  %8.3f  %4d  %6d  %d", latency, jitter, bound, median(walls), m,
    throttled, failed, dense))
  worst.ratio = math.min(worst.ratio, m)
  worst.throttled, worst.failed = worst.throttled + throttled, worst.failed + failed
  worst.dense = math.max(worst.dense, dense)
end
verdict("bulk, default options, 20/1000 at 50 to 1,000 ms", worst.ratio >= 0.95 and worst.throttled == 0
  and worst.failed == 0 and worst.dense <= 4,
  string.format("worst %.3f of bound + round trip (goal >= 0.95), %d 429s, %d failed, at most %d sends in 10 ms (goal <= 4)",
    worst.ratio, worst.throttled, worst.failed, worst.dense))
FIGURES[#FIGURES + 1] = { "5", "bulk, default options, worst cell's wall", worst.ratio, "requests / rate + one round trip" }
end

------------------------------------------------------------ 4. peak RSS
if part(4) then

sim.reset({ rate = "off", latency = 0 })
local function rss_run(n)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  local buf = {}
  for i = 1, n do
    buf[#buf + 1] = "rss" .. i .. "@example.com"
    if #buf == 10000 then f:write(table.concat(buf, "\n"), "\n"); buf = {} end
  end
  if #buf > 0 then f:write(table.concat(buf, "\n"), "\n") end
  f:close()
  local p = io.popen(string.format("lua5.4 bench/rss_job.lua %s %s", sim.url, path))
  local out = p:read("*a")
  p:close()
  os.remove(path)
  local done, kb = out:match("done=(%d+) failed=%d+ peak_kb=(%d+)")
  if not kb then error("the RSS job failed:\n" .. out) end
  return tonumber(done), tonumber(kb)
end
local d1, k1 = rss_run(RSS_SMALL)
sim.reset({ rate = "off", latency = 0 })
local d2, k2 = rss_run(RSS_LARGE)
print(string.format("\n4. peak RSS of a bulk job streaming ids from a file (8 in flight, batches of 100)"))
print(string.format("   %8d ids: %6.1f MB (%d done)", RSS_SMALL, k1 / 1024, d1))
print(string.format("   %8d ids: %6.1f MB (%d done)", RSS_LARGE, k2 / 1024, d2))
print(string.format("   ratio = %.2f (goal <= 1.2)", k2 / k1))
verdict("memory bounded", k2 / k1 <= 1.2 and d1 == RSS_SMALL and d2 == RSS_LARGE, string.format("%.2fx", k2 / k1))
end

------------------------------------------------------------ 6, 7. OpenResty
-- issue 7, in one nginx worker (spec/support/nginx.lua; the core from build/luajit):
--   6. reads/s through the cosocket transport (is_unsubscribed_from_all in
--      content_by_lua, one client made in init_by_lua) versus a proxy_pass location
--      to the same simulator (nginx's own HTTP client: the ceiling inside nginx),
--      wrk -t1 -c16 against each, latency 0 (issue 19's goal: >= 0.85x of
--      proxy_pass), and worker CPU per read against a hand-rolled cosocket GET
--      + cjson.decode (goal <= 1.0x) and against the floor: that anchor
--      reading with the project's HTTP reader (core.http1_response), the
--      least a read costs under the rule of no hand-written HTTP parser.
--   7. 40 concurrent reads at 200 ms latency: wall time, and the latency of an
--      unrelated /ping sent meanwhile (goals: <= 1.0 s and <= 0.1 s), beside the
--      same through the blocking libcurl transport (the issue measured 8.06 s, 7.9 s).
local function openresty_nginx()
  local nginx = require "support.nginx"
  local inst = nginx.start { env = { SIM_URL = sim.url }, conf = string.format([[
    upstream hubsim { server 127.0.0.1:%s; keepalive 64; }
    init_by_lua_block {
      local commprefs = require "commprefs"
      package.loaded.bench_ngx = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL") }
      package.loaded.bench_curl = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), transport = "curl" }
    }]], port), server = [[
    location = /ping { return 200 "pong"; }
    location = /read { content_by_lua_block {
      local client = ngx.var.arg_via == "curl" and package.loaded.bench_curl or package.loaded.bench_ngx
      local yes, err = client:is_unsubscribed_from_all(ngx.unescape_uri(ngx.var.arg_id or "bench@example.com"))
      if yes == nil then ngx.status = 502; ngx.say(tostring(err)); return end
      ngx.print(yes and "yes" or "no")
    } }
    location = /read6 { content_by_lua_block {
      -- part 6: the same read with the anchor's fixed id (no ngx.var look-ups)
      local yes, err = package.loaded.bench_ngx:is_unsubscribed_from_all("bench@example.com")
      if yes == nil then ngx.status = 502; ngx.say(tostring(err)); return end
      ngx.print(yes and "yes" or "no")
    } }
    location = /get { content_by_lua_block {
      local env, err = package.loaded.bench_ngx:get_unsubscribe_all_status("bench@example.com")
      if not env then ngx.status = 502; ngx.say(tostring(err)); return end
      ngx.print(#env.results)
    } }
    location = /hand { content_by_lua_block {
      -- the anchor: a hand-rolled keep-alive cosocket GET + cjson.decode
      local cjson = require "cjson"
      local sock = ngx.socket.tcp()
      sock:settimeouts(10000, 30000, 30000)
      assert(sock:connect("127.0.0.1", ]] .. port .. [[))
      assert(sock:send("GET /communication-preferences/2026-03/statuses/bench%40example.com/unsubscribe-all?channel=EMAIL HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sim-token\r\nAccept: application/json\r\n\r\n"))
      local status = assert(sock:receive("*l"))
      local len
      while true do
        local line = assert(sock:receive("*l"))
        if line == "" then break end
        local v = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
        if v then len = tonumber(v) end
      end
      local body = assert(sock:receive(len))
      sock:setkeepalive()
      local env = cjson.decode(body)
      ngx.print(status:sub(10, 12) == "200" and #env.results or "bad")
    } }
    location = /hand_h1 { content_by_lua_block {
      -- the floor under the project's rules: the anchor with its line reader
      -- replaced by the project's HTTP reader (core.http1_response, on
      -- http-parser; no hand-written HTTP parser), one socket read per answer,
      -- parsers kept for reuse as the cosocket transport keeps them
      local cjson = require "cjson"
      local kept = package.loaded.bench_h1_parsers or {}
      package.loaded.bench_h1_parsers = kept
      local parser = table.remove(kept) or require("commprefs.core").http1_response { max_body = 1048576 }
      local sock = ngx.socket.tcp()
      sock:settimeouts(10000, 30000, 30000)
      assert(sock:connect("127.0.0.1", ]] .. port .. [[))
      assert(sock:send("GET /communication-preferences/2026-03/statuses/bench%40example.com/unsubscribe-all?channel=EMAIL HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sim-token\r\nAccept: application/json\r\n\r\n"))
      local res, keep
      repeat
        res, keep = parser:take(assert(sock:receiveany(65536)))
        assert(res ~= nil, keep)
      until res
      kept[#kept + 1] = parser
      if keep then sock:setkeepalive() else sock:close() end
      local env = cjson.decode(res.body)
      ngx.print(res.status == 200 and #env.results or "bad")
    } }
    location = /proxy {
      proxy_pass http://hubsim/communication-preferences/2026-03/statuses/bench%40example.com/unsubscribe-all?channel=EMAIL;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sim-token";
      proxy_set_header Accept "application/json";
    }]] }
  return nginx, inst
end

local function wrk(url, seconds)
  local p = io.popen(string.format("wrk -t1 -c16 -d%ds %s 2>&1", seconds, url))
  local out = p:read("*a")
  p:close()
  local rps = tonumber(out:match("Requests/sec:%s*([%d%.]+)"))
  if not rps then error("wrk failed:\n" .. out) end
  return rps, tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0, out:match("Socket errors:[^\n]*")
end

-- CPU seconds (user + system) the one nginx worker of inst has used, and
-- the user part alone (the system part also carries loopback packet work the
-- kernel charges to whichever process runs, which moves between runs).
local function worker_cpu(inst)
  local p = io.popen("pgrep -P " .. inst.pid)
  local pid = p:read("*l")
  p:close()
  local f = pid and io.open("/proc/" .. pid .. "/stat")
  if not f then return 0, 0 end
  local stat = f:read("*a"); f:close()
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100, tonumber(fields[12]) / 100
end

if part(6) then
  sim.reset({ rate = "off", latency = 0 })
  local _, inst = openresty_nginx()
  local seconds, rounds = num("BENCH_WRK_SECONDS", 5), num("BENCH_ROUNDS", 5) -- 5: this part moves most between runs
  local names = { "read", "get", "floor", "hand", "proxy" }
  local where = { read = "/read6", get = "/get", floor = "/hand_h1", hand = "/hand", proxy = "/proxy" }
  for _, n in ipairs(names) do wrk(inst.url .. where[n], 1) end -- warm up each
  local rps, cpu, ratio = {}, {}, { rps_proxy = {}, cpu_hand = {}, get_rps_proxy = {}, get_cpu_hand = {},
    floor_rps_proxy = {}, floor_cpu_hand = {}, cpu_floor = {}, user_hand = {}, floor_user_hand = {} }
  local user = {}
  for _, n in ipairs(names) do rps[n], cpu[n], user[n] = {}, {}, {} end
  for r = 1, rounds do -- in turn, ratios per round
    for _, n in ipairs(names) do
      sim.reset({ rate = "off", latency = 0 }) -- a fresh simulator day: its daily limit is within reach
      local c0, u0 = worker_cpu(inst)
      local v, bad = wrk(inst.url .. where[n], seconds)
      local c1, u1 = worker_cpu(inst)
      local used = c1 - c0
      user[n][r] = (u1 - u0) / (v * seconds) * 1e6
      if bad > 0 then print(string.format("   (%s: %d non-2xx)", n, bad)) end
      rps[n][r], cpu[n][r] = v, used / (v * seconds) * 1e6
    end
    ratio.rps_proxy[r] = rps.read[r] / rps.proxy[r]
    ratio.cpu_hand[r] = cpu.read[r] / cpu.hand[r]
    ratio.get_rps_proxy[r] = rps.get[r] / rps.proxy[r]
    ratio.get_cpu_hand[r] = cpu.get[r] / cpu.hand[r]
    ratio.floor_rps_proxy[r] = rps.floor[r] / rps.proxy[r]
    ratio.floor_cpu_hand[r] = cpu.floor[r] / cpu.hand[r]
    ratio.cpu_floor[r] = cpu.read[r] / cpu.floor[r]
    ratio.user_hand[r] = user.read[r] / user.hand[r]
    ratio.floor_user_hand[r] = user.floor[r] / user.hand[r]
  end
  inst:stop()
  print(string.format("\n6. one nginx worker, simulator latency 0, wrk -t1 -c16 -d%ds, %d rounds in turn (medians)", seconds, rounds))
  local label = { read = "cosocket is_unsubscribed_from_all", get = "cosocket get_unsubscribe_all_status",
    floor = "the anchor read with http1.c (the floor)",
    hand = "hand-rolled cosocket GET + cjson (anchor)", proxy = "proxy_pass, upstream keepalive (anchor)" }
  for _, n in ipairs(names) do
    print(string.format("   %-42s %8.0f reads/s  worker CPU %5.1f us/read (user %5.1f)", label[n], median(rps[n]),
      median(cpu[n]), median(user[n])))
  end
  local r1, r2 = median(ratio.rps_proxy), median(ratio.cpu_hand)
  print(string.format("   reads/s ratio to proxy_pass      %.2f (get: %.2f) (goal >= 0.85)", r1, median(ratio.get_rps_proxy)))
  print(string.format("   worker CPU ratio to hand-rolled  %.2f (get: %.2f) (goal <= 1.0)", r2, median(ratio.get_cpu_hand)))
  -- the floor: what the anchor itself costs once it reads with the HTTP
  -- reader the project's rules require; above 1.0x, the goal is out of reach
  print(string.format("   the floor (anchor with http1.c): CPU %.2fx the hand-rolled, reads/s %.2fx proxy_pass;"
    .. " the read's CPU %.2fx the floor", median(ratio.floor_cpu_hand), median(ratio.floor_rps_proxy), median(ratio.cpu_floor)))
  print(string.format("   user CPU alone, ratio to hand-rolled: the read %.2f, the floor %.2f",
    median(ratio.user_hand), median(ratio.floor_user_hand)))
  FIGURES[#FIGURES + 1] = { "6", "cosocket reads/s", r1, "proxy_pass + keepalive" }
  FIGURES[#FIGURES + 1] = { "6", "cosocket worker CPU per read", r2, "hand-rolled cosocket GET + cjson" }
  FIGURES[#FIGURES + 1] = { "6", "the floor's worker CPU per read", median(ratio.floor_cpu_hand), "hand-rolled cosocket GET + cjson" }
  FIGURES[#FIGURES + 1] = { "6", "cosocket worker CPU per read", median(ratio.cpu_floor), "the floor (the anchor read with http1.c)" }
  verdict("cosocket reads vs proxy_pass", r1 >= 0.85, string.format("%.2fx", r1))
  verdict("cosocket worker CPU vs hand-rolled", r2 <= 1.0, string.format("%.2fx", r2))
end

if part(7) then
  sim.reset({ rate = "off", latency = 200 })
  local nginx, inst = openresty_nginx()
  print("\n7. 40 concurrent reads at 200 ms latency in one nginx worker, /ping sent 50 ms after them")
  for _, via in ipairs { "ngx", "curl" } do
    local paths = {}
    for i = 1, 40 do paths[i] = "/read?via=" .. via .. "&id=nb" .. i .. "%40example.com" end
    local t0 = socket.gettime()
    local answers = nginx.concurrent(inst, paths, 60, { after = { delay = 0.05, path = "/ping" } })
    local wall = socket.gettime() - t0
    local right = 0
    for i = 1, 40 do if answers[i].status == 200 and answers[i].body == "no" then right = right + 1 end end
    local ping = answers.after.seconds or math.huge
    print(string.format("   %-28s wall %5.2f s, %d/40 answered right, /ping %6.3f s", via == "ngx"
      and "cosocket transport (auto)" or "libcurl (transport = curl)", wall, right, ping))
    if via == "ngx" then
      verdict("non-blocking in nginx", wall <= 1.0 and ping <= 0.1 and right == 40,
        string.format("40 reads in %.2f s (goal <= 1.0), /ping %.3f s (goal <= 0.1)", wall, ping))
    end
  end
  inst:stop()
end

-- 8. issue 19: the request path under HubSpot's windows. "May I email X?"
-- with the README's options (coalesce = 0.01, timeout = 2, cache in a
-- lua_shared_dict; two workers also pace through the README's shared dict),
-- open loop, addresses drawn at random from 50,000, for BENCH_REQ_SECONDS (15)
-- at 200, 1,000 and 3,000 reads/s; windows 100 per 10,000 ms (HubSpot's
-- TEN_SECONDLY_ROLLING) and 10 per 1,000 ms, latency 50 and 150 ms, one and two
-- nginx workers (bench/request_load.lua runs each worker's share); medians of
-- BENCH_REQ_ROUNDS (3) rounds, 429s summed. Goals: at 200 and 1,000/s >= 99.9 %
-- answered, p99 of all reads <= 400 ms, 0 429s; at 3,000/s (over capacity,
-- 1,000 ids/s) timeouts and no 429s, no other errors.
-- BENCH_REQ_CELLS filters the cells by their label (e.g. "w1 100/10000").
local function nginx_support() return require "support.nginx" end
local CHECKOUT = io.popen("pwd"):read("*l")

local function request_cell(inst, params)
  local gen = params.gen
  local status, body = nginx_support().request(inst, "POST", "/go?gen=" .. gen, cjson.encode(params), 10)
  assert(status == 200, "request load did not start: " .. tostring(body))
  local deadline = socket.gettime() + params.seconds + 40
  local results = {}
  while #results < params.workers and socket.gettime() < deadline do
    socket.sleep(0.2)
    local s, b = nginx_support().request(inst, "GET", "/results?gen=" .. gen .. "&workers=" .. params.workers, nil, 10)
    if s == 200 then results = cjson.decode(b) end
  end
  assert(#results == params.workers, "request load: no results from every worker\n" .. inst:log())
  local out = { offered = 0, answered = 0, errors = {}, other = 0, hist = {} }
  for _, r in ipairs(results) do
    assert(not r.failed, "request load failed: " .. tostring(r.failed))
    out.offered, out.answered = out.offered + r.offered, out.answered + r.answered
    for k, v in pairs(r.errors) do
      out.errors[k] = (out.errors[k] or 0) + v
      if k ~= "timeout" then out.other = out.other + v end
    end
    for ms, v in pairs(r.hist) do out.hist[#out.hist + 1] = { tonumber(ms), v } end
  end
  table.sort(out.hist, function(x, y) return x[1] < y[1] end)
  local function pct(p)
    local want, seen = math.ceil(out.offered * p), 0
    for _, h in ipairs(out.hist) do
      seen = seen + h[2]
      if seen >= want then return h[1] end
    end
    return math.huge
  end
  out.p50, out.p99 = pct(0.5), pct(0.99)
  return out
end

if part(8) then
local ok, err = pcall(function()
  local SECONDS, ROUNDS = num("BENCH_REQ_SECONDS", 15), num("BENCH_REQ_ROUNDS", 3)
  local filter = os.getenv("BENCH_REQ_CELLS")
  local cells, gen = {}, math.floor(socket.gettime())
  for _, workers in ipairs { 1, 2 } do
    for _, window in ipairs { "100/10000", "10/1000" } do
      for _, latency in ipairs { 50, 150 } do
        local label = string.format("w%d %s %d ms", workers, window, latency)
        if not filter or label:find(filter, 1, true) then
          cells[#cells + 1] = { label = label, workers = workers, window = window, latency = latency, rates = {} }
        end
      end
    end
  end
  local RATES = { 200, 1000, 3000 }
  print(string.format("\n8. the request path: is_unsubscribed_from_all in nginx, README options, open loop for %d s,"
    .. " addresses of 50,000, medians of %d rounds (429s summed)", SECONDS, ROUNDS))
  for round = 1, ROUNDS do
    for _, cell in ipairs(cells) do
      -- a fresh nginx per cell: a worker keeps the window it learned
      local inst = nginx_support().start { workers = cell.workers, env = { SIM_URL = sim.url },
        conf = string.format([[
    lua_shared_dict commprefs 10m;
    lua_shared_dict commprefs_pace 1m;
    lua_shared_dict bench_load 16m;
    init_by_lua_block {
      package.loaded.bench_client = require("commprefs").new { token = "sim-token", base_url = os.getenv("SIM_URL"),
        coalesce = 0.01, timeout = 2, cache = { ttl = 60, shared_dict = "commprefs" }%s }
    }
    init_worker_by_lua_block {
      package.path = "%s/bench/?.lua;" .. package.path
      require("request_load").watch(package.loaded.bench_client, "bench_load")
    }]], cell.workers > 1 and ', shared_dict = "commprefs_pace"' or "", CHECKOUT), server = [[
    location = /go { content_by_lua_block {
      ngx.req.read_body()
      local d = ngx.shared.bench_load
      d:set("params", ngx.req.get_body_data())
      d:set("go", tonumber(ngx.var.arg_gen))
      ngx.say("ok")
    } }
    location = /results { content_by_lua_block {
      local d, out = ngx.shared.bench_load, {}
      for w = 0, tonumber(ngx.var.arg_workers) - 1 do
        local r = d:get("result:" .. ngx.var.arg_gen .. ":" .. w)
        if r then out[#out + 1] = r end
      end
      ngx.print("[" .. table.concat(out, ",") .. "]")
    } }]] }
      for i, rate in ipairs(RATES) do
        sim.reset({ rate = cell.window, latency = cell.latency, jitter = 0 })
        gen = gen + 1
        local r = request_cell(inst, { gen = gen, rate = rate, seconds = SECONDS, workers = cell.workers,
          pool = 50000, prefix = string.format("r%d-%d-", gen, i) })
        local counts = sim.counts()
        r.throttled, r.requests = counts.throttled or 0, counts.api or 0
        cell.rates[rate] = cell.rates[rate] or {}
        table.insert(cell.rates[rate], r)
      end
      inst:stop()
    end
  end
  print("   cell                       reads/s  answered %   p50 ms  p99 ms  HubSpot requests  429s  timeouts  other errors")
  local worst = { answered = 100, p99 = 0, throttled = 0, other = 0, over = true }
  for _, cell in ipairs(cells) do
    for _, rate in ipairs(RATES) do
      local runs = cell.rates[rate]
      local pcts, p50s, p99s, reqs, tos, throttled, other = {}, {}, {}, {}, {}, 0, 0
      for k, r in ipairs(runs) do
        pcts[k], p50s[k], p99s[k], reqs[k] = r.answered / r.offered * 100, r.p50, r.p99, r.requests
        tos[k] = r.errors.timeout or 0
        throttled, other = throttled + r.throttled, other + r.other
      end
      local pct_m, p99_m = median(pcts), median(p99s)
      print(string.format("   %-26s %7d  %10.2f  %7.0f  %6.0f  %16d  %4d  %8d  %12d", cell.label, rate, pct_m,
        median(p50s), p99_m, median(reqs), throttled, median(tos), other))
      worst.throttled, worst.other = worst.throttled + throttled, worst.other + other
      if rate <= 1000 then
        worst.answered, worst.p99 = math.min(worst.answered, pct_m), math.max(worst.p99, p99_m)
      end
    end
  end
  verdict("request path at 200 and 1,000 reads/s (every cell)", worst.answered >= 99.9 and worst.p99 <= 400
    and worst.throttled == 0 and worst.other == 0,
    string.format("worst cell: %.2f %% answered (goal >= 99.9), p99 %.0f ms (goal <= 400); %d 429s, %d other errors"
      .. " in all cells (3,000/s included; goal 0)", worst.answered, worst.p99, worst.throttled, worst.other))
  FIGURES[#FIGURES + 1] = { "8", "request path: worst cell's share of reads answered (200 and 1,000/s)",
    worst.answered / 100, "reads offered" }
  FIGURES[#FIGURES + 1] = { "8", "request path: worst cell's p99 (200 and 1,000/s)", worst.p99 / 400, "400 ms" }
end)
if not ok then print("\n8. the request path in nginx: not run: " .. tostring(err)) end
end

------------------------------------------------------------ 9. one budget, three processes
-- issue 9: a cron job, a script and a batch on one token each learn the limit
-- alone (429s, retries, a slower job) unless they share the Redis budget.
if part(9) then
  local redis = require "support.redis"
  local PER = num("BENCH_BUDGET_IDS", 6000)
  local r = redis.start()
  local requests = 3 * math.ceil(PER / 100)
  local bound = requests / 20
  print(string.format("\n9. 3 processes x %d ids on one token, limit 20 per 1,000 ms, latency 150 ms, default options", PER))
  print(string.format("   bound = %d requests / 20 per s = %.2f s", requests, bound))
  for _, shared in ipairs { false, true } do
    sim.reset({ rate = "20/1000", latency = 150 })
    local jobs = {}
    for p = 1, 3 do
      jobs[p] = io.popen(string.format("lua5.4 bench/budget_job.lua %s %s budget-bench %s %d 2>&1", sim.url,
        shared and r.url or "-", (shared and "s" or "n") .. p .. "-", PER))
    end
    local t0, t1, failed, retries = math.huge, 0, 0, 0
    for p = 1, 3 do
      local out = jobs[p]:read("*a")
      jobs[p]:close()
      local ok, res = pcall(cjson.decode, out:match("(%b{})%s*$") or "")
      if not ok then error("a budget job failed:\n" .. out) end
      t0, t1 = math.min(t0, res.t0), math.max(t1, res.t1)
      failed, retries = failed + res.failed, retries + res.retries
    end
    local throttled = sim.admin("GET", "log").throttled or 0
    local wall = t1 - t0
    print(string.format("   %-24s wall %6.2f s = %.3f of the bound; %d 429s, %d retries, %d failed",
      shared and "with the Redis budget" or "each process alone", wall, bound / wall, throttled, retries, failed))
    if shared then
      verdict("3 processes on one Redis budget", bound / wall >= 0.85 and throttled == 0 and failed == 0,
        string.format("%.3f of the bound, %d 429s", bound / wall, throttled))
    end
  end
  redis.stop(r)
end

------------------------------------------------------------ 11. Redis worker
-- issue 11: `commprefs worker` draining a Redis Stream of BENCH_WORKER_ENTRIES
-- (20,000) entries at a limit of 20 requests per 1,000 ms and 150 ms latency,
-- one worker, then two on one shared budget: entries per second against the
-- bound ceil(N / 100) / 20 per s (goal: >= 0.9 of it), and 429s.
if part(11) then
  local redis = require "support.redis"
  local N = num("BENCH_WORKER_ENTRIES", 20000)
  local r = redis.start()
  local conn = assert(core.redis_connect(r.url, { timeout = 10 }))
  local bound = math.ceil(N / 100) / 20
  print(string.format("\n11. commprefs worker: %d stream entries, limit 20 per 1,000 ms, latency 150 ms, default options", N))
  print(string.format("   bound ceil(N/100)/rate = %d requests / 20 per s = %.1f s = %.0f entries/s", math.ceil(N / 100), bound, N / bound))
  for _, workers in ipairs { 1, 2 } do
    sim.reset({ rate = "20/1000", latency = 150 })
    local stream, results = "bench:in:" .. workers, "bench:out:" .. workers
    for first = 1, N, 1000 do
      local cmds = {}
      for i = first, math.min(first + 999, N) do cmds[#cmds + 1] = { "XADD", stream, "*", "id", "wb" .. i .. "@example.com" } end
      assert(conn:pipeline(cmds))
    end
    local t0 = socket.gettime()
    for w = 1, workers do
      os.execute(string.format("HUBSPOT_ACCESS_TOKEN=sim-token lua5.4 bin/commprefs --base-url %s worker --redis %s"
        .. " --stream %s --group bench --results %s --consumer w%d --idle-exit 1 --quiet%s >/dev/null 2>&1 &",
        sim.url, r.url, stream, results, w, workers > 1 and " --budget-key bench-budget" or ""))
    end
    local deadline = t0 + bound * 4 + 30
    while conn:command({ "XLEN", results }) < N and socket.gettime() < deadline do socket.sleep(0.02) end
    local wall = socket.gettime() - t0
    local done = conn:command({ "XLEN", results })
    local throttled = sim.admin("GET", "log").throttled
    print(string.format("   %d worker%s %s %6.2f s, %5.0f entries/s = %.3f of the bound; %d results, %d 429s",
      workers, workers > 1 and "s" or " ", workers > 1 and "(one budget)" or "            ", wall, done / wall,
      bound / wall, done, throttled))
    verdict("worker drain, " .. workers .. " worker" .. (workers > 1 and "s" or ""),
      bound / wall >= 0.9 and done == N and throttled == 0,
      string.format("%.3f of the bound, %d 429s", bound / wall, throttled))
    socket.sleep(1.5) -- the workers see nothing more and exit
  end
  conn:close()
  redis.stop(r)
end

------------------------------------------------------------ 12. the command line
-- issue 19: `commprefs unsubscribe-all --file` on BENCH_CLI_IDS (1,000,000) ids
-- against the library's streaming job on the same file, journal on in both,
-- rate off, latency 0 (bench/cli_job.lua; rounds in turn): CPU (goal <= 1.3x).
if part(12) then
  local N, rounds = num("BENCH_CLI_IDS", 1000000), num("BENCH_ROUNDS", 3)
  local p = io.popen(string.format("lua5.4 bench/cli_job.lua %s %d %d journal 2>&1", sim.url, N, rounds))
  local out = p:read("*a")
  p:close()
  local lib, cli, ratio = out:match("lib_cpu=([%d.]+) cli_cpu=([%d.]+) ratio=([%d.]+)")
  print(string.format("\n12. the command line, %d ids from a file, journal on, against the library's streaming job"
    .. " (%d rounds in turn, medians)", N, rounds))
  if not ratio then
    print("   not measured:\n" .. out)
    verdict("command line CPU vs the library's job", false, "not measured")
  else
    lib, cli, ratio = tonumber(lib), tonumber(cli), tonumber(ratio)
    print(string.format("   library job CPU %.1f s, command line CPU %.1f s: ratio %.2f (goal <= 1.3)", lib, cli, ratio))
    FIGURES[#FIGURES + 1] = { "12", "command line CPU, 1,000,000 ids", ratio, "library's streaming job, same ids" }
    verdict("command line CPU vs the library's job", ratio <= 1.3, string.format("%.2fx", ratio))
  end
  sim.reset({ rate = "off", latency = 0 })
end

print("\ngoals:")
for _, v in ipairs(verdicts) do print(v) end
-- The README's "Measured" table is this, pasted as printed.
print("\nratios to anchors measured in this run (README \"Measured\"):")
print("| part | figure | anchor | ratio |")
print("| --- | --- | --- | --- |")
for _, f in ipairs(FIGURES) do print(string.format("| %s | %s | %s | %.2f |", f[1], f[2], f[4], f[3])) end
sim.stop(sim)
