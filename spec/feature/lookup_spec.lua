-- is_unsubscribed_from_all with the cache and coalesce options in plain Lua
-- (libcurl transport), against the simulator: option checks, hits, misses,
-- ttl, the in-process bound, errors never cached, and every change made
-- through commprefs updating the cached answer at once (the simulator's
-- request log shows which reads reached it). spec/feature/ngx_lookup_spec.lua covers
-- coalescing and the lua_shared_dict inside nginx.
local sim = require "support.sim"
local commprefs = require "commprefs"
local lookup = require "commprefs.lookup"

local function client(opts) return sim.client(opts) end

-- How many requests the simulator logged (only those with `method` if given).
local function reads(method)
  local n = 0
  for _, r in ipairs(sim.log()) do
    if not method or r.method == method then n = n + 1 end
  end
  return n
end

local function gets() return reads("GET") end

describe("is_unsubscribed_from_all with cache and coalesce (plain Lua)", function()
  before_each(function() sim.reset() end)

  describe("options", function()
    local bad = {
      { { coalesce = 0 }, "coalesce" }, { { coalesce = -1 }, "coalesce" }, { { coalesce = 2 }, "coalesce" },
      { { coalesce = "0.01" }, "coalesce" }, { { coalesce = 0 / 0 }, "coalesce" },
      { { cache = 60 }, "cache" }, { { cache = {} }, "cache.ttl" }, { { cache = { ttl = 0 } }, "cache.ttl" },
      { { cache = { ttl = -5 } }, "cache.ttl" }, { { cache = { ttl = "60" } }, "cache.ttl" },
      { { cache = { ttl = 1 / 0 } }, "cache.ttl" },
      { { cache = { ttl = 60, max_entries = 0 } }, "cache.max_entries" },
      { { cache = { ttl = 60, max_entries = 1.5 } }, "cache.max_entries" },
      { { cache = { ttl = 60, max_entries = "9" } }, "cache.max_entries" },
      { { cache = { ttl = 60, shared_dict = "" } }, "cache.shared_dict" },
      { { cache = { ttl = 60, shared_dict = "answers" } }, "needs OpenResty" },
      { { cache = { ttl = 60, size = 5 } }, "unknown field 'size'" },
    }
    for _, case in ipairs(bad) do
      it("raises on " .. case[2] .. " and sends nothing", function()
        local ok, err = pcall(client, case[1])
        assert.is_false(ok)
        assert.matches("commprefs.new: ", err, 1, true)
        assert.matches(case[2], err, 1, true)
        assert.equal(0, reads())
      end)
    end

    it("accepts coalesce in plain Lua: each call is still one GET with the same answers", function()
      local c = client { coalesce = 0.01 }
      assert(c:unsubscribe_all("gone@example.com"))
      assert.is_true(c:is_unsubscribed_from_all("gone@example.com"))
      assert.is_false(c:is_unsubscribed_from_all("here@example.com"))
      assert.is_false(c:is_unsubscribed_from_all("here@example.com"))
      assert.equal(3, gets())
      c:close()
    end)
  end)

  describe("cache", function()
    local c
    before_each(function() c = client { cache = { ttl = 60 } } end)
    after_each(function() c:close() end)

    it("answers a repeated read from the cache, per business unit", function()
      assert(client():unsubscribe_all("bu1@example.com", { business_unit_id = 1 }))
      for _ = 1, 3 do
        assert.is_false(c:is_unsubscribed_from_all("bu1@example.com"))
        assert.is_true(c:is_unsubscribed_from_all("bu1@example.com", { business_unit_id = 1 }))
        assert.is_false(c:is_unsubscribed_from_all("never@example.com"))
      end
      assert.equal(3, gets())
    end)

    it("never caches an error", function()
      for _ = 1, 2 do
        local ok, err = c:is_unsubscribed_from_all("not-an-email")
        assert.is_nil(ok)
        assert.equal("http", err.kind)
        assert.equal(400, err.status)
      end
      local failing = client { cache = { ttl = 60 }, max_retries = 0 }
      sim.fault { kind = "status", status = 503, match = "unsubscribe%-all" }
      local ok, err = failing:is_unsubscribed_from_all("flaky@example.com")
      assert.is_nil(ok)
      assert.equal(503, err.status)
      assert.is_false(failing:is_unsubscribed_from_all("flaky@example.com"))
      assert.is_false(failing:is_unsubscribed_from_all("flaky@example.com"))
      assert.equal(4, gets())
      failing:close()
    end)

    it("forgets answers after ttl", function()
      local short = client { cache = { ttl = 0.2 } }
      assert.is_false(short:is_unsubscribed_from_all("ttl@example.com"))
      assert.is_false(short:is_unsubscribed_from_all("ttl@example.com"))
      assert.equal(1, gets())
      require("socket").sleep(0.3)
      assert(client():unsubscribe_all("ttl@example.com"))
      assert.is_true(short:is_unsubscribed_from_all("ttl@example.com"))
      assert.equal(2, gets())
      short:close()
    end)

    it("holds at most max_entries answers (default " .. lookup.DEFAULT_MAX_ENTRIES .. ")", function()
      local small = client { cache = { ttl = 60, max_entries = 4 } }
      for i = 1, 20 do assert.is_false(small:is_unsubscribed_from_all("n" .. i .. "@example.com")) end
      assert.is_true(lookup.stats(small).cache_entries <= 4)
      assert.equal(20, gets())
      -- the most recent ones are still there, the first ones were dropped
      assert.is_false(small:is_unsubscribed_from_all("n20@example.com"))
      assert.equal(20, gets())
      assert.is_false(small:is_unsubscribed_from_all("n1@example.com"))
      assert.equal(21, gets())
      assert.equal(lookup.DEFAULT_MAX_ENTRIES, 10000)
      small:close()
    end)

    it("says true right after unsubscribe_all through the client, with no request", function()
      assert.is_false(c:is_unsubscribed_from_all("me@example.com"))
      assert(c:unsubscribe_all("me@example.com"))
      local before = reads()
      assert.is_true(c:is_unsubscribed_from_all("me@example.com"))
      assert.equal(before, reads())
      -- only in the business unit it changed
      assert.is_false(c:is_unsubscribed_from_all("me@example.com", { business_unit_id = 1 }))
      assert.equal(before + 1, reads())
    end)

    it("batch_unsubscribe_all and bulk_unsubscribe_all update the answers they change", function()
      local ids = { "a@example.com", "b@example.com", "c@example.com", "d@example.com" }
      for _, id in ipairs(ids) do assert.is_false(c:is_unsubscribed_from_all(id, { business_unit_id = 1 })) end
      assert(c:batch_unsubscribe_all({ ids[1], ids[2], "bad-id" }, { business_unit_id = 1 }))
      assert(c:bulk_unsubscribe_all({ ids[3] }, { business_unit_id = 1 }))
      local before = reads()
      for i = 1, 3 do assert.is_true(c:is_unsubscribed_from_all(ids[i], { business_unit_id = 1 })) end
      assert.is_false(c:is_unsubscribed_from_all(ids[4], { business_unit_id = 1 }))
      assert.equal(before, reads())
      -- the id HubSpot refused is not remembered as unsubscribed
      assert.is_nil((c:is_unsubscribed_from_all("bad-id", { business_unit_id = 1 })))
      assert.equal(before + 1, reads())
    end)

    it("a failed unsubscribe_all forgets the answer (HubSpot may have done it)", function()
      local once = client { cache = { ttl = 60 }, max_retries = 0 }
      assert.is_false(once:is_unsubscribed_from_all("maybe@example.com"))
      sim.fault { kind = "status", status = 500, match = "unsubscribe%-all" }
      assert.is_nil((once:unsubscribe_all("maybe@example.com")))
      local before = gets()
      assert.is_false(once:is_unsubscribed_from_all("maybe@example.com"))
      assert.equal(before + 1, gets())
      once:close()
    end)

    it("a status change that may resubscribe forgets the answer; an unsubscription keeps it", function()
      assert(c:unsubscribe_all("re@example.com"))
      assert.is_true(c:is_unsubscribed_from_all("re@example.com"))
      -- unsubscribing from one subscription does not change unsubscribe-all
      assert(c:update_status("re@example.com", { subscriptionId = 1002, statusState = "UNSUBSCRIBED" }))
      local before = gets()
      assert.is_true(c:is_unsubscribed_from_all("re@example.com"))
      assert.equal(before, gets())
      -- resubscribing lifts unsubscribe-all in the simulator (as in HubSpot): asked again
      assert(c:update_status("re@example.com", { subscriptionId = 1001, statusState = "SUBSCRIBED" }))
      assert.is_false(c:is_unsubscribed_from_all("re@example.com"))
      assert.equal(before + 1, gets())
      -- the same through batch_update_status, in business unit 1
      assert(c:unsubscribe_all("re1@example.com", { business_unit_id = 1 }))
      assert.is_true(c:is_unsubscribed_from_all("re1@example.com", { business_unit_id = 1 }))
      assert(c:batch_update_status({ { subscriberIdString = "re1@example.com", subscriptionId = 2001,
        statusState = "SUBSCRIBED" } }))
      assert.is_false(c:is_unsubscribed_from_all("re1@example.com", { business_unit_id = 1 }))
      assert.equal(before + 2, gets())
    end)

    it("a read that started before a change never overwrites what the change noted", function()
      local L = c._lookup
      local key = L.cache:key("race@example.com", nil)
      local started = require("commprefs.core").now()
      c:_cache_note("race@example.com", nil, true)
      L.cache:remember(key, false, started)
      assert.is_true(c:is_unsubscribed_from_all("race@example.com"))
      assert.equal(0, gets())
      -- a read that started after the change is remembered
      L.cache:remember(key, false, require("commprefs.core").now() + 0.001)
      assert.is_false(c:is_unsubscribed_from_all("race@example.com"))
    end)

    it("keys hold the API version, the business unit and the id, never the token", function()
      local key = c._lookup.cache:key("k@example.com", 1)
      assert.matches("2026-03", key, 1, true)
      assert.matches(":1:k@example.com$", key)
      assert.is_nil(key:find("sim-token", 1, true))
      local v4 = client { api_version = "v4", cache = { ttl = 60 } }
      assert.not_equal(key, v4._lookup.cache:key("k@example.com", 1))
      v4:close()
    end)
  end)
end)
