-- No answer without its question (HOSTILE D1, D2): a keep-alive server that
-- sends every answer twice (at once, or 20 ms later, as a broken proxy
-- might) must never make a read return another read's answer, on either
-- transport. Alternating reads of an unsubscribed and a subscribed address.
local rawserver = require "support.rawserver"
local commprefs = require "commprefs"

local TOKEN = "pat-na1-0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6"

local READS = [[
  local c = commprefs.new { token = TOKEN, base_url = URL, backoff_base = 0.01, backoff_max = 0.05 }
  local wrong, errors = 0, 0
  for i = 1, N do
    local id = (i % 2 == 0 and "u" or "s") .. i .. "@example.com"
    local yes = c:is_unsubscribed_from_all(id)
    if yes == nil then errors = errors + 1 elseif yes ~= (i % 2 == 0) then wrong = wrong + 1 end
    GAP()
  end
  return { wrong = wrong, errors = errors }
]]

-- The reads as Lua source; gap: source run after each read (none by default).
local function code(url, n, gap)
  return string.format("local commprefs = require 'commprefs'\nlocal TOKEN, URL, N = %q, %q, %d\n", TOKEN, url, n)
    .. "local function GAP() " .. (gap or "") .. " end\n" .. READS
end

describe("a server that sends every answer twice on a keep-alive connection", function()
  -- dup-late costs the server 20 ms an answer: fewer reads keep the suite short
  local N = { dup = 1000, ["dup-late"] = 300 }
  for _, mode in ipairs { "dup", "dup-late" } do
    it(mode .. ": " .. N[mode] .. " reads over libcurl, 0 wrong answers, 0 errors", function()
      local srv = rawserver.start(mode)
      local t = assert((loadstring or load)(code(srv.url, N[mode])))()
      srv:stop()
      assert.same({ wrong = 0, errors = 0 }, t)
    end)
  end

  describe("inside nginx (cosockets)", function()
    local N = { dup = 1000, ["dup-late"] = 300 }
    local nginx = require "support.nginx"
    local inst
    setup(function() inst = nginx.start {} end)
    teardown(function() if inst then inst:stop() end end)
    for _, mode in ipairs { "dup", "dup-late" } do
      it(mode .. ": " .. N[mode] .. " reads, 0 wrong answers, 0 errors", function()
        local srv = rawserver.start(mode)
        local status, body = nginx.run(inst, code(srv.url, N[mode]), 120)
        srv:stop()
        assert.equal(200, status, body)
        assert.same({ wrong = 0, errors = 0 }, require("cjson").decode(body))
      end)
    end
  end)

  it("an answer that names another id, twice, is an error (kind decode, code desync), never an answer", function()
    local srv = rawserver.start("dup")
    local c = commprefs.new { token = TOKEN, base_url = srv.url, max_retries = 0 }
    -- the server names the id of the path; a path for another id than asked cannot be made
    -- through the API, so check the rule itself
    local ops = require "commprefs.ops"
    assert.equal("b@x.io", ops.names_other({ results = { { subscriberIdString = "b@x.io" } } }, "a@x.io"))
    assert.is_nil(ops.names_other({ results = { { subscriberIdString = "A@X.io" } } }, "a@x.io"))
    assert.is_true(c:is_unsubscribed_from_all("u1@example.com"))
    c:close()
    srv:stop()
  end)
end)

-- The framing faults of issue 16 as a seeded property: every answer of a
-- keep-alive server carries a fault drawn at random (support.rawserver's
-- faults: a duplicate at once or 20 ms late, bytes after the answer, writes
-- of 1-40 bytes, two Content-Lengths, chunked with odd sizes/extensions/
-- trailers, a bad chunk size, an early close, Connection: close, another
-- id's answer); a read is either right or nil, err, never another read's
-- answer. The seeds make a failure replayable (the server's draws follow
-- the order of the requests it gets).
describe("a keep-alive server with a seeded random framing fault on every answer", function()
  local SEEDS, N = { 1, 2, 3 }, 150

  local function assert_property(t, seed)
    assert.equal(0, t.wrong, "seed " .. seed .. ": a read returned another read's answer")
    assert.is_true(t.errors < N / 2, "seed " .. seed .. ": " .. t.errors .. " of " .. N .. " reads failed")
  end

  for _, seed in ipairs(SEEDS) do
    it("seed " .. seed .. ": " .. N .. " reads over libcurl, 0 wrong answers", function()
      local srv = rawserver.start("faults", seed)
      local t = assert((loadstring or load)(code(srv.url, N)))()
      srv:stop()
      assert_property(t, seed)
    end)
  end

  describe("inside nginx (cosockets)", function()
    local nginx = require "support.nginx"
    local inst
    setup(function() inst = nginx.start {} end)
    teardown(function() if inst then inst:stop() end end)
    for _, seed in ipairs(SEEDS) do
      it("seed " .. seed .. ": " .. N .. " reads, 0 wrong answers", function()
        local srv = rawserver.start("faults", seed)
        local status, body = nginx.run(inst, code(srv.url, N), 120)
        srv:stop()
        assert.equal(200, status, body)
        assert_property(require("cjson").decode(body), seed)
      end)
    end
  end)
end)

-- HOSTILE D1 (case 13) and D2: bytes a server sends to a connection while it
-- is idle in the client's pool (the answer again 50 ms later, or a proxy's
-- unsolicited 408 and close) are never taken as the next read's answer:
-- with 150 ms between the reads over libcurl, and inside nginx with 150 ms
-- of CPU work and no yield between them (nginx's pool cannot drop the dirty
-- connection then). A read is right or nil, err.
describe("bytes sent to a connection idle in the pool", function()
  local N = 6
  for _, mode in ipairs { "idle-dup", "idle408" } do
    it(mode .. ": " .. N .. " reads 150 ms apart over libcurl, 0 wrong answers", function()
      local srv = rawserver.start(mode)
      local t = assert((loadstring or load)(code(srv.url, N, "require('socket').sleep(0.15)")))()
      srv:stop()
      assert.same({ wrong = 0, errors = 0 }, t) -- a 408 read off the idle connection is retried
    end)
  end

  describe("inside nginx (cosockets), CPU work without a yield between the reads", function()
    local nginx = require "support.nginx"
    local BUSY = "ngx.update_time(); local t = ngx.now(); repeat ngx.update_time() until ngx.now() - t >= 0.15"
    local inst
    setup(function() inst = nginx.start {} end)
    teardown(function() if inst then inst:stop() end end)
    for _, mode in ipairs { "idle-dup", "idle408" } do
      it(mode .. ": " .. N .. " reads, 0 wrong answers", function()
        local srv = rawserver.start(mode)
        local status, body = nginx.run(inst, code(srv.url, N, BUSY), 60)
        srv:stop()
        assert.equal(200, status, body)
        assert.same({ wrong = 0, errors = 0 }, require("cjson").decode(body))
      end)
    end
  end)
end)
