-- support.expectations: what every transport must do, written once. Each case
-- is Lua source run against a client, in plain Lua with a libcurl client
-- (run_curl, used by spec/contract/client_spec.lua) and inside a real nginx with a
-- cosocket client (run_ngx, used by spec/contract/ngx_transport_spec.lua); the value it
-- returns comes back as JSON, and ONE check function asserts on it (and on the
-- simulator's log) for both.
--
-- A case: { name =, call = "<source>", check = function(r, sim, transport),
--   client = function(urls) -> options (optional; merged over the defaults),
--   setup = function(sim) (optional: simulator faults, run in busted first),
--   tls = "ca" | "none" (optional: https to the simulator; "ca" trusts its CA:
--   ca_file for libcurl, lua_ssl_trusted_certificate for nginx) }
-- The source sees `c` (the client), `commprefs`, `urls` and helpers:
--   R(env, err) -> { env =, err = } with err flattened to plain fields plus
--   err.text = tostring(err) and err.is_error; is_int(v) (an integer value).
-- urls: url (http), tls_url (https://localhost:port: nginx checks DNS names
-- only, and the simulator's certificate is for localhost), dead (nothing listens).
local cjson = require "cjson"
local assert = require "luassert"

local M = {}

M.TOKEN = "sim-token"

M.PRELUDE = [[
local c, commprefs, urls = ...
local function flat(e)
  if e == nil then return nil end
  local t = {}
  for k, v in pairs(e) do t[k] = v end
  t.text, t.is_error = tostring(e), commprefs.Error.is(e)
  return t
end
local function R(env, err) return { env = env, err = flat(err) } end
local function is_int(v)
  if math.type then return math.type(v) == "integer" end
  return type(v) == "number" and v == math.floor(v)
end
]]

function M.urls(sim)
  return { url = sim.url, tls_url = sim.tls_url:gsub("127%.0%.0%.1", "localhost"), dead = "http://127.0.0.1:1" }
end

-- The options a case's client is made with, for transport "curl" or "ngx".
function M.client_opts(case, sim, transport)
  local urls = M.urls(sim)
  local o = { token = M.TOKEN, base_url = sim.url, backoff_base = 0.01, backoff_max = 0.05, transport = transport }
  if case.tls then o.base_url = urls.tls_url end
  if case.tls == "ca" and transport == "curl" then o.ca_file = sim.ca_file end
  for k, v in pairs(case.client and case.client(urls) or {}) do o[k] = v end
  return o
end

local function decode(text)
  return cjson.decode(text)
end

-- Runs the case in this process with a libcurl client.
function M.run_curl(case, sim)
  local commprefs = require "commprefs"
  local c = commprefs.new(M.client_opts(case, sim, "curl"))
  local fn = assert((loadstring or load)(M.PRELUDE .. case.call, "=" .. case.name))
  local out = fn(c, commprefs, M.urls(sim))
  c:close()
  return decode(cjson.encode(out))
end

-- The source nginx runs for a case (support.nginx.run): same prelude, same
-- call. The client is closed after it, as run_curl does: the worker's bundle
-- of that token (commprefs.shared) ends with it, so each case starts afresh.
function M.ngx_source(case, sim)
  return string.format([[
local cjson = require "cjson"
local commprefs = require "commprefs"
local c = commprefs.new(cjson.decode(%q))
local fn = assert(loadstring(%q, %q))
local ok, out = pcall(fn, c, commprefs, cjson.decode(%q))
c:close()
if not ok then error(out, 0) end
return cjson.encode(out)
]], cjson.encode(M.client_opts(case, sim, "ngx")), M.PRELUDE .. case.call, "=" .. case.name,
    cjson.encode(M.urls(sim)))
end

-- Runs the case inside nginx: insts = { ca = <nginx trusting the simulator's
-- CA>, none = <nginx without it> } (support.nginx instances).
function M.run_ngx(insts, case, sim)
  local nginx = require "support.nginx"
  local inst = case.tls == "none" and insts.none or insts.ca
  local status, body = nginx.run(inst, M.ngx_source(case, sim))
  assert(status == 200, "nginx answered " .. tostring(status) .. ": " .. tostring(body) .. "\n" .. inst:log())
  return decode(body)
end

------------------------------------------------------------------ the cases

local cases = {}
M.cases = cases
local function case(t) cases[#cases + 1] = t end

for _, scheme in ipairs { "http", "https" } do
  local tls = scheme == "https" and "ca" or nil
  local function op(name, call, check) case { name = name .. " over " .. scheme, tls = tls, call = call, check = check } end

  op("get_unsubscribe_all_status: empty for a contact never opted out",
    [[return R(c:get_unsubscribe_all_status("never@example.com"))]],
    function(r)
      assert.is_nil(r.err)
      assert.equal("COMPLETE", r.env.status)
      assert.same({}, r.env.results)
    end)

  op("unsubscribe_all then get_unsubscribe_all_status", [[
    local a = R(c:unsubscribe_all("one@example.com"))
    local b = R(c:get_unsubscribe_all_status("one@example.com"))
    local v = R(c:unsubscribe_all("one@example.com", { verbose = true }))
    return { a = a, b = b, v = v }]],
    function(r)
      assert.same({}, r.a.env)
      assert.equal("UNSUBSCRIBED", r.b.env.results[1].status)
      assert.equal("PORTAL_WIDE", r.b.env.results[1].wideStatusType)
      assert.equal("NO_STATUS_CHANGE", r.v.env.results[1].setStatusSuccessReason)
    end)

  op("batch_unsubscribe_all reports the change once", [[
    return { R(c:batch_unsubscribe_all({ "a@example.com", "b@example.com" })),
             R(c:batch_unsubscribe_all({ "a@example.com" })) }]],
    function(r)
      assert.equal(2, #r[1].env.results)
      assert.equal("UNSUBSCRIBE_FROM_ALL_OCCURRED", r[1].env.results[1].statuses[1].setStatusSuccessReason)
      assert.equal("NO_STATUS_CHANGE", r[2].env.results[1].statuses[1].setStatusSuccessReason)
    end)

  op("batch_get_unsubscribe_all_status", [[
    assert(c:unsubscribe_all("w@example.com"))
    return R(c:batch_get_unsubscribe_all_status({ "w@example.com", "x@example.com" }))]],
    function(r)
      assert.equal("UNSUBSCRIBED", r.env.results[1].wideStatuses[1].status)
      assert.same({}, r.env.results[2].wideStatuses)
    end)

  op("get_status and update_status", [[
    local a = R(c:get_status("s@example.com"))
    local up = R(c:update_status("s@example.com", { subscriptionId = 1002, statusState = "SUBSCRIBED",
      legalBasis = "CONSENT_WITH_NOTICE", legalBasisExplanation = "asked" }))
    return { a = a, up = up, b = R(c:get_status("s@example.com")) }]],
    function(r)
      assert.equal(3, #r.a.env.results)
      assert.equal("REQUESTED_CHANGE_OCCURRED", r.up.env.results[1].setStatusSuccessReason)
      assert.equal("SUBSCRIBED", r.b.env.results[2].status)
    end)

  op("batch_get_status and batch_update_status", [[
    local w = R(c:batch_update_status({
      { subscriberIdString = "m@example.com", subscriptionId = 1001, statusState = "UNSUBSCRIBED" },
      { subscriberIdString = "n@example.com", subscriptionId = 1001, statusState = "SUBSCRIBED" },
    }))
    return { w = w, r = R(c:batch_get_status({ "m@example.com", "n@example.com" })) }]],
    function(r)
      assert.equal(2, #r.w.env.results)
      assert.equal("UNSUBSCRIBED", r.r.env.results[1].statuses[1].status)
      assert.equal("SUBSCRIBED", r.r.env.results[2].statuses[1].status)
    end)

  op("get_definitions, per business unit and with translations", [[
    local all = R(c:get_definitions())
    local one = R(c:get_definitions({ business_unit_id = 1, include_translations = true }))
    return { all = all, one = one, int = is_int(one.env.results[1].subscriptionTranslations[1].createdAt) }]],
    function(r)
      assert.equal(3, #r.all.env.results)
      assert.equal("1001", r.all.env.results[1].id)
      assert.equal(1, #r.one.env.results)
      assert.is_true(r.int)
    end)

  op("generate_links",
    [[return R(c:generate_links({ subscriberIdString = "l@example.com", subscriptionId = 1001 }))]],
    function(r)
      assert.equal("l@example.com", r.env.subscriberIdString)
      assert.matches("^https://", r.env.unsubscribeAllUrl)
    end)

  op("is_unsubscribed_from_all", [[
    local before = c:is_unsubscribed_from_all("h@example.com")
    assert(c:unsubscribe_all("h@example.com"))
    return { before = before, after = c:is_unsubscribed_from_all("h@example.com") }]],
    function(r)
      assert.is_false(r.before)
      assert.is_true(r.after)
    end)

  op("bulk_unsubscribe_all runs through the same transport", [[
    local list = {}
    for i = 1, 7 do list[i] = "bulk" .. i .. "@example.com" end
    local s = c:bulk_unsubscribe_all(list, { batch_size = 3 })
    return { done = s.done, changed = s.changed, failed = s.failed }]],
    function(r, sim)
      assert.same({ done = 7, changed = 7, failed = 0 }, r)
      assert.equal(3, #sim.log())
    end)
end

case { name = "always sends channel=EMAIL, the business unit and verbose as given",
  client = function() return { business_unit_id = 1 } end,
  call = [[
    assert(c:get_unsubscribe_all_status("q@example.com", { verbose = true }))
    assert(c:get_unsubscribe_all_status("q@example.com", { business_unit_id = 0 }))
    return {}]],
  check = function(_, sim)
    local log = sim.log()
    assert.equal("channel=EMAIL&businessUnitId=1&verbose=true", log[1].query)
    assert.equal("channel=EMAIL&businessUnitId=0", log[2].query)
    assert.equal("application/json", log[1].headers.accept)
  end }

case { name = "uses the v4 prefix when asked", client = function() return { api_version = "v4" } end,
  call = [[assert(c:get_status("v@example.com")) return {}]],
  check = function(_, sim)
    assert.equal("/communication-preferences/v4/statuses/v%40example.com", sim.log()[1].path)
  end }

case { name = "percent-encodes ids so the server decodes exactly the id",
  call = [[
    local awkward = { "a+b@example.com", "sl/ash@example.com", "q?x=1@example.com", "h#sh@example.com",
      "pc%41@example.com", "sp ace@example.com", "quo\"te'@example.com", "ünïcødé@exämple.com" }
    local back = {}
    for _, id in ipairs(awkward) do assert(c:unsubscribe_all(id)) end
    for i, id in ipairs(awkward) do back[i] = assert(c:get_unsubscribe_all_status(id)).results[1].subscriberIdString end
    local env = assert(c:batch_get_unsubscribe_all_status(awkward))
    local batch = {}
    for i, res in ipairs(env.results) do batch[i] = res.subscriberIdString end
    return { awkward = awkward, back = back, batch = batch }]],
  check = function(r, sim)
    assert.same(r.awkward, r.back)
    assert.same(r.awkward, r.batch)
    assert.equal("/communication-preferences/2026-03/statuses/a%2Bb%40example.com/unsubscribe-all", sim.log()[1].path)
  end }

case { name = "keeps one connection alive across calls",
  -- (a delta: inside nginx, clients of one worker with the same options share one governor and its stats)
  call = [[local s0 = c:stats().sent for _ = 1, 5 do assert(c:get_status("k@example.com")) end return { sent = c:stats().sent - s0 }]],
  check = function(r, sim)
    assert.equal(5, r.sent)
    local log = sim.log()
    assert.equal(5, #log)
    for i = 2, 5 do assert.equal(log[1].port, log[i].port) end
  end }

case { name = "keeps one TLS connection alive across calls", tls = "ca",
  call = [[for _ = 1, 3 do assert(c:get_status("k@example.com")) end return {}]],
  check = function(_, sim)
    local log = sim.log()
    assert.equal(3, #log)
    for i = 2, 3 do assert.equal(log[1].port, log[i].port) end
  end }

case { name = "splits 2.5 x the limit into requests of at most 100 and covers every id once",
  client = function() return { max_concurrency = 2 } end,
  call = [[
    local list = {}
    for i = 1, 250 do list[i] = "user" .. i .. "@example.com" end
    local env = assert(c:batch_unsubscribe_all(list))
    local seen, dup = {}, 0
    for _, res in ipairs(env.results) do
      if seen[res.subscriberIdString] then dup = dup + 1 end
      seen[res.subscriberIdString] = true
    end
    local missing = 0
    for _, id in ipairs(list) do if not seen[id] then missing = missing + 1 end end
    return { n = #env.results, dup = dup, missing = missing }]],
  check = function(r, sim)
    assert.same({ n = 250, dup = 0, missing = 0 }, r)
    local log, sent = sim.log(), 0
    assert.equal(3, #log)
    for _, entry in ipairs(log) do
      local n = #cjson.decode(entry.body).inputs
      assert.is_true(n <= 100)
      sent = sent + n
    end
    assert.equal(250, sent)
  end }

case { name = "merges per-item errors of every request", client = function() return { batch_size = 2 } end,
  call = [[return R(c:batch_get_unsubscribe_all_status({ "a@example.com", "bad1", "b@example.com", "bad2" }))]],
  check = function(r)
    assert.equal(2, r.env.numErrors)
    assert.equal(2, #r.env.errors)
    assert.equal(2, #r.env.results)
  end }

case { name = "sends a duplicated id once",
  call = [[return R(c:batch_unsubscribe_all({ "d@example.com", "d@example.com", "e@example.com" }))]],
  check = function(r, sim)
    assert.equal(2, #r.env.results)
    assert.same({ "d@example.com", "e@example.com" }, cjson.decode(sim.log()[1].body).inputs)
  end }

case { name = "sends nothing for an empty list", call = [[return R(c:batch_unsubscribe_all({}))]],
  check = function(r, sim)
    assert.same({}, r.env.results)
    assert.equal("COMPLETE", r.env.status)
    assert.same({}, sim.log())
  end }

case { name = "reports which inputs a failed request did not process",
  client = function() return { batch_size = 2, max_retries = 0 } end,
  setup = function(sim) sim.fault { kind = "status", status = 500, match = "batch" } end,
  call = [[return R(c:batch_unsubscribe_all({ "a@example.com", "b@example.com", "c@example.com" }))]],
  check = function(r)
    assert.is_nil(r.env)
    assert.equal(500, r.err.status)
    assert.equal(1, #r.err.partial.results)
    assert.same({ "a@example.com", "b@example.com" }, r.err.failed_inputs)
  end }

------------------------------------------------------------------ errors

case { name = "http: HubSpot's error body becomes the Error", client = function() return { token = "sim-read-only" } end,
  call = [[local r = R(c:unsubscribe_all("p@example.com")) r.int = r.err and is_int(r.err.status) return r]],
  check = function(r, sim)
    assert.is_nil(r.env)
    assert.is_true(r.err.is_error)
    assert.equal("http", r.err.kind)
    assert.equal(403, r.err.status)
    assert.is_true(r.int)
    assert.equal("MISSING_SCOPES", r.err.category)
    assert.is_string(r.err.correlation_id)
    assert.is_table(r.err.context.requiredGranularScopes)
    assert.equal(1, r.err.attempts)
    assert.equal("POST", r.err.method)
    assert.matches("403 MISSING_SCOPES", r.err.text)
    assert.same({}, sim.state())
  end }

case { name = "http: a non-JSON error page gives the status and a snippet", client = function() return { max_retries = 0 } end,
  setup = function(sim) sim.fault { kind = "html" } end,
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r)
    assert.equal("http", r.err.kind)
    assert.equal(502, r.err.status)
    assert.matches("502 Bad Gateway", r.err.message)
  end }

case { name = "network: nothing listening", client = function(urls) return { base_url = urls.dead, max_retries = 1 } end,
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r)
    assert.equal("network", r.err.kind)
    assert.equal(2, r.err.attempts)
    assert.is_nil(r.err.status)
  end }

case { name = "network: connection cut mid-body", client = function() return { max_retries = 0 } end,
  setup = function(sim) sim.fault { kind = "reset" } end,
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r)
    assert.equal("network", r.err.kind)
    assert.equal(1, r.err.attempts)
  end }

case { name = "network: connection cut mid-body, retried", client = function() return { max_retries = 2 } end,
  setup = function(sim) sim.fault { kind = "reset" } end,
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r, sim)
    assert.equal(3, #r.env.results)
    assert.equal(2, #sim.log())
  end }

case { name = "timeout: a body that never finishes", client = function() return { timeout = 0.3, max_retries = 0 } end,
  setup = function(sim) sim.fault { kind = "hang", seconds = 3 } end,
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r)
    assert.equal("timeout", r.err.kind)
    assert.equal(1, r.err.attempts)
  end }

case { name = "tls: the simulator's certificate without its CA", tls = "none",
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r, sim)
    assert.equal("tls", r.err.kind)
    assert.equal(1, r.err.attempts)
    assert.same({}, sim.log())
  end }

case { name = "tls verification can be turned off explicitly", tls = "none",
  client = function() return { verify_tls = false } end,
  call = [[return R(c:get_status("p@example.com"))]],
  check = function(r) assert.equal(3, #r.env.results) end }

case { name = "too_large: an answer beyond max_response_size", client = function() return { max_response_size = 1024, max_retries = 2 } end,
  call = [[return R(c:get_definitions({ include_translations = true }))]],
  check = function(r, sim)
    assert.equal("too_large", r.err.kind)
    assert.equal(1, r.err.attempts)
    assert.equal(1, #sim.log())
  end }

for _, kind in ipairs { "truncated", "malformed", "content_type" } do
  case { name = "decode: " .. kind .. " body", setup = function(sim) sim.fault { kind = kind } end,
    call = [[return R(c:get_status("p@example.com"))]],
    check = function(r)
      assert.equal("decode", r.err.kind)
      assert.equal(200, r.err.status)
      assert.matches("HTTP 200", r.err.message)
    end }
end

------------------------------------------------------------------ retries

case { name = "retries 5xx and 429 and succeeds", client = function() return { max_retries = 3 } end,
  setup = function(sim)
    sim.fault { kind = "status", status = 503 }
    sim.fault { kind = "429", retry_after = 0 }
    sim.fault { kind = "html", status = 504 }
  end,
  -- counted from before the call: inside nginx the counts are the worker's bundle's (commprefs.shared)
  call = [[local r0 = c:stats().retries local r = R(c:get_status("r@example.com"))
    r.retries = c:stats().retries - r0 return r]],
  check = function(r, sim)
    assert.equal(3, #r.env.results)
    assert.equal(4, #sim.log())
    assert.equal(3, r.retries)
  end }

case { name = "gives up after max_retries with the attempt count", client = function() return { max_retries = 2 } end,
  setup = function(sim) sim.fault { kind = "status", status = 500, count = 10 } end,
  call = [[return R(c:get_status("r@example.com"))]],
  check = function(r, sim)
    assert.equal(500, r.err.status)
    assert.equal(3, r.err.attempts)
    assert.equal(3, #sim.log())
  end }

case { name = "honours Retry-After", client = function() return { max_retries = 1 } end,
  setup = function(sim) sim.fault { kind = "429", retry_after = 1 } end,
  call = [[return R(c:get_status("r@example.com"))]],
  check = function(r, sim)
    assert.equal(3, #r.env.results)
    local log = sim.log()
    assert.equal(2, #log)
    assert.is_true(log[2].time - log[1].time >= 0.95)
  end }

case { name = "does not retry other 4xx", client = function() return { max_retries = 3, token = "bogus" } end,
  call = [[return R(c:get_status("r@example.com"))]],
  check = function(r, sim)
    assert.equal(401, r.err.status)
    assert.equal(1, #sim.log())
  end }

case { name = "does not retry a Retry-After beyond max_retry_after, and reports it",
  client = function() return { max_retries = 3, max_retry_after = 5 } end,
  setup = function(sim) sim.fault { kind = "429", retry_after = 30 } end,
  call = [[return R(c:get_status("r@example.com"))]],
  check = function(r, sim)
    assert.equal(429, r.err.status)
    assert.equal(30, r.err.retry_after)
    assert.equal(1, #sim.log())
  end }

case { name = "HubSpot's daily limit stops a bulk job: no failures, nothing more sent, the rest counted",
  setup = function(sim) sim.reset { daily = 5 } end,
  call = [[
    local list = {}
    for i = 1, 300 do list[i] = "daily" .. i .. "@example.com" end
    local s = c:bulk_unsubscribe_all(list, { batch_size = 10 })
    return { stopped = s.stopped, done = s.done, failed = s.failed, remaining = s.remaining }]],
  check = function(r, sim)
    assert.equal("daily_limit", r.stopped, cjson.encode(r))
    assert.equal(0, r.failed)
    assert.equal(50, r.done) -- the 5 requests the day allowed
    assert.equal(250, r.remaining)
    local n = #sim.log()
    assert.is_true(n >= 5 and n <= 5 + 8, n .. " requests reached the simulator")
  end }

case { name = "a closed client raises and sends nothing",
  call = [[
    c:close()
    c:close()
    local ok, err = pcall(c.get_status, c, "a@example.com")
    return { ok = ok, err = tostring(err) }]],
  check = function(r, sim)
    assert.is_false(r.ok)
    assert.matches("commprefs: the client is closed", r.err, 1, true)
    assert.same({}, sim.log())
  end }

------------------------------------------------------------------ secrecy

case { name = "the token appears in no error, pretty output or log",
  setup = function(sim) sim.fault { kind = "html" } end,
  client = function() return { max_retries = 0 } end,
  call = [[
    local texts = { tostring(c), commprefs.pretty(c) }
    local _, e1 = c:get_status("t@example.com")
    local _, e2 = c:batch_unsubscribe_all({ "t@example.com", "bad" })
    for _, e in ipairs { e1, e2 } do texts[#texts + 1] = tostring(e); texts[#texts + 1] = commprefs.pretty(e) end
    return texts]],
  check = function(texts, sim)
    texts[#texts + 1] = cjson.encode(sim.log())
    for _, t in ipairs(texts) do assert.is_nil(t:find(M.TOKEN, 1, true), t) end
  end }

return M
