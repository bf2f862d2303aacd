-- spec/unit/redact_spec.lua: commprefs.redact keeps the derived forms of every
-- remembered secret out of text and decoded values (HOSTILE.md D10): the
-- secret in any letter case, base64 of it and of "Bearer SECRET" (both
-- alphabets, padded or not, inside a longer base64 text at each alignment),
-- percent-encoded (either hex case), and runs of 12 or more of its
-- characters; several secrets per owner; text without a secret unchanged;
-- and end to end, a server's error body echoing base64("Bearer TOKEN") never
-- reaches the Error. Base64 here is luasocket's mime.b64, not redact's own.
local redact = require "commprefs.redact"
local hostile = require "support.hostile"
local commprefs = require "commprefs"
local cjson = require "cjson"
local b64 = require("mime").b64

local MARK = redact.MARK

local function url_safe(s) return (s:gsub("[+/]", { ["+"] = "-", ["/"] = "_" })) end
local function unpadded(s) return (s:gsub("=+$", "")) end
local function pct(s, fmt) return (s:gsub(".", function(c) return fmt:format(c:byte()) end)) end

-- A mixed-case secret whose base64 holds '+' and '/' (so both alphabets differ).
local SECRET = "pat-na1-Zf3e?>a1-7B2c-4d5e->>?-90aBcDeF1234"

-- Every derived form that must be redacted, by name.
local function forms(secret)
  local bearer = "Bearer " .. secret
  local f = {
    exact = secret, upper = secret:upper(), lower = secret:lower(),
    b64 = b64(secret), b64_bearer = b64(bearer),
    b64_unpadded = unpadded(b64(secret)), b64_bearer_unpadded = unpadded(b64(bearer)),
    b64url = url_safe(b64(secret)), b64url_bearer = url_safe(b64(bearer)),
    b64url_unpadded = unpadded(url_safe(b64(bearer))),
    pct_upper = pct(secret, "%%%02X"), pct_lower = pct(secret, "%%%02x"),
    prefix20 = secret:sub(1, 20), half = secret:sub(1, math.floor(#secret / 2)),
    middle12 = secret:sub(8, 19), tail13_upper = secret:sub(-13):upper(),
  }
  -- inside a longer base64 text: 1 and 2 bytes before, 1 or 2 after
  for k, around in ipairs { { "x", "yz" }, { "xy", "z" }, { "xyz", "" } } do
    f["b64_inside_" .. k] = b64(around[1] .. secret .. around[2])
    f["b64_bearer_inside_" .. k] = url_safe(b64(around[1] .. bearer .. around[2]))
  end
  return f
end

-- The secret's characters (12 or more in a row) left in s after redaction.
local function leftover(s, secret)
  local low, sl = s:lower(), secret:lower()
  for i = 1, #sl - 11 do
    if low:find(sl:sub(i, i + 11), 1, true) then return sl:sub(i, i + 11) end
  end
  return nil
end

describe("commprefs.redact", function()
  local owner
  before_each(function()
    owner = {}
    redact.remember(owner, SECRET)
  end)

  it("the test's secret makes the two base64 alphabets differ", function()
    assert.is_truthy(b64(SECRET):find("[+/]"))
    assert.is_truthy(b64("Bearer " .. SECRET):find("[+/]"))
  end)

  it("redacts every derived form in text", function()
    for name, form in pairs(forms(SECRET)) do
      local out = redact.text("before " .. form .. " after")
      assert.is_true(redact.found(form), name)
      assert.is_falsy(out:find(form, 1, true), name .. ": " .. out)
      assert(out:find("^before .*" .. MARK:gsub("%p", "%%%0") .. ".* after$"), name .. ": " .. out)
      assert.is_nil(leftover(out, SECRET), name)
    end
  end)

  it("leaves at most a few characters of a base64 form that straddles other bytes", function()
    for k = 1, 2 do
      local inside = b64(("q"):rep(k) .. "Bearer " .. SECRET .. "!!")
      local out = redact.text(inside)
      assert.is_true(#out <= #MARK + 8, out) -- the straddling characters only
    end
  end)

  it("redacts every form in decoded JSON values: strings and keys, nested", function()
    local f = forms(SECRET)
    local body = { list = {}, by_key = {} }
    for name, form in pairs(f) do
      body.list[#body.list + 1] = "x " .. form
      body.by_key[form] = name
    end
    local v = redact.value(cjson.decode(cjson.encode(body)))
    for _, s in ipairs(v.list) do -- at most the few base64 characters that straddle other bytes remain
      assert.is_truthy(s:find("^x .*" .. MARK:gsub("%p", "%%%0")), s)
      assert.is_true(#s <= #"x " + #MARK + 8, s)
    end
    for key, name in pairs(v.by_key) do
      assert.is_falsy(key:find(f[name], 1, true), name)
      assert.is_truthy(key:find(MARK, 1, true), name)
    end
  end)

  it("leaves text and values without a secret unchanged", function()
    local s = "HTTP 401: This oauth-token (pat-na1-...) is invalid; the other run was 20 ok"
    assert.equal(s, redact.text(s))
    assert.is_false(redact.found(s))
    -- 11 characters of the secret, fewer than 12 in a row, base64 of something else
    for _, t in ipairs { SECRET:sub(1, 11), SECRET:sub(20, 30), b64("Bearer other-token-value"), "" } do
      assert.equal(t, redact.text(t))
    end
    local v = { message = "fine", context = { a = { "b", "c" } }, [1] = 2 }
    assert.same({ message = "fine", context = { a = { "b", "c" } }, [1] = 2 }, redact.value(v))
    assert.equal(42, redact.text(42))
  end)

  it("keeps several secrets per owner; remember() replaces them, forget_secret drops one", function()
    local refresh, client_secret = "na1-refresh-0011-2233-4455-66778899aabb", "cs/with+reserved=chars&x"
    redact.remember_secret(owner, refresh)
    redact.remember_secret(owner, client_secret)
    redact.remember_secret(owner, refresh) -- twice: once
    for _, s in ipairs { SECRET, b64("Bearer " .. refresh), refresh:sub(5, 20):upper(),
      "a=" .. client_secret:gsub("[/+=&]", function(c) return ("%%%02X"):format(c:byte()) end) } do
      assert.is_falsy(redact.text("[" .. s .. "]"):find(s, 1, true), s)
    end
    redact.forget_secret(owner, refresh)
    assert.equal("[" .. refresh .. "]", redact.text("[" .. refresh .. "]"))
    assert.equal("[" .. MARK .. "]", redact.text("[" .. client_secret .. "]"))
    redact.remember(owner, "only-this-one-now-0123")
    assert.equal("[" .. client_secret .. "]", redact.text("[" .. client_secret .. "]"))
  end)

  it("a short secret: exact, case and encoded forms, but no shorter runs", function()
    local short = "Sh0rt-Tok1" -- 10 characters
    redact.remember(owner, short)
    for _, s in ipairs { short, short:upper(), b64(short), b64("Bearer " .. short), pct(short, "%%%02x") } do
      assert.equal("<" .. MARK .. ">", redact.text("<" .. s .. ">"), s)
    end
    assert.equal("Sh0rt-Tok", redact.text("Sh0rt-Tok"))
  end)

  it("forgets an owner's secrets once the owner is collected", function()
    local other = "collected-owner-secret-5566"
    redact.remember({}, other) -- no other reference to that owner
    collectgarbage()
    collectgarbage()
    assert.equal(other, redact.text(other))
  end)

  it("ignores empty and non-string secrets", function()
    redact.remember_secret(owner, "")
    redact.remember_secret(owner, 42)
    assert.equal("abc", redact.text("abc"))
  end)
end)

describe("a server echoing a transform of the token (end to end)", function()
  local TOKEN = hostile.TOKEN
  local srv
  setup(function() srv = hostile.start() end)
  teardown(function() hostile.stop(srv) end)

  local function call(status, ctype, body)
    local c = commprefs.new { token = TOKEN, max_retries = 0,
      base_url = srv.url .. "/" .. hostile.respond(status, ctype, body) }
    local env, err = c:get_status("a@b.co")
    c:close()
    assert.is_nil(env)
    return err
  end

  it("base64(\"Bearer TOKEN\") in a JSON error body is not in the Error's message or tostring", function()
    local echo = b64("Bearer " .. TOKEN)
    local err = call(401, "application/json",
      cjson.encode { message = "bad credentials: " .. echo, category = "INVALID_AUTHENTICATION",
        correlationId = echo, context = { [echo] = { echo } } })
    assert.equal("http", err.kind)
    assert.is_falsy(err.message:find(echo, 1, true), err.message)
    assert.matches(MARK, err.message, 1, true)
    assert.is_falsy(tostring(err):find(echo, 1, true), tostring(err))
    assert.is_falsy(tostring(err):find(unpadded(echo), 1, true))
    assert.is_falsy(commprefs.pretty(err):find(unpadded(echo), 1, true))
    assert.is_falsy(cjson.encode(err.context):find(unpadded(echo), 1, true))
  end)

  it("an Error's url stays redacted after its client is closed and collected", function()
    -- tostring redacts with the secrets known then: after close() the token may not be
    -- (this case failed now and then: the url was kept as sent and shown later)
    local form = forms(TOKEN).b64_bearer_unpadded
    local err = call(500, "text/plain", "echo " .. form)
    collectgarbage(); collectgarbage()
    assert.is_falsy(tostring(err):find(form, 1, true), tostring(err))
    assert.is_falsy(err.url:find(form, 1, true), err.url)
  end)

  it("every other form, in a JSON and in a plain-text error body", function()
    for name, form in pairs(forms(TOKEN)) do
      local errs = { call(401, "application/json", cjson.encode { message = "echo " .. form }),
        call(500, "text/plain", "echo " .. form) }
      for _, err in ipairs(errs) do
        assert.is_falsy(tostring(err):find(form, 1, true), name .. ": " .. tostring(err))
        assert.is_nil(leftover(tostring(err), TOKEN), name .. ": " .. tostring(err))
      end
    end
  end)
end)
