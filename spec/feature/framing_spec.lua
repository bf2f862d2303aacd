-- Framing and replays on the libcurl transport (HOSTILE: a POST replayed
-- after a reused connection died, two Content-Length values): a replayed
-- POST is an attempt of its own and max_retries = 0 means one send; an
-- answer with two different lengths is an error, never a result.
local rawserver = require "support.rawserver"
local commprefs = require "commprefs"

local TOKEN = "pat-na1-0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6"

local function post(url) return { method = "POST", url = url .. "/x", body = "{}" } end

-- The number of requests the server has received, asked on a fresh connection.
local function received(srv)
  local c = commprefs.new { token = TOKEN, base_url = srv.url }
  local res = c:_perform({ { method = "GET", url = srv.url .. "/count" } })[1]
  c:close()
  return require("cjson").decode(res.body).n - 1
end

describe("a POST on a reused connection that dies unanswered", function()
  it("max_retries = 0: sent once, an error with 1 attempt", function()
    local srv = rawserver.start("dieafter1")
    local c = commprefs.new { token = TOKEN, base_url = srv.url, max_retries = 0 }
    local r = c:_perform({ post(srv.url), post(srv.url) })
    c:close()
    assert.equal(200, r[1].status)
    assert.is_nil(r[2].status)
    assert.equal("network", r[2].kind)
    assert.equal(1, r[2].attempts)
    assert.matches("not sent again", r[2].message)
    assert.equal(2, received(srv)) -- the first POST and the second, never a replay
    srv:stop()
  end)

  it("with retries left: replayed, and the replay is counted", function()
    local srv = rawserver.start("dieafter1")
    local c = commprefs.new { token = TOKEN, base_url = srv.url, max_retries = 2 }
    local r = c:_perform({ post(srv.url), post(srv.url) })
    c:close() -- the server serves one connection at a time
    assert.equal(200, r[2].status)
    assert.equal(2, r[2].attempts)
    assert.equal(3, received(srv))
    srv:stop()
  end)
end)

describe("an answer with two different Content-Length values", function()
  it("is an error (network), not a result, and names the cause", function()
    local srv = rawserver.start("twolengths")
    local c = commprefs.new { token = TOKEN, base_url = srv.url, max_retries = 0 }
    local r = c:_perform({ { method = "GET", url = srv.url .. "/x" } })[1]
    c:close()
    srv:stop()
    assert.is_nil(r.status)
    assert.equal("network", r.kind)
  end)
end)

describe("the same inside nginx (cosockets)", function()
  local nginx = require "support.nginx"
  local inst
  setup(function() inst = nginx.start {} end)
  teardown(function() if inst then inst:stop() end end)

  local function run(url, retries, reqs)
    local status, body = nginx.run(inst, string.format([[
      local c = require("commprefs").new { token = %q, base_url = %q, max_retries = %d }
      local reqs = {}
      for i, path in ipairs { %s } do
        reqs[i] = { method = path == "/get" and "GET" or "POST", url = %q .. path, body = "{}" }
      end
      local r = c:_perform(reqs)
      local out = {}
      for i = 1, #r do out[i] = { status = r[i].status or false, kind = r[i].kind or false,
        attempts = r[i].attempts, message = r[i].message or false } end
      return out
    ]], TOKEN, url, retries, reqs, url))
    assert.equal(200, status, body)
    return require("cjson").decode(body)
  end

  it("max_retries = 0: a POST whose pooled connection died is sent once, an error with 1 attempt", function()
    local srv = rawserver.start("dieafter1")
    local r = run(srv.url, 0, '"/x", "/x"')
    assert.equal(200, r[1].status)
    assert.same({ false, "network", 1 }, { r[2].status, r[2].kind, r[2].attempts })
    assert.matches("not sent again", r[2].message)
    assert.equal(2, received(srv))
    srv:stop()
  end)

  it("two different Content-Length values: an error, not a result", function()
    local srv = rawserver.start("twolengths")
    local r = run(srv.url, 0, '"/get"')
    srv:stop()
    assert.same({ false, "network" }, { r[1].status, r[1].kind })
  end)
end)
