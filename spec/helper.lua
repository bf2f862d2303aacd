-- spec/helper.lua: runs once per busted process. Puts the C core built for
-- this VM on package.cpath (COMMPREFS_BUILD picks another build, such as the
-- sanitizer one) and starts one simulator for the whole run.
local vm = jit and "luajit" or "lua5.4"
package.cpath = (os.getenv("COMMPREFS_BUILD") or ("build/" .. vm)) .. "/?.so;" .. package.cpath
local sim = require "support.sim"
sim.start()
