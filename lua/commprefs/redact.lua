-- commprefs.redact: owns keeping the clients' secrets (tokens; for OAuth also
-- the client secret and the refresh and access tokens) out of everything that
-- came from a server. The secrets live only here, in a private table with
-- weak keys (the owners: client tables, never holding a secret themselves):
-- once an owner is collected, its secrets are gone too. Redaction replaces,
-- for every live secret, with "<redacted>", in text and, in place, in decoded
-- values (keys and strings):
--   - the secret itself, in any letter case;
--   - its percent-encoded forms (reserved bytes only, or every byte; hex in
--     either case), in any letter case;
--   - base64 of the secret and of "Bearer SECRET", standard and URL-safe
--     alphabets, with or without padding, and the part of it that shows when
--     it sits inside a longer base64 text (each of the 3 alignments);
--   - for a secret of 12 characters or more, any run of 12 or more of its
--     consecutive characters (a prefix, a half), in any letter case.
-- Every form is computed once, when a secret is remembered. A text first
-- meets a quick check (plain finds of a few 6-byte pieces): a text holding
-- no piece is returned as it is, unchanged and not copied.
local M = {}

-- core.suspects: the whole quick check in one C call, over core.suspect_index
local core = require("commprefs.core")
local core_suspects, core_suspect_index = core.suspects, core.suspect_index

local live = setmetatable({}, { __mode = "k" }) -- owner -> array of entries (see prepare)
local MARK = "<redacted>"
M.MARK = MARK

local FRAGMENT = 12 -- the shortest run of a secret's characters that is redacted
local PIECE = 6     -- the quick check's piece length (FRAGMENT >= 2 * PIECE - 1)
local MIN_FORM = 8  -- a derived form shorter than this is dropped (it would match anything)

------------------------------------------------------------------ derived forms

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

-- Standard base64 of s, padded.
local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1, c2 = math.floor(n / 262144) % 64, math.floor(n / 4096) % 64
    local c3, c4 = math.floor(n / 64) % 64, n % 64
    out[#out + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
      .. (b and B64:sub(c3 + 1, c3 + 1) or "=") .. (c and B64:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

-- The characters of base64(k unknown bytes .. s ..unknown bytes) that depend
-- on s alone: s inside a longer base64 text, at alignment k (0, 1, 2).
local function base64_core(s, k)
  local enc = base64(string.rep("\0", k) .. s .. "\0\0\0")
  local first = math.ceil(8 * k / 6)         -- 0-based index of the first character
  local last = math.floor(8 * (k + #s) / 6) - 1
  return enc:sub(first + 1, last + 1)
end

local function url_safe(s)
  return (s:gsub("[+/]", { ["+"] = "-", ["/"] = "_" }))
end

-- The case-sensitive forms of secret: base64, in both alphabets.
local function base64_forms(secret)
  local forms = {}
  for _, src in ipairs { secret, "Bearer " .. secret } do
    local full = base64(src)
    local list = { full, (full:gsub("=+$", "")), base64_core(src, 0), base64_core(src, 1), base64_core(src, 2) }
    for _, f in ipairs(list) do
      forms[#forms + 1] = f
      forms[#forms + 1] = url_safe(f)
    end
  end
  return forms
end

-- The percent-encoded forms: reserved bytes only (as in a query), every byte.
local function percent_forms(secret)
  return {
    (secret:gsub("[^%w%-._~]", function(c) return string.format("%%%02X", c:byte()) end)),
    (secret:gsub(".", function(c) return string.format("%%%02X", c:byte()) end)),
  }
end

-- Adds f to list (and to seen) once, when it is long enough or is the secret.
local function add_form(list, seen, f, secret)
  if f ~= "" and not seen[f] and (#f >= MIN_FORM or f == secret) then
    seen[f] = true
    list[#list + 1] = f
  end
end

-- Adds the quick-check pieces of form f: its first PIECE bytes.
local function add_piece(pieces, seen, f)
  local p = f:sub(1, PIECE)
  if not seen[p] then
    seen[p] = true
    pieces[#pieces + 1] = p
  end
end

-- The quick-check pieces of the base64 forms. Each of them holds base64 of
-- the secret alone at one of the 3 alignments (base64_core), so one piece of
-- each core, in both alphabets, does; a secret too short for that: the first
-- PIECE characters of every form.
local function base64_pieces(e, seen, secret)
  local cores = { base64_core(secret, 0), base64_core(secret, 1), base64_core(secret, 2) }
  for _, core in ipairs(cores) do
    if #core < PIECE then
      for _, f in ipairs(e.exact) do add_piece(e.pieces, seen, f) end
      return
    end
  end
  for _, core in ipairs(cores) do
    add_piece(e.pieces, seen, core)
    add_piece(e.pieces, seen, url_safe(core))
  end
end

-- Everything redaction needs about one secret, computed once:
--   exact: case-sensitive forms (base64); folded: lower-cased forms matched
--   against the lower-cased text (the secret, percent forms); runs: the
--   secret lower-cased (fragments), or nil when shorter than FRAGMENT;
--   pieces / folded_pieces: the quick check's pieces for either kind.
local function prepare(secret)
  local e = { secret = secret, exact = {}, folded = {}, pieces = {}, folded_pieces = {} }
  if #secret < MIN_FORM then -- too short for derived forms (they would match ordinary text): exact only
    e.exact[1], e.pieces[1] = secret, secret:sub(1, PIECE)
    return e
  end
  local seen, pseen, fseen = {}, {}, {}
  for _, f in ipairs(base64_forms(secret)) do add_form(e.exact, seen, f, secret) end
  base64_pieces(e, pseen, secret)
  local lower = secret:lower()
  add_form(e.folded, seen, lower, lower)
  for _, f in ipairs(percent_forms(secret)) do add_form(e.folded, seen, f:lower(), lower) end
  for _, f in ipairs(e.folded) do add_piece(e.folded_pieces, fseen, f) end
  if #secret >= FRAGMENT then
    e.runs = lower
    -- any FRAGMENT-long run holds one of these aligned pieces
    for i = 1, #lower - PIECE + 1, PIECE do add_piece(e.folded_pieces, fseen, lower:sub(i, i + PIECE - 1)) end
  end
  return e
end

------------------------------------------------------------------ remembering

-- Adds secret to owner's secrets (owner: the client table; a secret already
-- remembered for it is not added twice). Empty or non-string: ignored.
-- The entry of each secret some owner holds, shared by its owners (read
-- only once made): the quick check looks at a secret once per text however
-- many clients hold it. Weak values: gone with the last owner's list.
local prepared = setmetatable({}, { __mode = "v" })

-- The quick check's index: every entry some live owner holds, once, in
-- index[1..index_n] (weak values: an entry whose owners are all collected
-- leaves a hole, as it leaves `live`). Appended to as secrets are
-- remembered; made again from `live` after a secret is forgotten or an
-- owner's secrets are replaced (index_stale), and when holes outnumber
-- entries. pidx: core.suspect_index(index, index_n), a C copy of the
-- entries' pieces, made again at the next check after the index changed
-- (nil: stale).
local index, index_n, indexed, index_made = nil, 0, nil, 0
local index_stale = true
local pidx = nil

local function index_add(e)
  if indexed[e] then return end
  indexed[e] = true
  index_n = index_n + 1
  index[index_n] = e
  pidx = nil
  if index_n > 64 and index_n > 2 * index_made then index_stale = true end -- compact the holes
end

local function make_index()
  index, indexed, index_n = setmetatable({}, { __mode = "v" }), setmetatable({}, { __mode = "k" }), 0
  for _, list in pairs(live) do
    for _, e in ipairs(list) do index_add(e) end
  end
  index_made, index_stale, pidx = index_n, false, nil
end

function M.remember_secret(owner, secret)
  if type(secret) ~= "string" or secret == "" then return end
  local list = live[owner]
  if not list then
    list = {}
    live[owner] = list
  end
  for _, e in ipairs(list) do
    if e.secret == secret then return end
  end
  local e = prepared[secret]
  if not e then
    e = prepare(secret)
    prepared[secret] = e
  end
  list[#list + 1] = e
  if not index_stale then index_add(e) end
end

-- Remembers owner's token: owner's secrets become that one alone.
function M.remember(owner, token)
  if live[owner] then
    live[owner] = nil
    index_stale = true
  end
  M.remember_secret(owner, token)
end

-- Forgets one of owner's secrets (a rotated access token, say).
function M.forget_secret(owner, secret)
  local list = live[owner]
  if not list then return end
  for i = #list, 1, -1 do
    if list[i].secret == secret then
      table.remove(list, i)
      index_stale = true
    end
  end
end

------------------------------------------------------------------ matching

-- The entries whose quick check s passes, or nil.
local function suspects(s)
  if index_stale then make_index() end
  if not pidx then pidx = core_suspect_index(index, index_n) end
  return core_suspects(s, pidx, index)
end

-- Appends to ranges every {i, j} where text holds form.
local function find_all(ranges, text, form)
  local pos = 1
  while true do
    local i, j = text:find(form, pos, true)
    if not i then return end
    ranges[#ranges + 1] = { i, j }
    pos = j + 1
  end
end

-- Appends the runs of FRAGMENT or more of the secret's characters in folded
-- text, each widened to as many of the secret's characters as it holds.
local function find_runs(ranges, folded, runs)
  for o = 1, #runs - FRAGMENT + 1 do
    local window, pos = runs:sub(o, o + FRAGMENT - 1), 1
    while true do
      local i, j = folded:find(window, pos, true)
      if not i then break end
      local lo, hi = o, o + FRAGMENT - 1
      while i > 1 and lo > 1 and folded:byte(i - 1) == runs:byte(lo - 1) do i, lo = i - 1, lo - 1 end
      while j < #folded and hi < #runs and folded:byte(j + 1) == runs:byte(hi + 1) do j, hi = j + 1, hi + 1 end
      ranges[#ranges + 1] = { i, j }
      pos = j + 1
    end
  end
end

-- Every range of s to redact, for the suspected entries.
local function ranges_of(s, folded, entries)
  local ranges = {}
  for _, e in ipairs(entries) do
    for _, f in ipairs(e.exact) do find_all(ranges, s, f) end
    for _, f in ipairs(e.folded) do find_all(ranges, folded, f) end
    if e.runs then find_runs(ranges, folded, e.runs) end
  end
  return ranges
end

-- s with each of ranges (overlapping or touching ones merged) replaced by MARK.
local function replace_ranges(s, ranges)
  table.sort(ranges, function(a, b) return a[1] < b[1] end)
  local out, pos = {}, 1
  local i, j = ranges[1][1], ranges[1][2]
  for k = 2, #ranges + 1 do
    local r = ranges[k]
    if r and r[1] <= j + 1 then
      if r[2] > j then j = r[2] end
    else
      out[#out + 1] = s:sub(pos, i - 1)
      out[#out + 1] = MARK
      pos = j + 1
      if r then i, j = r[1], r[2] end
    end
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

------------------------------------------------------------------ API

-- True when text s holds a live secret in any of the forms above.
function M.found(s)
  if type(s) ~= "string" then return false end
  local entries = suspects(s)
  return entries ~= nil and #ranges_of(s, s:lower(), entries) > 0
end

-- s without any live secret (s itself when there is none).
function M.text(s)
  if type(s) ~= "string" then return s end
  local entries = suspects(s)
  if not entries then return s end
  local ranges = ranges_of(s, s:lower(), entries)
  if #ranges == 0 then return s end
  return replace_ranges(s, ranges)
end

-- Redacts a decoded value in place (strings, and keys of tables); returns it.
function M.value(v, seen)
  if type(v) == "string" then return M.text(v) end
  if type(v) ~= "table" or next(live) == nil then return v end
  seen = seen or {}
  if seen[v] then return v end
  seen[v] = true
  local renamed = {}
  for k, x in pairs(v) do
    if type(x) == "string" or type(x) == "table" then v[k] = M.value(x, seen) end
    if type(k) == "string" and M.found(k) then renamed[k] = true end
  end
  for k in pairs(renamed) do
    v[M.text(k)], v[k] = v[k], nil
  end
  return v
end

return M
