-- bench/get_loop.lua: N keep-alive GETs through commprefs (libcurl), for the
-- floor comparison of make bench part 1 and for callgrind:
--   lua5.4 bench/get_loop.lua BASE_URL N [WARMUP]   prints the timed loop's CPU seconds
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = (os.getenv("COMMPREFS_BUILD") or "build/lua5.4") .. "/?.so;" .. package.cpath
local commprefs = require "commprefs"
local base, n, warm = arg[1], tonumber(arg[2]), tonumber(arg[3] or "0")
local c = commprefs.new { token = "sim-token", base_url = base }
for _ = 1, warm do assert(c:get_unsubscribe_all_status("bench@example.com")) end
local t0 = os.clock()
for _ = 1, n do assert(c:get_unsubscribe_all_status("bench@example.com")) end
print(string.format("%.9f", os.clock() - t0))
c:close()
