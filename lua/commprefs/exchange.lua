-- commprefs.exchange: owns what lies between the features' requests
-- (client:_perform: single calls, split batches, bulk jobs, coalesced reads,
-- the worker) and a transport's perform, for every one of them alike:
--   * the credentials in effect (commprefs.credentials): renewed when due
--     before a request is handed to the transport, told to libcurl through
--     client:set_token (the cosocket transport reads them per request);
--   * a 401 with renewable credentials: renewed once and the request sent
--     once more, never again;
--   * a request-wide refusal (commprefs.ops.stops: 401/403 "auth", 477
--     "migration") stops the whole perform: nothing more is pulled, the
--     refused result is delivered with .stopped (and .message, one line),
--     requests not sent get {stopped =} like any stop;
--   * batch = "auto" | "never" | "always": after a 403 MISSING_SCOPES to a
--     batch request ("auto"), or always ("never"), a batch request is sent as
--     one single-contact request per id (ops.singles) and its result is the
--     merged envelope in the batch shape (ops.merge_singles), given as
--     result.envelope (commprefs.response takes it as the answer).
-- perform keeps the transports' contract: on_done(i, result) per request
-- of source (or the results array), and the stop reason.
local ops = require "commprefs.ops"
local Error = require "commprefs.error"
local response = require "commprefs.response"

local M = {}

-- Clients of the same credentials and base URL that learned a portal has
-- no batch scopes (in nginx: this worker's).
local no_batch = {}

function M.single_contact(client)
  return client._batch_mode == "never" or (client._batch_mode == "auto" and no_batch[client._creds_key] == true)
end

-- One line saying why a result stopped a job.
local function stop_message(req, res, why)
  local line
  if res.kind == "auth" then line = res.message -- the token endpoint's refusal, already one line
  else
    local _, err = response.outcome(req, res)
    line = err and tostring(err):gsub("^commprefs: ", "") or "refused"
  end
  if why == "auth" then
    return "HubSpot refused the credentials (" .. line .. "); no further request was started"
  end
  return "HubSpot is migrating this account (" .. line .. ")"
    .. (res.retry_after and ("; retry after " .. res.retry_after .. " s") or "")
end

-- The result of a request the credentials failed: an "auth" refusal, or the
-- transport kind of a refresh that got no answer.
local function auth_result(err, attempts)
  return { kind = err.kind, code = err.code, message = err.message, attempts = attempts or 0 }
end

function M.perform(client, source, on_done, send, deadline)
  local creds = client._creds
  local results = on_done == nil and {} or nil
  local queue, meta, parents = {}, {}, {}
  local pulled, pos, exhausted = 0, 0, false
  local stop, stop_res = nil, nil -- a request-wide refusal, and its result
  local creds_err = nil

  local function deliver(i, res)
    if results then results[i] = res else on_done(i, res) end
  end

  local function stopped_result()
    return { stopped = stop, attempts = 0, message = stop_res and stop_res.message,
      retry_after = stop_res and stop_res.retry_after }
  end

  local function set_stop(why, res)
    if not stop then stop, stop_res = why, res end
  end

  -- A batch request as single-contact requests: queued, merged when all are back.
  local function expand(item)
    local subs = ops.singles(item.req)
    local parent = { i = item.i, req = item.req, subs = subs, parts = {}, left = #subs, attempts = 0 }
    parents[parent] = true
    for k = #subs, 1, -1 do table.insert(queue, 1, { req = subs[k], parent = parent, k = k }) end
  end

  local function next_item()
    local q = table.remove(queue, 1)
    if q then return q end
    if exhausted then return nil end
    local req
    if type(source) == "function" then req = source() else req = source[pulled + 1] end
    if req == nil then exhausted = true; return nil end
    pulled = pulled + 1
    local item = { i = pulled, req = req }
    if type(req) == "table" and M.single_contact(client) and ops.singles(req) then
      expand(item)
      return table.remove(queue, 1)
    end
    return item
  end

  local finish_item

  -- The source the transport pulls from. Credentials that cannot be had
  -- now: the request pulled gets that failure without being sent (an "auth"
  -- one stops everything, see ops.stops). A closed client raises here.
  local function pull()
    while not stop do
      client:_check_open()
      local tok, err = creds:current()
      local item = next_item()
      if not item then return nil end
      if tok then
        client:_use_token(tok)
        item.gen = creds.gen
        pos = pos + 1
        meta[pos] = item
        return item.req
      end
      finish_item(item, auth_result(err))
    end
    return nil
  end

  local function settle_parent(parent, k, part, res)
    parent.parts[k] = part
    parent.attempts = parent.attempts + (res and res.attempts or 0)
    parent.left = parent.left - 1
    if parent.left > 0 or parent.done then return end
    parent.done = true
    parents[parent] = nil
    local env, status = ops.merge_singles(parent.req, parent.subs, parent.parts)
    deliver(parent.i, { status = status, envelope = env, attempts = parent.attempts })
  end

  -- A parent whose sub-request failed as a whole request would: that result is the parent's.
  local function fail_parent(parent, res)
    if parent.done then return end
    parent.done = true
    parents[parent] = nil
    deliver(parent.i, res)
  end

  function finish_item(item, res)
    local req = item.req
    if res.status == 401 and not item.resent and creds:renewable() and not stop then
      local tok, err = creds:renew(item.gen)
      if tok then
        item.resent = true
        table.insert(queue, 1, item)
        return
      end
      if err then res = auth_result(err, res.attempts) end
    end
    if res.status == 403 and client._batch_mode == "auto" and not item.parent and ops.singles(req)
      and ops.missing_scopes(res) then
      no_batch[client._creds_key] = true
      expand(item)
      return
    end
    local why = ops.stops(res)
    if why then
      res.stopped = why
      res.message = stop_message(req, res, why)
      set_stop(why, res)
    end
    local parent = item.parent
    if not parent then return deliver(item.i, res) end
    if parent.done then return end
    if why then return fail_parent(parent, res) end
    local env, err = response.outcome(req, res)
    local other = env and ops.names_other(env, req.id)
    if other then
      env, err = nil, Error.new { kind = "decode", code = "desync", message = "the answer named another id ("
        .. other .. ") than the one asked" }
    end
    if env then return settle_parent(parent, item.k, { env = env }, res) end
    if res.status and res.status >= 400 and res.status < 500 and res.status ~= 429 then
      return settle_parent(parent, item.k, { err = err }, res) -- HubSpot refused this id alone
    end
    if err.kind == "decode" then res = { kind = "decode", message = err.message, attempts = res.attempts } end
    fail_parent(parent, res) -- no answer for this id: the batch it stands for failed, as a batch would
  end

  local function done(p, res)
    local item = meta[p]
    meta[p] = nil
    finish_item(item, res)
  end

  local reason
  repeat
    pos, meta = 0, {}
    local first = pull()
    if first == nil then break end
    local src
    if type(source) == "table" and #queue == 0 and pulled >= #source then
      src = { first } -- exactly one request: the transports' one-request path
    else
      local given = false
      src = function()
        if not given then given = true; return first end
        return pull()
      end
    end
    local _, r = send(client, src, done, deadline)
    reason = reason or r
  until stop or reason or (#queue == 0 and exhausted)
  -- whatever was not sent: stopped, like the transports' own stops
  local why = stop or reason
  if why then
    for _, item in ipairs(queue) do
      if item.parent then fail_parent(item.parent, stopped_result())
      else deliver(item.i, stop and stopped_result() or { stopped = why, attempts = 0 }) end
    end
    for parent in pairs(parents) do fail_parent(parent, stopped_result()) end
    if type(source) == "table" then
      for i = pulled + 1, #source do deliver(i, stop and stopped_result() or { stopped = why, attempts = 0 }) end
    end
  end
  if results then return results, why end
  return nil, why
end

return M
