-- commprefs.credentials: owns the one answer both transports ask for: the
-- access token a request carries now. Three kinds of credentials:
--   * a static token (a private app's): never renewed;
--   * token = function() return "..." end (rotated private-app tokens,
--     Service Keys, secret stores): asked for the first request and again
--     after a 401 (the refused request is then sent once more, by
--     commprefs.exchange);
--   * oauth = {client_id, client_secret, refresh_token, token_url,
--     on_refresh, shared_dict}: an access token got from HubSpot's token
--     endpoint (POST token_url, form grant_type=refresh_token) and renewed
--     ahead of its expires_in, with a margin that scales with it (15%: a
--     30-minute token lives 25.5 minutes here, a 10 s one 8.5 s), never per
--     request; one refresh at a time per process, and with shared_dict one
--     per nginx (a lock in the dict) whose token every worker takes.
-- A refresh HubSpot refuses (BAD_REFRESH_TOKEN, invalid_grant, a revoked
-- app) is Error{kind = "auth"}; one that gets no answer keeps its transport
-- kind. Every secret (client secret, refresh token, each access token) is
-- remembered by commprefs.redact before it can reach any output.
local core = require "commprefs.core"
local Error = require "commprefs.error"
local redact = require "commprefs.redact"

local M = {}

M.MARGIN = 0.15              -- of expires_in: how early a token is renewed
M.LOCK_TTL = 30              -- s: a worker that died while refreshing frees the lock by then
M.OAUTH_PATH = "/oauth/2026-03/token"

local Creds = {}
Creds.__index = Creds
Creds.__name = "commprefs.credentials"
function Creds.__tostring() return "commprefs.credentials" end -- never a secret

local function clock()
  if ngx and ngx.now then ngx.update_time(); return ngx.now() end
  return core.now()
end

local function sleep(s)
  if ngx and ngx.sleep then return ngx.sleep(s) end
end

-- The rule of a token value: what a header may carry.
function M.bad_token(tok)
  if type(tok) ~= "string" then return "a string expected, got " .. type(tok) end
  if tok == "" then return "empty" end
  if #tok > core.limits.max_token_bytes then return "longer than " .. core.limits.max_token_bytes .. " bytes" end
  if tok:find("[%s%c]") then return "contains spaces or control characters" end
  return nil
end

-- A short fingerprint of a token (djb2, 32 bits, hex): tells clients of
-- the same token apart from others without keeping the token itself.
function M.fingerprint(s)
  local h = 5381
  for i = 1, #s do h = (h * 33 + s:byte(i)) % 4294967296 end
  return string.format("%08x", h)
end

-- The token in effect now (not renewed: see current).
function Creds:value() return self.vault().token end

local function auth_error(fields)
  fields.kind = "auth"
  return Error.new(fields)
end

-- opts: {token = string | function, oauth = table, base_url =, owner = (the
-- client: what redact remembers the secrets for), post_form = function(url,
-- body) -> req, res (the client's machinery for the token endpoint)}.
function M.new(opts)
  -- the secrets live in a closure, never in a table field: nothing walking
  -- the client's tables (a dump, a debugger, a careless log) can reach them
  local vault = {}
  local self = setmetatable({ owner = opts.owner, gen = 0, post_form = opts.post_form,
    vault = function() return vault end }, Creds)
  local o = opts.oauth
  if o then
    self.kind = "oauth"
    self.client_id, self.vault().client_secret, self.vault().refresh_token = o.client_id, o.client_secret, o.refresh_token
    self.token_url = o.token_url or (opts.base_url .. M.OAUTH_PATH)
    -- on_refresh of every client of these credentials (commprefs.shared), weak: the
    -- clients hold theirs (client._on_refresh); one no client holds any more is not told
    self.listeners = setmetatable({}, { __mode = "k" })
    if o.on_refresh then self.listeners[o.on_refresh] = true end
    self.dict_name = o.shared_dict
    redact.remember_secret(self.owner, self.vault().client_secret)
    redact.remember_secret(self.owner, self.vault().refresh_token)
    self.identity = "oauth:" .. self.client_id
  elseif type(opts.token) == "function" then
    self.kind, self.fn = "function", opts.token
    self.identity = "function:" .. tostring(opts.token)
  else
    self.kind = "static"
    self:_set(opts.token)
    self.identity = "token:" .. M.fingerprint(opts.token)
  end
  return self
end

-- Another client of these credentials (inside nginx, one app's bundle:
-- commprefs.shared) with its oauth option o: its on_refresh is told too,
-- and its shared_dict is taken when these credentials had none. Returns
-- why it cannot join (another shared_dict), or nil.
function Creds:join(o)
  if not o or self.kind ~= "oauth" then return nil end
  if o.shared_dict and self.dict_name and o.shared_dict ~= self.dict_name then
    return string.format("bad option 'oauth.shared_dict' ('%s' here, '%s' for the clients this nginx worker"
      .. " already made with the same OAuth app, base URL and API version: they share one access token)",
      o.shared_dict, self.dict_name)
  end
  if o.shared_dict then self.dict_name = o.shared_dict end
  if o.on_refresh then self.listeners[o.on_refresh] = true end
end

-- Access tokens redaction keeps at once: the one in effect and the one
-- before it (requests still in flight may carry it, and their answers may
-- echo it). An older one is forgotten: by then it expired (a refresh comes
-- at 85 % of expires_in, so two refreshes later its lifetime is over) or
-- HubSpot refused it (a 401 renewed it), so it no longer opens anything,
-- and a long-running app's secrets stay bounded (a month of 30-minute
-- tokens kept all would make every answer's check 1,000 times dearer).
local KEEP_TOKENS = 2

-- Remembers access token tok for redaction, forgetting the ones older than
-- KEEP_TOKENS (never the client secret or refresh token, if one equals it).
function Creds:_remember_token(tok)
  redact.remember_secret(self.owner, tok)
  local v = self.vault()
  local recent = v.recent_tokens or {}
  v.recent_tokens = recent
  for _, t in ipairs(recent) do
    if t == tok then return end
  end
  recent[#recent + 1] = tok
  while #recent > KEEP_TOKENS do
    local old = table.remove(recent, 1)
    if old ~= v.client_secret and old ~= v.refresh_token then redact.forget_secret(self.owner, old) end
  end
end

-- A new access token is in effect (gen counts them: a request sent under an
-- older one that gets a 401 needs no new refresh, only a resend).
function Creds:_set(tok, expires_in)
  self:_remember_token(tok)
  if tok ~= self.vault().token then
    self.vault().token = tok
    self.gen = self.gen + 1
  end
  self.refresh_at = expires_in and (clock() + expires_in * (1 - M.MARGIN)) or nil
end

function Creds:renewable() return self.kind ~= "static" end

-- Seconds until the token is due for renewal (nil: never).
function Creds:due_in()
  if not self.refresh_at then return nil end
  return math.max(0.001, self.refresh_at - clock())
end

-- Whether the token should be renewed before the next request.
function Creds:due()
  if self.vault().token == nil then return true end
  return self.refresh_at ~= nil and clock() >= self.refresh_at
end

-- The token for a request made now (renewed when due): tok, or nil, Error.
function Creds:current()
  if not self:due() then return self.vault().token end
  if self.kind == "function" then return self:_ask() end
  if self.kind == "oauth" then return self:_refresh(self.gen) end
  return self.vault().token
end

-- After a 401 for a request sent under token generation `gen`: a token to
-- send it once more with, or nil, Error (static tokens: nil, no error).
function Creds:renew(gen)
  if self.kind == "static" then return nil end
  if gen ~= self.gen and self.vault().token then return self.vault().token end -- renewed meanwhile
  if self.kind == "function" then return self:_ask() end
  return self:_refresh(gen, true)
end

------------------------------------------------------------------ token = function

function Creds:_ask()
  local ok, tok, why = pcall(self.fn)
  if not ok then
    return nil, auth_error { code = "token_function", message = "the token function raised: " .. redact.text(tostring(tok)) }
  end
  if tok == nil then
    return nil, auth_error { code = "token_function", message = "the token function gave no token"
      .. (why ~= nil and (": " .. redact.text(tostring(why))) or "") }
  end
  local bad = M.bad_token(tok)
  if bad then
    if type(tok) == "string" then self:_remember_token(tok) end
    return nil, auth_error { code = "token_function", message = "the token function gave a bad token (" .. bad .. ")" }
  end
  self:_set(tok)
  return tok
end

------------------------------------------------------------------ oauth

local function form(fields)
  local parts = {}
  for _, kv in ipairs(fields) do parts[#parts + 1] = kv[1] .. "=" .. core.escape(kv[2]) end
  return table.concat(parts, "&")
end

-- One POST to the token endpoint: {access_token=, refresh_token=, expires_in=} or nil, Error.
function Creds:_fetch()
  local body = form { { "grant_type", "refresh_token" }, { "client_id", self.client_id },
    { "client_secret", self.vault().client_secret }, { "refresh_token", self.vault().refresh_token } }
  local req, res = self.post_form(self.token_url, body)
  self.refreshes = (self.refreshes or 0) + 1
  local url = req.url
  if not res.status then -- no answer: the transport's kind (network, timeout, tls), not "auth"
    return nil, Error.new { kind = res.kind or "network", method = "POST", url = url, attempts = res.attempts,
      message = "refreshing the OAuth access token failed: " .. redact.text(tostring(res.message or "no answer")) }
  end
  local v = res.body and res.body ~= "" and core.decode(res.body) or nil
  if type(v) ~= "table" then v = {} end
  if res.status >= 200 and res.status < 300 then
    local tok, ttl = v.access_token, tonumber(v.expires_in)
    if type(tok) == "string" then self:_remember_token(tok) end
    if type(v.refresh_token) == "string" then redact.remember_secret(self.owner, v.refresh_token) end
    if M.bad_token(tok) or not ttl or ttl <= 0 then
      return nil, Error.new { kind = "decode", method = "POST", url = url, status = res.status,
        message = "the token endpoint's answer has no usable access_token and expires_in" }
    end
    return { access_token = tok, expires_in = ttl,
      refresh_token = type(v.refresh_token) == "string" and v.refresh_token ~= "" and v.refresh_token or self.vault().refresh_token }
  end
  local code = type(v.status) == "string" and v.status ~= "error" and v.status or v.error
  local msg = v.message or v.error_description
  local fields = { method = "POST", url = url, status = res.status, attempts = res.attempts,
    code = type(code) == "string" and code or nil, correlation_id = v.correlationId,
    message = "HubSpot refused to refresh the OAuth access token" .. (type(msg) == "string" and (": " .. redact.text(msg)) or "")
      .. " (get a new refresh token: the app may have been uninstalled)" }
  if res.status >= 500 or res.status == 429 then
    fields.kind = "http"
    return nil, Error.new(fields)
  end
  return nil, auth_error(fields)
end

-- Takes a fetched token set: in effect here, told to every on_refresh.
function Creds:_take(t)
  self.vault().refresh_token = t.refresh_token
  self:_set(t.access_token, t.expires_in)
  for on_refresh in pairs(self.listeners) do
    local ok, err = pcall(on_refresh, { access_token = t.access_token, refresh_token = t.refresh_token,
      expires_in = t.expires_in })
    if not ok and ngx and ngx.log then ngx.log(ngx.ERR, "commprefs: on_refresh raised: ", redact.text(tostring(err)))
    elseif not ok then io.stderr:write("commprefs: on_refresh raised: ", redact.text(tostring(err)), "\n") end
  end
end

-- A refresh, one at a time in this process (light threads of an nginx
-- worker wait for the one under way), and with shared_dict one per nginx.
function Creds:_refresh(gen, forced)
  while self.refreshing do -- another light thread is refreshing: take its token
    sleep(0.005)
    if self.gen ~= gen and self.vault().token then return self.vault().token end
  end
  if self.gen ~= gen and self.vault().token and not self:due() then return self.vault().token end
  if self.dict_name then return self:_refresh_shared(gen, forced) end
  self.refreshing = true
  local ok, t, err = pcall(self._fetch, self)
  self.refreshing = false
  if not ok then error(t, 0) end
  if not t then self.failed = err; return nil, err end
  self:_take(t)
  return self.vault().token
end

------------------------------------------------------------------ shared_dict

function Creds:_keys()
  if not self.keys then
    local k = "commprefs:oauth:" .. ngx.md5(self.client_id .. "\0" .. self.token_url)
    self.keys = { token = k .. ":token", at = k .. ":refresh_at", rt = k .. ":refresh_token", lock = k .. ":lock" }
  end
  return self.keys
end

-- The dict's token when it is still fresh and not the one refused.
function Creds:_adopt(refused)
  local d, k = ngx.shared[self.dict_name], self:_keys()
  local tok, at = d:get(k.token), d:get(k.at)
  if tok and at and tok ~= refused and clock() < at then
    self:_remember_token(tok)
    local rt = d:get(k.rt)
    if rt then redact.remember_secret(self.owner, rt); self.vault().refresh_token = rt end
    if tok ~= self.vault().token then self.vault().token, self.gen = tok, self.gen + 1 end
    self.refresh_at = at
    return tok
  end
end

function Creds:_refresh_shared(gen, forced)
  local d, k = ngx.shared[self.dict_name], self:_keys()
  local refused = forced and gen == self.gen and self.vault().token or nil
  local deadline = clock() + M.LOCK_TTL
  while true do
    local tok = self:_adopt(refused)
    if tok then return tok end
    local won = d:add(k.lock, ngx.worker and ngx.worker.pid() or 1, M.LOCK_TTL)
    if won then
      local rt = d:get(k.rt)
      if rt then self.vault().refresh_token = rt end
      self.refreshing = true
      local ok, t, err = pcall(self._fetch, self)
      self.refreshing = false
      if ok and t then
        local ttl = t.expires_in
        d:set(k.rt, t.refresh_token)
        d:set(k.at, clock() + ttl * (1 - M.MARGIN), ttl)
        d:set(k.token, t.access_token, ttl)
        self:_take(t)
      end
      d:delete(k.lock)
      if not ok then error(t, 0) end
      if not t then self.failed = err; return nil, err end
      return self.vault().token
    end
    if clock() > deadline then
      return nil, Error.new { kind = "timeout", message = "waited " .. M.LOCK_TTL .. " s for another worker's OAuth refresh" }
    end
    sleep(0.01)
  end
end

return M
