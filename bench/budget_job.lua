-- bench/budget_job.lua URL REDIS_URL|- KEY PREFIX N: one participant of the
-- shared-budget benchmark (make bench, part 9): a default-options bulk
-- unsubscribe of N ids, on the Redis budget KEY unless REDIS_URL is "-";
-- prints its start and end (wall clock), outcome counts and 429s as JSON.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("COMMPREFS_BUILD") or "build/lua5.4") .. "/?.so;" .. package.cpath
local commprefs = require "commprefs"
local core = commprefs.core
local base, redis_url, key, prefix, n = arg[1], arg[2], arg[3], arg[4], tonumber(arg[5])
local c = assert(commprefs.new { token = "sim-token", base_url = base,
  rate_limit = redis_url ~= "-" and { redis = redis_url, key = key } or nil })
local ids = {}
for i = 1, n do ids[i] = prefix .. i .. "@example.com" end
local t0 = core.now()
local s = c:bulk_unsubscribe_all(ids)
local st = c:stats()
c:close()
print(core.encode { t0 = t0, t1 = core.now(), done = s.done, failed = s.failed, throttled = st.throttled,
  retries = st.retries })
