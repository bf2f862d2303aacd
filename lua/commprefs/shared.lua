-- commprefs.shared: owns the per-worker registry of what clients of one
-- HubSpot app share inside nginx. HubSpot's budget belongs to the app, not
-- to a Lua object: clients made in one worker with the same credentials,
-- base URL, API version and options (a client made per request, as
-- lua-resty-http advises, or one made in init_by_lua) get one bundle: one
-- governor (learned window, stats), one pacer, one cosocket transport with
-- its pools, and one lookup state (coalescing queue and cache).
-- Bundles are found by a keyed digest (HMAC-SHA1 under a random key made
-- once per process): the token is never a key, and the registry holds
-- nothing from which it could be read back.
local M = { MAX_BUNDLES = 256 } -- beyond that, clients are not shared (made afresh)

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

-- A canonical text of a value (tables with sorted keys); functions and other
-- values by identity.
local function canonical(v, out)
  local tv = type(v)
  if tv == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    out[#out + 1] = "{"
    for _, k in ipairs(keys) do
      out[#out + 1] = tostring(k) .. "="
      canonical(v[k], out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  elseif tv == "string" then
    out[#out + 1] = string.format("%q", v)
  else
    out[#out + 1] = tv .. ":" .. tostring(v)
  end
end

-- The digest naming a bundle: token (or any credential text), base URL, API
-- version and every other option of commprefs.new (`opts`, token left out).
function M.key(token, base_url, api_version, opts)
  local out = { base_url, "\0", api_version, "\0" }
  local rest = {}
  for k, v in pairs(opts) do
    if k ~= "token" and k ~= "base_url" and k ~= "api_version" then rest[k] = v end
  end
  canonical(rest, out)
  -- a token function or OAuth app: keyed by its identity (the function) and opts.oauth above
  local credential = type(token) == "string" and token or tostring(token)
  return ngx.hmac_sha1(process_secret(), credential .. "\0" .. table.concat(out))
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
