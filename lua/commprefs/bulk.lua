-- commprefs.bulk: long-running jobs over many ids at HubSpot's rate limit.
-- Owns client:bulk_unsubscribe_all and client:bulk_get_unsubscribe_all_status:
-- ids are pulled from a list or an iterator only as batches are needed
-- (memory bounded by batch_size x max_concurrency), sent through the core's
-- concurrent, rate-limited transport, and every id ends with exactly one
-- outcome: reported to on_result, counted in the summary and, with
-- opts.journal, appended durably before the job moves on. Rerunning with the
-- same journal skips every id whose outcome is final.
local core = require "commprefs.core"
local Error = require "commprefs.error"
local outcome = require("commprefs.response").outcome
local ops = require "commprefs.ops"

local M = {}
local rules = require "commprefs.check"

local now = core.now
local key = ops.key

-- Calls record(id, outcome, detail) once for every id of chunk, given the
-- transport result res of the batch request to url (commprefs.ops.classify).
local function classify(op, url, res, chunk, record)
  local env, err = outcome({ method = "POST", url = url }, res)
  ops.classify(op, env, err, chunk, record)
end

local ALLOWED = { business_unit_id = true, on_result = true, on_progress = true, on_start = true, journal = true,
  batch_size = true, total = true, max_failures_kept = true, verbose = true }

local function check(fname, op, source, opts)
  local function raise(msg) error("commprefs." .. fname .. ": " .. msg, 4) end
  if type(source) ~= "table" and type(source) ~= "function" then
    raise("bad argument 'source' (table or iterator function expected, got " .. type(source) .. ")")
  end
  if opts ~= nil and type(opts) ~= "table" then raise("bad argument 'opts' (table expected)") end
  opts = opts or {}
  for k, v in pairs(opts) do
    if not ALLOWED[k] or (k == "verbose" and not op.verbose) then raise("unknown option '" .. tostring(k) .. "'") end
    if (k == "on_result" or k == "on_progress" or k == "on_start") and type(v) ~= "function" then
      raise("bad option '" .. k .. "' (function expected)")
    end
    if k == "journal" and type(v) ~= "string" then raise("bad option 'journal' (path expected)") end
    if (k == "batch_size" or k == "business_unit_id" or k == "total" or k == "max_failures_kept")
      and (type(v) ~= "number" or v ~= math.floor(v)) then
      raise("bad option '" .. k .. "' (integer expected)")
    end
    if k == "verbose" and type(v) ~= "boolean" then raise("bad option 'verbose' (boolean expected)") end
  end
  if type(source) == "table" then
    for i = 1, #source do -- the name of the bad one only: a million names cost seconds
      if rules.id("source", source[i]) then raise(rules.id("source[" .. i .. "]", source[i])) end
    end
  end
  return opts
end

-- Reads a journal: the set of ids whose outcome is final for this operation.
local function read_journal(path, opname, bu)
  local done, n = {}, 0
  local f = io.open(path, "rb")
  if not f then return done, 0 end
  for line in f:lines() do
    local rec = core.decode(line)
    if type(rec) == "table" and rec.op == opname and rec.bu == bu and type(rec.id) == "string"
      and rec.outcome ~= "failed" and not done[key(rec.id)] then
      done[key(rec.id)] = true
      n = n + 1
    end
  end
  f:close()
  return done, n
end
M.read_journal = read_journal -- for fuzz/journal_fuzz.c

local function iterator(source)
  if type(source) == "function" then return source end
  local i = 0
  return function()
    i = i + 1
    return source[i]
  end
end

-- After a stop: how many ids of the source were never pulled (not counting
-- those the journal has). Reads the rest of an iterator only for the daily
-- limit or a spent budget; after an interrupt, only a list is counted (nil otherwise).
local function count_rest(stopped, source, next_id, dry, done_ids)
  if dry then return 0 end
  if stopped == "interrupted" and type(source) ~= "table" then return nil end
  local n = 0
  for id in next_id do
    if type(id) ~= "string" or not done_ids[key(id)] then n = n + 1 end
  end
  return n
end

function M.run(client, fname, opname, source, opts)
  local op = ops.BATCH[opname]
  opts = check(fname, op, source, opts)
  local bu = opts.business_unit_id or client.business_unit_id or 0
  local size = opts.batch_size or client.batch_size
  local verbose = nil
  if op.verbose then verbose = opts.verbose end
  local url = client._prefix .. op.path .. ops.query(true, bu, verbose)
  local keep = opts.max_failures_kept or 1000

  local summary = { done = 0, failed = 0, skipped = 0, failures = {}, started = now() }
  for _, k in ipairs(op.counts) do summary[k] = 0 end
  local total = opts.total or (type(source) == "table" and #source or nil)

  local done_ids, journal = {}, nil
  if opts.journal then
    local err
    journal, err = core.journal(opts.journal) -- locked: a second job on it fails here
    if not journal then return nil, Error.new { kind = "journal", message = err } end
    done_ids, summary.skipped = read_journal(opts.journal, opname, bu)
  end
  -- the journal is open and read: the job starts (nothing is sent before this)
  if opts.on_start then opts.on_start { total = total, skipped = summary.skipped } end

  -- The generator: the next batch request, or nil when the source is dry.
  local next_id, chunks, seq, dry = iterator(source), {}, 0, false
  local function generate()
    if dry then return nil end
    local chunk, seen = {}, {}
    while #chunk < size do
      local id = next_id()
      if id == nil then dry = true; break end
      local why = rules.id("id", id)
      if why then error("commprefs." .. fname .. ": the source gave a bad id: " .. why, 0) end
      local k = key(id)
      if done_ids[k] then
        if total then total = total - 1 end
      elseif not seen[k] then
        seen[k] = true
        chunk[#chunk + 1] = id
      end
    end
    if #chunk == 0 then return nil end
    seq = seq + 1
    chunks[seq] = chunk
    return ops.batch_request(url, chunk)
  end

  local lines = {}
  local function record(id, outcome, detail)
    if opname == "unsubscribe_all" then client:_cache_note(id, bu, outcome ~= "failed") end -- commprefs.lookup
    summary.done = summary.done + 1
    summary[outcome] = summary[outcome] + 1
    local err
    if outcome == "failed" then
      err = detail
      if #summary.failures < keep then summary.failures[#summary.failures + 1] = { id = id, error = err } end
    end
    if journal then
      lines[#lines + 1] = core.encode({ id = id, op = opname, bu = bu, outcome = outcome, t = now(),
        error = err and tostring(err) or nil })
    end
    if opts.on_result then opts.on_result(id, { status = outcome, error = err, result = outcome ~= "failed" and detail or nil }) end
  end

  local unsent = 0 -- ids of requests perform gave back unsent (stopped early, or HubSpot's daily 429)
  local function on_done(i, res)
    local chunk = chunks[i]
    chunks[i] = nil
    if res.stopped or res.daily_limit then -- neither failed nor journaled: a rerun sends them
      unsent = unsent + #chunk
      summary.stop_message = summary.stop_message or res.message -- why (the budget, HubSpot's refusal), if known
      if res.stopped == "migration" then summary.retry_after = summary.retry_after or res.retry_after end
      return
    end
    classify(op, url, res, chunk, record)
    if journal and #lines > 0 then
      local ok, werr = journal:append(table.concat(lines, "\n") .. "\n")
      if not ok then error("commprefs." .. fname .. ": " .. werr, 0) end -- never move on unrecorded
      lines = {}
    end
    if opts.on_progress then opts.on_progress(summary.done, total) end
  end

  local ok, perr, stopped = pcall(client._perform, client, generate, on_done)
  if journal then journal:close() end
  if not ok then error(perr, 0) end
  if stopped then
    summary.stopped = stopped
    local rest = count_rest(stopped, source, next_id, dry, done_ids)
    summary.remaining = rest and unsent + rest
  end
  summary.elapsed = now() - summary.started
  summary.started = nil
  summary.total = summary.done
  return summary
end

return M
