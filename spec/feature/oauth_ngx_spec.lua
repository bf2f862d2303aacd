-- Real HubSpot accounts (issue 15) over cosockets in a real nginx (two
-- workers): OAuth access tokens refreshed ahead of expiry during a bulk job,
-- one refresh per nginx with oauth.shared_dict, a 401 renewed and resent once,
-- revocation mid-job (stopped = "auth"), a portal without batch scopes
-- (single-contact requests, coalesced reads included), answers in lower
-- case, 423 and 477, and no secret in nginx's error log.
local nginx = require "support.nginx"
local sim = require "support.sim"
local cjson = require "cjson"

local function admin(s, method, path, body) return s.admin(method, path, body, s) end
local function reset(s, config)
  admin(s, "POST", "reset", {})
  if config then admin(s, "POST", "config", config) end
end
local function counts(s)
  local l = admin(s, "GET", "log")
  local api, forbidden_paths = 0, {}
  for _, r in ipairs(l.requests) do
    if r.path:find("/communication-preferences/", 1, true) then api = api + 1 end
    if r.path:find("/batch/", 1, true) then forbidden_paths[#forbidden_paths + 1] = r.path end
  end
  l.requests, l.api_logged, l.batch_requests = nil, api, #forbidden_paths
  return l
end

local PRELUDE = [[
  local commprefs = require "commprefs"
  local url = os.getenv("SIM_URL")
  local function ids(n, p) local t = {} for i = 1, n do t[i] = (p or "u") .. i .. "@example.com" end return t end
  local function oauth(x)
    local o = { client_id = "sim-client", client_secret = "sim-secret", refresh_token = "sim-refresh" }
    for k, v in pairs(x or {}) do o[k] = v end
    return o
  end
]]

local function run(inst, code)
  local status, body = nginx.run(inst, PRELUDE .. code, 120)
  assert.equals(200, status, tostring(body) .. "\n" .. table.concat(inst:errors(), "\n"))
  return cjson.decode(body)
end

describe("OAuth and HubSpot's answers over cosockets", function()
  local s, inst
  setup(function()
    s = sim.start { SIM_RATE = "off" }
    inst = nginx.start {
      workers = 2,
      env = { SIM_URL = s.url },
      conf = "lua_shared_dict oauth_tokens 1m;",
      server = [[
        location = /shared { content_by_lua_block {
          local c = require("commprefs").new { base_url = os.getenv("SIM_URL"), transport = "ngx",
            oauth = { client_id = "sim-client", client_secret = "sim-secret", refresh_token = "sim-refresh",
              shared_dict = "oauth_tokens" } }
          local env, err = c:get_status("a@example.com")
          ngx.print(env and ("ok " .. ngx.worker.pid()) or tostring(err))
        } }
      ]],
    }
  end)
  teardown(function()
    if inst then inst:stop() end
    if s then s:stop() end
  end)

  it("a bulk job of 3,000 ids with 2 s access tokens: every id done, refreshes about wall/2, at most 2 answered 401", function()
    reset(s, { token_ttl = 2, rate = "5/1000" })
    local t = run(inst, [[
      local n = 0
      local c = commprefs.new { base_url = url, transport = "ngx", oauth = oauth { on_refresh = function() n = n + 1 end } }
      ngx.update_time()
      local t0 = ngx.now()
      local s = c:bulk_unsubscribe_all(ids(3000))
      ngx.update_time()
      return { done = s.done, failed = s.failed, stopped = s.stopped, refreshes = n, wall = ngx.now() - t0 }
    ]])
    local c = counts(s)
    assert.equals(3000, t.done)
    assert.equals(0, t.failed)
    assert.is_true(t.wall >= 5, t.wall .. " s")
    assert.is_true(t.refreshes >= t.wall / 2.5 and t.refreshes <= t.wall / 1.5 + 1, t.refreshes .. " refreshes in " .. t.wall .. " s")
    assert.is_true(c.expired <= 2, c.expired .. " answered 401")
    print(string.format("\n  [nginx] 3,000 ids, 2 s tokens: %.1f s, %d refreshes, %d answered 401", t.wall, t.refreshes, c.expired))
  end)

  it("with oauth.shared_dict every worker takes one access token: one refresh per nginx", function()
    reset(s, { token_ttl = 60 })
    local paths = {}
    for i = 1, 24 do paths[i] = "/shared" end
    local answers = nginx.concurrent(inst, paths, 30)
    local pids = {}
    for _, a in ipairs(answers) do
      assert.matches("^ok ", a.body)
      pids[a.body] = true
    end
    assert.equals(1, counts(s).tokens_issued)
  end)

  it("a 401 renews once and resends once; a revoked app mid-job stops the job (stopped = 'auth', 0 failed)", function()
    reset(s, {})
    admin(s, "POST", "faults", { kind = "status", status = 401, count = 1, match = "^/communication" })
    -- the deprecated token URL: no other client of the worker uses it, so this client's
    -- credentials are its own (commprefs.shared) and its first request fetches a token
    local t = run(inst, [[
      local c = commprefs.new { base_url = url, transport = "ngx", oauth = oauth { token_url = url .. "/oauth/v1/token" } }
      local env, err = c:get_status("a@example.com")
      return { ok = env ~= nil, err = err and tostring(err) }
    ]])
    assert.is_true(t.ok, t.err)
    assert.equals(2, counts(s).tokens_issued)
    reset(s, { revoke_after = 20, rate = "20/1000" })
    t = run(inst, [[
      local c = commprefs.new { base_url = url, transport = "ngx", oauth = oauth() }
      local s = c:bulk_unsubscribe_all(ids(5000))
      local c2 = commprefs.new { base_url = url, transport = "ngx", token = "sim-token" }
      local env, err = c2:get_status("a@example.com")
      return { done = s.done, failed = s.failed, stopped = s.stopped, remaining = s.remaining, msg = s.stop_message,
        single = err and err.status }
    ]])
    local c = counts(s)
    assert.equals("auth", t.stopped)
    assert.equals(0, t.failed)
    assert.equals(5000, t.done + t.remaining)
    local after = c.api - c.revoked_at + 1 - 1 -- the last single GET not counted
    assert.is_true(after <= 12, after .. " requests after the revocation")
    assert.equals(401, t.single)
    assert.is_nil(t.msg:find("sim-secret", 1, true))
    print(string.format("\n  [nginx] revoked app mid-job: %d done, %d requests after the revocation, 0 failed", t.done, after))
  end)

  it("a portal without batch scopes: bulk and coalesced reads through single-contact requests; batch = 'never'", function()
    reset(s, { tier = "professional", lower_ids = 1 })
    local t = run(inst, [[
      local c = commprefs.new { base_url = url, transport = "ngx", token = "sim-token", coalesce = 0.01 }
      local list = ids(250, "Mixed")
      local u = c:bulk_unsubscribe_all(list)
      local r = c:bulk_get_unsubscribe_all_status(list)
      local threads, yes = {}, 0
      for i = 1, 20 do threads[i] = ngx.thread.spawn(function() return c:is_unsubscribed_from_all(list[i]) end) end
      for i = 1, 20 do local _, v = ngx.thread.wait(threads[i]); if v then yes = yes + 1 end end
      return { changed = u.changed, failed = u.failed + r.failed, unsubscribed = r.unsubscribed, yes = yes }
    ]])
    assert.equals(250, t.changed)
    assert.equals(0, t.failed)
    assert.equals(250, t.unsubscribed)
    assert.equals(20, t.yes)
    local c = counts(s)
    assert.is_true(c.forbidden <= 3, c.forbidden .. " answered 403")
    reset(s, {})
    t = run(inst, [[
      local c = commprefs.new { base_url = url, transport = "ngx", token = "sim-token", batch = "never" }
      return { changed = c:bulk_unsubscribe_all(ids(20)).changed }
    ]])
    assert.equals(20, t.changed)
    assert.equals(0, counts(s).batch_requests)
    print(string.format("\n  [nginx] no batch scopes: 500 ids + 20 coalesced reads, %d answered 403", c.forbidden))
  end)

  it("423 once: success after >= 2 s; 477: a single call within a second, bulk stops with retry_after", function()
    reset(s, {})
    admin(s, "POST", "faults", { kind = "423", count = 1 })
    local t = run(inst, [[
      local c = commprefs.new { base_url = url, transport = "ngx", token = "sim-token" }
      ngx.update_time()
      local t0 = ngx.now()
      local ok = c:get_status("a@example.com") ~= nil
      ngx.update_time()
      return { ok = ok, took = ngx.now() - t0 }
    ]])
    assert.is_true(t.ok)
    assert.is_true(t.took >= 2 and t.took < 4, t.took .. " s")
    admin(s, "POST", "faults", { kind = "477", retry_after = 3600, count = 100 })
    t = run(inst, [[
      local c = commprefs.new { base_url = url, transport = "ngx", token = "sim-token" }
      ngx.update_time()
      local t0 = ngx.now()
      local env, err = c:get_status("a@example.com")
      ngx.update_time()
      local single = ngx.now() - t0
      local s = c:bulk_unsubscribe_all(ids(500))
      ngx.update_time()
      return { status = err.status, retry_after = err.retry_after, single = single, stopped = s.stopped,
        ra = s.retry_after, failed = s.failed, bulk = ngx.now() - t0 - single }
    ]])
    assert.equals(477, t.status)
    assert.equals(3600, t.retry_after)
    assert.is_true(t.single < 1)
    assert.equals("migration", t.stopped)
    assert.equals(3600, t.ra)
    assert.equals(0, t.failed)
    assert.is_true(t.bulk < 1)
    -- nothing secret in nginx's log
    local log = inst:log()
    for _, secret in ipairs { "sim-secret", "sim-refresh", "sim-oauth-" } do
      assert.is_nil(log:find(secret, 1, true), secret)
    end
  end)
end)
