-- commprefs.shared: owns the per-worker registry of what clients of one
-- HubSpot app share inside nginx, and the rules of that sharing. HubSpot's
-- budget belongs to the app, not to a Lua object: clients made in one worker
-- with the same credentials, base URL and API version (a client made per
-- request, as lua-resty-http advises, or one made in init_by_lua) get one
-- bundle: one governor (learned window, daily rules, stats), one pacer, one
-- cosocket transport with its pools, one set of credentials (one access
-- token) and one lookup state (coalescing queue and cache entries).
--
-- The bundle key is a keyed digest (HMAC-SHA1 under a random key made once
-- per process) of what names the budget and where it lives, nothing else:
--   * the credentials: the token text; a token function by identity (pass a
--     module-level function to share: a closure made per request is another
--     function); an OAuth app by client_id, client secret, refresh token and
--     token_url (one installation of the app);
--   * base_url and api_version;
--   * the shared pacing backing: shared_dict, and rate_limit's redis, key,
--     redis_timeout and redis_wait. Clients that differ here still pace
--     through the same dict or Redis key when it is the same one, so a
--     second bundle never exceeds that budget; they only keep separate
--     pacer objects (one backing object per bundle).
-- The token is never a key, and the registry holds nothing from which it
-- could be read back.
--
-- Everything else is per client, even inside a bundle:
--   * the call policy (M.POLICY_OPTIONS: retries, backoff, timeouts,
--     answer size, TLS verification, User-Agent) becomes a profile
--     (commprefs.ngx.transport.profile over a commprefs.core.policy) that each
--     call hands to the shared transport and governor; clients of one
--     bundle with equal policy options share one profile (M.profile);
--   * deadline, batch_size, batch, business_unit_id, transport, ca_file
--     (a libcurl call in init_by_lua uses the client's own config), metrics;
--   * coalesce and cache.ttl: read per client by commprefs.lookup (entries
--     and the queue are the bundle's).
-- The budget stated by hand (M.BUDGET_OPTIONS: max_concurrency,
-- rate_limit.max and rate_limit.interval) is the bundle's, so every client
-- of a bundle must state the same one (not stating it is a statement too):
-- a client that differs raises at commprefs.new, naming the option
-- (M.conflict). Taking the tightest instead would change, silently and
-- depending on the order clients are made in, the pace of clients made
-- earlier; raising never exceeds the budget and shows the mistake at once.
-- Credentials options beyond the identity are joined, never ignored
-- (commprefs.credentials join): the on_refresh of every client still in use
-- is told of each new token, and the one access token is shared through the
-- oauth.shared_dict any client names (two different dicts raise).
local M = { MAX_BUNDLES = 256, -- beyond that, clients are not shared (made afresh)
  MAX_PROFILES = 64 } -- per bundle; beyond that, a client's profile is its own

M.POLICY_OPTIONS = { "max_retries", "backoff_base", "backoff_max", "max_retry_after", "timeout",
  "connect_timeout", "max_response_size", "verify_tls", "user_agent" }

-- {name shown in messages, how to read it from the options}
M.BUDGET_OPTIONS = {
  { "max_concurrency", function(o) return o.max_concurrency end },
  { "rate_limit.max", function(o) return o.rate_limit and o.rate_limit.max end },
  { "rate_limit.interval", function(o) return o.rate_limit and o.rate_limit.interval end },
}

local bundles, count = {}, 0
local secret

local function process_secret()
  if secret then return secret end
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(32)
  if f then f:close() end
  if not bytes or #bytes < 32 then -- no /dev/urandom: the clock and addresses, never the token
    bytes = string.format("%s:%.9f:%s:%d", tostring({}), ngx.now(), tostring(M), ngx.worker.pid())
  end
  secret = bytes
  return secret
end

-- Unambiguous text of a list of values (each length-prefixed; nil is "-").
local function joined(values, n)
  local out = {}
  for i = 1, n do
    local v = values[i]
    local s = v == nil and "-" or tostring(v)
    out[i] = #s .. ":" .. s
  end
  return table.concat(out, ",")
end

-- The text naming the credentials: token = string or function, or the oauth option.
local function credential_text(token, oauth)
  if oauth then
    return "oauth " .. joined({ oauth.client_id, oauth.client_secret, oauth.refresh_token, oauth.token_url }, 4)
  end
  if type(token) == "string" then return "token " .. token end
  return "function " .. tostring(token) -- by identity: the bundle keeps it alive, so never reused
end

M.credential_text = credential_text -- also names a bundle's entries in a shared cache (commprefs.lookup)

-- The digest naming a bundle (see the top): the credentials (token, or
-- opts.oauth), base URL, API version and the shared pacing backing of opts.
function M.key(token, base_url, api_version, opts)
  local rl = opts.rate_limit or {}
  local where = joined({ base_url, api_version, opts.shared_dict, rl.redis, rl.key, rl.redis_timeout,
    rl.redis_wait }, 7)
  return ngx.hmac_sha1(process_secret(), credential_text(token, opts.oauth) .. "\0" .. where)
end

-- The budget opts state by hand, as {[option] = value}.
local function budget_of(opts)
  local b = {}
  for _, o in ipairs(M.BUDGET_OPTIONS) do b[o[1]] = o[2](opts) end
  return b
end

-- A new bundle for its first client, made with opts (the caller fills in
-- gov, ngx, lookup and creds).
function M.new_bundle(opts)
  return { clients = 1, budget = budget_of(opts), profiles = {}, nprofiles = 0 }
end

-- Why a client made with opts cannot join bundle (its budget options
-- differ from the bundle's), or nil.
function M.conflict(bundle, opts)
  for _, o in ipairs(M.BUDGET_OPTIONS) do
    local name = o[1]
    local mine, theirs = o[2](opts), bundle.budget[name]
    if mine ~= theirs then
      return string.format("bad option '%s' (%s here, %s for the clients this nginx worker already has with the"
        .. " same credentials, base URL and API version: they share one HubSpot budget, so give every such"
        .. " client the same %s)", name, mine == nil and "not set" or tostring(mine),
        theirs == nil and "not set" or tostring(theirs), name)
    end
  end
end

-- The text naming a client's call policy (M.POLICY_OPTIONS of opts).
function M.profile_key(opts)
  local values = {}
  for i, k in ipairs(M.POLICY_OPTIONS) do values[i] = opts[k] end
  return joined(values, #M.POLICY_OPTIONS)
end

-- The profile of key in bundle, made by make() the first time (at most
-- MAX_PROFILES kept; beyond that each client keeps its own).
function M.profile(bundle, key, make)
  local p = bundle.profiles[key]
  if p then return p end
  p = make()
  if bundle.nprofiles < M.MAX_PROFILES then
    bundle.profiles[key], bundle.nprofiles = p, bundle.nprofiles + 1
  end
  return p
end

-- The bundle of key, or nil.
function M.get(key)
  return bundles[key]
end

-- Keeps bundle under key; false when the registry is full (the caller's
-- client then shares nothing).
function M.put(key, bundle)
  if bundles[key] == nil then
    if count >= M.MAX_BUNDLES then return false end
    count = count + 1
  end
  bundles[key] = bundle
  return true
end

-- One client of key's bundle was closed: true when it was the last one (the
-- bundle is then forgotten and its governor may be closed).
function M.release(key)
  local b = bundles[key]
  if not b then return true end
  b.clients = b.clients - 1
  if b.clients > 0 then return false end
  bundles[key], count = nil, count - 1
  return true
end

return M
