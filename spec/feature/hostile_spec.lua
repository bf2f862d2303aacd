-- spec/feature/hostile_spec.lua: commprefs against a hostile loopback server
-- (spec/support/hostile_server.lua): echoed tokens, wrong JSON types, endless
-- bodies, giant headers, a trickle, absurd rate headers and a redirect. The
-- cases live in spec/support/hostile.lua and run here twice: through the
-- libcurl transport in this process, and through the cosocket transport inside
-- a real nginx (support.nginx, which puts spec/ on nginx's Lua path).
local hostile = require "support.hostile"
local nginx = require "support.nginx"

describe("against a hostile server", function()
  local srv
  setup(function() srv = hostile.start() end)
  teardown(function() hostile.stop(srv) end)

  describe("the libcurl transport", function()
    for _, case in ipairs(hostile.CASES) do
      it(case.name, function()
        assert.equal("ok", hostile.run_case(case.name, srv.url))
      end)
    end
  end)

  describe("the cosocket transport inside nginx", function()
    local inst
    setup(function() inst = nginx.start {} end)
    teardown(function() if inst then nginx.stop(inst) end end)
    for _, case in ipairs(hostile.CASES) do
      it(case.name, function()
        local status, body = nginx.run(inst, ('return require("support.hostile").run_case(%q, %q, { transport = "ngx" })')
          :format(case.name, srv.url))
        assert.equal(200, status, body)
        assert.equal("ok", body)
      end)
    end
  end)
end)
