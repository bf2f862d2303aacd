-- commprefs.error: the Error type of failed calls (`commprefs.Error`).
-- Fields: kind ("http", "network", "timeout", "tls", "too_large", "decode",
-- "journal", "item", "stopped", "redis", ...), code (machine-readable, set
-- where the failure is known: a Redis error class such as "WRONGTYPE", or
-- "connection", "auth_failed", "interrupted", "too_large"), status, category, message, correlation_id, sub_category,
-- context, errors, retry_after, attempts, method, url, and for batches
-- partial/failed_inputs. tostring(err) never raises, whatever the fields
-- hold (a field of an unexpected type is left out), and never shows a
-- client's token (commprefs.redact).
local redact = require "commprefs.redact"

local Error = {}
Error.__index = Error
Error.__name = "commprefs.Error"

function Error.new(fields)
  return setmetatable(fields, Error)
end

function Error.is(v)
  return getmetatable(v) == Error
end

-- A field as text: strings and numbers as they are, anything else left out.
local function text(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" or t == "boolean" then return tostring(v) end
  return nil
end
Error.text = text

function Error.__tostring(e)
  local parts = { "commprefs: " .. (text(rawget(e, "kind")) or "error") }
  local status, category = text(rawget(e, "status")), text(rawget(e, "category"))
  if status then parts[#parts + 1] = status end
  if category then parts[#parts + 1] = category end
  local line = table.concat(parts, " ") .. ": " .. (text(rawget(e, "message")) or "(no message)")
  local method, url = text(rawget(e, "method")), text(rawget(e, "url"))
  if method and url then line = line .. " [" .. method .. " " .. url .. "]" end
  local cid = text(rawget(e, "correlation_id"))
  if cid then line = line .. " (correlation id " .. cid .. ")" end
  return redact.text(line)
end

-- The core's errors (Redis replies and connections) carry this type (a core
-- built without it, as the fuzzers' stand-in, keeps its own).
local core = require "commprefs.core"
if core.error_type then core.error_type(Error) end

return Error
