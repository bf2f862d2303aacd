-- commprefs.metrics: owns the Prometheus text exposition of a client's
-- counters (`commprefs.prometheus(client)`): what the governor counts per
-- attempt for both transports (csrc/governor.c, client:stats()), the
-- lookup's cache and coalescing counts, and any extra series a job or the
-- worker adds. In OpenResty `metrics = {shared_dict = NAME}` adds every
-- worker's counts into the dict (a timer per worker flushes deltas each
-- second, and rendering flushes its own first), so /metrics shows the nginx.
-- Names follow Prometheus' conventions: commprefs_ prefix, _total counters,
-- base units (seconds).
local M = {}

-- Family metadata: type and help, by family name.
local FAMILIES = {
  commprefs_requests_total = { "counter", "Attempts answered by HubSpot, by HTTP status." },
  commprefs_request_failures_total = { "counter", "Attempts that got no answer, by kind." },
  commprefs_retries_total = { "counter", "Attempts sent again after a retryable outcome." },
  commprefs_throttled_total = { "counter", "429 answers, by policy (daily: the daily limit is spent)." },
  commprefs_pacing_waits_total = { "counter", "Attempts that waited for pacing or the shared budget." },
  commprefs_pacing_wait_seconds_total = { "counter", "Time attempts waited for pacing or the shared budget." },
  commprefs_request_duration_seconds = { "histogram", "Duration of answered attempts." },
  commprefs_daily_remaining = { "gauge", "HubSpot's X-HubSpot-RateLimit-Daily-Remaining, the latest count." },
  commprefs_rate_limit_max = { "gauge", "Requests per window the client paces under (0: not known yet)." },
  commprefs_rate_limit_interval_seconds = { "gauge", "Length of the rate-limit window." },
  commprefs_in_flight_target = { "gauge", "Requests the client keeps in flight now." },
  commprefs_cache_hits_total = { "counter", "is_unsubscribed_from_all answers from the cache." },
  commprefs_cache_misses_total = { "counter", "is_unsubscribed_from_all reads the cache could not answer." },
  commprefs_coalesced_reads_total = { "counter", "is_unsubscribed_from_all reads joined into batch reads." },
  commprefs_batch_reads_total = { "counter", "Batch reads sent for coalesced reads." },
}
M.FAMILIES = FAMILIES

local function label(v) return (tostring(v):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" })) end

-- The series of stats (client:stats()) as {["name{labels}"] = value}.
function M.series(stats)
  local s = {}
  for status, n in pairs(stats.by_status or {}) do s['commprefs_requests_total{status="' .. status .. '"}'] = n end
  for kind, n in pairs(stats.by_kind or {}) do s['commprefs_request_failures_total{kind="' .. label(kind) .. '"}'] = n end
  s.commprefs_retries_total = stats.retries or 0
  local daily = stats.throttled_daily or 0
  s['commprefs_throttled_total{policy="daily"}'] = daily
  s['commprefs_throttled_total{policy="rolling"}'] = (stats.throttled or 0) - daily
  s.commprefs_pacing_waits_total = stats.paced or 0
  s.commprefs_pacing_wait_seconds_total = stats.paced_seconds or 0
  local d = stats.duration
  if d then
    for i, bound in ipairs(d.bounds) do
      s[string.format('commprefs_request_duration_seconds_bucket{le="%g"}', bound)] = d.counts[i]
    end
    s['commprefs_request_duration_seconds_bucket{le="+Inf"}'] = d.count
    s.commprefs_request_duration_seconds_sum = d.sum
    s.commprefs_request_duration_seconds_count = d.count
  end
  if stats.daily_remaining then s.commprefs_daily_remaining = stats.daily_remaining end
  s.commprefs_rate_limit_max = stats.rate_max or 0
  s.commprefs_rate_limit_interval_seconds = (stats.rate_interval_ms or 0) / 1000
  s.commprefs_in_flight_target = stats.in_flight_target or 0
  local l = stats.lookup
  if l then
    s.commprefs_cache_hits_total = l.cache_hits
    s.commprefs_cache_misses_total = l.cache_misses
    s.commprefs_coalesced_reads_total = l.coalesced_reads
    s.commprefs_batch_reads_total = l.batch_reads
  end
  return s
end

-- The family of a series name (a histogram's _bucket/_sum/_count: its base).
local function family_of(name)
  local base = name:match("^[%w_]+")
  if FAMILIES[base] then return base end
  local h = base:match("^(.-)_bucket$") or base:match("^(.-)_sum$") or base:match("^(.-)_count$")
  return h and FAMILIES[h] and h or base
end

local function number(v)
  if v == math.huge then return "+Inf" end
  if v == math.floor(v) and v > -2^53 and v < 2^53 then return string.format("%d", v) end
  return string.format("%.17g", v)
end

-- Prometheus' text format of series {["name{labels}"] = value}; extra:
-- {[family] = {type, help}} for families not in FAMILIES.
function M.render(series, extra)
  local by_family, names = {}, {}
  for name, v in pairs(series) do
    local f = family_of(name)
    if not by_family[f] then by_family[f] = {}; names[#names + 1] = f end
    local list = by_family[f]
    list[#list + 1] = { name, v }
  end
  table.sort(names)
  local out = {}
  for _, f in ipairs(names) do
    local meta = FAMILIES[f] or (extra and extra[f]) or { "untyped", f }
    out[#out + 1] = "# HELP " .. f .. " " .. meta[2]
    out[#out + 1] = "# TYPE " .. f .. " " .. meta[1]
    local list = by_family[f]
    table.sort(list, function(a, b) return a[1] < b[1] end)
    for _, e in ipairs(list) do out[#out + 1] = e[1] .. " " .. number(e[2]) end
  end
  return table.concat(out, "\n") .. "\n"
end

------------------------------------------------------------------ OpenResty

local GAUGE = { commprefs_daily_remaining = true, commprefs_rate_limit_max = true,
  commprefs_rate_limit_interval_seconds = true, commprefs_in_flight_target = true }

-- What was last flushed into each dict, per governor (the counts'
-- source: clients of one bundle, commprefs.shared, count into one governor,
-- so each count is added once however many of them flush). Weak: a
-- governor that is gone has nothing more to add.
local flushed = {}

-- Adds what changed since the last flush of client's counts into the dict
-- (counters by increment; gauges: this worker's value, under a per-worker key).
function M.flush(client, dict)
  local now_series = M.series(client:stats())
  local by_gov = flushed[dict]
  if not by_gov then
    by_gov = setmetatable({}, { __mode = "k" })
    flushed[dict] = by_gov
  end
  local last = by_gov[client._gov] or {}
  local pid = ngx.worker.pid()
  for name, v in pairs(now_series) do
    if GAUGE[family_of(name)] then
      dict:set("g|" .. pid .. "|" .. name, v, 60)
    else
      local delta = v - (last[name] or 0)
      if delta ~= 0 then dict:incr("c|" .. name, delta, 0) end
    end
  end
  by_gov[client._gov] = now_series
end

-- Every worker's counters from the dict (gauges: the lowest daily remaining,
-- the others the last worker's value).
function M.collect(dict)
  local s = {}
  for _, key in ipairs(dict:get_keys(0)) do
    local kind, rest = key:match("^(%a)|(.*)$")
    if kind == "c" then s[rest] = dict:get(key)
    elseif kind == "g" then
      local name = rest:match("^%d+|(.*)$")
      local v = dict:get(key)
      if name and v then
        if name == "commprefs_daily_remaining" then s[name] = math.min(s[name] or v, v) else s[name] = v end
      end
    end
  end
  return s
end

-- The clients whose counts a worker flushes, per dict (weak: a client that
-- is gone stops counting; at most its last second is lost).
local watched = {}

local function flush_all(premature, name)
  if premature then return end
  local dict = ngx.shared[name]
  for client in pairs(watched[name]) do M.flush(client, dict) end
end

-- Has this worker flush client's counts into the dict `name` every second
-- (one timer per dict and worker). true once watched; nil where timers
-- cannot be made yet (init_by_lua): asked again at the next call.
function M.watch(client, name)
  local set = watched[name]
  if not set then
    if ngx.get_phase() == "init" or not ngx.timer.every(1, flush_all, name) then return nil end
    set = setmetatable({}, { __mode = "k" })
    watched[name] = set
  end
  set[client] = true
  return true
end

return M
