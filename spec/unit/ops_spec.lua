-- commprefs.ops: the one home of operation semantics. Unit cases for the
-- per-id matching of a batch answer (without regard to letter case), the
-- query and batch builders, splitting and merging; then the same rule seen
-- through every feature against the simulator answering in lower case:
-- batch methods, bulk jobs and the Redis Stream worker.
local ops = require "commprefs.ops"
local sim = require "support.sim"
local commprefs = require "commprefs"

describe("commprefs.ops", function()
  it("matches an answer to its ids without regard to case, errors and silence included", function()
    local env = {
      results = { { subscriberIdString = "ada@example.com", wideStatuses = { { status = "UNSUBSCRIBED" } } } },
      errors = { { category = "VALIDATION_ERROR", message = "bad", context = { subscriberIdString = { "BOB@example.com" } } } },
    }
    local seen = {}
    ops.match(env, { "Ada@Example.com", "bob@example.com", "carol@example.com" }, function(id, r, e)
      seen[#seen + 1] = { id, r and "result" or e and e.category or "none" }
    end)
    assert.same({ { "Ada@Example.com", "result" }, { "bob@example.com", "VALIDATION_ERROR" },
      { "carol@example.com", "none" } }, seen)
  end)

  it("classifies per id (the A3 probe: a lower-case answer is not a failure)", function()
    local got = {}
    ops.classify(ops.BATCH.get_unsubscribe_all_status,
      { results = { { subscriberIdString = "ada@example.com", wideStatuses = { { status = "UNSUBSCRIBED" } } } } },
      nil, { "Ada@Example.com" }, function(id, outcome) got[id] = outcome end)
    assert.same({ ["Ada@Example.com"] = "unsubscribed" }, got)
  end)

  it("sends a repeat that differs only in case once, keeping the first spelling", function()
    assert.same({ "Ada@Example.com", "bob@x.io" }, ops.unique { "Ada@Example.com", "bob@x.io", "ada@example.com" })
  end)

  it("builds queries, splits and merges", function()
    assert.equal("?channel=EMAIL", ops.query(true))
    assert.equal("", ops.query(false))
    assert.equal("?channel=EMAIL&businessUnitId=7&verbose=false", ops.query(true, 7, false))
    assert.same({ { 1, 2 }, { 3 } }, ops.split({ 1, 2, 3 }, 2))
    local m = { status = "COMPLETE", results = {} }
    ops.merge(m, { results = { 1 }, numErrors = 1, errors = { "e" }, status = "COMPLETE" })
    ops.merge(m, { results = { 2 }, numErrors = 2, errors = { "f" }, status = "PENDING" })
    assert.same({ 1, 2 }, m.results)
    assert.equal(3, m.numErrors)
    assert.equal("PENDING", m.status)
  end)
end)

describe("answers in lower case for mixed-case inputs", function()
  before_each(function() sim.reset { lower_ids = 1 } end)
  after_each(function() sim.reset() end)

  local function client()
    return commprefs.new { token = "sim-token", base_url = sim.url }
  end

  local mixed = { "Ada@Example.com", "BOB@example.com", "carol@EXAMPLE.com", "ada@example.com" }

  it("batch methods: no failed id, the case-duplicate sent once", function()
    local c = client()
    local env = assert(c:batch_unsubscribe_all(mixed))
    assert.equal(3, #env.results)
    assert.equal(3, #require("cjson").decode(sim.log()[1].body).inputs)
    c:close()
  end)

  it("bulk jobs: every id done, none failed", function()
    local c = client()
    local s = c:bulk_unsubscribe_all(mixed)
    assert.equal(0, s.failed)
    assert.equal(3, s.done)
    assert.equal(3, s.changed)
    s = c:bulk_get_unsubscribe_all_status(mixed)
    assert.same({ 0, 3 }, { s.failed, s.unsubscribed })
    c:close()
  end)
end)

describe("the worker over mixed-case entries answered in lower case", function()
  local redis = require "support.redis"
  local core = require "commprefs.core"
  local worker = require "commprefs.worker"
  local R
  setup(function() R = redis.start() end)
  teardown(function() redis.stop(R) end)
  before_each(function() sim.reset { lower_ids = 1 } end)
  after_each(function() sim.reset() end)

  it("gives every entry a changed result, none failed", function()
    local conn = assert(core.redis_connect(R.url))
    local entries = { "Ada@Example.com", "BOB@example.com", "ada@example.com" }
    for _, id in ipairs(entries) do assert(conn:command { "XADD", "mixed:in", "*", "id", id }) end
    local c = commprefs.new { token = "sim-token", base_url = sim.url }
    local w = worker.new(c, { redis = R.url, stream = "mixed:in", group = "g", results = "mixed:out" })
    local s = assert(w:run { idle_exit = 0.5 })
    w:close()
    c:close()
    assert.same({ 3, 0 }, { s.results, s.failed })
    local out = assert(conn:command { "XRANGE", "mixed:out", "-", "+" })
    assert.equal(3, #out)
    for _, e in ipairs(out) do
      local f = {}
      for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
      assert.is_true(f.outcome == "changed" or f.outcome == "unchanged", f.outcome .. " " .. tostring(f.error))
    end
    assert.equal(1, #sim.log()) -- one batch of two distinct addresses
    conn:close()
  end)
end)
