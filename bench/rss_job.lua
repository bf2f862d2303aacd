-- bench/rss_job.lua URL FILE: a bulk unsubscribe streaming FILE's ids, then
-- prints its own peak resident set (VmHWM) so make bench can compare sizes.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local commprefs = require "commprefs"
local client = commprefs.new { token = "sim-token", base_url = arg[1], max_concurrency = 8 }
local s = client:bulk_unsubscribe_all(io.lines(arg[2]), { max_failures_kept = 100 })
client:close()
local kb
for line in io.lines("/proc/self/status") do kb = kb or line:match("^VmHWM:%s+(%d+)") end
print(string.format("done=%d failed=%d peak_kb=%s", s.done, s.failed, kb))
