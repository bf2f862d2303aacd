-- commprefs: a client for HubSpot's Communication Preferences API 2026-03
-- (and v4). Owns the public Lua API of ../shared/design/API.md: argument
-- checks (which raise before anything is sent), building each operation's
-- request, splitting long batches and merging their envelopes. Results
-- become envelopes or Errors in commprefs.response. HTTP, JSON and
-- pacing live in the C core (commprefs.core).
local core = require "commprefs.core"
local Error = require "commprefs.error"
local pretty = require("commprefs.pretty").value
local response = require "commprefs.response"
local redact = require "commprefs.redact"
local lookup = require "commprefs.lookup"
local transport_choice = require "commprefs.transport"
local ops = require "commprefs.ops"
local check = require "commprefs.check"
local credentials = require "commprefs.credentials"
local exchange = require "commprefs.exchange"
local outcome = response.outcome

local M = { Error = Error, pretty = pretty, _VERSION = core._VERSION, core = core }

local Client = {}
Client.__index = Client
Client.__name = "commprefs.client"

------------------------------------------------------------------ checks

local function raise(fname, msg)
  error("commprefs." .. fname .. ": " .. msg, 3)
end

local MAX_ID, MAX_TOKEN = check.MAX_ID, check.MAX_TOKEN
M.MAX_ID, M.MAX_TOKEN = MAX_ID, MAX_TOKEN
local is_integer = check.is_integer

local function check_text(fname, name, v, allow_empty, max)
  local why = check.text(name, v, allow_empty, max)
  if why then raise(fname, why) end
  return v
end

local function check_integer(fname, name, v)
  local why = check.integer(name, v)
  if why then raise(fname, why) end
  return v
end

local function check_id(fname, name, v)
  local why = check.id(name, v)
  if why then raise(fname, why) end
  return v
end

-- The numeric options of core.limits, by the names the user wrote.
local function check_option(name, v)
  local why = check.option(name, v)
  if why then raise("new", why) end
end

local NO_OPTS = setmetatable({}, { __newindex = function() error("commprefs: opts are read-only", 2) end })

local function check_opts(fname, opts, allowed)
  if opts == nil then return NO_OPTS end
  if type(opts) ~= "table" then raise(fname, "bad argument 'opts' (table expected, got " .. type(opts) .. ")") end
  for k, v in pairs(opts) do
    if not allowed[k] then raise(fname, "unknown option '" .. tostring(k) .. "'") end
    if k == "business_unit_id" then check_integer(fname, "opts.business_unit_id", v)
    elseif (k == "verbose" or k == "include_translations") and type(v) ~= "boolean" then
      raise(fname, "bad argument 'opts." .. k .. "' (boolean expected, got " .. type(v) .. ")")
    end
  end
  return opts
end

local function check_ids(fname, ids)
  if type(ids) ~= "table" then raise(fname, "bad argument 'ids' (table expected, got " .. type(ids) .. ")") end
  local n = #ids
  for k in pairs(ids) do
    if not is_integer(k) or k < 1 or k > n then raise(fname, "bad argument 'ids' (array expected)") end
  end
  for i = 1, n do check_id(fname, "ids[" .. i .. "]", ids[i]) end
  return ops.unique(ids) -- a repeat, in any letter case, is sent once
end

local ENUMS = {
  statusState = { SUBSCRIBED = true, UNSUBSCRIBED = true, NOT_SPECIFIED = true },
  legalBasis = { CONSENT_WITH_NOTICE = true, LEGITIMATE_INTEREST_CLIENT = true,
    LEGITIMATE_INTEREST_OTHER = true, LEGITIMATE_INTEREST_PQL = true, NON_GDPR = true,
    PERFORMANCE_OF_CONTRACT = true, PROCESS_AND_STORE = true },
}

-- A status change request (PublicStatusRequest / PartialPublicStatusRequest).
local function check_status_request(fname, name, r, with_id)
  if type(r) ~= "table" then raise(fname, "bad argument '" .. name .. "' (table expected, got " .. type(r) .. ")") end
  local out = { channel = "EMAIL" }
  for k, v in pairs(r) do
    if k == "subscriptionId" then out[k] = check_integer(fname, name .. ".subscriptionId", v)
    elseif k == "statusState" or k == "legalBasis" then
      if not ENUMS[k][v] then raise(fname, "bad argument '" .. name .. "." .. k .. "' (" .. tostring(v) .. " is not allowed)") end
      out[k] = v
    elseif k == "legalBasisExplanation" then out[k] = check_text(fname, name .. "." .. k, v, true)
    elseif k == "channel" then
      if v ~= "EMAIL" then raise(fname, "bad argument '" .. name .. ".channel' (only EMAIL)") end
    elseif k == "subscriberIdString" and with_id then out[k] = check_id(fname, name .. "." .. k, v)
    else raise(fname, "bad argument '" .. name .. "' (unknown field '" .. tostring(k) .. "')") end
  end
  if out.subscriptionId == nil then raise(fname, "bad argument '" .. name .. "' (subscriptionId is required)") end
  if out.statusState == nil then raise(fname, "bad argument '" .. name .. "' (statusState is required)") end
  if with_id and out.subscriberIdString == nil then
    raise(fname, "bad argument '" .. name .. "' (subscriberIdString is required)")
  end
  return out
end

------------------------------------------------------------------ client

local NEW_OPTIONS = {
  token = { string = true, ["function"] = true }, oauth = "table", batch = "string", base_url = "string", api_version = "string", timeout = "number",
  connect_timeout = "number", max_retries = "number", business_unit_id = "number",
  user_agent = "string", ca_file = "string", verify_tls = "boolean", batch_size = "number",
  max_concurrency = "number", rate_limit = "table", backoff_base = "number",
  backoff_max = "number", max_retry_after = "number", transport = "string", max_response_size = "number",
  shared_dict = "string", metrics = "table",
  coalesce = "number", cache = "table", deadline = "number",
}

local RATE_LIMIT_OPTIONS = { max = true, interval = true, redis = true, key = true,
  redis_timeout = true, redis_wait = true }

-- rate_limit = {max =, interval =} by hand and/or {redis = URL, key = K} (a budget
-- shared through Redis, see csrc/redis.c; redis_timeout and redis_wait in seconds);
-- with shared_dict, key alone names the dict's window. Messages never show the URL:
-- it may hold a password.
local OAUTH_OPTIONS = { client_id = "string", client_secret = "string", refresh_token = "string",
  token_url = "string", on_refresh = "function", shared_dict = "string" }

-- oauth = {client_id, client_secret, refresh_token[, token_url][, on_refresh][, shared_dict]}.
-- Messages name the field, never its value (a secret).
local function check_oauth(o)
  if o == nil then return end
  for k, v in pairs(o) do
    if not OAUTH_OPTIONS[k] then raise("new", "bad option 'oauth' (unknown field '" .. tostring(k) .. "')") end
    if type(v) ~= OAUTH_OPTIONS[k] then
      raise("new", string.format("bad option 'oauth.%s' (%s expected, got %s)", k, OAUTH_OPTIONS[k], type(v)))
    end
  end
  for _, k in ipairs { "client_id", "client_secret", "refresh_token" } do
    if o[k] == nil then raise("new", "bad option 'oauth." .. k .. "' (required)") end
    if o[k] == "" or #o[k] > MAX_TOKEN or o[k]:find("%c") then
      raise("new", "bad option 'oauth." .. k .. "' (1 to " .. MAX_TOKEN .. " bytes without control characters expected)")
    end
  end
  if o.token_url ~= nil and not o.token_url:match("^https?://[^/]") then
    raise("new", "bad option 'oauth.token_url' (http:// or https:// URL expected)")
  end
end

local warned_v4 = false
-- HubSpot ends v4's support on 2027-03-30: said once per process (nginx: per worker).
local function warn_v4()
  if warned_v4 then return end
  warned_v4 = true
  local msg = "commprefs: api_version \"v4\": HubSpot ends its support on 2027-03-30; use \"2026-03\" or \"2026-09\""
  if ngx and ngx.log then ngx.log(ngx.WARN, msg) else io.stderr:write(msg, "\n") end
end

-- The sender of token-endpoint POSTs (commprefs.credentials): the client's
-- machinery (the same transport choice, TLS and retry settings) with a
-- governor of its own, no token and form bodies.
local function token_sender(config, which, cosockets, has_ca_file)
  local tconf = {}
  for k, v in pairs(config) do tconf[k] = v end
  tconf.token, tconf.form_body = nil, true
  tconf.redis_url, tconf.redis_key, tconf.rate_max, tconf.rate_interval = nil, nil, nil, nil
  local gov, curl, ngx_t
  return function(url, body)
    gov = gov or core.governor(tconf)
    local req = { method = "POST", url = url, body = body }
    local res
    if transport_choice.for_call(which, cosockets, has_ca_file) == "ngx" then
      ngx_t = ngx_t or require("commprefs.ngx.transport").new(gov, require("commprefs.pacer").new(gov, {}), nil, true)
      -- in a light thread of its own: a refresh may be asked from a perform's own
      -- coroutine while its light threads run (a 401 in on_done, a pull), where
      -- lua-nginx-module would hand a finished thread's results to this socket
      local th = ngx.thread.spawn(function() return ngx_t:perform({ req }) end)
      local ok, results = ngx.thread.wait(th)
      res = ok and type(results) == "table" and results[1]
        or { kind = "network", attempts = 0, message = "the token request failed: " .. tostring(results) }
    else
      curl = curl or core.new(tconf, gov)
      res = curl:perform({ req })[1]
    end
    return req, res
  end
end

-- The profile (commprefs.ngx.transport.profile) of a cosocket client: its
-- call policy, which its calls hand to the transport and governor it may
-- share; one per set of policy options in the bundle (commprefs.shared).
local function profile_of(client, bundle, config, opts)
  local shared = require "commprefs.shared"
  return shared.profile(bundle, shared.profile_key(opts), function()
    local profile = require("commprefs.ngx.transport").profile(client._gov, core.policy(config, "commprefs.new"))
    client._ngx.pacer:cover(profile.settings)
    return profile
  end)
end

local function check_rate_limit(rl, shared_dict)
  if rl == nil then return end
  for k in pairs(rl) do
    if not RATE_LIMIT_OPTIONS[k] then raise("new", "bad option 'rate_limit' (unknown field '" .. tostring(k) .. "')") end
  end
  if (rl.max ~= nil or rl.interval ~= nil or (rl.redis == nil and rl.key == nil))
    and (type(rl.max) ~= "number" or type(rl.interval) ~= "number") then
    raise("new", "bad option 'rate_limit' ({max = requests, interval = seconds} expected)")
  end
  check_option("rate_limit.max", rl.max)
  check_option("rate_limit.interval", rl.interval)
  if rl.redis ~= nil and (type(rl.redis) ~= "string" or not rl.redis:match("^redis://[^/]")) then
    raise("new", "bad option 'rate_limit.redis' (a redis://[user:pass@]host:port[/db] URL expected)")
  end
  if rl.redis ~= nil and rl.key == nil then raise("new", "bad option 'rate_limit.key' (required with rate_limit.redis)") end
  if rl.key ~= nil then
    if rl.redis == nil and shared_dict == nil then
      raise("new", "bad option 'rate_limit.key' (names a shared budget: with rate_limit.redis or shared_dict)")
    end
    check_text("new", "rate_limit.key", rl.key)
    if #rl.key > 200 or rl.key:find("[{}]") then
      raise("new", "bad option 'rate_limit.key' (at most 200 characters, no { or })")
    end
  end
  check_option("rate_limit.redis_timeout", rl.redis_timeout)
  check_option("rate_limit.redis_wait", rl.redis_wait)
end

function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then raise("new", "bad argument 'opts' (table expected, got " .. type(opts) .. ")") end
  for k, v in pairs(opts) do
    if not NEW_OPTIONS[k] then raise("new", "unknown option '" .. tostring(k) .. "'") end
    local want = NEW_OPTIONS[k]
    if type(want) == "table" and not want[type(v)] then
      raise("new", string.format("bad option '%s' (string expected, got %s; or a function giving one)", k, type(v)))
    elseif type(want) == "string" and type(v) ~= want then
      raise("new", string.format("bad option '%s' (%s expected, got %s)", k, want, type(v)))
    end
  end
  if opts.token ~= nil and opts.oauth ~= nil then raise("new", "bad options 'token' and 'oauth' (exactly one of them)") end
  local token = opts.token
  if token == nil and opts.oauth == nil then token = os.getenv("HUBSPOT_ACCESS_TOKEN") end
  if token == nil and opts.oauth == nil then raise("new", "no token: pass token or oauth, or set HUBSPOT_ACCESS_TOKEN") end
  if type(token) == "string" then
    check_text("new", "token", token, false, MAX_TOKEN)
    if token:find("%s") then raise("new", "bad option 'token' (contains spaces)") end
  end
  check_oauth(opts.oauth)
  local batch_mode = opts.batch or "auto"
  if batch_mode ~= "auto" and batch_mode ~= "never" and batch_mode ~= "always" then
    raise("new", "bad option 'batch' (\"auto\", \"never\" or \"always\" expected, got " .. batch_mode .. ")")
  end
  local base_url = check_text("new", "base_url", opts.base_url or "https://api.hubapi.com")
  if not base_url:match("^https?://[^/]") then raise("new", "bad option 'base_url' (http:// or https:// URL expected)") end
  if base_url:find("[?#]") then raise("new", "bad option 'base_url' (no ?query or #fragment: the API root only)") end
  if base_url:match("^%a+://[^/]*@") then
    raise("new", "bad option 'base_url' (no user:password@: HubSpot authenticates with the token only)")
  end
  base_url = base_url:gsub("/+$", "")
  local version = opts.api_version or "2026-03"
  if version ~= "v4" and not version:match("^%d%d%d%d%-%d%d$") then
    raise("new", "bad option 'api_version' (\"2026-03\", \"2026-09\" or \"v4\" expected, got " .. version .. ")")
  end
  if version == "v4" then warn_v4() end
  if opts.business_unit_id ~= nil then check_integer("new", "business_unit_id", opts.business_unit_id) end
  for _, k in ipairs { "batch_size", "max_retries", "max_concurrency", "timeout", "connect_timeout",
    "backoff_base", "backoff_max", "max_retry_after", "max_response_size", "deadline" } do
    check_option(k, opts[k])
  end
  local batch_size = opts.batch_size or check.limits.batch_size.default
  if opts.ca_file then
    check_text("new", "ca_file", opts.ca_file)
    local f, ferr = io.open(opts.ca_file, "rb")
    if not f then raise("new", "bad option 'ca_file' (cannot read it: " .. tostring(ferr) .. ")") end
    f:close()
  end
  if opts.user_agent then check_text("new", "user_agent", opts.user_agent) end
  local rl = opts.rate_limit
  check_rate_limit(rl, opts.shared_dict)
  local transport = opts.transport or "auto"
  if transport ~= "auto" and transport ~= "curl" and transport ~= "ngx" then
    raise("new", "bad option 'transport' (\"auto\", \"curl\" or \"ngx\" expected, got " .. transport .. ")")
  end
  local in_nginx = transport_choice.in_nginx()
  if transport == "ngx" and not in_nginx then
    raise("new", "bad option 'transport' (\"ngx\" needs OpenResty's cosockets: it works only inside nginx)")
  end
  local oauth_dict = opts.oauth and opts.oauth.shared_dict
  if oauth_dict ~= nil and not (in_nginx and ngx.shared[oauth_dict]) then
    raise("new", "bad option 'oauth.shared_dict' (no lua_shared_dict named '" .. oauth_dict
      .. "'" .. (in_nginx and ": declare it in nginx.conf's http block)" or ": it exists only inside nginx)"))
  end
  if opts.shared_dict ~= nil and not (in_nginx and ngx.shared[opts.shared_dict]) then
    raise("new", "bad option 'shared_dict' (no lua_shared_dict named '" .. opts.shared_dict
      .. "'" .. (in_nginx and ": declare it in nginx.conf's http block)" or ": it exists only inside nginx)"))
  end
  lookup.check(opts.coalesce, opts.cache)
  local metrics_dict = opts.metrics and opts.metrics.shared_dict
  if opts.metrics ~= nil then
    for k in pairs(opts.metrics) do
      if k ~= "shared_dict" then raise("new", "bad option 'metrics' (unknown field '" .. tostring(k) .. "')") end
    end
    if type(metrics_dict) ~= "string" or not (in_nginx and ngx.shared[metrics_dict]) then
      raise("new", "bad option 'metrics.shared_dict' (the name of a lua_shared_dict of nginx.conf expected"
        .. (in_nginx and ")" or ": it exists only inside nginx)"))
    end
  end
  local cosockets = transport ~= "curl" and in_nginx
  if transport == "ngx" and opts.ca_file then raise("new", transport_choice.NGX_CA_FILE) end
  local config = {
    user_agent = opts.user_agent, ca_file = opts.ca_file, verify_tls = opts.verify_tls,
    timeout = opts.timeout, connect_timeout = opts.connect_timeout, max_retries = opts.max_retries,
    max_concurrency = opts.max_concurrency, backoff_base = opts.backoff_base,
    backoff_max = opts.backoff_max, max_retry_after = opts.max_retry_after,
    rate_max = rl and rl.max, rate_interval = rl and rl.interval,
    max_response_size = opts.max_response_size, deadline = opts.deadline,
    handle_signals = not ngx, -- inside nginx, its own signal handling stays in charge
    -- the shared budget in C: inside nginx the cosocket pacer speaks to Redis instead
    redis_url = rl and not cosockets and rl.redis or nil,
    redis_key = rl and rl.key, redis_timeout = rl and rl.redis_timeout, redis_wait = rl and rl.redis_wait,
  }
  -- inside nginx, clients of one app share one bundle per worker (commprefs.shared)
  local shared = cosockets and require("commprefs.shared")
  local share_key = shared and shared.key(token, base_url, version, opts)
  local bundle = share_key and shared.get(share_key)
  if bundle then
    local why = shared.conflict(bundle, opts) or bundle.creds:join(opts.oauth)
    if why then raise("new", why) end
  end
  local gov
  if bundle then
    gov = bundle.gov
    bundle.clients = bundle.clients + 1
  else
    local ok, g, budget_err = pcall(core.governor, config, "commprefs.new")
    if not ok then error(g, 2) end
    if g == nil then -- Redis unreachable or refusing us: a runtime failure
      return nil, Error.new { kind = "redis", message = "the shared budget is unavailable: " .. tostring(budget_err) }
    end
    gov = g
  end
  local client = setmetatable({
    base_url = base_url, api_version = version, business_unit_id = opts.business_unit_id,
    batch_size = batch_size, max_concurrency = opts.max_concurrency, -- nil: adaptive
    _gov = gov, _prefix = base_url .. "/communication-preferences/" .. version .. "/",
    _transport = transport, _ca_file = opts.ca_file ~= nil, _batch_mode = batch_mode, _metrics_dict = metrics_dict,
    _deadline = opts.deadline, _timeout = opts.timeout or check.limits.timeout.default,
    _shared = share_key or nil,
    _on_refresh = opts.oauth and opts.oauth.on_refresh, -- held here: the credentials hold it weakly
  }, Client)
  redact.remember(client, type(token) == "string" and token or nil) -- errors never show it (commprefs.redact)
  -- a shared bundle owns its credentials' secrets for redaction: they outlive any one client
  local holder = bundle or (share_key and shared.new_bundle(opts)) or client
  local creds = bundle and bundle.creds or credentials.new { token = token, oauth = opts.oauth, base_url = base_url,
    owner = holder, post_form = token_sender(config, transport, cosockets, opts.ca_file ~= nil) }
  client._creds, client._creds_key = creds, base_url .. "\0" .. creds.identity
  -- a static token over libcurl alone: single requests may go straight to it (Client:_answer)
  client._straight = not cosockets and not metrics_dict and not creds:renewable() and batch_mode ~= "never"
  if bundle then client._ngx = bundle.ngx
  elseif cosockets then -- the cosocket transport reads the token from the credentials per request
    local pacer = require("commprefs.pacer").new(gov, { shared_dict = opts.shared_dict, rate_limit = rl })
    client._ngx = require("commprefs.ngx.transport").new(gov, pacer, creds)
  end
  if cosockets then client._profile = profile_of(client, holder, config, opts) end
  -- libcurl: made at the first call (inside nginx only for init_by_lua calls), with the token then
  client._make_curl = function(tok)
    config.token = tok
    local curl = core.new(config, gov)
    config.token = nil
    return curl
  end
  if not cosockets and type(token) == "string" then client:_use_token(token) end
  -- lookup: the bundle's queue and cache entries, read with this client's coalesce and cache options
  client._lookup_state = bundle and bundle.lookup
    or lookup.state(version, shared and shared.credential_text(token, opts.oauth) .. "\0" .. base_url)
  client._lookup = lookup.view(client._lookup_state, client, opts.coalesce, opts.cache)
  if share_key and not bundle then
    holder.gov, holder.ngx, holder.lookup, holder.creds = gov, client._ngx, client._lookup_state, creds
    if not shared.put(share_key, holder) then client._shared = nil end
  end
  return client
end

function Client:__tostring()
  return string.format("commprefs.client: %s (api %s)", self.base_url, self.api_version)
end

-- A closed client sends nothing more (a perform under way raises once its
-- requests in flight end). One sharing its worker's bundle
-- (commprefs.shared) closes the governor only when it is the last open
-- client of the bundle: the others go on with it.
function Client:close()
  if self._closed then return end -- a second close must not close a bundle's governor
  self._closed = true
  if self._curl then self._curl:close() end
  if self._shared then
    local key = self._shared
    self._shared = nil
    if not require("commprefs.shared").release(key) then return end
  end
  self._gov:close()
end
Client.__close = Client.close

-- The counters of client:stats() (README "Metrics"), the lookup's included.
function Client:stats()
  local s = self._gov:stats()
  s.lookup = lookup.stats(self)
  return s
end

-- commprefs.prometheus(client) -> Prometheus' text format of its counters (with
-- metrics.shared_dict: every nginx worker's, added up in the dict).
function M.prometheus(client)
  local metrics = require "commprefs.metrics"
  local name = client._metrics_dict
  if not name then return metrics.text(client) end
  local dict = ngx.shared[name]
  metrics.flush(client, dict)
  return metrics.render(metrics.collect(dict))
end

------------------------------------------------------------------ requests

-- The query of an operation: the client's business unit unless opts names one.
local function query(self, opts, channel, verbose, translations)
  if opts == NO_OPTS then return ops.query(channel, self.business_unit_id) end
  local bu = opts.business_unit_id
  if bu == nil then bu = self.business_unit_id end
  local v, tr = nil, nil
  if verbose then v = opts.verbose end
  if translations then tr = opts.include_translations end
  return ops.query(channel, bu, v, tr)
end

------------------------------------------------------------------ the client port
-- What the feature modules (bulk, lookup, worker) use of a client, and
-- nothing else: _perform, _uses_cosockets, _has_cosockets, _in_flight_target, _pacer,
-- _cache_note, _get_unsubscribe_all, _gov:clock(), _deadline, _timeout, _prefix,
-- _lookup / _lookup_state (commprefs.lookup's own), _profile (its call policy
-- inside nginx), _check_open, batch_size, business_unit_id, max_concurrency.

-- One perform on the transport of this call (the choice is commprefs.transport's).
local function transport_perform(self, source, on_done, deadline)
  if transport_choice.for_call(self._transport, self._ngx ~= nil, self._ca_file) == "ngx" then
    return self._ngx:perform(source, on_done, deadline, self._profile)
  end
  return self._curl:perform(source, on_done, deadline)
end

-- With metrics.shared_dict: this worker flushes the client's counts (commprefs.metrics).
local function watch_metrics(self)
  self._metrics_watched = require("commprefs.metrics").watch(self, self._metrics_dict)
end

-- The one entry to the transports: credentials, the resend after a 401,
-- request-wide stops and the single-contact form are commprefs.exchange's.
-- deadline: the call's (the governor's clock, gov:deadline()), or nil.
function Client:_perform(source, on_done, deadline)
  if self._metrics_dict and not self._metrics_watched then watch_metrics(self) end
  return exchange.perform(self, source, on_done, transport_perform, deadline)
end

-- One request to its result. A static token needs nothing of commprefs.exchange
-- for one single-contact request: straight to the transport (no closures,
-- no wrapper table: the GET path).
function Client:_perform_one(req, deadline)
  self:_check_open()
  if self._creds:renewable() or exchange.single_contact(self) then
    return self:_perform({ req }, nil, deadline)[1]
  end
  if self._metrics_dict and not self._metrics_watched then watch_metrics(self) end
  -- (no cosocket transport: libcurl, as transport_choice.for_call says, without asking it)
  if self._ngx ~= nil and transport_choice.for_call(self._transport, true, self._ca_file) == "ngx" then
    return self._ngx:perform_one(req, deadline, self._profile)
  end
  local curl = self._curl
  if not curl then return self:_perform({ req }, nil, deadline)[1] end -- exchange sets the token first
  return (curl:perform_one(req, deadline))
end

-- One request to its envelope, or nil, Error (commprefs.response). Where
-- _perform_one would go straight to libcurl, the transport's answer_one
-- sends it and decodes a 2xx answer in the same C call (no request or
-- result table): the GET path.
local cleaned = response.cleaned
function Client:_answer(method, url, body, deadline)
  local curl = self._curl
  if not self._straight or curl == nil or self._closed or exchange.single_contact(self) then
    local req = { method = method, url = url, body = body }
    return outcome(req, self:_perform_one(req, deadline))
  end
  local env, text, escaped = curl:answer_one(method, url, body, deadline)
  if env then return cleaned(env, text, escaped) end
  return outcome({ method = method, url = url, body = body }, text) -- text: the result
end

-- The token requests carry from now on (commprefs.exchange, before each request).
-- libcurl asks the credentials again (its renewer) when an attempt starts
-- after the token is due, so a request waiting for the rate limit never
-- leaves with a token about to expire.
function Client:_use_token(tok)
  local curl = self._curl
  if not curl then
    if transport_choice.is_cosocket(self._transport, self._ngx ~= nil) then return end
    curl = self._make_curl(tok)
    self._curl, self._curl_gen = curl, nil
    local creds = self._creds
    if creds:renewable() then
      curl:set_renewer(function()
        local fresh = creds:current()
        if fresh then self:_use_token(fresh) end
      end)
    end
  end
  local gen = self._creds.gen -- never the token itself in a table field
  if self._curl_gen ~= gen then
    curl:set_token(tok, self._creds:due_in())
    self._curl_gen = gen
  end
end

-- Raises once the client is closed (commprefs.exchange asks before each request it hands on).
function Client:_check_open()
  if self._closed then error("commprefs: the client is closed", 0) end
end

-- Whether a call made now goes over cosockets (light threads can gather).
function Client:_uses_cosockets()
  return transport_choice.is_cosocket(self._transport, self._ngx ~= nil)
end

-- How many requests the governor would have in flight now.
function Client:_in_flight_target()
  return self._gov:target()
end

-- Whether the client has a cosocket transport it may take inside nginx.
function Client:_has_cosockets()
  return self._ngx ~= nil and self._transport ~= "curl"
end

-- The cosocket pacer (nil on the libcurl path).
function Client:_pacer()
  return self._ngx and self._ngx.pacer
end

-- Forgets the pooled connections of both transports.
function Client:_drop_connections()
  if self._curl then self._curl:drop_connections() end
  if self._ngx then self._ngx:drop_connections() end
end

-- The absolute deadline (the governor's clock) of a call of `seconds`
-- starting now, or nil: always this client's (never the deadline option of
-- the client that made a shared governor).
local function deadline_in(self, seconds)
  if seconds then return self._gov:deadline(seconds) end
end

-- One request; about_id: the id a read is about. An answer naming another id
-- belongs to another request (a connection that held stale bytes): the
-- connections are dropped and the read is sent once more on a fresh one;
-- twice is an error, never an answer.
-- seconds: the call's deadline when not the deadline option's.
function Client:_request(method, path, q, body, about_id, seconds)
  return self:_request_url(method, self._prefix .. path .. q, body, about_id, seconds)
end

-- _request with the whole URL (made in one concatenation by the caller).
function Client:_request_url(method, url, body, about_id, seconds)
  seconds = seconds or transport_choice.call_seconds(self._deadline, self._timeout)
  local deadline = seconds and self._gov:deadline(seconds)
  for attempt = 1, 2 do
    local env, err = self:_answer(method, url, body, deadline)
    local results = env and about_id and env.results -- (names_other: none named when there is no result)
    local other = results and results[1] ~= nil and ops.names_other(env, about_id)
    if not other then return env, err end
    self:_drop_connections()
    if attempt == 2 then
      return nil, Error.new { kind = "decode", code = "desync", method = method, url = response.error_url(url),
        message = "the answer named another id than the one asked (" .. other .. "), twice: not taken" }
    end
  end
end

------------------------------------------------------------------ batches

-- Why a split batch stopped (a request-wide refusal: ops.stops), or nil.
local function stopped_by(results)
  for _, res in pairs(results) do
    if res.stopped then return res.stopped end
  end
end

-- Splits items into requests of at most batch_size, runs them (concurrently
-- up to max_concurrency) and merges the envelopes. On any failed request:
-- nil, err with err.partial (what succeeded) and err.failed_inputs.
function Client:_batch(path, q, items)
  if #items == 0 then return ops.empty_envelope() end
  local size = self.batch_size
  local chunks, reqs = ops.split(items, size), {}
  for i, chunk in ipairs(chunks) do reqs[i] = ops.batch_request(self._prefix .. path .. q, chunk) end
  local results = self:_perform(reqs, nil, deadline_in(self, self._deadline))
  local merged = { status = "COMPLETE", results = {} }
  local first_err, failed = nil, {}
  for i, req in ipairs(reqs) do
    local env, err = outcome(req, results[i])
    if env then ops.merge(merged, env)
    else
      first_err = first_err or err
      for _, item in ipairs(chunks[i]) do failed[#failed + 1] = item end
    end
  end
  if first_err then
    first_err.stopped = stopped_by(results)
    first_err.partial = merged
    first_err.failed_inputs = failed
    if #reqs > 1 then
      first_err.message = string.format("%s (%d of %d requests failed; err.failed_inputs lists %d inputs not processed)",
        first_err.message, #failed > 0 and math.ceil(#failed / size) or 0, #reqs, #failed)
    end
    return nil, first_err
  end
  return merged
end

------------------------------------------------------------------ operations

local O_BU = { business_unit_id = true }
local O_BU_VERBOSE = { business_unit_id = true, verbose = true }
local O_DEFS = { business_unit_id = true, include_translations = true }

-- The escaped path segment of id, checked (raises). A printable-ASCII id
-- (the usual e-mail address) passes every rule of check.id: core.escape_id
-- checks that and escapes it in one call; anything else goes the long way.
local escape_id = core.escape_id
local function segment(fname, id)
  return escape_id(id, MAX_ID) or core.escape(check_id(fname, "id", id))
end

function Client:get_unsubscribe_all_status(id, opts)
  local seg = escape_id(id, MAX_ID) or segment("get_unsubscribe_all_status", id)
  opts = check_opts("get_unsubscribe_all_status", opts, O_BU_VERBOSE)
  return self:_request_url("GET", self._prefix .. "statuses/" .. seg .. "/unsubscribe-all" .. query(self, opts, true, true),
    nil, id)
end

-- The client port's read for lookups: id and opts checked; seconds: the
-- lookup's deadline (nil: the deadline option's).
function Client:_get_unsubscribe_all(id, opts, seconds)
  return self:_request_url("GET", self._prefix .. "statuses/" .. core.escape(id) .. "/unsubscribe-all"
    .. query(self, opts, true, true), nil, id, seconds)
end

function Client:unsubscribe_all(id, opts)
  local seg = segment("unsubscribe_all", id)
  opts = check_opts("unsubscribe_all", opts, O_BU_VERBOSE)
  local env, err = self:_request("POST", "statuses/" .. seg .. "/unsubscribe-all", query(self, opts, true, true), "")
  self:_cache_note(id, opts.business_unit_id, env ~= nil)
  return env, err
end

function Client:batch_unsubscribe_all(ids, opts)
  ids = check_ids("batch_unsubscribe_all", ids)
  opts = check_opts("batch_unsubscribe_all", opts, O_BU_VERBOSE)
  local env, err = self:_batch("statuses/batch/unsubscribe-all", query(self, opts, true, true), ids)
  lookup.note_batch(self, ids, opts.business_unit_id, env or err.partial, true)
  return env, err
end

function Client:batch_get_unsubscribe_all_status(ids, opts)
  ids = check_ids("batch_get_unsubscribe_all_status", ids)
  opts = check_opts("batch_get_unsubscribe_all_status", opts, O_BU)
  return self:_batch("statuses/batch/unsubscribe-all/read", query(self, opts, true), ids)
end

function Client:get_status(id, opts)
  local seg = segment("get_status", id)
  opts = check_opts("get_status", opts, O_BU)
  return self:_request("GET", "statuses/" .. seg, query(self, opts, true), nil, id)
end

function Client:update_status(id, request, opts)
  local seg = segment("update_status", id)
  local body = check_status_request("update_status", "request", request, false)
  check_opts("update_status", opts, {})
  local env, err = self:_request("POST", "statuses/" .. seg, "", core.encode(body))
  if body.statusState ~= "UNSUBSCRIBED" then lookup.note_batch(self, { id }, nil, env, false) end
  return env, err
end

function Client:batch_get_status(ids, opts)
  ids = check_ids("batch_get_status", ids)
  opts = check_opts("batch_get_status", opts, O_BU)
  return self:_batch("statuses/batch/read", query(self, opts, true), ids)
end

function Client:batch_update_status(inputs, opts)
  if type(inputs) ~= "table" then raise("batch_update_status", "bad argument 'inputs' (table expected, got " .. type(inputs) .. ")") end
  local items = {}
  for i = 1, #inputs do
    items[i] = check_status_request("batch_update_status", "inputs[" .. i .. "]", inputs[i], true)
  end
  check_opts("batch_update_status", opts, {})
  local env, err = self:_batch("statuses/batch/write", "", items)
  local maybe_resubscribed = {}
  for _, item in ipairs(items) do
    if item.statusState ~= "UNSUBSCRIBED" then maybe_resubscribed[#maybe_resubscribed + 1] = item.subscriberIdString end
  end
  lookup.note_batch(self, maybe_resubscribed, nil, env or err.partial, false)
  return env, err
end

function Client:get_definitions(opts)
  opts = check_opts("get_definitions", opts, O_DEFS)
  return self:_request("GET", "definitions", query(self, opts, false, false, true))
end

function Client:generate_links(request, opts)
  if type(request) ~= "table" then raise("generate_links", "bad argument 'request' (table expected, got " .. type(request) .. ")") end
  local body = { subscriberIdString = check_id("generate_links", "request.subscriberIdString", request.subscriberIdString) }
  for k, v in pairs(request) do
    if k == "subscriptionId" then body[k] = check_integer("generate_links", "request.subscriptionId", v)
    elseif k == "language" then body[k] = check_text("generate_links", "request.language", v)
    elseif k ~= "subscriberIdString" then raise("generate_links", "bad argument 'request' (unknown field '" .. tostring(k) .. "')") end
  end
  opts = check_opts("generate_links", opts, O_BU)
  return self:_request("POST", "links/generate", query(self, opts, true), core.encode(body))
end

------------------------------------------------------------------ helpers

-- With the coalesce and cache options: see commprefs.lookup.
function Client:is_unsubscribed_from_all(id, opts)
  check_id("is_unsubscribed_from_all", "id", id)
  opts = check_opts("is_unsubscribed_from_all", opts, O_BU)
  return lookup.is_unsubscribed_from_all(self, id, opts)
end

-- Called after every change made through commprefs (contract C7): unsubscribed
-- true = now unsubscribed from all; false/nil = the cached answer is forgotten.
function Client:_cache_note(id, business_unit_id, unsubscribed)
  lookup.note(self, id, business_unit_id, unsubscribed)
end

------------------------------------------------------------------ bulk jobs

-- client:bulk_unsubscribe_all(source, opts) / client:bulk_get_unsubscribe_all_status(source, opts):
-- see commprefs.bulk. Returns the summary table.
function Client:bulk_unsubscribe_all(source, opts)
  return require("commprefs.bulk").run(self, "bulk_unsubscribe_all", "unsubscribe_all", source, opts)
end

function Client:bulk_get_unsubscribe_all_status(source, opts)
  return require("commprefs.bulk").run(self, "bulk_get_unsubscribe_all_status", "get_unsubscribe_all_status", source, opts)
end

M.Client = Client
return M
