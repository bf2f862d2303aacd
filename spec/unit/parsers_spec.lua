-- spec/unit/parsers_spec.lua: the sans-I/O parsers' strictness (HOSTILE.md D17,
-- D18, D13, and bytes after an answer), fed bytes directly:
-- core.http1_response (csrc/http1.c: a status line must start with "HTTP/";
-- Content-Length twice is an error even with the same value; bytes after a
-- complete response are counted in result().extra and forbid keep-alive) and
-- core.redis_reader (csrc/resp.c: a bulk string announced longer than
-- 64 MiB is a protocol error as soon as its header arrives).
local core = require "commprefs.core"

-- Feeds chunks (or raw, byte by byte when bytewise) until done/error.
local parse = require("support.http1").parse

local function bytes(raw)
  local t = {}
  for i = 1, #raw do t[i] = raw:sub(i, i) end
  return t
end

local OK = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

describe("core.http1_response strictness", function()
  it("refuses a status line that does not start with exactly HTTP/, whole or byte by byte", function()
    for _, bad in ipairs { "HTTX/1.1 200 OK", "Hxxx/1.1 200 OK", "HTTP\\1.1 200 OK", "HTtP/1.1 200 OK" } do
      local raw = bad .. "\r\nContent-Length: 2\r\n\r\n{}"
      for _, chunks in ipairs { { raw }, bytes(raw), { raw:sub(1, 1), raw:sub(2) } } do
        local p, done, err, kind = parse(chunks)
        assert.is_nil(done, bad)
        assert.equal("network", kind)
        assert.equal('invalid HTTP response: the status line does not start with "HTTP/"', err)
        assert.has_error(function() p:result() end)
      end
    end
  end)

  it("checks the final status line after a 1xx too, and still reads good ones", function()
    local _, done, err = parse { "HTTP/1.1 100 Continue\r\n\r\nHTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" }
    assert.is_nil(done)
    assert.matches('does not start with "HTTP/"', err, 1, true)
    for _, chunks in ipairs { { OK }, bytes(OK), { "\r\n" .. OK }, { "HTTP/1.1 103 Early\r\n\r\n", OK } } do
      local p, ok = parse(chunks)
      assert.is_true(ok)
      assert.same({ status = 200, body = "{}", content_type = "application/json", keepalive = true }, p:result())
    end
  end)

  it("refuses two Content-Length headers, different or the same (http-parser 2.9.4), and a list", function()
    for _, lengths in ipairs { { "14", "200" }, { "200", "14" }, { "2", "2" } } do
      local raw = "HTTP/1.1 200 OK\r\nContent-Length: " .. lengths[1] .. "\r\nContent-Length: " .. lengths[2]
        .. "\r\n\r\n{}" .. string.rep("x", 198)
      local _, done, err, kind = parse { raw }
      assert.is_nil(done, raw)
      assert.equal("network", kind)
      assert.matches("^invalid HTTP response: ", err)
    end
    local _, done = parse { "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n{}" }
    assert.is_nil(done)
  end)

  it("counts bytes after a complete response in extra (same feed or later), and keepalive is false", function()
    local forged = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ntrue"
    local p, done = parse { OK .. forged }
    assert.is_true(done)
    local r = p:result()
    assert.equal("{}", r.body)
    assert.equal(#forged, r.extra)
    assert.is_false(r.keepalive)
    -- a later feed adds to it
    assert.is_true(p:feed("\r\n"))
    assert.equal(#forged + 2, p:result().extra)
    -- chunked, and after a body read to its Content-Length byte by byte
    p, done = parse { "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nX" }
    assert.is_true(done)
    assert.equal(1, p:result().extra)
    p = core.http1_response()
    for _, b in ipairs(bytes(OK)) do p:feed(b) end
    assert.is_nil(p:result().extra)
    assert.is_true(p:feed("H"))
    assert.equal(1, p:result().extra)
    assert.is_false(p:result().keepalive)
  end)

  it("has no extra field when nothing followed the response", function()
    local p = parse { OK }
    assert.is_nil(p:result().extra)
    assert.is_true(p:result().keepalive)
  end)
end)

describe("core.redis_reader bulk-string cap", function()
  local CAP_ERR = "protocol error: the server announced a string of more than 67108864 bytes"

  it("refuses a 300 MB bulk string as soon as its header is read, and stays failed", function()
    local rd = core.redis_reader()
    assert.is_true(rd:feed("$300000000\r\n"))
    local ok, err = rd:get()
    assert.is_nil(ok)
    assert.equal(CAP_ERR, err)
    ok, err = rd:feed(string.rep("x", 1024))
    assert.is_nil(ok)
    assert.equal(CAP_ERR, err)
    assert.is_nil((rd:get()))
    rd:close()
  end)

  it("also with the header's digits split across feeds, or inside an array", function()
    local rd = core.redis_reader()
    assert.is_true(rd:feed("$3000"))
    assert.is_false(rd:get()) -- 3000 so far: fine
    assert.is_true(rd:feed("00000\r\nabc"))
    assert.same({ nil, CAP_ERR, "too_large" }, { rd:get() })
    rd = core.redis_reader()
    assert.is_true(rd:feed("*2\r\n$3\r\nabc\r\n$67108865\r\n"))
    assert.same({ nil, CAP_ERR, "too_large" }, { rd:get() })
  end)

  it("refuses it when fed whole before any get (the string is never built)", function()
    local rd = core.redis_reader()
    local n = 64 * 1024 * 1024 + 1
    assert.is_true(rd:feed("$" .. n .. "\r\n" .. string.rep("x", n) .. "\r\n"))
    assert.same({ nil, CAP_ERR, "too_large" }, { rd:get() })
    rd:close()
    collectgarbage()
  end)

  it("accepts strings up to the cap, nil bulk strings and ordinary replies", function()
    local rd = core.redis_reader()
    assert.is_true(rd:feed("$67108864\r\nab"))
    assert.is_false(rd:get()) -- exactly 64 MiB announced: waits for it
    rd = core.redis_reader()
    assert.is_true(rd:feed("$5\r\nhello\r\n$-1\r\n:7\r\n"))
    assert.same({ true, "hello" }, { rd:get() })
    assert.same({ true, core.redis_null }, { rd:get() })
    assert.same({ true, 7 }, { rd:get() })
    assert.is_false(rd:get())
  end)
end)
