-- hubsim.state: the simulated portal's data and the semantics of every
-- Communication Preferences operation on it (no HTTP here: see hubsim.http).
--
-- A portal has business units 0 (the account's default) and 1, a few
-- subscription definitions per unit, and per subscriber: a status per
-- subscription and a "wide" (unsubscribe-from-all) flag per business unit.
local M = {}

local BUSINESS_UNITS = { [0] = true, [1] = true }
M.BUSINESS_UNITS = BUSINESS_UNITS

local CREATED = "2024-01-15T09:30:00.000Z"
local CREATED_MS = 1705311000000

local DEFINITIONS = {
  { id = "1001", name = "Marketing Information", businessUnitId = 0,
    description = "Marketing offers and updates.", purpose = "Marketing" },
  { id = "1002", name = "Product Updates", businessUnitId = 0,
    description = "News about product changes.", purpose = "Marketing" },
  { id = "1003", name = "One to One", businessUnitId = 0, isInternal = true,
    description = "One to one emails.", purpose = "Sales" },
  { id = "2001", name = "Unit One Newsletter", businessUnitId = 1,
    description = "The newsletter of business unit 1.", purpose = "Marketing" },
}

local function now_iso()
  local t = ngx and ngx.now() or os.time()
  local sec = math.floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", sec) .. string.format(".%03dZ", math.floor((t - sec) * 1000))
end
M.now_iso = now_iso

local subscribers -- id -> { wide = {[bu] = timestamp}, subs = {[subId] = status table} }

function M.reset()
  subscribers = {}
end
M.reset()

local function definitions_for(bu)
  local out = {}
  for _, d in ipairs(DEFINITIONS) do
    if d.businessUnitId == bu then out[#out + 1] = d end
  end
  return out
end

function M.find_definition(sub_id)
  for _, d in ipairs(DEFINITIONS) do
    if tonumber(d.id) == sub_id then return d end
  end
end

-- A subscriber id is valid when it looks like an email address: one '@'
-- with something on both sides and no control characters.
function M.valid_id(id)
  return type(id) == "string" and #id <= 1024 and not id:find("[%c]")
    and id:match("^[^@]+@[^@]+$") ~= nil
end

local function subscriber(id, create)
  local s = subscribers[id]
  if not s and create then
    s = { wide = {}, subs = {} }
    subscribers[id] = s
  end
  return s
end

function M.definitions(bu, with_translations)
  local results = {}
  for _, d in ipairs(definitions_for(bu)) do
    local r = {
      id = d.id, name = d.name, description = d.description, purpose = d.purpose,
      businessUnitId = d.businessUnitId, communicationMethod = "Email",
      isActive = true, isDefault = d.id == "1001", isInternal = d.isInternal == true,
      createdAt = CREATED, updatedAt = CREATED,
    }
    if with_translations then
      r.subscriptionTranslations = {
        { subscriptionId = tonumber(d.id), languageCode = "fr", name = d.name .. " (fr)",
          description = d.description, createdAt = CREATED_MS, updatedAt = CREATED_MS },
      }
    end
    results[#results + 1] = r
  end
  return results
end

-- The status of one subscription for one subscriber, as a PublicStatus.
local function public_status(id, d, s, verbose, reason)
  local rec = s and s.subs[tonumber(d.id)]
  local status = rec and rec.status or "NOT_SPECIFIED"
  local ts = rec and rec.timestamp or CREATED
  if s and s.wide[d.businessUnitId] then
    status, ts = "UNSUBSCRIBED", s.wide[d.businessUnitId]
  end
  local r = {
    subscriberIdString = id, subscriptionId = tonumber(d.id), channel = "EMAIL",
    status = status, source = rec and rec.source or "Portal default",
    timestamp = ts, businessUnitId = d.businessUnitId,
    setStatusSuccessReason = reason,
  }
  if verbose ~= false then
    r.subscriptionName = d.name
    r.legalBasis = rec and rec.legalBasis
    r.legalBasisExplanation = rec and rec.legalBasisExplanation
  end
  return r
end

function M.statuses(id, bu)
  local s = subscriber(id)
  local out = {}
  for _, d in ipairs(definitions_for(bu)) do out[#out + 1] = public_status(id, d, s) end
  return out
end

-- Wide statuses: only units the subscriber opted out of, unless verbose,
-- which reports the unit's wide status whatever it is.
function M.wide_statuses(id, bu, verbose)
  local s = subscriber(id)
  local ts = s and s.wide[bu]
  if not ts and not verbose then return {} end
  return { {
    subscriberIdString = id, channel = "EMAIL",
    status = ts and "UNSUBSCRIBED" or "NOT_SPECIFIED",
    timestamp = ts or CREATED, businessUnitId = bu,
    wideStatusType = bu == 0 and "PORTAL_WIDE" or "BUSINESS_UNIT_WIDE",
  } }
end

-- Unsubscribe from all: returns the per-subscription statuses with the
-- reason, and whether anything changed.
function M.unsubscribe_all(id, bu, verbose)
  local s = subscriber(id, true)
  local changed = not s.wide[bu]
  local reason = changed and "UNSUBSCRIBE_FROM_ALL_OCCURRED" or "NO_STATUS_CHANGE"
  if changed then s.wide[bu] = now_iso() end
  local out = {}
  for _, d in ipairs(definitions_for(bu)) do
    out[#out + 1] = public_status(id, d, s, verbose, reason)
  end
  return out, changed
end

-- Set one subscription's status; returns the PublicStatus or nil, message.
function M.set_status(id, req)
  local d = M.find_definition(req.subscriptionId)
  if not d then return nil, "Subscription " .. tostring(req.subscriptionId) .. " does not exist" end
  local s = subscriber(id, true)
  local rec = s.subs[req.subscriptionId]
  local was_wide = s.wide[d.businessUnitId]
  local old = was_wide and "UNSUBSCRIBED" or (rec and rec.status) or "NOT_SPECIFIED"
  local reason = "REQUESTED_CHANGE_OCCURRED"
  if old == req.statusState then
    reason = "NO_STATUS_CHANGE"
  elseif req.statusState == "SUBSCRIBED" and was_wide then
    reason = "RESUBSCRIBE_OCCURRED"
    s.wide[d.businessUnitId] = nil
  end
  if reason ~= "NO_STATUS_CHANGE" then
    s.subs[req.subscriptionId] = {
      status = req.statusState, timestamp = now_iso(), source = "Public API",
      legalBasis = req.legalBasis, legalBasisExplanation = req.legalBasisExplanation,
    }
  end
  return public_status(id, d, s, true, reason)
end

-- The whole state, for tests (GET /__sim/state).
function M.dump()
  local out = {}
  for id, s in pairs(subscribers) do
    local wide, subs = {}, {}
    for bu, ts in pairs(s.wide) do wide[tostring(bu)] = ts end
    for sid, rec in pairs(s.subs) do subs[tostring(sid)] = rec.status end
    out[id] = { wide = wide, subs = subs }
  end
  return out
end

return M
