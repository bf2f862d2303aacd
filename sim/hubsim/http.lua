-- hubsim.http: the simulator's HTTP face under nginx + lua-nginx-module.
-- Owns routing of /communication-preferences/{2026-03,2026-09,v4}/..., HubSpot's
-- checks (token, scopes, parameters, bodies, batch size), the per-token
-- rolling rate limit and its headers, latency, queued faults, the request
-- log, the OAuth token endpoint (POST /oauth/2026-03/token, /oauth/v1/token:
-- access tokens that expire after SIM_TOKEN_TTL seconds, one OAuth app
-- "sim-client"/"sim-secret" with refresh token "sim-refresh"), revocation,
-- the portal tier (SIM_TIER=professional: no batch scopes) and the /__sim/
-- admin paths. Runs in one nginx worker, so plain Lua
-- tables hold all state.
local cjson = require "cjson.safe"
local state = require "hubsim.state"

local M = {}

local EMPTY = "\0empty-array\0" -- encoded as [] (Debian's cjson has no empty_array)
local function arr(t) if #t == 0 then return EMPTY end return t end
local function encode(v)
  return (cjson.encode(v):gsub('"\\u0000empty%-array\\u0000"', "[]"))
end

local config, tokens, faults, log, windows
-- OAuth: the app's refresh tokens (valid ones), the access tokens issued
-- (token -> {expires = s, app = client_id}), and how many were issued.
local oauth
local OAUTH_APP = { client_id = "sim-client", client_secret = "sim-secret" }

local function oauth_reset()
  oauth = { refresh = { ["sim-refresh"] = true }, issued = {}, n = 0, revoked_app = false }
end

local function parse_rate(s)
  if not s or s == "" then return { max = 100, interval = 10000 } end
  if s == "off" or s == "0" then return nil end
  local n, ms = s:match("^(%d+)/(%d+)$")
  assert(n, "SIM_RATE must look like 100/10000 (requests/milliseconds) or off")
  return { max = tonumber(n), interval = tonumber(ms) }
end

local function defaults()
  return {
    rate = parse_rate(os.getenv("SIM_RATE")),
    latency = tonumber(os.getenv("SIM_LATENCY") or "0") or 0,
    jitter = tonumber(os.getenv("SIM_JITTER") or "") ,
    max_batch = tonumber(os.getenv("SIM_MAX_BATCH") or "100") or 100,
    log_max = tonumber(os.getenv("SIM_LOG_MAX") or "50000") or 50000,
    daily = tonumber(os.getenv("SIM_DAILY") or "250000"),
    -- 1: batch answers name each address in lower case (as HubSpot may)
    lower_ids = tonumber(os.getenv("SIM_LOWER_IDS") or "0") or 0,
    token_ttl = tonumber(os.getenv("SIM_TOKEN_TTL") or "1800") or 1800,
    -- "professional": the portal has no Marketing Hub Enterprise, so no token holds the batch scopes
    tier = os.getenv("SIM_TIER") or "enterprise",
    -- N > 0: after N API requests every token and the OAuth app are revoked (a revocation mid-job)
    revoke_after = tonumber(os.getenv("SIM_REVOKE_AFTER") or "0") or 0,
    -- a Lua pattern: batch inputs matching it are answered as per-item errors (invalid ids)
    invalid_match = false,
  }
end

-- How a batch answer names address id (SIM_LOWER_IDS / config lower_ids).
local function named(id)
  return config.lower_ids == 1 and id:lower() or id
end

local ALL_SCOPES = {
  "communication_preferences.read", "communication_preferences.write",
  "communication_preferences.read_write",
  "communication_preferences.statuses.batch.read", "communication_preferences.statuses.batch.write",
}
local READ_SCOPES = { "communication_preferences.read", "communication_preferences.statuses.batch.read" }

local function scope_set(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

-- Tokens: the two defaults plus "token scope,scope" lines of SIM_TOKENS_FILE.
local function load_tokens()
  local t = { ["sim-token"] = scope_set(ALL_SCOPES), ["sim-read-only"] = scope_set(READ_SCOPES) }
  local path = os.getenv("SIM_TOKENS_FILE")
  if path and path ~= "" then
    for line in assert(io.open(path)):lines() do
      local tok, scopes = line:match("^%s*([^%s#]+)%s+(%S+)")
      if tok then
        local list = {}
        for sc in scopes:gmatch("[^,]+") do list[#list + 1] = sc end
        t[tok] = scope_set(list)
      end
    end
  end
  return t
end

-- In nginx's master (init_by_lua), before workers drop root: the tokens
-- file may be readable by its owner only.
local base_tokens
local function copy_tokens()
  local t = {}
  for k, v in pairs(base_tokens) do t[k] = v end
  return t
end

function M.load()
  base_tokens = load_tokens()
end

-- In the worker (init_worker_by_lua).
function M.init()
  config = defaults()
  base_tokens = base_tokens or load_tokens()
  tokens = copy_tokens()
  faults, log, windows = {}, { n = 0, first = 1 }, {}
  oauth_reset()
  math.randomseed(os.time() + (ngx and ngx.worker.pid() or 0))
end

local function uuid()
  local r = math.random
  return string.format("%08x-%04x-4%03x-%04x-%012x", r(0, 0x7fffffff), r(0, 0xffff),
    r(0, 0xfff), 0x8000 + r(0, 0x3fff), r(0, 0xffffffff) * 0x10000 + r(0, 0xffff))
end

local function send(status, body, headers)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json;charset=utf-8"
  for k, v in pairs(headers or {}) do ngx.header[k] = v end
  local text = body == nil and "" or type(body) == "string" and body or encode(body)
  ngx.header["Content-Length"] = #text
  ngx.print(text)
  return ngx.exit(status)
end

local function hs_error(status, category, message, extra)
  local body = { status = "error", category = category, message = message, correlationId = uuid() }
  for k, v in pairs(extra or {}) do body[k] = v end
  return send(status, body)
end

local function validation(message, field)
  return hs_error(400, "VALIDATION_ERROR", message, field and {
    errors = { { message = message, ["in"] = field, code = "INVALID" } },
  } or nil)
end

-- Percent-decoding of one raw path segment: %XX only, '+' stays '+'.
local function unescape(seg)
  return (seg:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

------------------------------------------------------------------ log, faults

local function mask_headers(h)
  local out = {}
  for k, v in pairs(h) do
    if k:lower() == "authorization" then
      v = type(v) == "string" and v:gsub("^(%S+)%s.*$", "%1 ****") or "****"
    end
    out[k] = v
  end
  return out
end

local function record(method, raw_path, query, body)
  if raw_path:find("^/oauth/") then body = body and "(form, masked)" end -- secrets stay out of the log
  log.n = log.n + 1
  log[log.n] = { method = method, path = raw_path, query = query, body = body,
    headers = mask_headers(ngx.req.get_headers(100)), time = ngx.now(),
    port = tonumber(ngx.var.remote_port), http = ngx.var.server_protocol }
  if log.n - log.first + 1 > config.log_max then
    log[log.first] = nil
    log.first = log.first + 1
  end
end

-- A fault with `seconds` plays on every matching request for that many
-- seconds from when it was queued (an outage); others play `count` times.
local function take_fault(method, path)
  for i = #faults, 1, -1 do
    local f = faults[i]
    if f.seconds and ngx.now() >= f.queued + f.seconds then table.remove(faults, i) end
  end
  for i, f in ipairs(faults) do
    if (not f.method or f.method == method) and (not f.match or path:find(f.match))
      and (not f.p or math.random() < f.p) then
      if not f.seconds then
        f.count = (f.count or 1) - 1
        if f.count <= 0 then table.remove(faults, i) end
      end
      return f
    end
  end
end

local HTML = "<html><head><title>502 Bad Gateway</title></head><body><center>"
  .. "<h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>\n"
local FULL = '{"status":"COMPLETE","results":[],"startedAt":"2026-01-01T00:00:00.000Z",'
  .. '"completedAt":"2026-01-01T00:00:00.001Z","padding":"' .. string.rep("x", 2000) .. '"}'

-- Raw HTTP/1.1 on the request socket: headers promising more than is sent.
local function raw_partial(extra_wait)
  local sock = assert(ngx.req.socket(true))
  sock:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    .. #FULL .. "\r\n\r\n" .. FULL:sub(1, 100))
  if extra_wait then ngx.sleep(extra_wait) end
  return ngx.exit(ngx.OK) -- nginx closes the connection mid-body
end

local function play_fault(f)
  local kind = f.kind
  if kind == "status" then
    return hs_error(f.status or 500, "INTERNAL_ERROR", "Simulated server error")
  elseif kind == "423" then -- HubSpot: "locks last 2 seconds"
    return hs_error(423, "LOCKED", "The resource is locked; retry after at least 2 seconds.")
  elseif kind == "477" then -- HubSpot: the portal is being migrated between data centers
    ngx.header["Retry-After"] = tostring(f.retry_after or 3600)
    return hs_error(477, "MIGRATION_IN_PROGRESS", "This account is being migrated; retry later.")
  elseif kind == "html" then
    ngx.status = f.status or 502
    ngx.header["Content-Type"] = "text/html"
    ngx.print(HTML)
    return ngx.exit(ngx.status)
  elseif kind == "429" then
    ngx.header["Retry-After"] = tostring(f.retry_after or 1)
    return hs_error(429, "RATE_LIMITS", "You have reached your secondly limit.",
      { errorType = "RATE_LIMIT", policyName = f.policy or "SECONDLY", groupName = "sim" })
  elseif kind == "reset" then
    return raw_partial(nil)
  elseif kind == "hang" then
    return raw_partial(f.seconds or 30)
  elseif kind == "truncated" then
    return send(200, FULL:sub(1, 120))
  elseif kind == "malformed" then
    return send(200, '{"status":"COMPLETE",,"results":[}')
  elseif kind == "content_type" then
    ngx.status = 200
    ngx.header["Content-Type"] = "text/html"
    ngx.print("<html><body>Please log in to continue</body></html>")
    return ngx.exit(200)
  end
  return hs_error(500, "INTERNAL_ERROR", "unknown simulated fault " .. tostring(kind))
end

------------------------------------------------------------------ rate limit

-- A rolling window per token: timestamps (ms) of the requests it counted,
-- and the day's count (SIM_DAILY, like HubSpot's daily limit: once spent,
-- every request is a 429 with policyName DAILY until POST /__sim/day).
-- Returns true, or false and the policy that refused.
local function rate_check(token)
  local rate = config.rate
  if not rate and not config.daily then return true end
  local now = ngx.now() * 1000
  local w = windows[token]
  if not w then w = { first = 1, last = 0, daily = 0 }; windows[token] = w end
  local day_ok = not config.daily or w.daily < config.daily
  local ok, used = day_ok, 0
  if rate then
    while w.first <= w.last and w[w.first] <= now - rate.interval do
      w[w.first] = nil
      w.first = w.first + 1
    end
    used = w.last - w.first + 1
    ok = ok and used < rate.max
  end
  if ok then
    if rate then
      w.last = w.last + 1
      w[w.last] = now
      used = used + 1
    end
    w.daily = w.daily + 1
  end
  if rate then
    ngx.header["X-HubSpot-RateLimit-Max"] = tostring(rate.max)
    ngx.header["X-HubSpot-RateLimit-Remaining"] = tostring(math.max(0, rate.max - used))
    ngx.header["X-HubSpot-RateLimit-Interval-Milliseconds"] = tostring(rate.interval)
  end
  if config.daily then
    ngx.header["X-HubSpot-RateLimit-Daily"] = tostring(config.daily)
    ngx.header["X-HubSpot-RateLimit-Daily-Remaining"] = tostring(math.max(0, config.daily - w.daily))
  end
  return ok, not day_ok and "DAILY" or nil
end

------------------------------------------------------------------ operations

local SC = {
  read = { { "communication_preferences.read_write" }, { "communication_preferences.read" } },
  write = { { "communication_preferences.read_write" }, { "communication_preferences.write" } },
  links = { { "communication_preferences.read", "communication_preferences.write" },
    { "communication_preferences.read_write" } },
  batch_read = { { "communication_preferences.statuses.batch.read" } },
  batch_write = { { "communication_preferences.statuses.batch.write" } },
}

local function envelope(results, extra)
  local t = state.now_iso()
  local e = { status = "COMPLETE", results = arr(results), startedAt = t, completedAt = t }
  for k, v in pairs(extra or {}) do e[k] = v end
  return e
end

local function item_error(id)
  return { status = "error", category = "VALIDATION_ERROR",
    message = "Invalid subscriber id: " .. tostring(id),
    context = { subscriberIdString = { tostring(id) } }, errors = EMPTY, links = {},
    subCategory = { reason = "INVALID_EMAIL" } }
end

-- Runs per_id for every valid input; invalid ones become per-item errors.
local function batch(ids, per_id, partial_status)
  local results, errors = {}, {}
  for _, id in ipairs(ids) do
    if state.valid_id(id) and not (config.invalid_match and id:find(config.invalid_match)) then
      results[#results + 1] = per_id(id)
    else errors[#errors + 1] = item_error(id) end
  end
  if #errors == 0 then return 200, envelope(results) end
  return partial_status, envelope(results, { errors = errors, numErrors = #errors })
end

local function is_int(v) return type(v) == "number" and v == math.floor(v) end

local ROUTES = {
  { "GET", "^definitions$", SC.read, function(q)
      return 200, envelope(state.definitions(q.bu, q.includeTranslations == "true"))
    end, channel = false },
  { "POST", "^links/generate$", SC.links, function(q, body)
      if type(body.subscriberIdString) ~= "string" then
        return validation("subscriberIdString is required", "subscriberIdString")
      end
      local base = "https://sim.hubspot.local/hs/manage-preferences/"
      local token = ngx.encode_base64(body.subscriberIdString):gsub("[+/=]", "")
      local r = { subscriberIdString = body.subscriberIdString,
        managePreferencesUrl = base .. "unsubscribe?bu=" .. q.bu .. "&t=" .. token,
        unsubscribeAllUrl = base .. "unsubscribe-all?bu=" .. q.bu .. "&t=" .. token }
      if body.subscriptionId then
        r.unsubscribeSingleUrl = base .. "unsubscribe?sub=" .. tostring(body.subscriptionId) .. "&t=" .. token
      end
      return 200, r
    end, body = "object" },
  { "POST", "^statuses/batch/read$", SC.batch_read, function(q, body)
      return batch(body.inputs, function(id)
        return { subscriberIdString = named(id), statuses = arr(state.statuses(id, q.bu)) }
      end, 207)
    end, body = "inputs" },
  { "POST", "^statuses/batch/write$", SC.batch_write, function(_, body)
      local results, errors = {}, {}
      for _, req in ipairs(body.inputs) do
        local ok = type(req) == "table" and state.valid_id(req.subscriberIdString)
          and req.channel == "EMAIL" and is_int(req.subscriptionId)
          and (req.statusState == "SUBSCRIBED" or req.statusState == "UNSUBSCRIBED" or req.statusState == "NOT_SPECIFIED")
        local r, msg
        if ok then r, msg = state.set_status(req.subscriberIdString, req) end
        if r then results[#results + 1] = r
        else
          local e = item_error(type(req) == "table" and req.subscriberIdString or "?")
          if msg then e.message = msg end
          errors[#errors + 1] = e
        end
      end
      return 200, envelope(results, #errors > 0 and { errors = errors, numErrors = #errors } or nil)
    end, body = "inputs", channel = false },
  { "POST", "^statuses/batch/unsubscribe%-all$", SC.batch_write, function(q, body)
      return batch(body.inputs, function(id)
        return { subscriberIdString = named(id), statuses = arr((state.unsubscribe_all(id, q.bu, q.verbose))) }
      end, 200)
    end, body = "inputs", verbose = true },
  { "POST", "^statuses/batch/unsubscribe%-all/read$", SC.batch_read, function(q, body)
      return batch(body.inputs, function(id)
        return { subscriberIdString = named(id), wideStatuses = arr(state.wide_statuses(id, q.bu, false)) }
      end, 207)
    end, body = "inputs" },
  { "GET", "^statuses/([^/]+)/unsubscribe%-all$", SC.read, function(q, _, id)
      return 200, envelope(state.wide_statuses(id, q.bu, q.verbose))
    end, id = true, verbose = true },
  { "POST", "^statuses/([^/]+)/unsubscribe%-all$", SC.write, function(q, _, id)
      local statuses = state.unsubscribe_all(id, q.bu, q.verbose)
      if not q.verbose then return 200, "" end -- HubSpot sends no body then
      return 200, envelope(statuses)
    end, id = true, verbose = true },
  { "GET", "^statuses/([^/]+)$", SC.read, function(q, _, id)
      return 200, envelope(state.statuses(id, q.bu))
    end, id = true },
  { "POST", "^statuses/([^/]+)$", SC.write, function(_, body, id)
      if body.channel ~= "EMAIL" then return validation("channel must be EMAIL", "channel") end
      if not is_int(body.subscriptionId) then
        return validation("subscriptionId must be an integer", "subscriptionId")
      end
      local s = body.statusState
      if s ~= "SUBSCRIBED" and s ~= "UNSUBSCRIBED" and s ~= "NOT_SPECIFIED" then
        return validation("statusState must be SUBSCRIBED, UNSUBSCRIBED or NOT_SPECIFIED", "statusState")
      end
      local r, msg = state.set_status(id, body)
      if not r then return validation(msg, "subscriptionId") end
      return 200, envelope({ r })
    end, id = true, body = "object", channel = false },
}

local function has_scope(granted, alternatives)
  for _, set in ipairs(alternatives) do
    local all = true
    for _, sc in ipairs(set) do if not granted[sc] then all = false end end
    if all then return true end
  end
  return false
end

local function missing_scopes(alternatives)
  log.forbidden = (log.forbidden or 0) + 1
  local names = {}
  for _, set in ipairs(alternatives) do names[#names + 1] = table.concat(set, "+") end
  return hs_error(403, "MISSING_SCOPES",
    "This app hasn't been granted all required scopes to make this call. "
      .. "Read more about required scopes here: https://developers.hubspot.com/scopes.",
    { context = { requiredGranularScopes = names },
      errors = { { message = "One or more of the following scopes are required.",
        context = { requiredGranularScopes = names } } },
      links = { scopes = "https://developers.hubspot.com/scopes" } })
end

-- Query checks shared by every operation; returns the parsed query or sends 400.
local function check_query(route, args)
  local q = { bu = 0, verbose = false, includeTranslations = args.includeTranslations }
  for k, v in pairs(args) do
    if type(v) == "table" then return nil, validation("parameter " .. k .. " given more than once", k) end
  end
  if route.channel ~= false then
    if args.channel == nil then return nil, validation("channel is required and must be EMAIL", "channel") end
    if args.channel ~= "EMAIL" then
      return nil, validation("Unable to process channel: " .. tostring(args.channel) .. "; must be EMAIL", "channel")
    end
  end
  if args.businessUnitId ~= nil then
    local s = args.businessUnitId
    if type(s) ~= "string" or not s:match("^%-?%d+$") then
      return nil, validation("businessUnitId must be an integer, got " .. tostring(s), "businessUnitId")
    end
    q.bu = tonumber(s)
    if not state.BUSINESS_UNITS[q.bu] then
      return nil, validation("Business unit " .. s .. " does not exist", "businessUnitId")
    end
  end
  if route.verbose and args.verbose ~= nil then
    if args.verbose ~= "true" and args.verbose ~= "false" then
      return nil, validation("verbose must be true or false", "verbose")
    end
    q.verbose = args.verbose == "true"
  end
  return q
end

local function check_body(route, raw)
  if not route.body then return {} end
  local body = raw and cjson.decode(raw)
  if type(body) ~= "table" then return nil, validation("Invalid input JSON on line 1", "body") end
  if route.body == "inputs" then
    if type(body.inputs) ~= "table" or #body.inputs == 0 then
      return nil, validation("inputs is required and must be a non-empty array", "inputs")
    end
    if #body.inputs > config.max_batch then
      return nil, validation(string.format("Too many inputs: %d, the maximum is %d",
        #body.inputs, config.max_batch), "inputs")
    end
  end
  return body
end

local function read_body()
  ngx.req.read_body()
  local raw = ngx.req.get_body_data()
  if not raw then
    local f = ngx.req.get_body_file()
    if f then local h = io.open(f, "rb"); raw = h:read("*a"); h:close() end
  end
  return raw
end

local function latency()
  local ms = config.latency
  if ms <= 0 then return end
  local j = config.jitter or ms / 5
  ngx.sleep(math.max(0, ms + (math.random() * 2 - 1) * j) / 1000)
end

function M.api()
  local method = ngx.req.get_method()
  local raw_uri = ngx.var.request_uri
  local raw_path, query = raw_uri:match("^([^?]*)%??(.*)$")
  local raw_body = read_body()
  record(method, raw_path, query, raw_body)

  local f = take_fault(method, raw_path)
  if f then latency(); return play_fault(f) end

  log.api = (log.api or 0) + 1
  if config.revoke_after > 0 and log.api > config.revoke_after and not log.revoked_at then
    log.revoked_at = log.api -- everything is revoked from this request on
    tokens, oauth.refresh, oauth.issued, oauth.revoked_app = {}, {}, {}, true
  end
  local auth = ngx.var.http_authorization
  local token = auth and auth:match("^Bearer%s+(%S+)$")
  local granted, window = token and tokens[token], token
  local issued = token and oauth.issued[token]
  if issued then
    local late = ngx.now() - issued.expires
    if late >= 0 then
      log.expired = (log.expired or 0) + 1
      return hs_error(401, "EXPIRED_AUTHENTICATION", string.format(
        "The OAuth token used to make this call expired %d second(s) ago.", math.floor(late)),
        { context = {}, links = {} })
    end
    granted, window = scope_set(ALL_SCOPES), "oauth:" .. issued.app -- one window per app
  end
  if not granted then
    log.unauthorized = (log.unauthorized or 0) + 1
    return hs_error(401, "INVALID_AUTHENTICATION",
      "Authentication credentials not found. This API supports OAuth 2.0 authentication.")
  end
  if config.tier == "professional" then -- batch scopes need Marketing Hub Enterprise
    local g = {}
    for k in pairs(granted) do g[k] = true end
    g["communication_preferences.statuses.batch.read"] = nil
    g["communication_preferences.statuses.batch.write"] = nil
    granted = g
  end
  local allowed, refused_by = rate_check(window)
  if not allowed then log.throttled = (log.throttled or 0) + 1 end -- GET /__sim/log says how many
  if not allowed and refused_by == "DAILY" then
    return hs_error(429, "RATE_LIMITS", "You have reached your daily limit.", { errorType = "RATE_LIMIT",
      policyName = "DAILY", groupName = "sim" })
  end
  if not allowed then
    local msg = "You have reached your ten_secondly_rolling limit."
    return hs_error(429, "RATE_LIMITS", msg, { errorType = "RATE_LIMIT",
      policyName = config.rate.interval == 1000 and "SECONDLY" or "TEN_SECONDLY_ROLLING", groupName = "sim" })
  end
  latency()

  local rest = raw_path:match("^/communication%-preferences/2026%-03/(.*)$")
    or raw_path:match("^/communication%-preferences/2026%-09/(.*)$")
    or raw_path:match("^/communication%-preferences/v4/(.*)$")
  if not rest then return hs_error(404, "OBJECT_NOT_FOUND", "No API version at " .. raw_path) end
  local path_known = false
  for _, route in ipairs(ROUTES) do
    local cap = { rest:match(route[2]) }
    path_known = path_known or cap[1] ~= nil
    if cap[1] and route[1] == method then
      if not has_scope(granted, route[3]) then return missing_scopes(route[3]) end
      local q = check_query(route, ngx.req.get_uri_args(100))
      if not q then return end
      local body = check_body(route, raw_body)
      if not body then return end
      local id
      if route.id then
        id = unescape(cap[1])
        if not state.valid_id(id) then
          return validation("Invalid subscriber id: " .. id, "subscriberIdString")
        end
      end
      local status, out = route[4](q, body, id)
      if status then return send(status, out) end
      return
    end
  end
  if path_known then return hs_error(405, "VALIDATION_ERROR", "Method " .. method .. " not allowed here") end
  return hs_error(404, "OBJECT_NOT_FOUND", "No operation at " .. raw_path)
end

------------------------------------------------------------------ OAuth

local function form_decode(raw)
  local out = {}
  for pair in (raw or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    local function dec(x) return (x:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)) end
    out[dec(k)] = dec(v)
  end
  return out
end

-- POST /oauth/2026-03/token (and the deprecated /oauth/v1/token): a refresh
-- grant gives a new access token living config.token_ttl seconds.
function M.oauth()
  local method, path = ngx.req.get_method(), ngx.var.uri
  local raw = read_body()
  record(method, path, ngx.var.args or "", raw)
  if method ~= "POST" or not (path == "/oauth/2026-03/token" or path == "/oauth/v1/token") then
    return hs_error(404, "OBJECT_NOT_FOUND", "No OAuth endpoint at " .. path)
  end
  local f = take_fault(method, path)
  if f then return play_fault(f) end
  local ctype = ngx.var.http_content_type or ""
  if not ctype:find("application/x-www-form-urlencoded", 1, true) then
    return send(400, { status = "BAD_REQUEST", message = "expected a form body" })
  end
  local form = form_decode(raw)
  if form.grant_type ~= "refresh_token" then
    return send(400, { status = "error", error = "unsupported_grant_type", message = "grant_type must be refresh_token" })
  end
  if form.client_id ~= OAUTH_APP.client_id or form.client_secret ~= OAUTH_APP.client_secret then
    return send(400, { status = "BAD_CLIENT_ID", message = "missing or unknown client id", correlationId = uuid() })
  end
  if not oauth.refresh[form.refresh_token or ""] then
    return send(400, { status = "BAD_REFRESH_TOKEN", message = "missing or unknown refresh token",
      error = "invalid_grant", correlationId = uuid() })
  end
  oauth.n = oauth.n + 1
  local access = string.format("sim-oauth-%d-%08x%08x", oauth.n, math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  oauth.issued[access] = { expires = ngx.now() + config.token_ttl, app = form.client_id }
  return send(200, { token_type = "bearer", refresh_token = form.refresh_token, access_token = access,
    expires_in = config.token_ttl })
end

------------------------------------------------------------------ admin

local function admin_config(body)
  for k, v in pairs(body) do
    if k == "rate" then config.rate = parse_rate(v)
    elseif k == "tier" then config.tier = tostring(v)
    elseif k == "invalid_match" then config[k] = type(v) == "string" and v or false
    elseif config[k] ~= nil or k == "jitter" then config[k] = tonumber(v)
    else return send(400, { message = "unknown config key " .. k }) end
  end
  return send(200, { rate = config.rate or "off", latency = config.latency, max_batch = config.max_batch })
end

function M.admin()
  -- nginx picks locations by the decoded, normalised URI: an API id such as
  -- "..%2F..%2F__sim%2Fstate" lands here. Only a raw /__sim/ path is admin.
  if not ngx.var.request_uri:find("^/__sim/") then return M.api() end
  local method, what = ngx.req.get_method(), ngx.var.uri:match("^/__sim/(.*)$")
  local body = cjson.decode(read_body() or "{}") or {}
  if what == "health" then return send(200, { ok = true })
  elseif what == "log" and method == "GET" then
    local out = {}
    for i = log.first, log.n do out[#out + 1] = log[i] end
    return send(200, { requests = arr(out), throttled = log.throttled or 0, expired = log.expired or 0,
      unauthorized = log.unauthorized or 0, forbidden = log.forbidden or 0, tokens_issued = oauth.n,
      api = log.api or 0, revoked_at = log.revoked_at })
  elseif what == "faults" and method == "POST" then
    for _, f in ipairs(body.faults or { body }) do f.queued = ngx.now(); faults[#faults + 1] = f end
    return send(200, { queued = #faults })
  elseif what == "faults" and method == "GET" then
    return send(200, { faults = arr(faults) })
  elseif what == "reset" and method == "POST" then
    state.reset()
    local keep_config = body.keep_config
    faults, log, windows = {}, { n = 0, first = 1 }, {}
    tokens = copy_tokens()
    oauth_reset()
    if not keep_config then config = defaults() end
    return send(200, { ok = true })
  elseif what == "config" and method == "POST" then
    return admin_config(body)
  elseif what == "day" and method == "POST" then -- a new day: daily counts start again
    for _, w in pairs(windows) do w.daily = 0 end
    return send(200, { ok = true })
  elseif what == "revoke" and method == "POST" then
    -- {token = T}: a static token no longer works; {app = true}: the OAuth app is
    -- uninstalled (its refresh token and every access token issued stop working)
    if body.token then tokens[body.token] = nil end
    if body.app then
      oauth.refresh, oauth.issued, oauth.revoked_app = {}, {}, true
    end
    if body.refresh_token then oauth.refresh[body.refresh_token] = nil end
    return send(200, { ok = true })
  elseif what == "state" then
    return send(200, { subscribers = state.dump() })
  end
  return send(404, { message = "unknown admin path" })
end

return M
