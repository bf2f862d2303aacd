-- spec/hostile_spec.lua: commprefs (libcurl transport) against a hostile
-- loopback server (spec/support/hostile_server.lua): echoed tokens, wrong JSON
-- types, endless bodies, giant headers, a trickle, absurd rate headers and a
-- redirect. The cases live in spec/support/hostile.lua, so the cosocket
-- transport's specs run the very same ones (see the top of that file).
local hostile = require "support.hostile"

describe("against a hostile server (libcurl transport)", function()
  local srv
  setup(function() srv = hostile.start() end)
  teardown(function() hostile.stop(srv) end)

  for _, case in ipairs(hostile.CASES) do
    it(case.name, function()
      assert.equal("ok", hostile.run_case(case.name, srv.url))
    end)
  end
end)
