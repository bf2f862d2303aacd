-- commprefs.ids, the one rule of what an id is, seen through the library:
-- an id with an invisible or control character in it (a zero-width space,
-- a no-break space, a BOM, a bidi control) names another address than the
-- one meant, so every call refuses it before anything is sent.
local sim = require "support.sim"
local commprefs = require "commprefs"
local ids = require "commprefs.ids"

describe("ids with invisible characters", function()
  before_each(function() sim.reset() end)

  local BAD = {
    { "ada\226\128\139@example.com", "U+200B" },  -- zero-width space inside
    { "\239\187\191ada@example.com", "U+FEFF" },  -- a BOM in front
    { "ada@example.com\194\160", "U+00A0" },      -- a no-break space after
    { "ada\226\128\174@example.com", "U+202E" },  -- a bidi override
    { "ada\194\133@example.com", "U+0085" },      -- a C1 control
  }

  it("are refused by every call, naming the character, and nothing is sent", function()
    local c = commprefs.new { token = "sim-token", base_url = sim.url }
    for _, b in ipairs(BAD) do
      local ok, err = pcall(c.is_unsubscribed_from_all, c, b[1])
      assert.is_false(ok)
      assert.matches("character " .. b[2], err, 1, true)
      ok, err = pcall(c.batch_unsubscribe_all, c, { "ok@example.com", b[1] })
      assert.is_false(ok)
      assert.matches("ids[2]", err, 1, true)
      ok, err = pcall(c.bulk_unsubscribe_all, c, { b[1] })
      assert.is_false(ok)
      assert.matches(b[2], err, 1, true)
    end
    assert.same({}, sim.log())
    c:close()
  end)

  it("the rule itself: trimmed around, refused inside, plain addresses untouched", function()
    assert.equal("ada@example.com", ids.trim("\194\160 ada@example.com\226\128\139\t"))
    assert.is_nil(ids.refused_char("ada@example.com"))
    assert.equal("U+0020", ids.refused_char("a da@example.com"))
    assert.is_nil(ids.refused_char("a da@example.com", true))
    assert.is_false(ids.valid_utf8("ada\255@example.com"))
  end)

  it("an address as the command line and the worker take it: ids.address", function()
    assert.same({ "ada@example.com" }, { ids.address("\239\187\191\194\160ada@example.com\226\128\139 ") })
    assert.same({ nil, "invisible or control character U+200B inside the id", true },
      { ids.address("ada\226\128\139@example.com") })
    assert.same({ nil, ids.EMPTY }, { ids.address("\194\160\t") })
    assert.same({ nil, "not valid UTF-8" }, { ids.address("ada\255@example.com") })
    assert.same({ nil, "not an email address" }, { ids.address("ada.example.com") })
  end)
end)
