-- commprefs.redact: owns keeping the clients' tokens out of everything that
-- came from a server. The tokens live only here, in a private table with weak
-- keys (the client tables, never holding a token themselves): once a client
-- is collected, its token is gone too. Redaction replaces every live token
-- (so a body echoing any of this process's tokens is cleaned) with
-- "<redacted>", in text and, in place, in decoded values (keys and strings).
local M = {}

local live = setmetatable({}, { __mode = "k" })
local MARK = "<redacted>"
M.MARK = MARK

-- Remembers owner's token (owner: the client table).
function M.remember(owner, token)
  live[owner] = token
end

local function replace_plain(s, token)
  local out, pos = {}, 1
  while true do
    local i, j = s:find(token, pos, true)
    if not i then break end
    out[#out + 1] = s:sub(pos, i - 1)
    out[#out + 1] = MARK
    pos = j + 1
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

-- True when text s holds a live token.
function M.found(s)
  if type(s) ~= "string" then return false end
  for _, token in pairs(live) do
    if s:find(token, 1, true) then return true end
  end
  return false
end

-- s without any live token (s itself when there is none).
function M.text(s)
  if type(s) ~= "string" then return s end
  for _, token in pairs(live) do
    if s:find(token, 1, true) then s = replace_plain(s, token) end
  end
  return s
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
