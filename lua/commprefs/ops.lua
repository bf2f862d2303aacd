-- commprefs.ops: owns the operation semantics every feature shares (init's
-- methods, bulk jobs, lookup and the worker): the batch operations and what
-- one result means, query strings, batch requests, splitting and merging
-- batches, matching a batch answer to the ids asked, which answers refuse a
-- whole request (M.stops) and the single-contact form of a batch request
-- (M.singles, M.merge_singles: for portals without the batch scopes). HubSpot keys
-- subscription status by e-mail address, without regard to case: ids are
-- compared by ops.key (their lower case) everywhere, and a duplicate that
-- differs only in case is sent once.
local core = require "commprefs.core"
local Error = require "commprefs.error"

local M = {}

-- The one rule for comparing ids.
local lower = string.lower
function M.key(id) return lower(id) end

-- Whether a list of wide statuses says "unsubscribed from all".
function M.unsubscribed(wide_statuses)
  for _, s in ipairs(wide_statuses or {}) do
    if s.status == "UNSUBSCRIBED" then return true end
  end
  return false
end

-- The batch operations of bulk jobs and the worker: the path and how one
-- result becomes an outcome (one of counts).
M.BATCH = {
  unsubscribe_all = {
    path = "statuses/batch/unsubscribe-all",
    classify = function(r)
      for _, s in ipairs(r.statuses or {}) do
        if s.setStatusSuccessReason == "UNSUBSCRIBE_FROM_ALL_OCCURRED" then return "changed" end
      end
      return "unchanged"
    end,
    counts = { "changed", "unchanged" },
    verbose = true,
  },
  get_unsubscribe_all_status = {
    path = "statuses/batch/unsubscribe-all/read",
    classify = function(r) return M.unsubscribed(r.wideStatuses) and "unsubscribed" or "subscribed" end,
    counts = { "unsubscribed", "subscribed" },
  },
}

-- "?channel=EMAIL&businessUnitId=N[&verbose=..][&includeTranslations=..]" as
-- asked: channel (boolean), bu (nil: none), verbose / translations (nil: none).
function M.query(channel, bu, verbose, translations)
  if bu == nil and verbose == nil and translations == nil then return channel and "?channel=EMAIL" or "" end
  local q = {}
  if channel then q[1] = "channel=EMAIL" end
  if bu ~= nil then q[#q + 1] = string.format("businessUnitId=%d", bu) end
  if verbose ~= nil then q[#q + 1] = "verbose=" .. tostring(verbose) end
  if translations ~= nil then q[#q + 1] = "includeTranslations=" .. tostring(translations) end
  return #q > 0 and "?" .. table.concat(q, "&") or ""
end

-- The POST of a batch of inputs (ids or status requests) to url.
-- (inputs stays on it: the single-contact form, M.singles, is made from it)
function M.batch_request(url, inputs)
  return { method = "POST", url = url, body = core.encode({ inputs = inputs }), inputs = inputs }
end

-- items split into arrays of at most size.
function M.split(items, size)
  local chunks = {}
  for first = 1, #items, size do
    local chunk = {}
    for i = first, math.min(first + size - 1, #items) do chunk[#chunk + 1] = items[i] end
    chunks[#chunks + 1] = chunk
  end
  return chunks
end

-- ids without the ones that repeat an earlier id (ops.key), in their order.
function M.unique(ids)
  local out, seen = {}, {}
  for i = 1, #ids do
    local k = lower(ids[i])
    if not seen[k] then seen[k] = true; out[#out + 1] = ids[i] end
  end
  return out
end

function M.empty_envelope()
  local t = os.date("!%Y-%m-%dT%H:%M:%SZ")
  return { status = "COMPLETE", results = {}, startedAt = t, completedAt = t }
end

-- Folds envelope e into the merged envelope m.
function M.merge(m, e)
  for _, r in ipairs(e.results or {}) do m.results[#m.results + 1] = r end
  if e.errors then
    m.errors = m.errors or {}
    for _, x in ipairs(e.errors) do m.errors[#m.errors + 1] = x end
  end
  if e.numErrors then m.numErrors = (m.numErrors or 0) + e.numErrors end
  for _, k in ipairs { "startedAt", "requestedAt" } do
    if e[k] and (not m[k] or e[k] < m[k]) then m[k] = e[k] end
  end
  if e.completedAt and (not m.completedAt or e.completedAt > m.completedAt) then m.completedAt = e.completedAt end
  if e.status and e.status ~= "COMPLETE" then m.status = e.status end
  if e.links then
    m.links = m.links or {}
    for k, v in pairs(e.links) do m.links[k] = v end
  end
end

-- Per id of `ids`, what batch envelope env says: on(id, result) for a
-- result naming it, on(id, nil, e) for an error entry naming it (e: the raw
-- entry, {category=, message=, ...}), on(id) when it names neither. Ids are
-- matched by ops.key: HubSpot may answer in another case than asked.
function M.match(env, ids, on)
  local results, errors = {}, {}
  for _, r in ipairs(env.results or {}) do
    if type(r) == "table" and type(r.subscriberIdString) == "string" then
      results[lower(r.subscriberIdString)] = r
    end
  end
  for _, e in ipairs(env.errors or {}) do
    local ctx = type(e) == "table" and type(e.context) == "table" and e.context.subscriberIdString
    for _, id in ipairs(type(ctx) == "table" and ctx or {}) do
      if type(id) == "string" then
        local k = lower(id)
        errors[k] = errors[k] or e
      end
    end
  end
  for _, id in ipairs(ids) do
    local k = lower(id)
    on(id, results[k], results[k] == nil and errors[k] or nil)
  end
end

-- The id another than `id` that an answer about `id` names (a result's
-- subscriberIdString), or nil: such an answer belongs to another request
-- (a desynchronised connection) and must never be taken as id's.
function M.names_other(env, id)
  local results = env.results
  if results == nil or results[1] == nil then return nil end -- nothing named (no id lower-cased)
  local k -- id lower-cased, made only when an answer names it otherwise (rarely)
  for _, r in ipairs(results) do
    local named = type(r) == "table" and r.subscriberIdString
    if type(named) == "string" and named ~= id then
      k = k or lower(id)
      if lower(named) ~= k then return named end
    end
  end
  return nil
end

------------------------------------------------------------------ request-wide answers

-- The one rule of answers that refuse a whole request, whatever ids it
-- carries, and so stop a job (bulk, split batches, the worker) instead of
-- failing every id: 401 and 403 ("auth": the credentials or the app's scopes),
-- HubSpot's 477 ("migration": the account is being moved, for hours; its
-- Retry-After says how long). nil for any other result.
function M.stops(res)
  local s = res.status
  if s == 401 or s == 403 then return "auth" end
  if s == 477 then return "migration" end
  if res.kind == "auth" then return "auth" end -- credentials that could not be renewed
  return nil
end

-- Whether a result is HubSpot's 403 for scopes the app lacks (MISSING_SCOPES).
function M.missing_scopes(res)
  if res.status ~= 403 or type(res.body) ~= "string" then return false end
  local v = core.decode(res.body, "error")
  return type(v) == "table" and v.category == "MISSING_SCOPES"
end

------------------------------------------------------------------ single-contact form

-- What one single-contact request answers, as the batch answer's result for
-- the id: a batch result entry, or (write) the results as they are.
local SINGLE = {
  ["unsubscribe-all"] = { method = "POST", suffix = "/unsubscribe-all", verbose = true, field = "statuses" },
  ["unsubscribe-all/read"] = { method = "GET", suffix = "/unsubscribe-all", field = "wideStatuses" },
  ["read"] = { method = "GET", suffix = "", field = "statuses" },
  ["write"] = { method = "POST", suffix = "" },
}

-- The single-contact requests that stand for batch request req (one per
-- input, in order, each with .id), or nil when req is not a batch request.
-- POST statuses/batch/unsubscribe-all is sent with verbose=true: its answer
-- then has the statuses the batch answer would.
function M.singles(req)
  local inputs = req.inputs
  if type(inputs) ~= "table" then return nil end
  local prefix, kind, q = req.url:match("^(.-)statuses/batch/([%w/%-]+)(.*)$")
  local form = kind and SINGLE[kind]
  if not form or (q ~= "" and q:sub(1, 1) ~= "?") then return nil end
  if form.verbose then
    local parts = {}
    for kv in (q:gsub("^%?", "")):gmatch("[^&]+") do
      if not kv:find("^verbose=") then parts[#parts + 1] = kv end
    end
    parts[#parts + 1] = "verbose=true"
    q = "?" .. table.concat(parts, "&")
  end
  local out = {}
  for i, input in ipairs(inputs) do
    local id, body = input, nil
    if kind == "write" then
      id = input.subscriberIdString
      local b = {}
      for k, v in pairs(input) do if k ~= "subscriberIdString" then b[k] = v end end
      body = core.encode(b)
    elseif form.method == "POST" then body = ""
    end
    out[i] = { method = form.method, url = prefix .. "statuses/" .. core.escape(id) .. form.suffix .. q,
      body = body, id = id, kind = kind }
  end
  return out
end

-- The batch answer made of the single answers of M.singles(req): parts[i] =
-- {env =} or {err =} (a per-id refusal: an entry of errors, as HubSpot's
-- batch answers name them). Returns the merged envelope and the HTTP status a
-- batch would have had (207 when a read has errors).
function M.merge_singles(req, subs, parts)
  local m = { status = "COMPLETE", results = {} }
  local kind = subs[1] and subs[1].kind
  local field = kind and SINGLE[kind].field
  for i, sub in ipairs(subs) do
    local p = parts[i]
    if p.env then
      local e = p.env
      if field then m.results[#m.results + 1] = { subscriberIdString = sub.id, [field] = e.results or {} }
      else for _, r in ipairs(e.results or {}) do m.results[#m.results + 1] = r end end
      for _, k in ipairs { "startedAt", "requestedAt" } do
        if e[k] and (not m[k] or e[k] < m[k]) then m[k] = e[k] end
      end
      if e.completedAt and (not m.completedAt or e.completedAt > m.completedAt) then m.completedAt = e.completedAt end
    else
      local err = p.err
      m.errors = m.errors or {}
      m.errors[#m.errors + 1] = { status = "error", category = err.category, message = err.message,
        context = { subscriberIdString = { sub.id } } }
      m.numErrors = (m.numErrors or 0) + 1
    end
  end
  local t = os.date("!%Y-%m-%dT%H:%M:%SZ")
  m.startedAt, m.completedAt = m.startedAt or t, m.completedAt or t
  return m, (m.errors and req.url:find("/read", 1, true)) and 207 or 200
end

-- Calls record(id, outcome, detail) once for every id of chunk, given the
-- envelope (or Error) of the batch request: outcome is one of op.counts or
-- "failed" (detail: the per-id result, or the Error).
function M.classify(op, env, err, chunk, record)
  if not env then
    for _, id in ipairs(chunk) do record(id, "failed", err) end
    return
  end
  M.match(env, chunk, function(id, r, e)
    if r then record(id, op.classify(r), r)
    elseif e then record(id, "failed", Error.new { kind = "item", category = e.category, message = e.message })
    else record(id, "failed", Error.new { kind = "decode", message = "the response did not mention this id" }) end
  end)
end

return M
