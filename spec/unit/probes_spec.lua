-- The review's probes (REVIEW.md appendix A) that are not cases of a shared
-- table elsewhere: A6 a bad Redis URL inside nginx, A7 the C core alone, A8
-- command arguments left as given. (A1, A2, A4: spec/contract/pacing_contract_spec.lua;
-- A3: spec/unit/ops_spec.lua; A5: spec/contract/transport_spec.lua.)
local sim = require "support.sim"

describe("review probes", function()
  it("A7: core.so alone returns nil, err for a Redis failure (no Lua module required)", function()
    local vm = sim.vm
    local build = os.getenv("COMMPREFS_BUILD") or ("build/" .. vm)
    local code = "package.path = '' package.cpath = '" .. build .. "/?.so;' .. package.cpath "
      .. "local core = require 'commprefs.core' "
      .. "local v, err = core.redis_connect('redis://127.0.0.1:1') "
      .. "io.write(tostring(v), '|', err.kind, '|', err.code, '|', tostring(err))"
    local f = io.popen((vm == "luajit" and "luajit" or "lua5.4") .. " -e \"" .. code .. "\" 2>&1")
    local out = f:read("*a")
    f:close()
    assert.matches("^nil|redis|connection|commprefs: redis: 127.0.0.1:1: cannot connect", out)
  end)

  it("A8: formatting a command leaves its arguments as they were", function()
    local core = require "commprefs.core"
    local args = { "EXPIRE", "k", 10 }
    core.redis_format(args)
    assert.equal("number", type(args[3]))
  end)

  it("A6: a bad Redis URL inside nginx raises at commprefs.new, not at the first call", function()
    local nginx = require "support.nginx"
    local inst = nginx.start {}
    local status, body = nginx.run(inst, [[
      local ok, err = pcall(require("commprefs").new, { token = "t", base_url = "http://127.0.0.1:9",
        rate_limit = { redis = "redis://h:notaport", key = "k" } })
      return { ok = ok, err = tostring(err) }
    ]])
    inst:stop()
    assert.equal(200, status, body)
    local t = require("cjson").decode(body)
    assert.is_false(t.ok)
    assert.matches("port", t.err)
    assert.is_nil(t.err:find("notaport", 1, true) and t.err:find("redis://", 1, true)) -- never the URL
  end)
end)
