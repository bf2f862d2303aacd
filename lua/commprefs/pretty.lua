-- commprefs.pretty: human-readable text for envelopes (results as an aligned
-- table), errors and any other value. Keys that could hold credentials are
-- never shown, nor a client's token (commprefs.redact); it never raises,
-- whatever types the fields hold.
local Error = require "commprefs.error"
local redact = require "commprefs.redact"

local SECRET = { token = true, authorization = true, access_token = true, Authorization = true }
local COLUMNS = { "subscriberIdString", "subscriptionId", "subscriptionName", "status",
  "wideStatusType", "businessUnitId", "setStatusSuccessReason", "timestamp",
  "id", "name", "isActive", "managePreferencesUrl", "unsubscribeAllUrl" }

local function scalar(v)
  if type(v) == "string" then return v end
  local ok, s = pcall(tostring, v)
  return ok and type(s) == "string" and s or "<" .. type(v) .. ">"
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return scalar(a) < scalar(b) end)
  return keys
end

-- A short one-line text for any value: tables as their items joined by ", ".
local function flat(v, depth)
  if type(v) ~= "table" or getmetatable(v) then return scalar(v) end
  if (depth or 0) > 3 then return "{...}" end
  local parts = {}
  for _, k in ipairs(sorted_keys(v)) do
    local item = flat(v[k], (depth or 0) + 1)
    parts[#parts + 1] = type(k) == "number" and item or scalar(k) .. "=" .. item
  end
  return v[1] ~= nil and table.concat(parts, ", ") or "{" .. table.concat(parts, ", ") .. "}"
end

-- Display width: UTF-8 continuation bytes take no column.
local function width_of(s)
  return #s - select(2, s:gsub("[\128-\191]", ""))
end

local function dump(v, indent, seen, out)
  if type(v) ~= "table" or getmetatable(v) and getmetatable(v).__tostring and not Error.is(v) then
    out[#out + 1] = scalar(v)
    return
  end
  if seen[v] then out[#out + 1] = "<cycle>"; return end
  seen[v] = true
  local keys = sorted_keys(v)
  if #keys == 0 then out[#out + 1] = "{}"; return end
  out[#out + 1] = "{\n"
  for _, k in ipairs(keys) do
    out[#out + 1] = indent .. "  " .. tostring(k) .. " = "
    if SECRET[k] then out[#out + 1] = "<hidden>" else dump(v[k], indent .. "  ", seen, out) end
    out[#out + 1] = "\n"
  end
  out[#out + 1] = indent .. "}"
  seen[v] = nil
end

-- One row per result, or per status inside a result (batch envelopes).
local function rows_of(results)
  local rows = {}
  for _, r in ipairs(results) do
    local nested = type(r) == "table" and (r.statuses or r.wideStatuses)
    if type(r) ~= "table" then
      rows[#rows + 1] = { status = scalar(r) }
    elseif type(nested) == "table" and #nested > 0 then
      for _, s in ipairs(nested) do rows[#rows + 1] = type(s) == "table" and s or { status = scalar(s) } end
    elseif type(nested) == "table" then
      rows[#rows + 1] = { subscriberIdString = r.subscriberIdString, status = "(none)" }
    else
      rows[#rows + 1] = r
    end
  end
  return rows
end

-- Rows as aligned columns: cols (default: the known columns present), a
-- header, and a rule of dashes under it unless rule == false.
local function table_text(rows, cols, rule)
  local width = {}
  if not cols then
    cols = {}
    for _, c in ipairs(COLUMNS) do
      for _, r in ipairs(rows) do
        if r[c] ~= nil then cols[#cols + 1] = c; break end
      end
    end
  end
  for _, c in ipairs(cols) do
    width[c] = #c
    for _, r in ipairs(rows) do
      local n = width_of(scalar(r[c] == nil and "" or r[c]))
      if n > width[c] then width[c] = n end
    end
  end
  local lines = {}
  local function line(get)
    local cells = {}
    for i, c in ipairs(cols) do
      local s = get(c)
      cells[i] = i == #cols and s or s .. string.rep(" ", width[c] - width_of(s))
    end
    lines[#lines + 1] = table.concat(cells, "  ")
  end
  line(function(c) return c end)
  if rule ~= false then line(function(c) return string.rep("-", width[c]) end) end
  for _, r in ipairs(rows) do line(function(c) return r[c] == nil and "" or scalar(r[c]) end) end
  return table.concat(lines, "\n")
end

local function envelope_text(e)
  local out = { string.format("%s: %d result%s", scalar(e.status or "OK"), #e.results,
    #e.results == 1 and "" or "s") }
  if type(e.numErrors) == "number" and e.numErrors > 0 then out[1] = out[1] .. string.format(", %s error%s",
    scalar(e.numErrors), e.numErrors == 1 and "" or "s") end
  local rows = rows_of(e.results)
  if #rows > 0 then out[#out + 1] = table_text(rows) end
  for _, err in ipairs(type(e.errors) == "table" and e.errors or {}) do
    if type(err) == "table" then
      out[#out + 1] = "error: " .. scalar(err.category) .. ": " .. scalar(err.message)
    else
      out[#out + 1] = "error: " .. scalar(err)
    end
  end
  return table.concat(out, "\n")
end

local function error_text(v)
  local out = { tostring(v) }
  for _, d in ipairs(type(v.errors) == "table" and v.errors or {}) do
    if type(d) == "table" then
      local where = Error.text(d["in"])
      out[#out + 1] = "  - " .. flat(d.message) .. (where and (" (in " .. where .. ")") or "")
    else
      out[#out + 1] = "  - " .. flat(d)
    end
  end
  if type(v.context) == "table" then
    for _, k in ipairs(sorted_keys(v.context)) do
      out[#out + 1] = "  " .. scalar(k) .. ": " .. flat(v.context[k])
    end
  end
  return table.concat(out, "\n")
end

local function pretty(v)
  if Error.is(v) then return redact.text(error_text(v)) end
  if type(v) == "table" and type(v.results) == "table" then return redact.text(envelope_text(v)) end
  local out = {}
  dump(v, "", {}, out)
  return redact.text(table.concat(out))
end

return { value = pretty, rows = table_text }
