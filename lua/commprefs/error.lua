-- commprefs.error: the Error type of failed calls (`commprefs.Error`).
-- Fields: kind ("http", "network", "timeout", "tls", "decode"), status,
-- category, message, correlation_id, sub_category, context, errors,
-- retry_after, attempts, method, url, and for batches partial/failed_inputs.
local Error = {}
Error.__index = Error
Error.__name = "commprefs.Error"

function Error.new(fields)
  return setmetatable(fields, Error)
end

function Error.is(v)
  return getmetatable(v) == Error
end

function Error.__tostring(e)
  local parts = { "commprefs: " .. tostring(e.kind or "error") }
  if e.status then parts[#parts + 1] = tostring(e.status) end
  if e.category then parts[#parts + 1] = e.category end
  local line = table.concat(parts, " ") .. ": " .. tostring(e.message or "(no message)")
  if e.method and e.url then line = line .. " [" .. e.method .. " " .. e.url .. "]" end
  if e.correlation_id then line = line .. " (correlation id " .. e.correlation_id .. ")" end
  return line
end

return Error
