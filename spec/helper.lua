-- spec/helper.lua: runs once per busted process. Stops the run in one line
-- when this checkout cannot serve nginx's workers from where it lives
-- (support.nginx.place_problem), puts the C core built for this VM on
-- package.cpath (COMMPREFS_BUILD picks another build, such as the sanitizer
-- one) and starts one simulator for the whole run.
local problem = require("support.nginx").place_problem()
if problem then
  io.stderr:write("commprefs specs cannot run here: ", problem, "\n")
  os.exit(1)
end
local vm = jit and "luajit" or "lua5.4"
package.cpath = (os.getenv("COMMPREFS_BUILD") or ("build/" .. vm)) .. "/?.so;" .. package.cpath
local sim = require "support.sim"
sim.start()
