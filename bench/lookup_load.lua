-- bench/lookup_load.lua: the issue-8 load (bench/run.lua part 8), run inside
-- nginx by support.nginx.run with RATE, SECONDS, PREFIX and CLIENT set in
-- front of it: callers of client:is_unsubscribed_from_all on distinct ids
-- arrive at RATE a second for SECONDS (one light thread each, spawned every
-- millisecond as due); returns what they got and what it cost.
local c = package.loaded[CLIENT]
local lookup = require "commprefs.lookup"
local n = math.floor(RATE * SECONDS)
local latencies, kinds, answered, done, waiting, peak_waiting = {}, {}, 0, 0, 0, 0
local finished = require("ngx.semaphore").new(0)
local requests0, stats0 = lookup.stats(c).batch_reads, c:stats()
collectgarbage()
local mem0, peak_mem = collectgarbage("count"), 0

local function caller(id)
  ngx.update_time()
  local t = ngx.now()
  waiting = waiting + 1
  if waiting > peak_waiting then peak_waiting = waiting end
  local v, err = c:is_unsubscribed_from_all(id)
  ngx.update_time()
  waiting = waiting - 1
  if v ~= nil then
    answered = answered + 1
    latencies[#latencies + 1] = ngx.now() - t
  else
    local k = tostring(err.kind)
    kinds[k] = (kinds[k] or 0) + 1
  end
  done = done + 1
  if done == n then finished:post(1) end
end

ngx.update_time()
local t0, sent = ngx.now(), 0
while sent < n do
  ngx.update_time()
  local due = math.min(n, math.floor((ngx.now() - t0) * RATE) + 1)
  while sent < due do
    sent = sent + 1
    ngx.thread.spawn(caller, PREFIX .. sent .. "@example.com")
  end
  local mem = collectgarbage("count")
  if mem > peak_mem then peak_mem = mem end
  ngx.sleep(0.001)
end
finished:wait(120)
ngx.update_time()
table.sort(latencies)
local function pct(p) return latencies[math.max(1, math.ceil(#latencies * p))] or 0 end
local stats = c:stats()
return {
  offered = n, answered = answered, errors = kinds, seconds = ngx.now() - t0,
  requests = lookup.stats(c).batch_reads - requests0,
  throttled = (stats.throttled or 0) - (stats0.throttled or 0),
  p50_ms = pct(0.5) * 1000, p99_ms = pct(0.99) * 1000,
  peak_waiting = peak_waiting, mem_kb = mem0, peak_mem_kb = peak_mem,
}
