-- commprefs.response: turns one transport result (see commprefs.core's
-- perform) into what a call returns: the decoded envelope, or nil and a
-- commprefs.Error with HubSpot's error body, the status, a readable snippet
-- of a body that is not JSON, and the URL without credentials. Shared by the
-- client's calls and bulk jobs.
local core = require "commprefs.core"
local Error = require "commprefs.error"

local M = {}

function M.strip_userinfo(url)
  return (url:gsub("^(%a[%w+.-]*://)[^/@]*@", "%1"))
end
local strip_userinfo = M.strip_userinfo

local function snippet(body)
  local s = body:sub(1, 120):gsub("[%c]", " ")
  return #body > 120 and s .. "..." or s
end

local function is_json(ctype)
  return ctype == nil or ctype:lower():find("json", 1, true) ~= nil
end

local function error_base(req, res)
  return { method = req.method, url = strip_userinfo(req.url), attempts = res.attempts,
    status = res.status, retry_after = res.retry_after }
end

-- Turns one transport result into the decoded envelope, or nil, Error.
-- The success path allocates nothing but the decoded envelope.
function M.outcome(req, res)
  local status, body = res.status, res.body
  if status and status >= 200 and status < 300 then
    if body == "" then return {} end
    local v, err
    if is_json(res.content_type) then v, err = core.decode(body) end
    if type(v) == "table" then return v end
    local base = error_base(req, res)
    base.kind = "decode"
    base.message = is_json(res.content_type)
      and string.format("invalid JSON (HTTP %d): %s: %s", status, tostring(err or "not an object"), snippet(body))
      or string.format("expected JSON, got %s (HTTP %d): %s", tostring(res.content_type), status, snippet(body))
    return nil, Error.new(base)
  end
  local base = error_base(req, res)
  if res.kind then
    base.kind, base.message = res.kind, res.message
    return nil, Error.new(base)
  end
  base.kind = "http"
  local v = is_json(res.content_type) and body ~= "" and core.decode(body)
  if type(v) == "table" then
    base.category = v.category or v.errorType
    base.message = v.message
    base.correlation_id = v.correlationId
    base.sub_category = v.subCategory
    base.context = v.context
    base.errors = v.errors
    base.policy_name = v.policyName
  else
    base.message = string.format("HTTP %d with a %s body: %s", status, tostring(res.content_type), snippet(body))
  end
  base.message = base.message or ("HTTP " .. status)
  base.daily_limit = res.daily_limit
  return nil, Error.new(base)
end

return M
