-- commprefs.ngx.redis_budget: the Redis backing of the pacer (commprefs.pacer)
-- over cosockets, for nginx workers: the same backing as csrc/redis.c's. It
-- runs the very script the C side runs (core.budget_script()) on the same
-- keys (core.budget_keys), with the margin from C (core.budget_margin_ms) and
-- C's rule for a lost Redis (core.budget_lost_wait): nothing of the budget's
-- logic lives here, only I/O. What it is told is the governor's decision.
--
--   local budget = require("commprefs.ngx.redis_budget").new {
--     url = "redis://...", key = "app", timeout = 2, wait = 30 }
--   budget:acquire()                -> 0 (go, counted) | ms to wait | nil, err (gone for good)
--   budget:learn(max, interval_ms)  a window for every participant
--   budget:throttled(hold_ms)       a 429 arrived: everybody holds that long
--   wait/start/sent/unsent          the pacer's backing operations (start acquires)
--
-- new() does no I/O (it may run in init_worker, where cosockets are off): the
-- first acquire connects. Each call takes a pooled connection for the running
-- request or timer and gives it back. While Redis is unreachable, acquire
-- answers waits for `wait` seconds (default core.budget_wait, 30, as the C
-- side), then nil, err.
local core = require "commprefs.core"
local redis = require "commprefs.ngx.redis"
local nap = require("commprefs.transport").nap -- never ngx.sleep(0)

local M = {}

local Budget = {}
Budget.__index = Budget

local SCRIPT = core.budget_script()

local function now_ms()
  ngx.update_time()
  return ngx.now() * 1000
end

-- Runs the budget script: EVALSHA, EVAL after NOSCRIPT. reply | nil, err.
-- A pooled connection that died meanwhile (Redis restarted) gets one fresh retry.
function Budget:run(op, a1, a2, a3, a4)
  local v, err, reused = self:run_once(op, a1, a2, a3, a4)
  if v == nil and reused then v, err = self:run_once(op, a1, a2, a3, a4) end
  return v, err
end

function Budget:run_once(op, a1, a2, a3, a4)
  local conn, err = redis.connect(self.url, { connect_timeout = self.timeout, timeout = self.timeout })
  if not conn then return nil, err end
  if not self.sha then
    local sha, lerr = conn:command { "SCRIPT", "LOAD", SCRIPT }
    if not sha then
      local lost = conn.sock == nil
      conn:close()
      return nil, lerr, lost and conn.reused
    end
    self.sha = sha
  end
  local args = { "EVALSHA", self.sha, "2", self.window_key, self.limits_key, op, a1 or "", a2 or "", a3 or "", a4 or "" }
  local v, rerr = conn:command(args)
  if v == nil and rerr and rerr.code == "NOSCRIPT" then
    args[1], args[2] = "EVAL", SCRIPT
    v, rerr = conn:command(args)
  end
  local lost = v == nil and conn.sock == nil -- the socket failed (an error reply keeps it open)
  conn:close()
  return v, rerr, lost and conn.reused
end

function Budget:lost(err)
  local now = now_ms()
  self.lost_since = self.lost_since or now
  local w = core.budget_lost_wait(now - self.lost_since, self.wait_ms)
  if w then return math.max(w, 1) end
  return nil, string.format("the shared budget in Redis was unavailable for %g s: %s", self.wait_ms / 1000,
    tostring(err and err.message or err))
end

function Budget:acquire()
  local max, interval, margin = "", "", ""
  if self.max then
    max, interval = tostring(self.max), tostring(self.interval_ms)
    margin = string.format("%.3f", core.budget_margin_ms(self.interval_ms))
  end
  local v, err = self:run("acquire", max, interval, margin)
  if type(v) ~= "number" then return self:lost(err or "unexpected reply to the budget script") end
  self.lost_since = nil
  if v <= 0 then return 0 end
  return core.budget_wait_cap(v, self.interval_ms) -- an absurd wait: ask again within a window
end

-- manual: a window set by hand, which no learned one replaces (the script's rule).
function Budget:learn(max, interval_ms, manual)
  if not max or not interval_ms or max <= 0 or interval_ms <= 0 then return end
  if self.written and max == self.max and interval_ms == self.interval_ms then return end
  self.max, self.interval_ms = max, interval_ms
  local v = self:run("learn", tostring(max), tostring(interval_ms),
    string.format("%.3f", core.budget_margin_ms(interval_ms)), manual and "manual" or "")
  self.written = type(v) == "number"
end

function Budget:throttled(retry_after_ms)
  if not retry_after_ms or not (retry_after_ms > 0) then return end
  self:run("throttled", string.format("%.0f", retry_after_ms))
end

-- The pacer's backing operations: asking counts a request, so it is done in start.
function Budget:wait() return 0 end
function Budget:sent() end
function Budget:unsent() end

function Budget:start()
  while true do
    local ms, err = self:acquire()
    if ms == nil then return nil, err end
    if ms <= 0 then return true end
    nap(ms)
  end
end

local function seconds(opts, k, def, allow_zero)
  local v = opts[k]
  if v == nil then return def end
  if type(v) ~= "number" or not (v > 0 or (allow_zero and v == 0)) then
    error("commprefs.ngx.redis_budget.new: bad option '" .. k .. "' (seconds expected)", 3)
  end
  return v
end

-- new{url =, key =, timeout = 2, wait = 30}: raises on bad options (never echoing the URL).
function M.new(opts)
  if type(opts) ~= "table" then error("commprefs.ngx.redis_budget.new: bad argument (table expected)", 2) end
  if type(opts.url) ~= "string" then error("commprefs.ngx.redis_budget.new: bad option 'url' (redis:// URL expected)", 2) end
  local ok, perr = pcall(core.redis_url, opts.url, "commprefs.ngx.redis_budget.new")
  if not ok then error(perr, 2) end
  if type(opts.key) ~= "string" then error("commprefs.ngx.redis_budget.new: bad option 'key' (string expected)", 2) end
  local okk, window_key, limits_key = pcall(core.budget_keys, opts.key, "commprefs.ngx.redis_budget.new")
  if not okk then error(window_key, 2) end
  return setmetatable({
    url = opts.url, window_key = window_key, limits_key = limits_key,
    timeout = seconds(opts, "timeout", 2), wait_ms = seconds(opts, "wait", core.budget_wait, true) * 1000,
  }, Budget)
end

return M
