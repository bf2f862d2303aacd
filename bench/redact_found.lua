-- bench/redact_found.lua: the CPU of commprefs.redact's check of one answer
-- body (redact.found: the quick check, core.suspects, and nothing else when
-- the body holds no piece), with a 9- and a 40-character secret remembered;
-- for before/after comparisons of the quick check and for callgrind:
--   lua5.4 bench/redact_found.lua [ROOT] [N] [REP]
-- ROOT: a checkout whose lua/ and build/lua5.4/ are used (default .); N
-- calls (default 1e6); REP: the body repeated REP times (default 1, 96 bytes).
local root, n, rep = arg[1] or ".", tonumber(arg[2] or "1000000"), tonumber(arg[3] or "1")
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/lua5.4/?.so;" .. package.cpath
local redact = require "commprefs.redact"
local owner = {}
redact.remember_secret(owner, "sim-token")
redact.remember_secret(owner, "pat-na1-Zf3eQa1x7B2c-4d5e-ABCD-90aBcDeF12")
local body = ('{"results":[{"subscriberIdString":"bench@example.com","status":"SUBSCRIBED","channel":"EMAIL"}]}'):rep(rep)
assert(not redact.found(body) and redact.found(body .. "SIM-TOKEN"))
local found = redact.found
for _ = 1, 1000 do found(body) end
local t0 = os.clock()
for _ = 1, n do found(body) end
local t = os.clock() - t0
print(("%s: %d x redact.found(%d-byte body): %.3f s, %.0f ns a call"):format(root, n, #body, t, t / n * 1e9))
