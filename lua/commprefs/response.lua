-- commprefs.response: turns one transport result (see commprefs.core's
-- perform) into what a call returns: the decoded envelope, or nil and a
-- commprefs.Error with HubSpot's error body, the status, a readable snippet
-- of a body that is not JSON, and the URL without credentials. Shared by the
-- client's calls, bulk jobs and lookups. Whatever the server sent is checked
-- once, by core.decode's "envelope" (2xx: wrong types are a decode Error) and
-- "error" (others: wrong-typed fields dropped) modes, and any of this
-- process's tokens it echoes is redacted (commprefs.redact) before it can
-- reach an Error, a message or a journal.
local core = require "commprefs.core"
local Error = require "commprefs.error"
local redact = require "commprefs.redact"

local M = {}

function M.strip_userinfo(url)
  return (url:gsub("^(%a[%w+.-]*://)[^/@]*@", "%1"))
end
local strip_userinfo = M.strip_userinfo

-- The url an Error carries: without userinfo, and redacted now, while the
-- client's secrets are known (tostring redacts again, but after close() the
-- client's token may no longer be: a URL that held it would then show it).
function M.error_url(url)
  return redact.text(strip_userinfo(url))
end

-- The first 120 bytes of a body, on one line, without any token.
local function snippet(body)
  body = redact.text(body)
  local s = body:sub(1, 120):gsub("[%c]", " ")
  return #body > 120 and s .. "..." or s
end

-- The last content type judged (servers send the same one again and again).
local last_ctype, last_json = nil, true
local function is_json(ctype)
  if ctype == nil then return true end
  if ctype == last_ctype then return last_json end
  local yes = ctype:lower():find("json", 1, true) ~= nil
  last_ctype, last_json = ctype, yes
  return yes
end

local function error_base(req, res)
  return { method = req.method, url = M.error_url(req.url), attempts = res.attempts,
    status = res.status, retry_after = res.retry_after }
end

local function decode_error(req, res, message)
  local base = error_base(req, res)
  base.kind, base.message = "decode", message
  return nil, Error.new(base)
end

-- Only POST .../unsubscribe-all may answer 2xx with an empty body (HubSpot
-- does so without verbose=true); for any other request it answers nothing.
local function may_be_empty(req)
  return req.method == "POST" and req.url:find("/unsubscribe-all", 1, true) ~= nil
end

local function success(req, res)
  local status, body = res.status, res.body
  if body == nil or body == "" then
    if may_be_empty(req) then return {} end
    return decode_error(req, res, string.format("empty answer (HTTP %d) where a JSON envelope was expected", status))
  end
  if not is_json(res.content_type) then
    return decode_error(req, res, string.format("expected JSON, got %s (HTTP %d): %s",
      redact.text(tostring(res.content_type)), status, snippet(body)))
  end
  local v, err = core.decode(body, "envelope")
  if not v then
    return decode_error(req, res, string.format("invalid answer (HTTP %d): %s: %s", status,
      redact.text(tostring(err)), snippet(body)))
  end
  return M.cleaned(v, body, body:find("\\u", 1, true) ~= nil)
end

-- Envelope v decoded from body, with any secret the body echoed removed: a
-- token echoed verbatim, or possibly \u-escaped (escaped: body holds "\u"),
-- is cleaned from the decoded strings too. (libcurl's answer_one decodes a
-- 2xx answer in C and hands its envelope here.)
function M.cleaned(v, body, escaped)
  if escaped or redact.found(body) then redact.value(v) end
  return v
end

-- A redirect: where it pointed, without credentials; never followed.
local function redirect_message(res)
  local loc = type(res.location) == "string" and redact.text(strip_userinfo(res.location)) or nil
  return string.format("HTTP %d redirect%s; commprefs does not follow redirects", res.status,
    loc and (" to " .. loc:gsub("[%c]", " ")) or "")
end

local function failure(req, res)
  local status, body = res.status, res.body or ""
  local base = error_base(req, res)
  base.kind = "http"
  local v = is_json(res.content_type) and body ~= "" and core.decode(body, "error")
  if type(v) == "table" then
    redact.value(v)
    base.category = v.category or v.errorType
    base.message = v.message
    base.correlation_id = v.correlationId
    base.sub_category = v.subCategory
    base.context = v.context
    base.errors = v.errors
    base.policy_name = v.policyName
  end
  if status >= 300 and status < 400 then
    base.message = redirect_message(res) .. (base.message and (": " .. base.message) or "")
  elseif base.message == nil and body ~= "" then
    base.message = string.format("HTTP %d with a %s body: %s", status,
      redact.text(tostring(res.content_type or "untyped")), snippet(body))
  end
  base.message = base.message or ("HTTP " .. status .. " with an empty body")
  base.daily_limit = res.daily_limit
  return nil, Error.new(base)
end

-- Turns one transport result into the decoded envelope, or nil, Error.
-- The success path allocates nothing but the decoded envelope.
function M.outcome(req, res)
  if res.envelope then return res.envelope end -- made of single-contact answers (commprefs.exchange)
  local status = res.status
  if status and status >= 200 and status < 300 then return success(req, res) end
  if res.kind or not status then
    local base = error_base(req, res)
    base.kind = res.kind or (res.stopped and "stopped") or "network"
    base.code, base.stopped = res.code, res.stopped -- code "deadline": the call's deadline passed
    base.message = redact.text(tostring(res.message or (res.stopped and "not sent: " .. tostring(res.stopped))
      or "no answer"))
    return nil, Error.new(base)
  end
  return failure(req, res)
end

return M
