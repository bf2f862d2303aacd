-- The lua_shared_dict backing releases a ticket on every exit path of an
-- attempt (HOSTILE: a request killed during connect or TLS left its ticket
-- pending and stalled a later request for 20 s): a light thread killed
-- between start and sent does not hold up the next attempt.
local nginx = require "support.nginx"

describe("a shared_dict ticket whose attempt was killed", function()
  it("does not stall the next attempt", function()
    local inst = nginx.start { conf = "lua_shared_dict pace 1m;" }
    local status, body = nginx.run(inst, [[
      local core, pacer = require "commprefs.core", require "commprefs.pacer"
      local p = pacer.new(core.governor { rate_max = 1, rate_interval = 10 }, { shared_dict = "pace",
        rate_limit = { key = "killed" } })
      local t = ngx.thread.spawn(function()
        assert(p:start())   -- a ticket, pending
        ngx.sleep(30)       -- "connecting" when it is killed
      end)
      ngx.sleep(0.01)
      ngx.thread.kill(t)
      ngx.update_time()
      local t0 = ngx.now()
      local started = ngx.thread.spawn(function() return p:start() end)
      local timer = ngx.thread.spawn(function() ngx.sleep(3) return "stalled" end)
      local _, r = ngx.thread.wait(started, timer)
      ngx.update_time()
      return { result = tostring(r), seconds = ngx.now() - t0 }
    ]])
    inst:stop()
    assert.equal(200, status, body)
    local t = require("cjson").decode(body)
    -- ticket 2 of a 1-per-10 s window waits for ticket 1 while it is pending (it
    -- lands first); ticket 1's attempt is gone, so it is released and 2 goes at once
    assert.equal("true", t.result)
    assert.is_true(t.seconds < 1, tostring(t.seconds))
  end)
end)

-- A coalesced batch read takes its place in the dict's line before its turn
-- (Pacer:reserve, commprefs.lookup) and keeps gathering callers until then:
-- a later asker goes after it, and the place is given up when nobody is left.
describe("a reserved shared_dict place", function()
  it("keeps its turn against a later asker, and release() gives it up", function()
    local inst = nginx.start { conf = "lua_shared_dict pace 1m;" }
    local status, body = nginx.run(inst, [[
      local core, pacer = require "commprefs.core", require "commprefs.pacer"
      local function participant()
        return pacer.new(core.governor { rate_max = 10, rate_interval = 1 }, { shared_dict = "pace",
          rate_limit = { key = "line" } })
      end
      local a, b = participant(), participant()
      for _ = 1, 4 do assert(b:start()); b:sent() end -- the window's burst: the rest are spaced
      local order = {}
      local holder = ngx.thread.spawn(function()
        assert(a:reserve())          -- its place, taken now
        ngx.sleep(0.05)              -- gathering callers meanwhile
        assert(a:start()); order[#order + 1] = "a"; a:sent()
      end)
      ngx.sleep(0.01)
      local later = ngx.thread.spawn(function()
        assert(b:start()); order[#order + 1] = "b"; b:sent()
      end)
      ngx.thread.wait(holder); ngx.thread.wait(later)
      -- a place reserved and released holds nobody up
      local c = participant()
      local gone = ngx.thread.spawn(function() assert(c:reserve()); c:release() end)
      ngx.thread.wait(gone)
      ngx.update_time()
      local t0 = ngx.now()
      assert(b:start()); b:sent()
      ngx.update_time()
      return { order = table.concat(order, ","), after_release = ngx.now() - t0 }
    ]])
    inst:stop()
    assert.equal(200, status, body)
    local t = require("cjson").decode(body)
    assert.equal("a,b", t.order) -- without the reservation b (asking while a gathers) went first
    assert.is_true(t.after_release < 0.25, tostring(t.after_release)) -- one spacing (~102 ms), not a stall
  end)
end)
