-- The pacing contract (support.pacing_cases) against all four backings: the
-- governor's window and the C Redis backing in this process, a
-- lua_shared_dict and Redis over cosockets inside a real nginx, all against
-- a real redis-server. One rule set: what may be learned, what a window set
-- by hand means, what a 429 and the daily limit do, when the day resets.
local cases = require "support.pacing_cases"
local redis = require "support.redis"
local nginx = require "support.nginx"
local cjson = require "cjson"

describe("the pacing contract", function()
  local r, inst
  setup(function()
    r = redis.start {}
    inst = nginx.start { conf = "lua_shared_dict pace 1m;" }
  end)
  teardown(function()
    if inst then inst:stop() end
    if r then redis.stop(r) end
  end)

  local n = 0
  local function globals()
    n = n + 1
    return string.format("local REDIS_URL, KEY = %q, %q\n", r.url, "contract" .. n .. "-" .. os.time())
  end

  local function in_process(backing, case)
    local chunk = assert((loadstring or load)(globals() .. cases.PRELUDE[backing] .. case.code))
    return chunk()
  end

  local function in_nginx(backing, case)
    local status, body = nginx.run(inst, globals() .. cases.PRELUDE[backing] .. case.code)
    assert.equal(200, status, body)
    return cjson.decode(body)
  end

  for _, backing in ipairs { "window", "redis_c", "shared_dict", "redis_ngx" } do
    local shared = backing ~= "window"
    local runner = (backing == "window" or backing == "redis_c") and in_process or in_nginx
    describe("over " .. backing, function()
      for _, case in ipairs(cases) do
        if shared or not case.shared then
          it(case.name, function() case.check(runner(backing, case), backing) end)
        end
      end
    end)
  end
end)
