-- commprefs against the local simulator: every operation over HTTP and
-- HTTPS, every error kind, every bad input (raising, nothing sent),
-- retries, chunking, integer types, awkward ids, TLS, secrecy of the token.
local sim = require "support.sim"
local cjson = require "cjson"
local commprefs = require "commprefs"

local TOKEN = "sim-token"
local is_int = math.type and function(v) return math.type(v) == "integer" end
  or function(v) return type(v) == "number" and v == math.floor(v) end

local function client(opts) return sim.client(opts, { token = TOKEN }) end

local function ids(n, prefix)
  local t = {}
  for i = 1, n do t[i] = (prefix or "user") .. i .. "@example.com" end
  return t
end

describe("commprefs", function()
  before_each(function() sim.reset() end)

  for _, transport in ipairs { "http", "https" } do
    describe("every operation over " .. transport, function()
      local c
      before_each(function()
        c = transport == "http" and client() or client { base_url = sim.tls_url, ca_file = sim.ca_file }
      end)
      after_each(function() c:close() end)

      it("get_unsubscribe_all_status: empty for a contact never opted out", function()
        local env = assert(c:get_unsubscribe_all_status("never@example.com"))
        assert.equal("COMPLETE", env.status)
        assert.same({}, env.results)
      end)

      it("unsubscribe_all then get_unsubscribe_all_status", function()
        assert.same({}, assert(c:unsubscribe_all("one@example.com")))
        local env = assert(c:get_unsubscribe_all_status("one@example.com"))
        assert.equal("UNSUBSCRIBED", env.results[1].status)
        assert.equal("PORTAL_WIDE", env.results[1].wideStatusType)
        local verbose = assert(c:unsubscribe_all("one@example.com", { verbose = true }))
        assert.equal("NO_STATUS_CHANGE", verbose.results[1].setStatusSuccessReason)
      end)

      it("batch_unsubscribe_all reports the change once", function()
        local env = assert(c:batch_unsubscribe_all({ "a@example.com", "b@example.com" }))
        assert.equal(2, #env.results)
        assert.equal("UNSUBSCRIBE_FROM_ALL_OCCURRED", env.results[1].statuses[1].setStatusSuccessReason)
        env = assert(c:batch_unsubscribe_all({ "a@example.com" }))
        assert.equal("NO_STATUS_CHANGE", env.results[1].statuses[1].setStatusSuccessReason)
      end)

      it("batch_get_unsubscribe_all_status", function()
        assert(c:unsubscribe_all("w@example.com"))
        local env = assert(c:batch_get_unsubscribe_all_status({ "w@example.com", "x@example.com" }))
        assert.equal("UNSUBSCRIBED", env.results[1].wideStatuses[1].status)
        assert.same({}, env.results[2].wideStatuses)
      end)

      it("get_status and update_status", function()
        local env = assert(c:get_status("s@example.com"))
        assert.equal(3, #env.results)
        local up = assert(c:update_status("s@example.com", { subscriptionId = 1002, statusState = "SUBSCRIBED",
          legalBasis = "CONSENT_WITH_NOTICE", legalBasisExplanation = "asked" }))
        assert.equal("REQUESTED_CHANGE_OCCURRED", up.results[1].setStatusSuccessReason)
        env = assert(c:get_status("s@example.com"))
        assert.equal("SUBSCRIBED", env.results[2].status)
      end)

      it("batch_get_status and batch_update_status", function()
        local w = assert(c:batch_update_status({
          { subscriberIdString = "m@example.com", subscriptionId = 1001, statusState = "UNSUBSCRIBED" },
          { subscriberIdString = "n@example.com", subscriptionId = 1001, statusState = "SUBSCRIBED" },
        }))
        assert.equal(2, #w.results)
        local r = assert(c:batch_get_status({ "m@example.com", "n@example.com" }))
        assert.equal("UNSUBSCRIBED", r.results[1].statuses[1].status)
        assert.equal("SUBSCRIBED", r.results[2].statuses[1].status)
      end)

      it("get_definitions, per business unit and with translations", function()
        local env = assert(c:get_definitions())
        assert.equal(3, #env.results)
        assert.equal("1001", env.results[1].id)
        env = assert(c:get_definitions({ business_unit_id = 1, include_translations = true }))
        assert.equal(1, #env.results)
        assert.is_true(is_int(env.results[1].subscriptionTranslations[1].createdAt))
      end)

      it("generate_links", function()
        local r = assert(c:generate_links({ subscriberIdString = "l@example.com", subscriptionId = 1001 }))
        assert.equal("l@example.com", r.subscriberIdString)
        assert.matches("^https://", r.unsubscribeAllUrl)
      end)

      if transport == "https" then
        it("speaks HTTP/2 over TLS", function()
          assert(c:get_status("h2@example.com"))
          assert.equal("HTTP/2.0", sim.log()[1].http)
        end)
      end

      it("is_unsubscribed_from_all", function()
        assert.is_false(c:is_unsubscribed_from_all("h@example.com"))
        assert(c:unsubscribe_all("h@example.com"))
        assert.is_true(c:is_unsubscribed_from_all("h@example.com"))
      end)
    end)
  end

  describe("requests on the wire", function()
    it("always sends channel=EMAIL, the business unit and verbose as given", function()
      local c = client { business_unit_id = 1 }
      assert(c:get_unsubscribe_all_status("q@example.com", { verbose = true }))
      assert(c:get_unsubscribe_all_status("q@example.com", { business_unit_id = 0 }))
      local log = sim.log()
      assert.equal("channel=EMAIL&businessUnitId=1&verbose=true", log[1].query)
      assert.equal("channel=EMAIL&businessUnitId=0", log[2].query)
      assert.equal("application/json", log[1].headers.accept)
    end)

    it("uses the v4 prefix when asked", function()
      local c = client { api_version = "v4" }
      assert(c:get_status("v@example.com"))
      assert.equal("/communication-preferences/v4/statuses/v%40example.com", sim.log()[1].path)
    end)

    it("percent-encodes ids so the server decodes exactly the id", function()
      local c = client()
      local awkward = { "a+b@example.com", "sl/ash@example.com", "q?x=1@example.com", "h#sh@example.com",
        "pc%41@example.com", "sp ace@example.com", "quo\"te'@example.com", "ünïcødé@exämple.com" }
      for _, id in ipairs(awkward) do assert(c:unsubscribe_all(id)) end
      local state = sim.state()
      for _, id in ipairs(awkward) do
        assert.is_not_nil(state[id], id)
        local env = assert(c:get_unsubscribe_all_status(id))
        assert.equal(id, env.results[1].subscriberIdString)
      end
      assert.equal(sim.log()[1].path, "/communication-preferences/2026-03/statuses/a%2Bb%40example.com/unsubscribe-all")
      -- dot-segments are escaped whole, so no server resolves them away
      assert.equal("%2E%2E", commprefs.core.escape(".."))
      assert.equal("a.b%40x.com", commprefs.core.escape("a.b@x.com"))
      -- and in a batch body
      local env = assert(c:batch_get_unsubscribe_all_status(awkward))
      for i, id in ipairs(awkward) do assert.equal(id, env.results[i].subscriberIdString) end
    end)

    it("keeps one connection alive across calls", function()
      local c = client()
      for _ = 1, 5 do assert(c:get_status("k@example.com")) end
      assert.equal(5, c:stats().sent)
      -- the simulator's log shows one client port for all five
      local log = sim.log()
      assert.equal(5, #log)
      for i = 2, 5 do assert.equal(log[1].port, log[i].port) end
    end)
  end)

  describe("integers and nulls", function()
    it("returns integer fields as Lua integers", function()
      local c = client()
      local env = assert(c:batch_get_status({ "i@example.com", "bad id" }))
      assert.is_true(is_int(env.numErrors))
      assert.is_true(is_int(env.results[1].statuses[1].subscriptionId))
      assert.is_true(is_int(env.results[1].statuses[1].businessUnitId))
    end)
    it("decodes with its own cjson: a user's settings do not leak in", function()
      local user = require "cjson"
      user.decode_max_depth(1)
      local c = client()
      local ok, env = pcall(c.get_status, c, "d@example.com")
      user.decode_max_depth(1000)
      assert.is_true(ok)
      assert.equal(3, #env.results)
    end)
    it("drops JSON nulls and keeps exact integers", function()
      local v = commprefs.core.decode('{"a":null,"businessUnitId":12,"list":[1,null,3],"x":1.5}')
      assert.is_nil(v.a)
      assert.is_true(is_int(v.businessUnitId))
      assert.is_nil(v.list[2])
      assert.equal(1.5, v.x)
      local none, err = commprefs.core.decode('{"subscriptionId":18014398509481985}')
      assert.is_nil(none)
      assert.matches("subscriptionId is not an exact integer", err)
    end)
  end)

  describe("batches", function()
    it("splits 2.5 x the limit into requests of at most 100 and covers every id once", function()
      local c = client { max_concurrency = 2 }
      local list = ids(250)
      local env = assert(c:batch_unsubscribe_all(list))
      assert.equal(250, #env.results)
      local seen = {}
      for _, r in ipairs(env.results) do
        assert.is_nil(seen[r.subscriberIdString])
        seen[r.subscriberIdString] = true
      end
      for _, id in ipairs(list) do assert.is_true(seen[id]) end
      local log = sim.log()
      assert.equal(3, #log)
      local sent = 0
      for _, entry in ipairs(log) do
        local n = #cjson.decode(entry.body).inputs
        assert.is_true(n <= 100)
        sent = sent + n
      end
      assert.equal(250, sent)
    end)

    it("merges per-item errors of every request", function()
      local c = client { batch_size = 2 }
      local env = assert(c:batch_get_unsubscribe_all_status({ "a@example.com", "bad1", "b@example.com", "bad2" }))
      assert.equal(2, env.numErrors)
      assert.equal(2, #env.errors)
      assert.equal(2, #env.results)
    end)

    it("sends a duplicated id once", function()
      local c = client()
      local env = assert(c:batch_unsubscribe_all({ "d@example.com", "d@example.com", "e@example.com" }))
      assert.equal(2, #env.results)
      assert.same({ "d@example.com", "e@example.com" }, cjson.decode(sim.log()[1].body).inputs)
    end)

    it("sends nothing for an empty list", function()
      local c = client()
      local env = assert(c:batch_unsubscribe_all({}))
      assert.same({}, env.results)
      assert.equal("COMPLETE", env.status)
      assert.same({}, sim.log())
    end)

    it("reports which inputs a failed request did not process", function()
      local c = client { batch_size = 2, max_retries = 0 }
      sim.fault { kind = "status", status = 500, match = "batch" }
      local env, err = c:batch_unsubscribe_all({ "a@example.com", "b@example.com", "c@example.com" })
      assert.is_nil(env)
      assert.equal(500, err.status)
      assert.equal(1, #err.partial.results)
      assert.same({ "a@example.com", "b@example.com" }, err.failed_inputs)
    end)
  end)

  describe("errors", function()
    it("http: HubSpot's error body becomes the Error", function()
      local c = client { token = "sim-read-only" }
      local env, err = c:unsubscribe_all("p@example.com")
      assert.is_nil(env)
      assert.is_true(commprefs.Error.is(err))
      assert.equal("http", err.kind)
      assert.equal(403, err.status)
      assert.is_true(is_int(err.status))
      assert.equal("MISSING_SCOPES", err.category)
      assert.is_string(err.correlation_id)
      assert.is_table(err.context.requiredGranularScopes)
      assert.equal(1, err.attempts)
      assert.equal("POST", err.method)
      assert.matches("403 MISSING_SCOPES", tostring(err))
      assert.same({}, sim.state())
    end)

    it("http: a non-JSON error page gives the status and a snippet", function()
      local c = client { max_retries = 0 }
      sim.fault { kind = "html" }
      local _, err = c:get_status("p@example.com")
      assert.equal("http", err.kind)
      assert.equal(502, err.status)
      assert.matches("502 Bad Gateway", err.message)
    end)

    it("network: nothing listening", function()
      local c = client { base_url = "http://127.0.0.1:1", max_retries = 1 }
      local _, err = c:get_status("p@example.com")
      assert.equal("network", err.kind)
      assert.equal(2, err.attempts)
    end)

    it("network: connection cut mid-body, retried", function()
      local c = client { max_retries = 0 }
      sim.fault { kind = "reset" }
      local _, err = c:get_status("p@example.com")
      assert.equal("network", err.kind)
      sim.fault { kind = "reset" }
      local env = assert(client():get_status("p@example.com"))
      assert.equal(3, #env.results)
    end)

    it("timeout: a body that never finishes", function()
      local c = client { timeout = 0.3, max_retries = 0 }
      sim.fault { kind = "hang", seconds = 3 }
      local _, err = c:get_status("p@example.com")
      assert.equal("timeout", err.kind)
    end)

    it("tls: a self-signed server without ca_file", function()
      local c = client { base_url = sim.tls_url }
      local _, err = c:get_status("p@example.com")
      assert.equal("tls", err.kind)
      assert.equal(1, err.attempts)
      assert.same({}, sim.log())
    end)

    it("tls verification can be turned off explicitly", function()
      local c = client { base_url = sim.tls_url, verify_tls = false }
      assert(c:get_status("p@example.com"))
    end)

    for _, kind in ipairs { "truncated", "malformed", "content_type" } do
      it("decode: " .. kind .. " body", function()
        local c = client()
        sim.fault { kind = kind }
        local _, err = c:get_status("p@example.com")
        assert.equal("decode", err.kind)
        assert.equal(200, err.status)
        assert.matches("HTTP 200", err.message)
      end)
    end
  end)

  describe("retries", function()
    it("retries 5xx and 429 and succeeds", function()
      local c = client { max_retries = 3 }
      sim.fault { kind = "status", status = 503 }
      sim.fault { kind = "429", retry_after = 0 }
      sim.fault { kind = "html", status = 504 }
      local env = assert(c:get_status("r@example.com"))
      assert.equal(3, #env.results)
      assert.equal(4, #sim.log())
      assert.equal(3, c:stats().retries)
    end)

    it("gives up after max_retries with the attempt count", function()
      local c = client { max_retries = 2 }
      sim.fault { kind = "status", status = 500, count = 10 }
      local _, err = c:get_status("r@example.com")
      assert.equal(500, err.status)
      assert.equal(3, err.attempts)
      assert.equal(3, #sim.log())
    end)

    it("honours Retry-After", function()
      local socket = require "socket"
      local c = client { max_retries = 1 }
      sim.fault { kind = "429", retry_after = 1 }
      local t0 = socket.gettime()
      assert(c:get_status("r@example.com"))
      assert.is_true(socket.gettime() - t0 >= 0.95)
      local log = sim.log()
      assert.is_true(log[2].time - log[1].time >= 0.95)
    end)

    it("does not retry other 4xx", function()
      local c = client { max_retries = 3, token = "bogus" }
      local _, err = c:get_status("r@example.com")
      assert.equal(401, err.status)
      assert.equal(1, #sim.log())
    end)

    it("does not retry a Retry-After beyond max_retry_after, and reports it", function()
      local c = client { max_retries = 3, max_retry_after = 5 }
      sim.fault { kind = "429", retry_after = 30 }
      local _, err = c:get_status("r@example.com")
      assert.equal(429, err.status)
      assert.equal(30, err.retry_after)
      assert.equal(1, #sim.log())
    end)
  end)

  describe("bad input raises and sends nothing", function()
    local c
    before_each(function() c = client() end)
    local cases = {
      { "get_unsubscribe_all_status", { nil }, "'id' %(string expected, got nil%)" },
      { "get_unsubscribe_all_status", { "" }, "'id' %(empty string%)" },
      { "get_unsubscribe_all_status", { 42 }, "string expected, got number" },
      { "get_unsubscribe_all_status", { "a@x.com\r\nX-Evil: 1" }, "control characters" },
      { "get_unsubscribe_all_status", { "a@x.com\0" }, "control characters" },
      { "get_unsubscribe_all_status", { "a@x.com", { business_unit_id = 1.5 } }, "integer expected" },
      { "get_unsubscribe_all_status", { "a@x.com", { business_unit_id = "1" } }, "integer expected" },
      { "get_unsubscribe_all_status", { "a@x.com", { bogus = true } }, "unknown option 'bogus'" },
      { "get_unsubscribe_all_status", { "a@x.com", { verbose = "yes" } }, "boolean expected" },
      { "get_status", { "a@x.com", { verbose = true } }, "unknown option 'verbose'" },
      { "batch_unsubscribe_all", { "a@x.com" }, "'ids' %(table expected" },
      { "batch_unsubscribe_all", { { "a@x.com", 5 } }, "ids%[2%]" },
      { "batch_unsubscribe_all", { { "a@x.com", "b\n@x.com" } }, "control characters" },
      { "batch_unsubscribe_all", { { x = "a@x.com" } }, "array expected" },
      { "batch_get_unsubscribe_all_status", { { "" } }, "empty string" },
      { "batch_get_status", { nil }, "table expected" },
      { "update_status", { "a@x.com", { subscriptionId = 1001 } }, "statusState is required" },
      { "update_status", { "a@x.com", { subscriptionId = "1001", statusState = "SUBSCRIBED" } }, "integer expected" },
      { "update_status", { "a@x.com", { subscriptionId = 1001, statusState = "MAYBE" } }, "MAYBE is not allowed" },
      { "batch_update_status", { { { subscriptionId = 1, statusState = "SUBSCRIBED" } } }, "subscriberIdString is required" },
      { "generate_links", { {} }, "request.subscriberIdString" },
      { "get_definitions", { { include_translations = 1 } }, "boolean expected" },
      { "is_unsubscribed_from_all", { false }, "string expected" },
    }
    for _, case in ipairs(cases) do
      it(case[1] .. " " .. case[3], function()
        local ok, err = pcall(c[case[1]], c, (table.unpack or unpack)(case[2], 1, 2))
        assert.is_false(ok)
        assert.matches("commprefs%." .. case[1] .. ": ", err)
        assert.matches(case[3], err)
        assert.same({}, sim.log())
      end)
    end

    local new_cases = {
      { { token = "tok\r\nX-Evil: 1" }, "control characters" },
      { { token = "" }, "empty string" },
      { { token = "a b" }, "contains spaces" },
      { { token = 5 }, "string expected, got number" },
      { { base_url = "ftp://x" }, "http:// or https://" },
      { { api_version = "v3" }, "api_version" },
      { { business_unit_id = 0.5 }, "integer expected" },
      { { batch_size = 0 }, "batch_size" },
      { { max_concurrency = 0 }, "max_concurrency" },
      { { timeout = -1 }, "timeout" },
      { { wat = 1 }, "unknown option 'wat'" },
    }
    for _, case in ipairs(new_cases) do
      it("new " .. case[2], function()
        local o = { token = TOKEN, base_url = sim.url }
        for k, v in pairs(case[1]) do o[k] = v end
        local ok, err = pcall(commprefs.new, o)
        assert.is_false(ok)
        assert.matches("commprefs%.new: ", err)
        assert.matches(case[2], err)
        assert.is_nil(err:find("tok\r\n", 1, true))
      end)
    end
  end)

  describe("the token stays secret", function()
    it("in tostring(client), errors, pretty and the simulator's log", function()
      local c = client()
      assert.is_nil(tostring(c):find(TOKEN, 1, true))
      assert.matches(sim.url, tostring(c), 1, true)
      assert.is_nil(commprefs.pretty(c):find(TOKEN, 1, true))
      local texts = {}
      sim.fault { kind = "html" }
      local _, e1 = client { max_retries = 0 }:get_status("t@example.com")
      local _, e2 = client { base_url = "http://127.0.0.1:1", max_retries = 0 }:get_status("t@example.com")
      local _, e3 = client { token = "sim-read-only" }:unsubscribe_all("t@example.com")
      local env = assert(c:batch_unsubscribe_all({ "t@example.com", "bad" }))
      for _, v in ipairs { e1, e2, e3 } do
        texts[#texts + 1] = tostring(v)
        texts[#texts + 1] = commprefs.pretty(v)
      end
      texts[#texts + 1] = commprefs.pretty(env)
      texts[#texts + 1] = cjson.encode(sim.log())
      for _, t in ipairs(texts) do assert.is_nil(t:find(TOKEN, 1, true), t) end
    end)

    it("refuses credentials in base_url at new, without echoing them", function()
      local ok, err = pcall(client, { base_url = "http://user:pw@127.0.0.1:1", max_retries = 0 })
      assert.is_false(ok)
      assert.is_nil(tostring(err):find("pw", 1, true))
    end)
  end)

  describe("the client object", function()
    it("close is safe twice, and a closed client raises", function()
      local c = client()
      c:close()
      c:close()
      assert.has_error(function() c:get_status("a@example.com") end, "commprefs: the client is closed")
    end)

    if _VERSION == "Lua 5.4" and not jit then
      it("closes as a to-be-closed variable", function()
        local chunk = load([[
          local commprefs, o = ...
          local kept
          do
            local c <close> = commprefs.new(o)
            kept = c
          end
          return kept
        ]])
        local kept = chunk(commprefs, { token = TOKEN, base_url = sim.url })
        assert.has_error(function() kept:get_status("a@example.com") end, "commprefs: the client is closed")
      end)
    end

    it("loads the core twice safely", function()
      local first = require "commprefs.core"
      package.loaded["commprefs.core"] = nil
      local second = require "commprefs.core"
      assert.are_not.equal(first, second)
      local a = first.new { token = TOKEN }
      local b = second.new { token = TOKEN }
      a:close(); b:close()
      assert.equal("%41", second.escape("A"):gsub("A", "%%41"))
    end)

    it("a callback cannot re-enter its own client", function()
      local c = client()
      local ok, err = pcall(c._curl.perform, c._curl, { { method = "GET", url = sim.url .. "/__sim/health" } },
        function() c:get_status("a@example.com") end)
      assert.is_false(ok)
      assert.matches("busy", err)
      assert(c:get_status("a@example.com"))
    end)
  end)
end)

-- The expectations every transport meets, shared with spec/contract/ngx_transport_spec.lua
-- (which runs the same cases inside nginx over cosockets).
describe("commprefs over libcurl meets every shared expectation", function()
  local expectations = require "support.expectations"
  before_each(function() sim.reset() end)
  for _, case in ipairs(expectations.cases) do
    it(case.name, function()
      if case.setup then case.setup(sim) end
      case.check(expectations.run_curl(case, sim), sim, "curl")
    end)
  end
end)
