-- The simulator itself, spoken to with raw HTTP (luasocket), not commprefs:
-- every operation's body against HubSpot's schema, every check, every fault.
local sim = require "support.sim"
local schema = require "support.schema"
local cjson = require "cjson"
local http = require "socket.http"
local socket = require "socket"

local P = "/communication-preferences/2026-03/"
local DOC = "/communication-preferences/2026-03/"

local function json(body) return cjson.decode(body) end

describe("simulator", function()
  before_each(function() sim.reset() end)

  describe("every operation validates against the OpenAPI schema", function()
    -- method, path (as sent), path in the document, body, expected status
    local ops = {
      { "GET", "definitions?includeTranslations=true", "definitions" },
      { "POST", "links/generate?channel=EMAIL", "links/generate", '{"subscriberIdString":"a@x.com","subscriptionId":1001}' },
      { "GET", "statuses/a%40x.com?channel=EMAIL", "statuses/{subscriberIdString}" },
      { "POST", "statuses/a%40x.com", "statuses/{subscriberIdString}",
        '{"channel":"EMAIL","subscriptionId":1001,"statusState":"UNSUBSCRIBED","legalBasis":"NON_GDPR"}' },
      { "POST", "statuses/batch/read?channel=EMAIL", "statuses/batch/read", '{"inputs":["a@x.com","b@x.com"]}' },
      { "POST", "statuses/batch/read?channel=EMAIL", "statuses/batch/read", '{"inputs":["a@x.com","bad"]}', 207 },
      { "POST", "statuses/batch/write", "statuses/batch/write",
        '{"inputs":[{"subscriberIdString":"a@x.com","channel":"EMAIL","subscriptionId":1002,"statusState":"SUBSCRIBED"}]}' },
      { "POST", "statuses/batch/unsubscribe-all?channel=EMAIL&verbose=true", "statuses/batch/unsubscribe-all", '{"inputs":["c@x.com"]}' },
      { "POST", "statuses/batch/unsubscribe-all/read?channel=EMAIL", "statuses/batch/unsubscribe-all/read", '{"inputs":["c@x.com","d@x.com"]}' },
      { "POST", "statuses/batch/unsubscribe-all/read?channel=EMAIL", "statuses/batch/unsubscribe-all/read", '{"inputs":["c@x.com","nope"]}', 207 },
      { "GET", "statuses/c%40x.com/unsubscribe-all?channel=EMAIL", "statuses/{subscriberIdString}/unsubscribe-all" },
      { "GET", "statuses/new%40x.com/unsubscribe-all?channel=EMAIL&verbose=true", "statuses/{subscriberIdString}/unsubscribe-all" },
      { "POST", "statuses/e%40x.com/unsubscribe-all?channel=EMAIL&verbose=true", "statuses/{subscriberIdString}/unsubscribe-all" },
    }
    for _, prefix in ipairs { "2026-03", "v4" } do
      for _, op in ipairs(ops) do
        local method, path, docpath, body, want = op[1], op[2], op[3], op[4], op[5] or 200
        it(prefix .. " " .. method .. " " .. path .. " -> " .. want, function()
          local code, text = sim.raw(method, "/communication-preferences/" .. prefix .. "/" .. path, { body = body })
          assert.equal(want, code, text)
          local name = schema.response_schema(DOC .. docpath, method, want)
          local ok, err = schema.validate(text, name)
          assert.is_true(ok, name .. ": " .. tostring(err) .. "\n" .. text)
        end)
      end
    end

    it("error answers validate against Error", function()
      local cases = {
        { "GET", P .. "statuses/a%40x.com?channel=EMAIL", { token = false } },
        { "POST", P .. "statuses/batch/unsubscribe-all?channel=EMAIL", { token = "sim-read-only", body = '{"inputs":["a@x.com"]}' } },
        { "GET", P .. "statuses/a%40x.com?channel=SMS", {} },
      }
      for _, c in ipairs(cases) do
        local code, text = sim.raw(c[1], c[2], c[3])
        assert.is_true(code >= 400)
        assert.is_true(schema.validate(text, "Error"))
      end
    end)

    it("POST unsubscribe-all without verbose answers 200 with an empty body", function()
      local code, text = sim.raw("POST", P .. "statuses/f%40x.com/unsubscribe-all?channel=EMAIL")
      assert.equal(200, code)
      assert.equal("", text)
    end)
  end)

  describe("state", function()
    it("reports UNSUBSCRIBE_FROM_ALL_OCCURRED once, then NO_STATUS_CHANGE", function()
      local body = '{"inputs":["g@x.com"]}'
      local _, t1 = sim.raw("POST", P .. "statuses/batch/unsubscribe-all?channel=EMAIL", { body = body })
      local _, t2 = sim.raw("POST", P .. "statuses/batch/unsubscribe-all?channel=EMAIL", { body = body })
      assert.equal("UNSUBSCRIBE_FROM_ALL_OCCURRED", json(t1).results[1].statuses[1].setStatusSuccessReason)
      assert.equal("NO_STATUS_CHANGE", json(t2).results[1].statuses[1].setStatusSuccessReason)
      assert.same({ ["0"] = json(t1).results[1].statuses[1].timestamp }, sim.state()["g@x.com"].wide)
    end)

    it("gives empty results for a contact never opted out, and its wide status with verbose", function()
      local _, t = sim.raw("GET", P .. "statuses/h%40x.com/unsubscribe-all?channel=EMAIL")
      assert.same({}, json(t).results)
      local _, v = sim.raw("GET", P .. "statuses/h%40x.com/unsubscribe-all?channel=EMAIL&verbose=true")
      assert.equal("NOT_SPECIFIED", json(v).results[1].status)
      assert.equal("PORTAL_WIDE", json(v).results[1].wideStatusType)
    end)

    it("keeps business units apart", function()
      sim.raw("POST", P .. "statuses/i%40x.com/unsubscribe-all?channel=EMAIL&businessUnitId=1")
      local _, t0 = sim.raw("GET", P .. "statuses/i%40x.com/unsubscribe-all?channel=EMAIL")
      local _, t1 = sim.raw("GET", P .. "statuses/i%40x.com/unsubscribe-all?channel=EMAIL&businessUnitId=1")
      assert.same({}, json(t0).results)
      assert.equal("BUSINESS_UNIT_WIDE", json(t1).results[1].wideStatusType)
      local _, defs = sim.raw("GET", P .. "definitions?businessUnitId=1")
      assert.equal(1, #json(defs).results)
    end)

    it("decodes the path segment exactly (+ stays +, %2F is a slash inside the id)", function()
      sim.raw("POST", P .. "statuses/a%2Bb%2Fc%40x.com/unsubscribe-all?channel=EMAIL")
      assert.is_not_nil(sim.state()["a+b/c@x.com"])
    end)
  end)

  describe("checks", function()
    local function expect(code, category, method, path, opts)
      local c, text = sim.raw(method, P .. path, opts)
      assert.equal(code, c, text)
      local e = json(text)
      assert.equal(category, e.category)
      assert.truthy(e.correlationId:match("^%x+%-%x+%-4%x+%-%x+%-%x+$"))
      return e
    end
    it("401 without a token", function() expect(401, "INVALID_AUTHENTICATION", "GET", "definitions", { token = false }) end)
    it("401 with an unknown token", function() expect(401, "INVALID_AUTHENTICATION", "GET", "definitions", { token = "bogus" }) end)
    it("403 names the missing scopes in context", function()
      local e = expect(403, "MISSING_SCOPES", "POST", "statuses/batch/unsubscribe-all?channel=EMAIL",
        { token = "sim-read-only", body = '{"inputs":["a@x.com"]}' })
      assert.same({ "communication_preferences.statuses.batch.write" }, e.context.requiredGranularScopes)
    end)
    it("read-only token may read", function()
      assert.equal(200, (sim.raw("GET", P .. "statuses/a%40x.com/unsubscribe-all?channel=EMAIL", { token = "sim-read-only" })))
    end)
    it("400 without channel", function() expect(400, "VALIDATION_ERROR", "GET", "statuses/a%40x.com/unsubscribe-all") end)
    it("400 with a wrong channel", function() expect(400, "VALIDATION_ERROR", "GET", "statuses/a%40x.com?channel=SMS") end)
    it("400 with a non-integer businessUnitId", function()
      expect(400, "VALIDATION_ERROR", "GET", "statuses/a%40x.com?channel=EMAIL&businessUnitId=1.5")
    end)
    it("400 with malformed JSON", function()
      expect(400, "VALIDATION_ERROR", "POST", "statuses/batch/read?channel=EMAIL", { body = '{"inputs":[' })
    end)
    it("400 without inputs", function()
      expect(400, "VALIDATION_ERROR", "POST", "statuses/batch/read?channel=EMAIL", { body = '{}' })
    end)
    it("400 with more than 100 inputs, and the maximum is configurable", function()
      local ids = {}
      for i = 1, 101 do ids[i] = "u" .. i .. "@x.com" end
      local body = cjson.encode { inputs = ids }
      local e = expect(400, "VALIDATION_ERROR", "POST", "statuses/batch/unsubscribe-all?channel=EMAIL", { body = body })
      assert.matches("maximum is 100", e.message)
      assert.same({}, sim.state())
      sim.admin("POST", "config", { max_batch = 200 })
      assert.equal(200, (sim.raw("POST", P .. "statuses/batch/unsubscribe-all?channel=EMAIL", { body = body })))
    end)
    it("207 with per-item errors for invalid ids in a batch read", function()
      local c, text = sim.raw("POST", P .. "statuses/batch/unsubscribe-all/read?channel=EMAIL", { body = '{"inputs":["ok@x.com","nope"]}' })
      assert.equal(207, c)
      assert.equal(1, json(text).numErrors)
      assert.same({ "nope" }, json(text).errors[1].context.subscriberIdString)
    end)
    it("404 for an unknown path, 405 for a wrong method", function()
      expect(404, "OBJECT_NOT_FOUND", "GET", "nothing/here")
      expect(405, "VALIDATION_ERROR", "GET", "statuses/batch/read?channel=EMAIL")
    end)
  end)

  it("takes more tokens and their scopes from SIM_TOKENS_FILE", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write("# token scopes\nbatch-reader communication_preferences.statuses.batch.read\n")
    f:close()
    local other = sim.start { SIM_TOKENS_FILE = path }
    local function call(token, method, p, body)
      local out = {}
      local ltn12 = require "ltn12"
      local _, code = http.request { url = other.url .. P .. p, method = method,
        headers = { authorization = "Bearer " .. token, ["content-length"] = body and #body or nil },
        source = body and ltn12.source.string(body) or nil, sink = ltn12.sink.table(out) }
      return code
    end
    assert.equal(200, call("batch-reader", "POST", "statuses/batch/read?channel=EMAIL", '{"inputs":["a@x.com"]}'))
    assert.equal(403, call("batch-reader", "GET", "statuses/a%40x.com?channel=EMAIL"))
    assert.equal(200, call("sim-token", "GET", "statuses/a%40x.com?channel=EMAIL"))
    sim.stop(other)
    os.remove(path)
  end)

  describe("rate limit", function()
    it("sends the headers on every response and 429 past the limit", function()
      sim.admin("POST", "config", { rate = "3/1000" })
      for i = 1, 3 do
        local c, _, h = sim.raw("GET", P .. "definitions")
        assert.equal(200, c)
        assert.equal("3", h["x-hubspot-ratelimit-max"])
        assert.equal(tostring(3 - i), h["x-hubspot-ratelimit-remaining"])
        assert.equal("1000", h["x-hubspot-ratelimit-interval-milliseconds"])
      end
      local c, text, h = sim.raw("GET", P .. "definitions")
      assert.equal(429, c)
      assert.equal("0", h["x-hubspot-ratelimit-remaining"])
      assert.equal("SECONDLY", json(text).policyName)
      assert.equal("RATE_LIMIT", json(text).errorType)
      assert.is_true(schema.validate(text, "Error"))
      -- each token has its own window
      assert.equal(200, (sim.raw("GET", P .. "definitions", { token = "sim-read-only" })))
    end)

    it("frees the window as it rolls", function()
      sim.admin("POST", "config", { rate = "2/300" })
      assert.equal(200, (sim.raw("GET", P .. "definitions")))
      assert.equal(200, (sim.raw("GET", P .. "definitions")))
      assert.equal(429, (sim.raw("GET", P .. "definitions")))
      socket.sleep(0.35)
      assert.equal(200, (sim.raw("GET", P .. "definitions")))
    end)
  end)

  it("adds the configured latency", function()
    sim.admin("POST", "config", { latency = 200, jitter = 0 })
    local t0 = socket.gettime()
    sim.raw("GET", P .. "definitions")
    assert.is_true(socket.gettime() - t0 >= 0.19)
  end)

  describe("faults", function()
    local path = P .. "statuses/a%40x.com/unsubscribe-all?channel=EMAIL"
    it("5xx with a JSON body, then back to normal", function()
      sim.fault { kind = "status", status = 503, count = 2 }
      assert.equal(503, (sim.raw("GET", path)))
      assert.equal(503, (sim.raw("GET", path)))
      assert.equal(200, (sim.raw("GET", path)))
    end)
    it("5xx with an HTML proxy page", function()
      sim.fault { kind = "html" }
      local c, text, h = sim.raw("GET", path)
      assert.equal(502, c)
      assert.matches("^text/html", h["content-type"])
      assert.matches("Bad Gateway", text)
    end)
    it("429 with Retry-After", function()
      sim.fault { kind = "429", retry_after = 7 }
      local c, _, h = sim.raw("GET", path)
      assert.equal(429, c)
      assert.equal("7", h["retry-after"])
    end)
    it("only for matching requests", function()
      sim.fault { kind = "status", status = 500, match = "batch", method = "POST" }
      assert.equal(200, (sim.raw("GET", path)))
      assert.equal(500, (sim.raw("POST", P .. "statuses/batch/read?channel=EMAIL", { body = '{"inputs":["a@x.com"]}' })))
    end)
    it("connection cut mid-body", function()
      sim.fault { kind = "reset" }
      local ok, code = http.request(sim.url .. path)
      assert.is_nil(ok)
      assert.is_string(code)
    end)
    it("a body that never finishes", function()
      sim.fault { kind = "hang", seconds = 5 }
      http.TIMEOUT = 0.5
      local t0 = socket.gettime()
      local ok = http.request(sim.url .. path)
      http.TIMEOUT = 60
      assert.is_nil(ok)
      assert.is_true(socket.gettime() - t0 < 3)
    end)
    it("truncated JSON", function()
      sim.fault { kind = "truncated" }
      local c, text = sim.raw("GET", path)
      assert.equal(200, c)
      assert.is_false(pcall(cjson.decode, text))
    end)
    it("malformed JSON", function()
      sim.fault { kind = "malformed" }
      local c, text = sim.raw("GET", path)
      assert.equal(200, c)
      assert.is_false(pcall(cjson.decode, text))
    end)
    it("a wrong content type", function()
      sim.fault { kind = "content_type" }
      local c, _, h = sim.raw("GET", path)
      assert.equal(200, c)
      assert.matches("^text/html", h["content-type"])
    end)
  end)

  describe("request log", function()
    it("records method, raw path, query, body and masked headers", function()
      sim.raw("POST", P .. "statuses/batch/read?channel=EMAIL", { body = '{"inputs":["a@x.com"]}' })
      local log = sim.log()
      assert.equal(1, #log)
      assert.equal("POST", log[1].method)
      assert.equal(P .. "statuses/batch/read", log[1].path)
      assert.equal("channel=EMAIL", log[1].query)
      assert.equal('{"inputs":["a@x.com"]}', log[1].body)
      assert.equal("Bearer ****", log[1].headers.authorization)
    end)
    it("is emptied by reset, with the state", function()
      sim.raw("POST", P .. "statuses/z%40x.com/unsubscribe-all?channel=EMAIL")
      sim.reset()
      assert.same({}, sim.log())
      assert.same({}, sim.state())
    end)
  end)
end)
