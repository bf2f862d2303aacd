-- commprefs.check: owns the rules of arguments and options, once: what a
-- text, an id, an integer and a numeric option must be, with the ranges
-- and defaults of the C core's one table (core.limits, csrc/cp_limits.h), so a
-- message names the option as the user wrote it and no number is written
-- twice. Each rule returns nil when v is fine, else the reason; the caller
-- raises (with the stack level that points at its own caller).
local core = require "commprefs.core"
local ids = require "commprefs.ids"

local limits = core.limits
local M = { limits = limits, MAX_ID = limits.max_id_bytes, MAX_TOKEN = limits.max_token_bytes }

local math_type = math.type or function(x)
  if type(x) ~= "number" then return nil end
  return x == math.floor(x) and x > -2^53 and x < 2^53 and "integer" or "float"
end

function M.is_integer(v)
  return math_type(v) == "integer" or (type(v) == "number" and v == math.floor(v) and v > -2^53 and v < 2^53)
end

-- A text argument `name`: a string, non-empty unless allow_empty, at most max bytes, no control bytes.
function M.text(name, v, allow_empty, max)
  if type(v) ~= "string" then
    return string.format("bad argument '%s' (string expected, got %s)", name, type(v))
  end
  if v == "" and not allow_empty then return string.format("bad argument '%s' (empty string)", name) end
  if max and #v > max then
    return string.format("bad argument '%s' (%d bytes long, at most %d allowed)", name, #v, max)
  end
  if core.has_control(v) then return string.format("bad argument '%s' (contains control characters)", name) end
end

-- An id (an e-mail address or HubSpot's subscriber id string): a text that
-- is valid UTF-8 with no invisible or control character in it (commprefs.ids;
-- a plain space is HubSpot's to judge): such an id names another address
-- than the one meant.
local find, PLAIN = string.find, ids.PLAIN
function M.id(name, v)
  -- printable ASCII only (the usual e-mail address; commprefs.ids.PLAIN): no
  -- control byte, valid UTF-8 and no refused character, in one find
  if type(v) == "string" and #v <= M.MAX_ID and find(v, PLAIN) then return nil end
  local why = M.text(name, v, false, M.MAX_ID)
  if why then return why end
  if not ids.valid_utf8(v) then return string.format("bad argument '%s' (not valid UTF-8)", name) end
  local bad = ids.refused_char(v, true)
  if bad then return string.format("bad argument '%s' (invisible or control character %s in it)", name, bad) end
end

function M.integer(name, v)
  if not M.is_integer(v) then
    return string.format("bad argument '%s' (integer expected, got %s)", name,
      type(v) == "number" and tostring(v) or type(v))
  end
end

-- A numeric option of core.limits (its name as the user writes it: "timeout",
-- "rate_limit.max", ...): nil (absent or fine) or the reason.
function M.option(name, v)
  local l = assert(limits[name], name)
  if v == nil then return nil end
  if type(v) ~= "number" or v ~= v or (l.integer and not M.is_integer(v)) or v < l.min or v > l.max then
    return string.format("bad option '%s' (%s from %.15g to %.15g expected)", name,
      l.integer and "an integer" or "a number", l.min, l.max)
  end
end

return M
