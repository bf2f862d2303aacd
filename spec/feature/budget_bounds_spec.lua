-- Bounded waits (HOSTILE: the budget's wait obeyed without bound; 2^63-1 ms
-- inside nginx raised "invalid sleep duration"): whatever the shared budget
-- in Redis says, a backing waits at most one window and its margin, then
-- asks again. Both Redis backings, against a real redis-server.
local redis = require "support.redis"
local core = require "commprefs.core"

describe("a Redis budget holding an absurd wait", function()
  local r
  setup(function() r = redis.start {} end)
  teardown(function() redis.stop(r) end)

  local function poison(key)
    redis.cli(r, "HSET", "commprefs:{" .. key .. "}:limits", "blocked", "9223372036854775807")
  end

  it("the C backing (libcurl path) waits at most one window", function()
    poison("absurd-c")
    local g = assert(core.governor { redis_url = r.url, redis_key = "absurd-c" })
    local w = g:next()
    assert.is_true(w > 0 and w <= 10000 + core.budget_margin_ms(10000), tostring(w))
    g:close()
  end)

  it("the cosocket backing waits at most one window, and nginx never raises", function()
    poison("absurd-ngx")
    local nginx = require "support.nginx"
    local inst = nginx.start {}
    local status, body = nginx.run(inst, string.format([[
      local budget = require("commprefs.ngx.redis_budget").new { url = %q, key = "absurd-ngx" }
      local w = budget:acquire()
      return { w = w }
    ]], r.url))
    inst:stop()
    assert.equal(200, status, body)
    local w = require("cjson").decode(body).w
    assert.is_true(w > 0 and w <= 10000 + core.budget_margin_ms(10000), tostring(w))
  end)
end)
