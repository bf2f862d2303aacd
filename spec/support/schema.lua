-- support.schema: checks a decoded JSON value against a schema of the
-- OpenAPI document (the subset it uses: $ref, type, required, properties,
-- items, enum, additionalProperties, format). Returns true, or false and
-- the path of the first mismatch. Raw JSON text is also checked for integer
-- fields written as non-integers (cjson decodes every number as a double).
local cjson = require "cjson"

local M = {}
local doc

function M.document()
  if not doc then
    local f = assert(io.open("spec/fixtures/communication-preferences-2026-03.openapi.json"))
    doc = cjson.decode(f:read("*a"))
    f:close()
  end
  return doc
end

local function resolve(s)
  while s["$ref"] do
    local name = s["$ref"]:match("^#/components/schemas/(.+)$")
    s = assert(M.document().components.schemas[name], "unknown $ref " .. s["$ref"])
  end
  return s
end

local function is_array(v)
  if type(v) ~= "table" then return false end
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  return n == #v
end

local function check(v, s, path)
  s = resolve(s)
  if v == cjson.null then return false, path .. ": null" end
  local t = s.type
  if t == "object" then
    if type(v) ~= "table" or (next(v) ~= nil and is_array(v)) then return false, path .. ": object expected" end
    for _, req in ipairs(s.required or {}) do
      if v[req] == nil then return false, path .. "." .. req .. ": required" end
    end
    for k, val in pairs(v) do
      local ps = s.properties and s.properties[k]
      if ps then
        local ok, err = check(val, ps, path .. "." .. k)
        if not ok then return false, err end
      elseif type(s.additionalProperties) == "table" then
        local ok, err = check(val, s.additionalProperties, path .. "." .. k)
        if not ok then return false, err end
      end
    end
  elseif t == "array" then
    if not is_array(v) then return false, path .. ": array expected" end
    for i, item in ipairs(v) do
      local ok, err = check(item, s.items, path .. "[" .. i .. "]")
      if not ok then return false, err end
    end
  elseif t == "string" then
    if type(v) ~= "string" then return false, path .. ": string expected, got " .. type(v) end
    if s.format == "date-time" and not v:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d") then
      return false, path .. ": date-time expected"
    end
    if s.format == "uuid" and not v:match("^%x+%-%x+%-%x+%-%x+%-%x+$") then return false, path .. ": uuid expected" end
  elseif t == "integer" then
    if type(v) ~= "number" or v ~= math.floor(v) then return false, path .. ": integer expected" end
  elseif t == "boolean" then
    if type(v) ~= "boolean" then return false, path .. ": boolean expected" end
  end
  if s.enum then
    local found = false
    for _, e in ipairs(s.enum) do if e == v then found = true end end
    if not found then return false, path .. ": " .. tostring(v) .. " not in enum" end
  end
  return true
end

-- Validates raw JSON text against the named component schema.
function M.validate(text, schema_name)
  local ok, v = pcall(cjson.decode, text)
  if not ok then return false, "not JSON: " .. text:sub(1, 80) end
  if text:find('"[%w]+Id"%s*:%s*%-?%d+%.%d') or text:find('"numErrors"%s*:%s*%d+%.%d') then
    return false, "an integer field is written with a fraction"
  end
  return check(v, { ["$ref"] = "#/components/schemas/" .. schema_name }, "$")
end

-- The schema an operation documents for a status (200, 207, else default = Error).
function M.response_schema(path, method, status)
  local op = M.document().paths[path][method:lower()]
  local r = op.responses[tostring(status)] or op.responses.default
  if r["$ref"] then return "Error" end
  local s = r.content["application/json"].schema["$ref"]
  return s:match("([^/]+)$")
end

return M
