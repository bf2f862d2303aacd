-- examples/redis_worker.lua: a `commprefs run` automation that drains a Redis
-- Stream of addresses (field `id`) and then reports who failed.
--   HUBSPOT_ACCESS_TOKEN=... commprefs run examples/redis_worker.lua redis://127.0.0.1:6379 unsubs
-- (`commprefs worker` does the same with a fixed command line; this is the Lua API.)
local worker = require "commprefs.worker"
local core = require "commprefs.core"

local url, stream = arg[1] or "redis://127.0.0.1:6379", arg[2] or "unsubs"
local results = stream .. ":results"
local w = worker.new(client, { redis = url, stream = stream, group = "commprefs", results = results })
local summary, err = w:run { idle_exit = 2, signals = true }
w:close()
if not summary then
  io.stderr:write(commprefs.pretty(err), "\n")
  return 1
end
print(string.format("%d entries: %d changed, %d unchanged, %d failed (%.1f s)", summary.read,
  summary.changed, summary.unchanged, summary.failed, summary.elapsed))

-- The results stream is an ordinary stream: read it like any other.
local conn = assert(core.redis_connect(url))
for _, e in ipairs(assert(conn:command({ "XRANGE", results, "-", "+" }))) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  if f.outcome == "failed" then print("failed: " .. f.id .. ": " .. f.error) end
end
conn:close()
return summary.failed == 0
