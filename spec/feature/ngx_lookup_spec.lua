-- is_unsubscribed_from_all with coalesce and cache inside a real nginx
-- (issue 8): concurrent light threads share batch reads within HubSpot's
-- rate limit, answers equal what a single GET gives (unsubscribed,
-- never-seen, business-unit-wide, invalid ids; business units never share a
-- batch), errors reach exactly the callers they concern, and a
-- lua_shared_dict cache serves every worker. Each block starts its own
-- simulator and nginx (spec/support/nginx.lua) on free ports.
local nginx = require "support.nginx"
local sim = require "support.sim"
local cjson = require "cjson"

local function admin(s, method, path, body) return s.admin(method, path, body, s) end

-- The API requests the simulator logged (method, path, query, body).
local function api_log(s)
  local out = {}
  for _, r in ipairs(admin(s, "GET", "log").requests) do
    if r.path:find("/communication-preferences/", 1, true) then out[#out + 1] = r end
  end
  return out
end

-- Runs one concurrent caller (ngx.thread) per case {id, bu} of client `name`
-- (package.loaded, made in init_by_lua) inside one request. Returns the list
-- of {v = true|false|nil, kind, status, category, message}, the seconds taken
-- and the client's stats.
local READ_ALL = [[
  local c = package.loaded[%q]
  local cases = require("cjson").decode(%q)
  local threads, out = {}, {}
  ngx.update_time()
  local t0 = ngx.now()
  for i, case in ipairs(cases) do
    threads[i] = ngx.thread.spawn(function()
      local v, err = c:is_unsubscribed_from_all(case[1], case[2] and { business_unit_id = case[2] } or nil)
      out[i] = { v = v, kind = err and err.kind, status = err and err.status, category = err and err.category,
        message = err and err.message }
    end)
  end
  for i = 1, #cases do assert(ngx.thread.wait(threads[i])) end
  ngx.update_time()
  return { answers = out, seconds = ngx.now() - t0, stats = c:stats() }
]]

local function read_all(inst, name, cases)
  local status, body = nginx.run(inst, string.format(READ_ALL, name, cjson.encode(cases)), 60)
  assert.equals(200, status, body .. "\n" .. table.concat(inst:errors(), "\n"))
  local t = cjson.decode(body)
  for i = 1, #cases do
    local a = t.answers[i]
    if a == nil or a == cjson.null then a = {}; t.answers[i] = a end
    for k, v in pairs(a) do if v == cjson.null then a[k] = nil end end
  end
  return t.answers, t.seconds, t.stats
end

local function numbered(prefix, n, bu)
  local cases = {}
  for i = 1, n do cases[i] = { prefix .. i .. "@example.com", bu } end
  return cases
end

local CLIENTS = [[
  init_by_lua_block {
    local commprefs = require "commprefs"
    local url = os.getenv("SIM_URL")
    local function new(o)
      o.token, o.base_url, o.backoff_base, o.backoff_max = "sim-token", url, 0.01, 0.05
      return commprefs.new(o)
    end
    package.loaded.lk_plain = new {}
    package.loaded.lk_coalesce = new { coalesce = 0.01 }
    package.loaded.lk_cached = new { coalesce = 0.01, cache = { ttl = 60, shared_dict = "answers" } }
    package.loaded.lk_fragile = new { coalesce = 0.01, max_retries = 0 }
    -- a budget of its own set by hand: another API version, so not the others' bundle (commprefs.shared)
    package.loaded.lk_slow = new { coalesce = 0.01, timeout = 1, rate_limit = { max = 1, interval = 3 },
      api_version = "2026-09" }
  }
]]

describe("is_unsubscribed_from_all coalesced and cached in nginx", function()
  local s, inst
  setup(function()
    s = sim.start { SIM_RATE = "10/1000", SIM_LATENCY = "20" }
    inst = nginx.start {
      workers = 2,
      env = { SIM_URL = s.url },
      conf = "lua_shared_dict answers 4m;\n" .. CLIENTS,
      server = [[
        location = /check { content_by_lua_block {
          local v, err = package.loaded.lk_cached:is_unsubscribed_from_all(ngx.unescape_uri(ngx.var.arg_id))
          if v == nil then ngx.status = 502; ngx.print(tostring(err)); return end
          ngx.print(v and "yes" or "no")
        } }
      ]],
    }
  end)
  teardown(function()
    if inst then inst:stop() end
    if s then s:stop() end
  end)

  -- Half of r1..r600 unsubscribed (the even ones), through a client outside nginx.
  local function prepare(prefix, n)
    local c = require("commprefs").new { token = "sim-token", base_url = s.url }
    local even = {}
    for i = 2, n, 2 do even[#even + 1] = prefix .. i .. "@example.com" end
    assert(c:batch_unsubscribe_all(even))
    c:close()
    require("socket").sleep(1.1) -- leave the simulator's window empty
  end

  it("600 concurrent reads: every answer right, <= 20 requests, no 429, within 4 s; again with the cache: 0 requests", function()
    prepare("r", 600)
    local before = #api_log(s)
    local answers, seconds, stats = read_all(inst, "lk_cached", numbered("r", 600))
    local log = {}
    for i, r in ipairs(api_log(s)) do if i > before then log[#log + 1] = r end end
    for i = 1, 600 do
      assert.equals(i % 2 == 0, answers[i].v, "r" .. i .. ": " .. tostring(answers[i].message))
    end
    local requests = #log
    assert.is_true(requests <= 20, requests .. " requests")
    assert.equals(0, stats.throttled) -- no 429
    for _, r in ipairs(log) do assert.matches("statuses/batch/unsubscribe%-all/read$", r.path) end
    assert.is_true(seconds < 4, string.format("%.2f s", seconds))
    -- the same 600 again, from the cache: nothing reaches the simulator
    answers = read_all(inst, "lk_cached", numbered("r", 600))
    for i = 1, 600 do assert.equals(i % 2 == 0, answers[i].v, "r" .. i) end
    assert.equals(before + #log, #api_log(s))
    -- and through HTTP requests spread over both workers (one shared dict)
    local paths = {}
    for i = 1, 40 do paths[i] = "/check?id=r" .. i .. "%40example.com" end
    local http = nginx.concurrent(inst, paths, 20)
    for i = 1, 40 do assert.equals(i % 2 == 0 and "yes" or "no", http[i].body) end
    assert.equals(before + #log, #api_log(s))
    assert.same({}, inst:errors())
  end)

  -- Waits until the simulator's window of 10 per 1,000 ms is empty again.
  local function quiet() require("socket").sleep(1.1) end

  it("after unsubscribe_all through the client the next cached read says true with no request", function()
    quiet()
    local before = #api_log(s)
    local status, body = nginx.run(inst, [[
      local c = package.loaded.lk_cached
      local first = c:is_unsubscribed_from_all("u-me@example.com")
      assert(c:unsubscribe_all("u-me@example.com"))
      local second = c:is_unsubscribed_from_all("u-me@example.com")
      local keys, token_seen = ngx.shared.answers:get_keys(0), false
      for _, k in ipairs(keys) do if k:find("sim-token", 1, true) then token_seen = true end end
      return { first = first, second = second, token_seen = token_seen, key = c._lookup.cache:key("u-me@example.com") }
    ]])
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    assert.is_false(t.first)
    assert.is_true(t.second)
    assert.is_false(t.token_seen)
    assert.matches("^commprefs:uall:2026%-03:%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x:0:u%-me@example%.com$", t.key)
    local log = api_log(s)
    assert.equals(before + 2, #log) -- the first read and the POST
    assert.equals("POST", log[#log].method)
    assert.matches("statuses/u%-me%%40example.com/unsubscribe%-all$", log[#log].path)
    -- every worker sees it (one shared dict), still with no request
    local paths = {}
    for i = 1, 8 do paths[i] = "/check?id=u-me%40example.com" end
    for _, a in ipairs(nginx.concurrent(inst, paths, 20)) do assert.equals("yes", a.body) end
    assert.equals(before + 2, #api_log(s))
  end)

  it("never gives one app's cached answer to another app sharing the dict (other token or base URL)", function()
    quiet()
    local status, body = nginx.run(inst, [[
      local commprefs = require "commprefs"
      local a = package.loaded.lk_cached
      assert(a:unsubscribe_all("app-a@example.com")) -- noted as unsubscribed in the dict
      local url = os.getenv("SIM_URL")
      local b = commprefs.new { token = "sim-read-only", base_url = url,
        cache = { ttl = 60, shared_dict = "answers" } }
      local c = commprefs.new { token = "sim-token", base_url = url:gsub("127%.0%.0%.1", "localhost"),
        cache = { ttl = 60, shared_dict = "answers" } }
      local a_key, b_key, c_key = a._lookup.cache:key("x"), b._lookup.cache:key("x"), c._lookup.cache:key("x")
      b:close(); c:close()
      return { a = a_key, b = b_key, c = c_key }
    ]])
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    assert.are_not.equal(t.a, t.b)
    assert.are_not.equal(t.a, t.c)
    assert.is_nil(t.b:find("sim", 1, true))
    -- the simulator forgets everything: another app asking now must hear HubSpot's answer
    admin(s, "POST", "reset", {})
    local before = #api_log(s)
    status, body = nginx.run(inst, [[
      local b = require("commprefs").new { token = "sim-read-only", base_url = os.getenv("SIM_URL"),
        cache = { ttl = 60, shared_dict = "answers" } }
      local v, err = b:is_unsubscribed_from_all("app-a@example.com")
      b:close()
      return { v = v, err = err and tostring(err) }
    ]])
    assert.equals(200, status, body)
    t = cjson.decode(body)
    assert.is_false(t.v, t.err)
    assert.equals(before + 1, #api_log(s))
  end)

  it("gives each caller what a single GET gives; business units never share a batch", function()
    quiet()
    local c = require("commprefs").new { token = "sim-token", base_url = s.url }
    assert(c:unsubscribe_all("p-unsub@example.com"))
    assert(c:unsubscribe_all("p-bu1@example.com", { business_unit_id = 1 }))
    assert(c:unsubscribe_all("p-both@example.com"))
    assert(c:unsubscribe_all("p-both@example.com", { business_unit_id = 1 }))
    c:close()
    quiet()
    local cases = {}
    for _, id in ipairs { "p-unsub@example.com", "p-bu1@example.com", "p-both@example.com",
      "p-never@example.com", "not-an-email", "two@@example.com" } do
      for _, bu in ipairs { false, 0, 1, 7 } do cases[#cases + 1] = { id, bu or nil } end
    end
    local before = #api_log(s)
    local coalesced = read_all(inst, "lk_coalesce", cases)
    local log = {}
    for i, r in ipairs(api_log(s)) do if i > before then log[#log + 1] = r end end
    quiet()
    local single = read_all(inst, "lk_plain", cases)
    for i, case in ipairs(cases) do
      local what = case[1] .. " in business unit " .. tostring(case[2])
      assert.same(single[i], coalesced[i], what)
    end
    -- the GETs answered as expected (so the comparison above says something)
    assert.is_true(single[1].v)                                          -- unsubscribed, no unit given
    assert.is_false(single[5].v); assert.is_true(single[7].v)            -- business-unit-wide: unit 0, unit 1
    assert.is_false(single[13].v)                                        -- never seen
    assert.equals(400, single[17].status); assert.equals("VALIDATION_ERROR", single[17].category) -- invalid
    assert.equals(400, single[4].status)                                 -- a business unit that does not exist
    -- coalesced: batch reads only, one business unit each, every input asked in that unit
    local asked = {}
    for _, case in ipairs(cases) do asked[tostring(case[2] or "-") .. " " .. case[1]] = true end
    assert.is_true(#log >= 4 and #log <= 8, #log .. " requests")
    local invalid_with_others = false
    for _, r in ipairs(log) do
      assert.matches("statuses/batch/unsubscribe%-all/read$", r.path)
      local bu = r.query:match("businessUnitId=(%d+)") or "-"
      local inputs = cjson.decode(r.body).inputs
      for _, id in ipairs(inputs) do
        assert.is_true(asked[bu .. " " .. id], id .. " in a batch of business unit " .. bu)
        if id == "not-an-email" and #inputs > 1 then invalid_with_others = true end
      end
    end
    assert.is_true(invalid_with_others)
  end)

  it("callers asking about the same id share one input", function()
    quiet()
    local c = require("commprefs").new { token = "sim-token", base_url = s.url }
    assert(c:unsubscribe_all("same@example.com"))
    c:close()
    local cases = numbered("d", 50)
    for _ = 1, 50 do cases[#cases + 1] = { "same@example.com" } end
    local before = #api_log(s)
    local answers = read_all(inst, "lk_coalesce", cases)
    for i = 1, 50 do assert.is_false(answers[i].v) end
    for i = 51, 100 do assert.is_true(answers[i].v) end
    local log = api_log(s)
    assert.equals(before + 1, #log)
    assert.equals(51, #cjson.decode(log[#log].body).inputs)
  end)

  it("a failed request is an error for exactly the callers in it", function()
    quiet()
    admin(s, "POST", "faults", { kind = "status", status = 500, match = "batch/unsubscribe%-all/read", count = 1 })
    local before = #api_log(s)
    local answers = read_all(inst, "lk_fragile", numbered("f", 150))
    local log = {}
    for i, r in ipairs(api_log(s)) do if i > before then log[#log + 1] = r end end
    assert.equals(2, #log)
    local failed = {}
    for _, id in ipairs(cjson.decode(log[1].body).inputs) do failed[id] = true end
    local n = 0
    for i, a in ipairs(answers) do
      local id = "f" .. i .. "@example.com"
      if failed[id] then
        n = n + 1
        assert.equals("http", a.kind, id)
        assert.equals(500, a.status, id)
      else
        assert.is_false(a.v, id)
      end
    end
    assert.is_true(n == 100 or n == 50, n .. " callers failed")
  end)

  it("callers whose timeout passes get a timeout error; nothing is sent for them afterwards", function()
    quiet()
    local before = #api_log(s)
    -- lk_slow: timeout = 1, 1 request per 3 s: the first 100 go at once, the rest would wait 3 s
    local answers, seconds = read_all(inst, "lk_slow", numbered("t", 250))
    for i, a in ipairs(answers) do
      if i <= 100 then
        assert.is_false(a.v, "t" .. i)
      else
        assert.equals("timeout", a.kind, "t" .. i)
        assert.matches("no answer for t" .. i .. "@example.com within 1 s", a.message, 1, true)
      end
    end
    assert.is_true(seconds >= 0.9 and seconds < 2.5, string.format("%.2f s", seconds))
    require("socket").sleep(3.5)
    assert.equals(before + 1, #api_log(s))
    assert.same({}, inst:errors())
  end)
end)

describe("coalesced reads when HubSpot is slow", function()
  it("full batches go out together: 1,000 callers at 300 ms latency answered well within 10 round trips", function()
    local s = sim.start { SIM_RATE = "off", SIM_LATENCY = "300", SIM_JITTER = "0" }
    local inst = nginx.start { env = { SIM_URL = s.url }, conf = [[
      init_by_lua_block {
        package.loaded.lk_coalesce = require("commprefs").new { token = "sim-token",
          base_url = os.getenv("SIM_URL"), coalesce = 0.01 }
      }]] }
    finally(function() inst:stop(); s:stop() end)
    local answers, seconds = read_all(inst, "lk_coalesce", numbered("o", 1000))
    for i = 1, 1000 do assert.is_false(answers[i].v, "o" .. i .. ": " .. tostring(answers[i].message)) end
    assert.equals(10, #api_log(s))
    assert.is_true(seconds < 1.5, string.format("%.2f s (one batch after another: 3 s)", seconds))
    assert.same({}, inst:errors())
  end)
end)
