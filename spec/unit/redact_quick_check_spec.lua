-- spec/unit/redact_quick_check_spec.lua: commprefs.redact's quick check
-- (core.suspect_index, core.suspects) gives exactly what a brute-force Lua
-- reference gives: an entry is suspected when string.find(s, piece, 1, true)
-- finds one of its `pieces`, or finds one of its `folded_pieces` in
-- s:lower(); entries the index no longer holds (holes, before or after the
-- build) are left out; the rest in entry order. Random texts and pieces
-- (seeded) over a small alphabet, so that pieces are often found: in mixed
-- case, at the start and end of a text, next to NUL bytes.
local core = require "commprefs.core"

local ALPHABET = { "a", "A", "b", "B", "c", "C", "z", "Z", "-", "%", "0", "9", "\0", "=", "\n", "\255" }

local function random_string(len)
  local out = {}
  for i = 1, len do out[i] = ALPHABET[math.random(#ALPHABET)] end
  return table.concat(out)
end

-- s with each ASCII letter's case flipped at random.
local function mixed_case(s)
  return (s:gsub("%a", function(c) return math.random(2) == 1 and c:upper() or c:lower() end))
end

-- The reference: the entries of index[1..n] whose pieces s holds, or nil.
local function reference(s, index, n)
  local folded, out = s:lower(), {}
  for e = 1, n do
    local entry = index[e]
    local hit = false
    for _, p in ipairs(type(entry) == "table" and entry.pieces or {}) do
      hit = hit or s:find(p, 1, true) ~= nil
    end
    for _, p in ipairs(type(entry) == "table" and entry.folded_pieces or {}) do
      hit = hit or folded:find(p, 1, true) ~= nil
    end
    if hit then out[#out + 1] = entry end
  end
  return out[1] and out or nil
end

-- A random piece: 1..6 bytes, mostly 3 or more, rarely empty (it holds
-- for every text); long: 3..8 bytes. Folded ones lower-case, now and then
-- not (which then never matches).
local function random_piece(folded, long)
  if not long and math.random(200) == 1 then return "" end
  local len = long and math.random(3, 8) or math.random(10) == 1 and math.random(2) or math.random(3, 6)
  local p = random_string(len)
  if folded and math.random(10) > 1 then p = p:lower() end
  return p
end

local function random_entries(n, long)
  local index, all = {}, {}
  for e = 1, n do
    local entry = { pieces = {}, folded_pieces = {} }
    for k = 1, math.random(0, 4) do entry.pieces[k] = random_piece(false, long) end
    for k = 1, math.random(0, 4) do entry.folded_pieces[k] = random_piece(true, long) end
    all[#all + 1] = entry
    if math.random(8) > 1 then index[e] = entry end -- else a hole
  end
  return index, all
end

-- A random text, holding now and then a piece of some entry (a folded
-- one in mixed case) at its start, its end or inside.
local function random_text(all)
  local s = random_string(math.random(0, 300))
  local entry = all[math.random(#all)]
  local list = math.random(2) == 1 and entry.pieces or entry.folded_pieces
  if #list > 0 and math.random(3) > 1 then
    local p = list[math.random(#list)]
    if list == entry.folded_pieces then p = mixed_case(p) end
    local where = math.random(3)
    if where == 1 then s = p .. s
    elseif where == 2 then s = s .. p
    else
      local at = math.random(0, #s)
      s = s:sub(1, at) .. p .. s:sub(at + 1)
    end
  end
  return s
end

describe("commprefs.redact's quick check (core.suspects)", function()
  -- 200 indexes of 1..30 entries, 20 texts each; long: every piece 3..8 bytes
  local function check(seed, long)
    math.randomseed(seed)
    local texts, hits = 0, 0
    for _ = 1, 200 do
      local n = math.random(3) == 1 and math.random(30) or math.random(4) -- mostly few, at times many
      local index, all = random_entries(n, long)
      local pidx = core.suspect_index(index, n)
      for _ = 1, 20 do
        if math.random(20) == 1 then index[math.random(n)] = nil end -- collected since the build
        local s = random_text(all)
        local want = reference(s, index, n)
        assert.same(want, core.suspects(s, pidx, index), ("text %q"):format(s))
        texts, hits = texts + 1, hits + (want and 1 or 0)
      end
    end
    assert.equal(4000, texts)
    assert.is_true(hits > 400 and hits < texts - 400, "hits " .. hits) -- both answers are common
  end

  it("gives what plain finds of the pieces give, over random texts and pieces", function()
    check(20261202, false)
  end)

  it("does so too when every piece is 3 bytes or more (the stepped scan)", function()
    check(4242, true)
  end)

  it("builds an index over entries the collector clears meanwhile (weak values)", function()
    -- every entry is held by the weak index alone: the collector (run by the
    -- build's own allocations) may clear some between the build's two walks
    for round = 1, 300 do
      local index = setmetatable({}, { __mode = "v" })
      for e = 1, 50 do index[e] = { pieces = { "xyzxyz" .. e }, folded_pieces = { "qwerty" .. e } } end
      local pidx = core.suspect_index(index, 50)
      local s = "..xyzxyz1..QWERTY2.." .. round
      assert.same(reference(s, index, 50), core.suspects(s, pidx, index))
    end
  end)

  it("answers for its own text when a finalizer checks another text meanwhile", function()
    -- the answer's table is the one allocation of core.suspects: the collector
    -- may run there, and a finalizer may check a text on the same index. In
    -- a fresh VM of the same kind: in the suite's large heap a collector cycle
    -- outlasts the rounds, and no finalizer would run at all.
    local vm = rawget(_G, "jit") and "luajit" or "lua5.4"
    local build = os.getenv("COMMPREFS_BUILD") or ("build/" .. vm)
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write(string.format("package.cpath = %q .. '/?.so;' .. package.cpath\n", build), [[
      local core = require "commprefs.core"
      local index, text = {}, ""
      for e = 1, 8 do
        index[e] = { pieces = { ("k%d-piece"):format(e) }, folded_pieces = {} }
        text = text .. ("k%d-piece "):format(e)
      end
      local pidx, nested, wrong = core.suspect_index(index, 8), 0, 0
      for _ = 1, 50000 do
        for _ = 1, 3 do
          local function check_other() nested = nested + 1; core.suspects("none", pidx, index) end
          if newproxy then getmetatable(newproxy(true)).__gc = check_other -- LuaJIT: userdata only
          else setmetatable({}, { __gc = check_other }) end
        end
        if #core.suspects(text, pidx, index) ~= 8 then wrong = wrong + 1 end
      end
      print(nested, wrong)
    ]])
    f:close()
    local p = io.popen(vm .. " " .. script .. " 2>&1")
    local out = p:read("*a")
    p:close()
    os.remove(script)
    local nested, wrong = out:match("^(%d+)%s+(%d+)")
    assert(nested, out)
    assert.is_true(tonumber(nested) > 1000, out) -- finalizers did run meanwhile
    assert.equals(0, tonumber(wrong), out)
  end)

  it("lets redact find its secrets, and passes a body without one", function()
    math.randomseed(7)
    local secrets = { "sim-token", "pat-na1-Zf3e?>a1-7B2c-4d5e->>?-90aBcDeF1234", "qq" }
    local redact = require "commprefs.redact"
    local owner = {}
    for _, secret in ipairs(secrets) do redact.remember_secret(owner, secret) end
    local body = '{"results":[{"subscriberIdString":"bench@example.com","status":"SUBSCRIBED"}]}'
    for _, s in ipairs { body, body .. "SIM-TOKEN", "QQ", "qq", "pat-na1-", "nothing", "" } do
      assert.equal(redact.found(s), redact.text(s) ~= s)
    end
    assert.is_true(redact.found("PAT-NA1-ZF3E?>A1-7B2C"))
    assert.is_false(redact.found(body))
  end)
end)
