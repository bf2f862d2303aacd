-- commprefs.redis_eval: owns the Redis command plumbing of the worker: one
-- connection opened through a connect function (core.redis_connect, or
-- commprefs.ngx.redis inside nginx), reopened while Redis is lost for up to
-- `wait` seconds (stop() ends the wait at once), every failure classified by
-- err.code and never by its text, scripts run by EVALSHA with EVAL after
-- NOSCRIPT, and the events a log wants: "redis_lost" when a command first
-- finds Redis gone, "redis_back" when one succeeds again.
--
--   local session = require("commprefs.redis_eval").new {
--     connect = function() return conn or nil, err end, wait = 30,
--     stop = function() return false end, on_event = function(name, info) end }
--   session:call(argv [, opts])               -> reply | nil, err, code
--   session:eval(script, keys, args [, opts]) -> reply | nil, err, code
--   session:try(argv [, opts [, open]])       -> the same, never waiting for Redis
--   (opts: the connection's, e.g. {stop_after_signals = 2}: see csrc/redis.c)
--   session:drop(); session:close()
--
-- code: a reply error's class (its first word: "NOGROUP", "WRONGTYPE", ...),
-- "interrupted" (SIGINT/SIGTERM during the wait: never retried), or for a
-- Redis that stayed unreachable, "unreachable". Commands retried after a lost
-- connection must be safe to run twice.
local core = require "commprefs.core"
local Error = require "commprefs.error"

local M = {}

local Session = {}
Session.__index = Session

local sleep
do
  if ngx and ngx.sleep then sleep = ngx.sleep
  else
    local ok, socket = pcall(require, "socket")
    sleep = ok and socket.sleep or function(s) os.execute("sleep " .. s) end
  end
end
M.sleep = sleep

local function message(err) return type(err) == "table" and tostring(err.message or err) or tostring(err) end
M.message = message

-- Error replies after which the same command may succeed once Redis (or a
-- new connection) is ready: retried like a lost connection.
local TRANSIENT = { LOADING = true, BUSY = true, MASTERDOWN = true, READONLY = true, NOAUTH = true,
  TRYAGAIN = true, CLUSTERDOWN = true }

-- The class of a failure: "connection" (gone: refused, reset, timed out,
-- closed), "auth_failed", "interrupted", "too_large" (a reply over the
-- core's caps, refused at its header), or a reply error's class.
local function code_of(err)
  return type(err) == "table" and err.code or "connection"
end

function M.error(msg, code)
  return Error.new { kind = "redis", code = code, message = msg }
end

-- A reply of the wrong shape for what was asked (a proxy, a fake, a bug).
function M.bad_reply(what)
  return M.error("unexpected reply to " .. what, "bad_reply")
end

function M.new(opts)
  return setmetatable({ connect = opts.connect, wait = opts.wait or 30, stop = opts.stop or function() return false end,
    on_event = opts.on_event, reconnects = 0, shas = {} }, Session)
end

function Session:_event(name, info)
  if self.on_event then self.on_event(name, info or {}) end
end

-- Redis was found gone (first time since it last answered).
function Session:_lost(err)
  if not self.lost_since then
    self.lost_since = core.now()
    self:_event("redis_lost", { error = message(err), wait = self.wait })
  end
end

function Session:_answered()
  if self.lost_since then
    local after = core.now() - self.lost_since
    self.lost_since = nil
    self:_event("redis_back", { after = after })
  end
end

-- The connection, opened (retrying for `wait` seconds) when there is none.
-- opened = true when this call opened it (a reply may have been lost).
function Session:open()
  if self.conn then return self.conn end
  local deadline, delay = core.now() + self.wait, 0.05
  while true do
    local ok, conn, err = pcall(self.connect)
    if not ok then error(conn, 0) end -- a mistake (bad URL, bad option), not an outage
    if conn then
      self.conn = conn
      if self.on_open then self.on_open() end
      return conn
    end
    if code_of(err) == "auth_failed" then -- a wrong password does not heal
      return nil, M.error(message(err), "auth_failed"), "auth_failed"
    end
    self:_lost(err)
    if self.stop() then
      return nil, M.error("stopped while Redis was unreachable: " .. message(err), "interrupted"), "interrupted"
    end
    if core.now() + delay > deadline then
      return nil, M.error("Redis unreachable for " .. self.wait .. " s: " .. message(err), "unreachable"), "unreachable"
    end
    sleep(delay)
    delay = math.min(delay * 2, 1)
  end
end

-- Drops the connection (a reply of the wrong shape: the next command reconnects).
function Session:drop()
  if self.conn then pcall(self.conn.close, self.conn); self.conn = nil end
end
Session.close = Session.drop

-- One command: reply, or nil, err, code (see the top of this file).
function Session:call(argv, opts)
  local deadline = core.now() + self.wait
  while true do
    local conn, cerr, ccode = self:open()
    if not conn then return nil, cerr, ccode end
    local reply, err = conn:command(argv, opts)
    if reply ~= nil then self:_answered(); return reply end
    local code = code_of(err)
    if code == "interrupted" then self:drop(); return nil, err, code end
    if code ~= "connection" and code ~= "auth_failed" and not TRANSIENT[code] then
      self:_answered()
      return nil, err, code
    end
    self:drop()
    self.reconnects = self.reconnects + 1
    self:_lost(err)
    if self.stop() then return nil, M.error("stopped while Redis was failing: " .. message(err), "interrupted"), "interrupted" end
    if core.now() > deadline then
      return nil, M.error("Redis failing for " .. self.wait .. " s: " .. message(err), "unreachable"), "unreachable"
    end
    if code ~= "connection" then sleep(0.1) end
  end
end

-- One command for figures a log or a metrics file shows, on the connection
-- already open (with open = true, one attempt to open one when there is
-- none): never waits for Redis (nil, err, code at once; a lost connection
-- is dropped for the next call to reopen) and tells no event.
function Session:try(argv, opts, open)
  if not self.conn and open then
    local ok, conn = pcall(self.connect)
    if ok and conn then
      self.conn = conn
      if self.on_open then self.on_open() end
    end
  end
  if not self.conn then return nil, M.error("not connected to Redis", "connection"), "connection" end
  local reply, err = self.conn:command(argv, opts)
  if reply ~= nil then return reply end
  local code = code_of(err)
  if code == "connection" or code == "interrupted" then
    self:drop()
    self.reconnects = self.reconnects + 1
  end
  return nil, err, code
end

-- Runs a script: EVALSHA of its cached digest (SCRIPT LOAD once), EVAL after
-- NOSCRIPT (SCRIPT FLUSH, a restarted Redis), which caches it again.
function Session:eval(script, keys, args, opts)
  local argv = { "EVALSHA", "", tostring(#keys) }
  for _, k in ipairs(keys) do argv[#argv + 1] = k end
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local sha = self.shas[script]
  if not sha then
    local err, code
    sha, err, code = self:call({ "SCRIPT", "LOAD", script }, opts)
    if not sha then return nil, err, code end
    if type(sha) ~= "string" then return nil, M.bad_reply("SCRIPT LOAD"), "bad_reply" end
    self.shas[script] = sha
  end
  argv[2] = sha
  local reply, err, code = self:call(argv, opts)
  if code == "NOSCRIPT" then
    argv[1], argv[2] = "EVAL", script
    reply, err, code = self:call(argv, opts)
  end
  return reply, err, code
end

return M
