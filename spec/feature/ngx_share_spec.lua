-- Clients made per request inside nginx (issue 18): clients of one worker
-- with the same credentials, base URL and API version share one governor,
-- pacer, coalescing queue, access token and cache (commprefs.shared),
-- whatever their other options, so 600 concurrent reads through 600
-- clients made in the request stay within HubSpot's 10 requests/s even when
-- the clients differ in timeout, max_retries and coalesce; each call keeps
-- its own client's retry policy and timeouts, each cached read its own
-- client's ttl; a budget set by hand must agree within a bundle; another
-- token is another bundle; and normal operation (a coalesced burst, a bulk
-- job) logs nothing at warn or above on Debian's nginx (no ngx.sleep(0)).
local nginx = require "support.nginx"
local sim = require "support.sim"
local cjson = require "cjson"

local function api_log(s)
  local out = {}
  for _, r in ipairs(s.admin("GET", "log", nil, s).requests) do
    if r.path:find("/communication-preferences/", 1, true) then out[#out + 1] = r end
  end
  return out
end

-- The simulator's answers so far: {throttled =, tokens_issued =, ...}.
local function counts(s)
  local l = s.admin("GET", "log", nil, s)
  l.requests = nil
  return l
end

-- n light threads, each making its own client (as a content handler would)
-- with the options of opts(i) and reading one id.
local PER_REQUEST = [[
  local commprefs = require "commprefs"
  local url = os.getenv("SIM_URL")
  local n = %d
  local function opts(i) %s end
  local threads, out = {}, {}
  ngx.update_time()
  local t0 = ngx.now()
  for i = 1, n do
    threads[i] = ngx.thread.spawn(function()
      local c = commprefs.new(opts(i))
      local v, err = c:is_unsubscribed_from_all("r" .. i .. "@example.com")
      out[i] = v == nil and ("err " .. tostring(err)) or v
    end)
  end
  for i = 1, n do assert(ngx.thread.wait(threads[i])) end
  ngx.update_time()
  return { answers = out, seconds = ngx.now() - t0, stats = commprefs.new(opts(1)):stats() }
]]

-- The same options for every client.
local SAME = [[return { token = "sim-token", base_url = url, coalesce = 0.01 }]]
local SAME_CACHED = [[return { token = "sim-token", base_url = url, coalesce = 0.01,
  cache = { ttl = 60, shared_dict = "answers" } }]]
-- Four call policies (timeout x max_retries) and ten coalesce windows: 20
-- different sets of options, one app.
local MIXED = [[return { token = "sim-token", base_url = url, timeout = i % 2 == 0 and 10 or 20,
  max_retries = i % 4 < 2 and 2 or 3, coalesce = 0.005 + (i % 10) * 0.002 }]]

describe("clients made per request share their worker's budget", function()
  local s, inst
  setup(function()
    s = sim.start { SIM_RATE = "10/1000", SIM_LATENCY = "20" }
    inst = nginx.start { workers = 1, env = { SIM_URL = s.url }, conf = "lua_shared_dict answers 4m; lua_shared_dict metrics 1m;" }
    local c = require("commprefs").new { token = "sim-token", base_url = s.url }
    local even = {}
    for i = 2, 600, 2 do even[#even + 1] = "r" .. i .. "@example.com" end
    assert(c:batch_unsubscribe_all(even))
    c:close()
  end)
  teardown(function()
    if inst then inst:stop() end
    if s then s:stop() end
  end)
  before_each(function() require("socket").sleep(1.1) end) -- the simulator's window empty again

  local function run(code, timeout)
    local status, body = nginx.run(inst, code, timeout or 60)
    assert.equals(200, status, body)
    return cjson.decode(body)
  end

  -- 600 reads through 600 clients of opts: the answers and the API requests they made.
  local function read(opts)
    local before, throttled = #api_log(s), counts(s).throttled
    local t = run(string.format(PER_REQUEST, 600, opts))
    local log = {}
    for i, r in ipairs(api_log(s)) do if i > before then log[#log + 1] = r end end
    t.sim_throttled = counts(s).throttled - throttled
    return t, log
  end

  local function all_right(t)
    for i = 1, 600 do assert.equals(i % 2 == 0, t.answers[i], "r" .. i .. ": " .. tostring(t.answers[i])) end
  end

  it("600 reads through 600 clients made per request: every answer right, <= 20 requests, no 429, <= 4 s", function()
    local t, log = read(SAME)
    all_right(t)
    assert.is_true(#log <= 20, #log .. " requests")
    assert.equals(0, t.sim_throttled)
    assert.is_true(t.seconds <= 4, string.format("%.2f s", t.seconds))
    print(string.format("\n  per-request clients: %d requests, %.2f s, %d throttled", #log, t.seconds, t.sim_throttled))
  end)

  it("the same through clients of different timeout, max_retries and coalesce: one budget", function()
    local t, log = read(MIXED)
    all_right(t)
    assert.is_true(#log <= 20, #log .. " requests")
    assert.equals(0, t.sim_throttled)
    assert.is_true(t.seconds <= 4, string.format("%.2f s", t.seconds))
    print(string.format("\n  mixed options: %d requests, %.2f s, %d throttled", #log, t.seconds, t.sim_throttled))
  end)

  it("the same with a cache: right answers, then 0 requests on the second pass", function()
    local t, log = read(SAME_CACHED)
    all_right(t)
    assert.is_true(#log <= 20, #log .. " requests")
    assert.is_true(t.seconds <= 4, string.format("%.2f s", t.seconds))
    local again, log2 = read(SAME_CACHED)
    all_right(again)
    assert.equals(0, #log2)
    print(string.format("\n  cached: first pass %d requests %.2f s; second pass %d requests", #log, t.seconds, #log2))
  end)

  -- Two clients of one bundle made in the order given (the first makes it:
  -- each run names a token, base URL and version no client of the worker
  -- had), then one of them reads p-<name>@example.com through get_status, or
  -- through is_unsubscribed_from_all with coalesce.
  local POLICY = [[
    local commprefs = require "commprefs"
    local token, url, version, coalesce = %q, %q, %q, %s
    local OPTS = { fragile = { max_retries = 0 }, patient = { max_retries = 3 },
      hasty = { max_retries = 0, timeout = 0.3 }, calm = { max_retries = 0, timeout = 5 } }
    local made = {}
    for _, name in ipairs { %q, %q } do
      local o = { token = token, base_url = url, api_version = version, backoff_base = 0.01, backoff_max = 0.05,
        coalesce = coalesce }
      for k, v in pairs(OPTS[name]) do o[k] = v end
      made[#made + 1] = commprefs.new(o)
      made[name] = made[#made]
    end
    local name = %q
    local id = "p-" .. name .. "@example.com"
    local v, err
    if coalesce then v, err = made[name]:is_unsubscribed_from_all(id)
    else
      local env
      env, err = made[name]:get_status(id)
      v = env and #env.results
    end
    return { shared = made[1]._gov == made[2]._gov, v = v, kind = err and err.kind, status = err and err.status }
  ]]

  -- Runs POLICY: the answer and the API requests it made.
  local function policy_run(bundle, order, reader, coalesce)
    local before = #api_log(s)
    local t = run(string.format(POLICY, bundle[1], bundle[2], bundle[3], coalesce and "0.01" or "nil",
      order[1], order[2], reader))
    local log = {}
    for i, r in ipairs(api_log(s)) do if i > before then log[#log + 1] = r end end
    return t, log
  end

  -- Bundles no other test of the worker makes: {token, base URL, API version}.
  local function bundles(token)
    local url, localhost = s.url, s.url:gsub("127%.0%.0%.1", "localhost")
    return { { token, url, "2026-09" }, { token, url, "v4" }, { token, localhost, "2026-09" }, { token, localhost, "v4" } }
  end

  it("each client keeps its own max_retries on the shared governor (get_status and coalesced reads)", function()
    local k = 0
    for _, coalesce in ipairs { false, true } do
      for _, order in ipairs { { "fragile", "patient" }, { "patient", "fragile" } } do
        k = k + 1
        local bundle = bundles("sim-token")[k]
        local match = coalesce and "batch/unsubscribe%-all/read" or nil
        -- the fragile client's read meets one 503: one retry too many for max_retries = 0
        s.admin("POST", "faults", { kind = "status", status = 503, match = match or "p%-fragile", count = 1 }, s)
        local t, log = policy_run(bundle, order, "fragile", coalesce)
        assert.is_true(t.shared, "one governor for both")
        assert.equals("http", t.kind, cjson.encode(t))
        assert.equals(503, t.status)
        assert.equals(1, #log)
        -- the patient client's read meets two: within max_retries = 3
        s.admin("POST", "faults", { kind = "status", status = 503, match = match or "p%-patient", count = 2 }, s)
        t, log = policy_run(bundle, order, "patient", coalesce)
        assert.is_true(t.shared, "one governor for both")
        assert.is_nil(t.kind, cjson.encode(t))
        assert.is_not_nil(t.v)
        assert.equals(3, #log)
      end
    end
  end)

  it("each client keeps its own timeout on the shared governor", function()
    for k, order in ipairs { { "hasty", "calm" }, { "calm", "hasty" } } do
      local bundle = bundles("sim-read-only")[k]
      -- an answer that stops after its first bytes for 1 s, then the connection closes
      s.admin("POST", "faults", { kind = "hang", seconds = 1, match = "p%-hasty" }, s)
      s.admin("POST", "faults", { kind = "hang", seconds = 1, match = "p%-calm" }, s)
      local hasty = policy_run(bundle, order, "hasty", false)
      local calm = policy_run(bundle, order, "calm", false)
      assert.is_true(hasty.shared and calm.shared, "one governor for both")
      assert.equals("timeout", hasty.kind, cjson.encode(hasty)) -- 0.3 s
      assert.equals("network", calm.kind, cjson.encode(calm)) -- waited the 1 s out
      require("socket").sleep(1)
    end
  end)

  it("a cached read takes its own client's ttl; a change through any client of the bundle reaches the cache", function()
    local before = #api_log(s)
    local t = run([[
      local commprefs = require "commprefs"
      local url = os.getenv("SIM_URL")
      local function new(cache) return commprefs.new { token = "sim-token", base_url = url, cache = cache } end
      local long = new { ttl = 60, shared_dict = "answers" }
      local short = new { ttl = 0.3, shared_dict = "answers" }
      local plain = new(nil)
      local id = "c-x@example.com"
      local out = { long:is_unsubscribed_from_all(id), short:is_unsubscribed_from_all(id) } -- 1 GET
      ngx.sleep(0.5)
      out[3] = long:is_unsubscribed_from_all(id) -- still within 60 s: no request
      out[4] = short:is_unsubscribed_from_all(id) -- 0.5 s old for a 0.3 s ttl: 1 GET
      assert(plain:unsubscribe_all(id)) -- a client without a cache: 1 POST
      out[5] = long:is_unsubscribed_from_all(id) -- what the change noted: no request
      out[6] = short:is_unsubscribed_from_all(id)
      return out
    ]])
    assert.same({ false, false, false, false, true, true }, t)
    local methods = {}
    for i, r in ipairs(api_log(s)) do if i > before then methods[#methods + 1] = r.method end end
    assert.same({ "GET", "GET", "POST" }, methods)
  end)

  it("clients with one OAuth app share one access token", function()
    local before = counts(s).tokens_issued
    local t = run(string.format(PER_REQUEST, 40, [[
      return { base_url = url, timeout = 5 + i % 5, max_retries = 1 + i % 3, coalesce = 0.01,
        oauth = { client_id = "sim-client", client_secret = "sim-secret", refresh_token = "sim-refresh" } }]]))
    for i = 1, 40 do assert.equals(i % 2 == 0, t.answers[i], "r" .. i .. ": " .. tostring(t.answers[i])) end
    assert.equals(1, counts(s).tokens_issued - before)
  end)

  it("a budget set by hand is the bundle's: a client stating another raises, naming the option", function()
    local t = run([[
      local commprefs = require "commprefs"
      local o = { token = "sim-token", base_url = os.getenv("SIM_URL"):gsub("127%.0%.0%.1", "localhost"),
        max_concurrency = 4, rate_limit = { max = 8, interval = 1 } }
      local a = commprefs.new(o)
      local function try(changes)
        local x = {}
        for k, v in pairs(o) do x[k] = v end
        for k, v in pairs(changes) do if v == "unset" then x[k] = nil else x[k] = v end end
        local ok, err = pcall(commprefs.new, x)
        return ok and (x.timeout and "made" or "no error") or err
      end
      return { more = try { max_concurrency = 8 }, unset = try { max_concurrency = "unset" },
        max = try { rate_limit = { max = 9, interval = 1 } }, interval = try { rate_limit = { max = 8, interval = 2 } },
        policy = try { timeout = 3, max_retries = 0 }, made = a ~= nil }
    ]])
    assert.matches("^commprefs.new: bad option 'max_concurrency' %(8 here, 4 for the clients", t.more)
    assert.matches("bad option 'max_concurrency' (not set here, 4", t.unset, 1, true)
    assert.matches("bad option 'rate_limit.max' (9 here, 8", t.max, 1, true)
    assert.matches("bad option 'rate_limit.interval' (2 here, 1", t.interval, 1, true)
    assert.matches("share one HubSpot budget", t.more, 1, true)
    assert.equals("made", t.policy) -- another call policy: the same bundle
  end)

  it("clients made per request with metrics add each count of their bundle once", function()
    local t = run([[
      local commprefs = require "commprefs"
      local o = { token = "sim-read-only", base_url = os.getenv("SIM_URL"):gsub("127%.0%.0%.1", "localhost"),
        metrics = { shared_dict = "metrics" } }
      local c
      for i = 1, 5 do
        c = commprefs.new(o)
        assert(c:get_status("m" .. i .. "@example.com"))
        commprefs.prometheus(c) -- what a /metrics location does: flushes this worker's counts first
      end
      local text = commprefs.prometheus(commprefs.new(o))
      return { ok = tonumber(text:match('commprefs_requests_total{status="200"} (%d+)')), stats = c:stats().by_status["200"] }
    ]])
    assert.equals(5, t.stats)
    assert.equals(5, t.ok)
  end)

  it("the registry keys by a digest of credentials, base URL and version: never the token, never other options", function()
    local t = run([[
      local commprefs = require "commprefs"
      local url = os.getenv("SIM_URL")
      local a = commprefs.new { token = "sim-token", base_url = url }
      local b = commprefs.new { token = "sim-token", base_url = url }
      local other_opts = commprefs.new { token = "sim-token", base_url = url, max_retries = 1, timeout = 7,
        deadline = 9, coalesce = 0.2, cache = { ttl = 5 }, batch_size = 10, user_agent = "other" }
      local other_token = commprefs.new { token = "sim-read-only", base_url = url }
      local other_version = commprefs.new { token = "sim-token", base_url = url, api_version = "2026-09" }
      local shared = require "commprefs.shared"
      local key = shared.key("sim-token", url, "2026-03", { token = "sim-token", base_url = url })
      b:close() -- closing one client leaves the others working
      local v = a:is_unsubscribed_from_all("r2@example.com")
      local ok, err = pcall(b.get_status, b, "r2@example.com")
      return { same = a._gov == b._gov, opts = a._gov == other_opts._gov, lookup = a._lookup_state == other_opts._lookup_state,
        token = a._gov == other_token._gov, version = a._gov == other_version._gov,
        key_has_token = key:find("sim-token", 1, true) ~= nil, key_len = #key, v = v, closed = not ok and tostring(err) }
    ]])
    assert.is_true(t.same)
    assert.is_true(t.opts)
    assert.is_true(t.lookup)
    assert.is_false(t.token)
    assert.is_false(t.version)
    assert.is_false(t.key_has_token)
    assert.equals(20, t.key_len)
    assert.is_true(t.v)
    assert.matches("the client is closed", t.closed, 1, true)
  end)
end)

describe("nothing at warn or above in nginx's error log during normal operation", function()
  local s, inst
  setup(function()
    s = sim.start { SIM_RATE = "10/1000", SIM_LATENCY = "5" }
    inst = nginx.start { workers = 1, env = { SIM_URL = s.url }, log_level = "notice",
      conf = "lua_shared_dict pace 1m;" }
  end)
  teardown(function()
    if inst then inst:stop() end
    if s then s:stop() end
  end)

  it("a coalesced-read burst and a bulk job of 3,000 ids", function()
    local status, body = nginx.run(inst, [[
      local commprefs = require "commprefs"
      -- paced through a shared dict, as the README's OpenResty block does: pacing waits of every length
      local c = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), coalesce = 0.01,
        shared_dict = "pace" }
      local threads, wrong = {}, 0
      for i = 1, 200 do
        threads[i] = ngx.thread.spawn(function()
          local v = c:is_unsubscribed_from_all("w" .. i .. "@example.com")
          if v ~= false then wrong = wrong + 1 end
        end)
      end
      for i = 1, 200 do ngx.thread.wait(threads[i]) end
      local ids = {}
      for i = 1, 3000 do ids[i] = "bulk" .. i .. "@example.com" end
      local summary, err = c:bulk_unsubscribe_all(ids)
      if not summary then return "bulk: " .. tostring(err) end
      return { wrong = wrong, done = summary.done, failed = summary.failed }
    ]], 60)
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    assert.equals(0, t.wrong)
    assert.equals(3000, t.done)
    assert.equals(0, t.failed)
    assert.same({}, inst:warnings())
  end)
end)
