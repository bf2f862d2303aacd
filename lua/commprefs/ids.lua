-- commprefs.ids: owns what an id is, as HubSpot sees it, for every part of
-- commprefs (the library's argument checks in commprefs.check, the command
-- line's input files, the worker's entries): strict UTF-8; the white space a
-- file may put around an id (ASCII space and tab, U+00A0, U+2000-U+200A,
-- U+202F, U+205F, U+3000, U+FEFF and the zero-width U+200B-U+200D, U+2060),
-- which the command line trims; the characters refused inside an id (those
-- same ones, C0/C1 controls, U+2028/U+2029 and the bidi controls U+200E/F,
-- U+202A-U+202E, U+2066-U+2069): they make another address than the one
-- meant; and the shape of an e-mail address.
local M = {}

-- The UTF-8 bytes of code point cp (utf8.char is Lua 5.3+ only).
local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
  return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

-- The code point of one well-formed UTF-8 sequence.
local function code_point(seq)
  local b1, b2, b3, b4 = seq:byte(1, 4)
  if b1 < 0x80 then return b1 end
  if b1 < 0xE0 then return (b1 - 0xC0) * 64 + (b2 - 0x80) end
  if b1 < 0xF0 then return ((b1 - 0xE0) * 64 + (b2 - 0x80)) * 64 + (b3 - 0x80) end
  return (((b1 - 0xF0) * 64 + (b2 - 0x80)) * 64 + (b3 - 0x80)) * 64 + (b4 - 0x80)
end

-- A set of the UTF-8 encodings of the given code points and {first, last} ranges.
local function char_set(list, into)
  local set = into or {}
  for _, c in ipairs(list) do
    local first, last = c, c
    if type(c) == "table" then first, last = c[1], c[2] end
    for cp = first, last do set[utf8_char(cp)] = true end
  end
  return set
end

local TRIMMED_LIST = { 0x20, 0x09, 0xA0, { 0x2000, 0x200A }, 0x202F, 0x205F, 0x3000, 0xFEFF,
  { 0x200B, 0x200D }, 0x2060 }
local TRIMMED = char_set(TRIMMED_LIST)
-- Refused inside an id: the trimmed characters, controls, line/paragraph separators, bidi controls.
local REFUSED = char_set({ { 0x00, 0x1F }, 0x7F, { 0x80, 0x9F }, 0x2028, 0x2029, 0x200E, 0x200F,
  { 0x202A, 0x202E }, { 0x2066, 0x2069 } }, char_set(TRIMMED_LIST))

-- Strict UTF-8 (no overlong forms, surrogates or code points above U+10FFFF).
local function valid_utf8(s)
  local i = 1
  while true do
    i = s:find("[\128-\255]", i) -- ASCII runs are valid: skip them in one call
    if not i then return true end
    local b = s:byte(i)
    local len, min
    if b < 0x80 then len = 1 elseif b >= 0xC2 and b <= 0xDF then len, min = 2, 0x80
    elseif b >= 0xE0 and b <= 0xEF then len, min = 3, 0x800
    elseif b >= 0xF0 and b <= 0xF4 then len, min = 4, 0x10000
    else return false end
    if len > 1 then
      local seq = s:sub(i, i + len - 1)
      if #seq < len or seq:find("[^\128-\191]", 2) then return false end
      local cp = code_point(seq)
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    end
    i = i + len
  end
end

-- s without the TRIMMED characters at either end (s is valid UTF-8).
local function trim_unicode(s)
  local first, last = 1, #s
  while first <= last do
    local b = s:byte(first)
    local len = b < 0x80 and 1 or b < 0xE0 and 2 or 3
    if not TRIMMED[s:sub(first, first + len - 1)] then break end
    first = first + len
  end
  while last >= first do
    local b, len = s:byte(last), 1
    if b >= 0x80 then len = s:byte(last - 1) >= 0xC0 and 2 or 3 end
    if not TRIMMED[s:sub(last - len + 1, last)] then break end
    last = last - len
  end
  return s:sub(first, last)
end

-- The first REFUSED character of id as "U+XXXX", or nil. allow_space: an
-- ASCII space inside is not refused (the library's ids are any text HubSpot
-- takes; the command line refuses it in an address).
local function refused_char(id, allow_space)
  local s = id:find(allow_space and "[%z\1-\31\127]" or "[%z\1-\32\127]") -- the ASCII ones
  if s then return string.format("U+%04X", id:byte(s)) end
  local pos = 1
  while true do
    local a, b = id:find("[\192-\255][\128-\191]*", pos)
    if not a then return nil end
    local seq = id:sub(a, b)
    if REFUSED[seq] then return string.format("U+%04X", code_point(seq)) end
    pos = b + 1
  end
end

M.ADDRESS = "^[^@]+@[^@]+%.[^@.]+$"
-- The common id, checked in one anchored match: printable ASCII (U+0020 to
-- U+007E) and nothing else, so valid UTF-8 with no refused character in it
-- but perhaps a plain space (which refused_char(id, true) allows).
M.PLAIN = "^[\32-\126]+$"
-- The fast path of M.address for a line of a file, at position init of its
-- buffer: an address of printable ASCII without "@" but the one, a dot in its
-- domain (so M.ADDRESS holds), between optional spaces/tabs (trimmed),
-- ending in "\n" or "\r\n"; the capture is the id M.address gives for that
-- line. A line it does not match takes M.address (the full rule).
M.PLAIN_LINE = "^[ \t]*([\33-\63\65-\126]+@[\33-\63\65-\126]+%.[\33-\45\47-\63\65-\126]+)[ \t]*\r?\n"
M.EMPTY = "empty" -- the why of an address that is nothing but white space

-- An address as the command line (a line, an argument) and the worker (an
-- entry's field) take it: s with the white space around it trimmed. nil,
-- why, refused when it is none: why is "not valid UTF-8", M.EMPTY,
-- "invisible or control character U+XXXX inside the id" (then refused is
-- true: it would name another address than the one meant) or "not an email
-- address". Duplicates are compared by commprefs.ops.key (any letter case).
function M.address(s)
  if not valid_utf8(s) then return nil, "not valid UTF-8" end
  local id = trim_unicode(s)
  if id == "" then return nil, M.EMPTY end
  local bad = refused_char(id)
  if bad then return nil, "invisible or control character " .. bad .. " inside the id", true end
  if not id:find(M.ADDRESS) then return nil, "not an email address" end
  return id
end

M.valid_utf8, M.trim, M.refused_char = valid_utf8, trim_unicode, refused_char

return M
