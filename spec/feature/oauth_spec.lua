-- Real HubSpot accounts (issue 15), against the simulator in plain Lua
-- (libcurl): OAuth apps whose access tokens expire (refreshed ahead of
-- expires_in, a 401 refreshed and resent once), token functions, refused
-- refreshes, revocation mid-job (bulk stops with stopped = "auth", a rerun
-- with the journal sends exactly the rest, the command line says why in one
-- line and exits 3), portals without batch scopes (single-contact requests,
-- batch = "never"), answers in lower case, 423 and 477, api_version
-- 2026-09 / v4, bad options, and no secret in any output.
-- spec/feature/oauth_ngx_spec.lua runs the same over cosockets in a real nginx.
local sim = require "support.sim"
local commprefs = require "commprefs"
local core = require "commprefs.core"
local credentials = require "commprefs.credentials"
local cjson = require "cjson"

local APP = sim.oauth_app
local SECRETS = { "sim-secret", "sim-refresh", "sim-oauth-" }

local function oauth(extra)
  local o = { client_id = APP.client_id, client_secret = APP.client_secret, refresh_token = APP.refresh_token }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local function ids(n, prefix)
  local t = {}
  for i = 1, n do t[i] = (prefix or "u") .. i .. "@example.com" end
  return t
end

local function api_requests()
  local out = {}
  for _, r in ipairs(sim.log()) do
    if r.path:find("/communication-preferences/", 1, true) then out[#out + 1] = r end
  end
  return out
end

local function token_requests()
  local n = 0
  for _, r in ipairs(sim.log()) do if r.path:find("^/oauth/") then n = n + 1 end end
  return n
end

-- base64 of s (standard alphabet): a secret must not appear in that form either.
local function b64(s)
  local A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return A:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

local function assert_no_secret(text, extra)
  for _, s in ipairs(SECRETS) do
    assert.is_nil(text:find(s, 1, true), "found " .. s .. " in:\n" .. text)
    assert.is_nil(text:find(b64(s):sub(1, 12), 1, true), "found base64 of " .. s)
  end
  for _, s in ipairs(extra or {}) do assert.is_nil(text:find(s, 1, true), "found a secret in:\n" .. text) end
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local LUA = jit and "luajit" or "lua5.4"
local BUILD = os.getenv("COMMPREFS_BUILD") or ("build/" .. (jit and "luajit" or "lua5.4"))

-- The command line (a Lua 5.4 script, whichever VM runs the specs) with a
-- clean environment plus env.
local function cli(args, env)
  local out, err = os.tmpname(), os.tmpname()
  local vars = "env -u HUBSPOT_ACCESS_TOKEN LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/lua5.4/?.so;;' "
  for k, v in pairs(env or {}) do vars = vars .. k .. "='" .. v .. "' " end
  local ok, _, code = os.execute(vars .. "lua5.4 bin/commprefs " .. args .. " >" .. out .. " 2>" .. err)
  if type(ok) == "number" then code = ok / 256 end -- Lua 5.1's os.execute
  local o, e = read(out), read(err)
  os.remove(out); os.remove(err)
  return code, o, e
end

describe("OAuth apps", function()
  it("a bulk job of 10,000 ids with 2 s access tokens: every id done, refreshes about wall/2, at most 2 requests answered 401", function()
    sim.reset { token_ttl = 2, rate = "10/1000" }
    local refreshed = {}
    local c = commprefs.new { base_url = sim.url, oauth = oauth { on_refresh = function(t) refreshed[#refreshed + 1] = t end } }
    local t0 = core.now()
    local s = c:bulk_unsubscribe_all(ids(10000))
    local wall = core.now() - t0
    local counts = sim.counts()
    assert.equals(10000, s.done)
    assert.equals(0, s.failed)
    assert.equals(10000, s.changed)
    assert.is_nil(s.stopped)
    assert.is_true(wall >= 9, wall .. " s")
    -- one refresh per token life (1.7 s here), never per request (100 requests)
    assert.is_true(#refreshed >= wall / 2.5 and #refreshed <= wall / 1.5 + 1,
      string.format("%d refreshes in %.1f s", #refreshed, wall))
    assert.equals(#refreshed, counts.tokens_issued)
    assert.is_true(counts.expired <= 2, counts.expired .. " answered 401")
    for _, t in ipairs(refreshed) do
      assert.matches("^sim%-oauth%-", t.access_token)
      assert.equals("sim-refresh", t.refresh_token)
      assert.equals(2, t.expires_in)
    end
    print(string.format("\n  [%s] 10,000 ids, 2 s tokens: %.1f s, %d refreshes, %d answered 401, %d failed",
      sim.vm, wall, #refreshed, counts.expired, s.failed))
  end)

  it("renews ahead of expires_in with a margin that scales with it (10 s: after 8-9 s; 1,800 s: after 25-30 min)", function()
    for _, case in ipairs { { 10, 8, 9 }, { 1800, 25 * 60, 30 * 60 } } do
      sim.reset { token_ttl = case[1] }
      local c = commprefs.new { base_url = sim.url, oauth = oauth() }
      assert(c:get_status("a@example.com"))
      local due = c._creds:due_in()
      assert.is_true(due >= case[2] - 0.5 and due <= case[3], case[1] .. " s token renewed after " .. due .. " s")
      -- never per request
      for _ = 1, 5 do assert(c:get_status("a@example.com")) end
      assert.equals(1, sim.counts().tokens_issued)
    end
  end)

  it("a 401 refreshes once and resends once; a second 401 is the answer (never a loop)", function()
    sim.reset {}
    local c = commprefs.new { base_url = sim.url, oauth = oauth() }
    assert(c:get_status("a@example.com"))
    sim.fault { kind = "status", status = 401, count = 1, match = "^/communication" }
    local env, err = c:get_status("a@example.com")
    assert.is_nil(err)
    assert.truthy(env.results)
    assert.equals(2, sim.counts().tokens_issued) -- the first and the one after the 401
    assert.equals(3, #api_requests())
    sim.reset {}
    c = commprefs.new { base_url = sim.url, oauth = oauth() }
    sim.fault { kind = "status", status = 401, count = 10, match = "^/communication" }
    env, err = c:get_status("a@example.com")
    assert.is_nil(env)
    assert.equals(401, err.status)
    assert.equals(2, #api_requests()) -- sent, refused, renewed, sent once more: that is all
    assert.equals(2, sim.counts().tokens_issued)
  end)

  it("a refused refresh (BAD_REFRESH_TOKEN / invalid_grant) is nil, Error{kind = 'auth'}; nothing reaches the API", function()
    sim.reset {}
    local c = commprefs.new { base_url = sim.url, oauth = oauth { refresh_token = "revoked-refresh-token-1" } }
    local env, err = c:get_status("a@example.com")
    assert.is_nil(env)
    assert.equals("auth", err.kind)
    assert.equals("BAD_REFRESH_TOKEN", err.code)
    assert.equals(0, #api_requests())
    assert_no_secret(tostring(err), { "revoked-refresh-token-1" })
    -- bulk: stopped at once, nothing failed
    local s = c:bulk_get_unsubscribe_all_status(ids(300))
    assert.equals("auth", s.stopped)
    assert.equals(0, s.failed)
    assert.equals(300, s.remaining)
    assert.equals(0, #api_requests())
    assert_no_secret(s.stop_message, { "revoked-refresh-token-1" })
  end)

  it("the refresh is a form POST to base_url .. /oauth/2026-03/token (or token_url), percent-encoded", function()
    sim.reset {}
    local c = commprefs.new { base_url = sim.url, oauth = oauth() }
    assert(c:get_status("a@example.com"))
    local r = sim.log()[1]
    assert.equals("POST", r.method)
    assert.equals("/oauth/2026-03/token", r.path)
    assert.matches("application/x-www-form-urlencoded", r.headers["content-type"], 1, true)
    assert.is_nil(r.headers.authorization)
    sim.reset {}
    c = commprefs.new { base_url = sim.url, oauth = oauth { token_url = sim.url .. "/oauth/v1/token" } }
    assert(c:get_status("a@example.com"))
    assert.equals("/oauth/v1/token", sim.log()[1].path)
    -- percent-encoding: a secret with reserved characters reaches the server exactly (refused there)
    local body = {}
    local creds = credentials.new { oauth = oauth { client_secret = "a b&c=d+e%" }, base_url = sim.url, owner = body,
      post_form = function(url, b) body.sent = b; return { url = url }, { status = 400, body = "{}" } end }
    creds:current()
    assert.equals("grant_type=refresh_token&client_id=sim-client&client_secret=a%20b%26c%3Dd%2Be%25&refresh_token=sim-refresh",
      body.sent)
  end)

  it("redacts the access token in effect and the one before it; older ones are forgotten (bounded over months)", function()
    local redact = require "commprefs.redact"
    local made = {}
    math.randomseed(20261202)
    local function token(i) -- distinct random tokens: no run of 12 characters in common (redact's fragments)
      if not made[i] then
        local t = {}
        for k = 1, 48 do t[k] = string.char(97 + math.random(0, 25)) end
        made[i] = "tok" .. i .. table.concat(t)
      end
      return made[i]
    end
    local owner, served = {}, 0
    local creds = credentials.new { oauth = oauth { client_secret = "a-client-secret-kept", refresh_token = "a-refresh-token-kept" },
      base_url = sim.url, owner = owner, post_form = function(url)
        served = served + 1
        return { url = url }, { status = 200, body = cjson.encode { access_token = token(served), expires_in = 1800 } }
      end }
    assert.equals(token(1), creds:current())
    for i = 2, 50 do assert.equals(token(i), creds:renew(creds.gen)) end -- 49 renewals (a 401 each)
    for i = 1, 48 do assert.is_false(redact.found("echo: " .. token(i)), "token " .. i) end
    for i = 49, 50 do assert.is_true(redact.found("echo: " .. token(i)), "token " .. i) end
    assert.equals("echo: <redacted>", redact.text("echo: " .. token(50)))
    assert.is_true(redact.found("a-client-secret-kept"))
    assert.is_true(redact.found("a-refresh-token-kept"))
    -- a token function: the same bound
    local asked = 0
    local fn = credentials.new { token = function() asked = asked + 1; return token(100 + asked) end, owner = {} }
    assert.equals(token(101), fn:current())
    for i = 2, 10 do assert.equals(token(100 + i), fn:renew(fn.gen)) end
    assert.is_false(redact.found(token(108)))
    assert.is_true(redact.found(token(109)) and redact.found(token(110)))
  end)
end)

describe("token = function", function()
  it("is asked for the first request and again after a 401; the refused request is sent once more", function()
    sim.reset {}
    local asked = 0
    local c = commprefs.new { base_url = sim.url, token = function()
      asked = asked + 1
      return asked == 1 and "rotated-away-token" or "sim-token"
    end }
    local env, err = c:get_status("a@example.com")
    assert.is_nil(err)
    assert.truthy(env)
    assert.equals(2, asked)
    assert.equals(2, #api_requests())
    assert(c:get_status("a@example.com")) -- not asked per request
    assert.equals(2, asked)
  end)

  it("a function that raises or gives a bad token: nil, Error{kind = 'auth'}, nothing sent", function()
    sim.reset {}
    for _, fn in ipairs { function() error("vault sealed") end, function() return nil, "no lease" end,
      function() return "has space" end, function() return 42 end } do
      local c = commprefs.new { base_url = sim.url, token = fn }
      local env, err = c:get_status("a@example.com")
      assert.is_nil(env)
      assert.equals("auth", err.kind)
      assert.equals("token_function", err.code)
    end
    assert.equals(0, #api_requests())
  end)
end)

describe("a token refused mid-job", function()
  local function job(creds, n_before)
    sim.reset { revoke_after = n_before, rate = "20/1000" }
    local journal = os.tmpname()
    os.remove(journal)
    local c = commprefs.new(creds)
    local s = c:bulk_unsubscribe_all(ids(5000), { journal = journal })
    local counts = sim.counts()
    return s, counts, journal
  end

  for _, case in ipairs {
    { "a revoked static token", function() return { base_url = sim.url, token = "sim-token" } end },
    { "a revoked OAuth app", function() return { base_url = sim.url, oauth = oauth() } end },
  } do
    it(case[1] .. " (5,000 ids): stopped = 'auth', 0 failed, at most a dozen requests after it; a rerun sends exactly the rest", function()
      local s, counts, journal = job(case[2](), 20)
      assert.equals("auth", s.stopped)
      assert.equals(0, s.failed)
      assert.equals(2000, s.done)
      assert.equals(3000, s.remaining)
      local after = counts.api - counts.revoked_at + 1
      assert.is_true(after <= 12, after .. " requests after the revocation")
      assert.matches("refused the credentials", s.stop_message)
      assert_no_secret(s.stop_message)
      local lines = 0
      for _ in io.lines(journal) do lines = lines + 1 end
      assert.equals(2000, lines) -- the ids not sent are not journaled
      -- a rerun with the journal (credentials valid again): exactly the 3,000 not sent
      sim.reset { rate = "off" }
      local s2 = commprefs.new(case[2]()):bulk_unsubscribe_all(ids(5000), { journal = journal })
      assert.equals(3000, s2.done)
      assert.equals(2000, s2.skipped)
      local sent = 0
      for _, r in ipairs(api_requests()) do sent = sent + #cjson.decode(r.body).inputs end
      assert.equals(3000, sent)
      os.remove(journal)
      print(string.format("\n  [%s] %s: %d requests after the revocation, %d failed, %d not sent",
        sim.vm, case[1], after, s.failed, s.remaining))
    end)
  end

  it("the command line: one line says why, exit 3, <= 20 lines in all, no secret (static token and --oauth)", function()
    local file = os.tmpname()
    local f = io.open(file, "w")
    f:write(table.concat(ids(5000), "\n"), "\n")
    f:close()
    for _, env in ipairs {
      { HUBSPOT_ACCESS_TOKEN = "sim-token" },
      { HUBSPOT_CLIENT_ID = "sim-client", HUBSPOT_CLIENT_SECRET = "sim-secret", HUBSPOT_REFRESH_TOKEN = "sim-refresh" },
    } do
      sim.reset { revoke_after = 20, rate = "20/1000" }
      local journal = os.tmpname()
      os.remove(journal)
      local code, out, err = cli("unsubscribe-all --quiet --base-url " .. sim.url .. " --file " .. file
        .. " --journal " .. journal .. (env.HUBSPOT_CLIENT_ID and " --oauth" or ""), env)
      local all = out .. err
      local n = select(2, all:gsub("\n", "\n"))
      assert.equals(3, code, all)
      assert.is_true(n <= 20, n .. " lines:\n" .. all)
      local why = 0
      for line in err:gmatch("[^\n]+") do if line:find("stopped: HubSpot refused the credentials", 1, true) then why = why + 1 end end
      assert.equals(1, why, err)
      assert.matches("ids not sent: 3000", err)
      assert_no_secret(all .. read(journal))
      os.remove(journal)
      print(string.format("\n  [%s] CLI%s: exit %d, %d lines", sim.vm, env.HUBSPOT_CLIENT_ID and " --oauth" or "", code, n))
    end
    os.remove(file)
  end)

  it("--oauth never takes the secrets from argv; a missing one is a usage error (exit 2)", function()
    local code, _, err = cli("status a@example.com --oauth --base-url " .. sim.url, { HUBSPOT_CLIENT_ID = "sim-client" })
    assert.equals(2, code)
    assert.matches("HUBSPOT_CLIENT_SECRET is missing", err)
    code = cli("status a@example.com --client-secret sim-secret --base-url " .. sim.url, {})
    assert.equals(2, code)
    sim.reset {}
    local file = os.tmpname()
    local f = io.open(file, "w")
    f:write("HUBSPOT_CLIENT_ID=sim-client\nHUBSPOT_CLIENT_SECRET=sim-secret\nHUBSPOT_REFRESH_TOKEN=sim-refresh\n")
    f:close()
    local out
    code, out, err = cli("status a@example.com --oauth-file " .. file .. " --base-url " .. sim.url, {})
    os.remove(file)
    assert.equals(0, code, err)
    assert.matches("a@example.com", out)
    assert_no_secret(out .. err)
  end)
end)

describe("the worker", function()
  local redis = require "support.redis"
  local worker = require "commprefs.worker"
  local R
  setup(function() R = redis.start() end)
  teardown(function() redis.stop(R) end)

  local function fill(stream, n, prefix)
    local conn = assert(core.redis_connect(R.url))
    for i = 1, n do assert(conn:command { "XADD", stream, "*", "id", (prefix or "W") .. i .. "@Example.com" }) end
    return conn
  end

  it("a token revoked mid-run: stopped = 'auth', nothing failed, the entries not answered stay pending; the CLI exits 3", function()
    local conn = fill("rv:in", 500)
    sim.reset { revoke_after = 2, rate = "20/1000" }
    local c = commprefs.new { token = "sim-token", base_url = sim.url }
    local w = worker.new(c, { redis = R.url, stream = "rv:in", group = "g", results = "rv:out" })
    local s = assert(w:run { idle_exit = 0.5 })
    w:close()
    assert.equals("auth", s.stopped)
    assert.equals(0, s.failed)
    assert.equals(200, s.results)
    local pending = conn:command { "XPENDING", "rv:in", "g" }
    assert.is_true(pending[1] > 0)
    assert.equals(200, conn:command { "XLEN", "rv:out" })
    -- the command line
    fill("rv2:in", 300)
    sim.reset { revoke_after = 1 }
    local code, _, err = cli("worker --redis " .. R.url .. " --stream rv2:in --group g --results rv2:out --idle-exit 0.5 --quiet"
      .. " --base-url " .. sim.url, { HUBSPOT_ACCESS_TOKEN = "sim-token" })
    assert.equals(3, code, err)
    assert.matches("refused the credentials", err, 1, true)
    assert.is_true(select(2, err:gsub("\n", "")) <= 20, err)
  end)

  it("mixed-case entries on a portal without batch scopes answered in lower case: every entry changed, none failed", function()
    fill("nb:in", 120, "Nb")
    sim.reset { tier = "professional", lower_ids = 1, rate = "off" }
    local c = commprefs.new { token = "sim-token", base_url = sim.url }
    local w = worker.new(c, { redis = R.url, stream = "nb:in", group = "g", results = "nb:out" })
    local s = assert(w:run { idle_exit = 0.5 })
    w:close()
    assert.equals(120, s.results)
    assert.equals(0, s.failed)
    assert.equals(120, s.changed)
    assert.is_true(sim.counts().forbidden <= 3)
  end)
end)

describe("a portal without batch scopes", function()
  it("bulk unsubscribe and bulk read of 250 ids: all right through single-contact requests, at most a handful of 403s", function()
    sim.reset { tier = "professional", rate = "off" }
    local c = commprefs.new { base_url = sim.url, token = "sim-token" }
    local list = ids(250, "Mixed")
    list[#list + 1] = "not-an-address"
    local s = c:bulk_unsubscribe_all(list)
    assert.equals(251, s.done)
    assert.equals(250, s.changed)
    assert.equals(1, s.failed)
    assert.equals("not-an-address", s.failures[1].id)
    local r = c:bulk_get_unsubscribe_all_status(list)
    assert.equals(250, r.unsubscribed)
    assert.equals(1, r.failed)
    -- the batch methods: a merged envelope in the batch shape
    local env = assert(c:batch_get_unsubscribe_all_status { "Mixed1@example.com", "nope" })
    assert.equals(1, #env.results)
    assert.equals("Mixed1@example.com", env.results[1].subscriberIdString)
    assert.equals("UNSUBSCRIBED", env.results[1].wideStatuses[1].status)
    assert.equals(1, env.numErrors)
    assert.same({ "nope" }, env.errors[1].context.subscriberIdString)
    env = assert(c:batch_get_status { "Mixed2@example.com" })
    assert.equals("Mixed2@example.com", env.results[1].subscriberIdString)
    assert.truthy(#env.results[1].statuses > 0)
    local forbidden = sim.counts().forbidden
    assert.is_true(forbidden <= 3, forbidden .. " answered 403")
    print(string.format("\n  [%s] no batch scopes: 2 x 251 ids, %d answered 403", sim.vm, forbidden))
  end)

  it("batch = 'never' sends no batch request; batch = 'always' never falls back", function()
    sim.reset { rate = "off" }
    local c = commprefs.new { base_url = sim.url, token = "sim-token", batch = "never" }
    local s = c:bulk_unsubscribe_all(ids(30))
    assert.equals(30, s.changed)
    assert(c:batch_unsubscribe_all(ids(5, "n")))
    for _, r in ipairs(api_requests()) do assert.is_nil(r.path:find("/batch/", 1, true), r.path) end
    assert.equals(35, #api_requests())
    sim.reset { tier = "professional" }
    c = commprefs.new { base_url = sim.url, token = "sim-token", batch = "always" }
    local env, err = c:batch_unsubscribe_all(ids(3))
    assert.is_nil(env)
    assert.equals(403, err.status)
    assert.equals("auth", err.stopped)
    s = c:bulk_unsubscribe_all(ids(300))
    assert.equals("auth", s.stopped)
    assert.equals(0, s.failed)
  end)
end)

describe("answers in lower case", function()
  it("mixed-case inputs: no failed id in bulk and batch methods", function()
    sim.reset { lower_ids = 1, rate = "off" }
    local c = commprefs.new { base_url = sim.url, token = "sim-token" }
    local list = ids(300, "Ada.Case")
    local s = c:bulk_unsubscribe_all(list)
    assert.equals(0, s.failed)
    assert.equals(300, s.changed)
    s = c:bulk_get_unsubscribe_all_status(list)
    assert.equals(300, s.unsubscribed)
    local env = assert(c:batch_unsubscribe_all({ "Ada@Example.com", "ada@example.com" }))
    assert.equals(1, #env.results) -- the duplicate that differs only in case is sent once
  end)
end)

describe("HubSpot's other answers", function()
  it("423 once: success after at least 2 s", function()
    sim.reset {}
    sim.fault { kind = "423", count = 1 }
    local c = commprefs.new { base_url = sim.url, token = "sim-token" }
    local t0 = core.now()
    assert(c:get_status("a@example.com"))
    local took = core.now() - t0
    assert.is_true(took >= 2 and took < 4, took .. " s")
    print(string.format("\n  [%s] 423 once: answered after %.2f s", sim.vm, took))
  end)

  it("477 with Retry-After 3600: a single call returns within a second, bulk stops at once with retry_after", function()
    sim.reset {}
    sim.fault { kind = "477", retry_after = 3600, count = 1000 }
    local c = commprefs.new { base_url = sim.url, token = "sim-token" }
    local t0 = core.now()
    local env, err = c:get_status("a@example.com")
    local single = core.now() - t0
    assert.is_nil(env)
    assert.equals(477, err.status)
    assert.equals(3600, err.retry_after)
    assert.is_true(single < 1, single .. " s")
    assert.equals(1, #sim.log())
    t0 = core.now()
    local s = c:bulk_unsubscribe_all(ids(1000))
    local took = core.now() - t0
    assert.equals("migration", s.stopped)
    assert.equals(3600, s.retry_after)
    assert.equals(0, s.failed)
    assert.equals(1000, s.remaining)
    assert.is_true(took < 1, took .. " s")
    assert.is_true(#sim.log() <= 1 + 12)
    print(string.format("\n  [%s] 477: single call %.3f s; bulk stopped after %.3f s, %d requests", sim.vm, single, took,
      #sim.log() - 1))
  end)
end)

describe("api_version", function()
  it("2026-09 is accepted and used in the paths", function()
    sim.reset {}
    local c = commprefs.new { base_url = sim.url, token = "sim-token", api_version = "2026-09" }
    assert(c:get_status("a@example.com"))
    assert.matches("^/communication%-preferences/2026%-09/", sim.log()[1].path)
  end)

  it("v4 warns once per process that HubSpot ends its support on 2027-03-30", function()
    local code, out = 0, os.tmpname()
    local ok = os.execute("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='" .. BUILD .. "/?.so;;' " .. LUA
      .. " -e 'local c = require \"commprefs\"; for i = 1, 3 do c.new { token = \"t\", api_version = \"v4\" } end;"
      .. " c.new { token = \"t\" }' 2>" .. out)
    assert.truthy(ok)
    local text = read(out)
    os.remove(out)
    local n = select(2, text:gsub("2027%-03%-30", ""))
    assert.equals(1, n, text)
    _ = code
  end)
end)

describe("bad options raise, naming the option and never a secret; nothing is sent", function()
  it("rejects them", function()
    sim.reset {}
    local cases = {
      { { token = "sim-token", oauth = oauth() }, "exactly one" },
      { { oauth = { client_id = "x", client_secret = "sim-secret" } }, "oauth.refresh_token" },
      { { oauth = oauth { extra = 1 } }, "unknown field 'extra'" },
      { { oauth = oauth { on_refresh = "no" } }, "oauth.on_refresh" },
      { { oauth = oauth { token_url = "ftp://x" } }, "oauth.token_url" },
      { { oauth = oauth { client_secret = "sim-secret\n" } }, "oauth.client_secret" },
      { { oauth = oauth { shared_dict = "tokens" } }, "oauth.shared_dict" },
      { { token = "sim-token", batch = "sometimes" }, "bad option 'batch'" },
      { { token = 42 }, "bad option 'token' (string expected" },
      { { token = "sim-token", api_version = "v3" }, "api_version" },
    }
    for _, case in ipairs(cases) do
      case[1].base_url = sim.url
      local ok, err = pcall(commprefs.new, case[1])
      assert.is_false(ok)
      assert.matches(case[2], err, 1, true)
      assert_no_secret(err)
    end
    assert.equals(0, #sim.log())
  end)
end)
