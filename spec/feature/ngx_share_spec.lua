-- Clients made per request inside nginx (issue 18): clients of one worker
-- with the same credentials, base URL, API version and options share one
-- governor, pacer, coalescing queue and cache (commprefs.shared), so 600
-- concurrent reads through 600 clients made in the request stay within
-- HubSpot's 10 requests/s; and normal operation (a coalesced burst, a bulk
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

-- 600 light threads, each making its own client (as a content handler would) and reading one id.
local PER_REQUEST = [[
  local commprefs = require "commprefs"
  local n, cached = %d, %s
  local threads, out = {}, {}
  ngx.update_time()
  local t0 = ngx.now()
  for i = 1, n do
    threads[i] = ngx.thread.spawn(function()
      local c = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), coalesce = 0.01,
        cache = cached and { ttl = 60, shared_dict = "answers" } or nil }
      local v, err = c:is_unsubscribed_from_all("r" .. i .. "@example.com")
      out[i] = v == nil and ("err " .. tostring(err)) or v
    end)
  end
  for i = 1, n do assert(ngx.thread.wait(threads[i])) end
  ngx.update_time()
  local c = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), coalesce = 0.01,
    cache = cached and { ttl = 60, shared_dict = "answers" } or nil }
  return { answers = out, seconds = ngx.now() - t0, stats = c:stats() }
]]

describe("clients made per request share their worker's budget", function()
  local s, inst
  setup(function()
    s = sim.start { SIM_RATE = "10/1000", SIM_LATENCY = "20" }
    inst = nginx.start { workers = 1, env = { SIM_URL = s.url }, conf = "lua_shared_dict answers 4m;" }
    local c = require("commprefs").new { token = "sim-token", base_url = s.url }
    local even = {}
    for i = 2, 600, 2 do even[#even + 1] = "r" .. i .. "@example.com" end
    assert(c:batch_unsubscribe_all(even))
    c:close()
    require("socket").sleep(1.1) -- the simulator's window empty again
  end)
  teardown(function()
    if inst then inst:stop() end
    if s then s:stop() end
  end)

  local function read(cached)
    local before = #api_log(s)
    local status, body = nginx.run(inst, string.format(PER_REQUEST, 600, tostring(cached)), 60)
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    local log = {}
    for i, r in ipairs(api_log(s)) do if i > before then log[#log + 1] = r end end
    return t, log
  end

  it("600 reads through 600 clients made per request: every answer right, <= 20 requests, no 429, <= 4 s", function()
    local t, log = read(false)
    for i = 1, 600 do assert.equals(i % 2 == 0, t.answers[i], "r" .. i .. ": " .. tostring(t.answers[i])) end
    assert.is_true(#log <= 20, #log .. " requests")
    assert.equals(0, t.stats.throttled)
    assert.is_true(t.seconds <= 4, string.format("%.2f s", t.seconds))
    print(string.format("\n  per-request clients: %d requests, %.2f s, %d throttled", #log, t.seconds, t.stats.throttled))
  end)

  it("the same with a cache: right answers, then 0 requests on the second pass", function()
    require("socket").sleep(1.1)
    local t, log = read(true)
    for i = 1, 600 do assert.equals(i % 2 == 0, t.answers[i], "r" .. i) end
    assert.is_true(#log <= 20, #log .. " requests")
    assert.is_true(t.seconds <= 4, string.format("%.2f s", t.seconds))
    local again, log2 = read(true)
    for i = 1, 600 do assert.equals(i % 2 == 0, again.answers[i], "r" .. i) end
    assert.equals(0, #log2)
    print(string.format("\n  cached: first pass %d requests %.2f s; second pass %d requests", #log, t.seconds, #log2))
  end)

  it("the registry keys by a digest: the token is in no key, and other options or tokens get their own", function()
    local status, body = nginx.run(inst, [[
      local commprefs = require "commprefs"
      local url = os.getenv("SIM_URL")
      local a = commprefs.new { token = "sim-token", base_url = url }
      local b = commprefs.new { token = "sim-token", base_url = url }
      local other_token = commprefs.new { token = "sim-other", base_url = url }
      local other_opts = commprefs.new { token = "sim-token", base_url = url, max_retries = 1 }
      local shared = require "commprefs.shared"
      local key = shared.key("sim-token", url, "2026-03", { token = "sim-token", base_url = url })
      b:close() -- closing one client leaves the others working
      local v = a:is_unsubscribed_from_all("r2@example.com")
      return { same = a._gov == b._gov, token = a._gov == other_token._gov, opts = a._gov == other_opts._gov,
        key_has_token = key:find("sim-token", 1, true) ~= nil, key_len = #key, v = v }
    ]])
    assert.equals(200, status, body)
    local t = cjson.decode(body)
    assert.is_true(t.same)
    assert.is_false(t.token)
    assert.is_false(t.opts)
    assert.is_false(t.key_has_token)
    assert.equals(20, t.key_len)
    assert.is_true(t.v)
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
