-- commprefs.ngx.redis: Redis connections over OpenResty cosockets with the
-- same methods and reply shapes as core.redis_connect (contract C4). The
-- protocol is hiredis's, through the core's sans-I/O pieces: commands are
-- formatted by core.redis_format, replies parsed by core.redis_reader, the
-- URL by core.redis_url. No protocol code here, only socket I/O.
--
--   local redis = require "commprefs.ngx.redis"
--   local conn, err = redis.connect("redis://:pw@127.0.0.1:6379/0", { connect_timeout = 5, timeout = 10 })
--   conn:command({"SET", "k", "v"})        -> {ok = "OK"} | nil, err
--   conn:pipeline({{"INCR", "n"}, {"GET", "k"}}) -> {1, "v"} (an error reply: an Error in its place)
--   conn:close()                           -> back to the worker's keepalive pool
--
-- Replies: bulk string -> string, integer -> integer, array -> Lua array, nil ->
-- core.redis_null, status -> {ok = "..."}, error -> nil, commprefs.Error
-- {kind = "redis"}. A failed socket operation is nil, Error and closes the
-- connection. Like every cosocket, a conn belongs to the request (or timer)
-- that made it; connections are pooled per worker (per host, port, db and
-- credentials) so connect() in the next request is cheap and skips AUTH.
local core = require "commprefs.core"
local Error = require "commprefs.error"

local M = {}

local Conn = {}
Conn.__index = Conn
Conn.__name = "commprefs.ngx.redis"

local POOL_SIZE = 16
local KEEPALIVE_MS = 60000
local RECEIVE_CHUNK = 65536

-- nil, Error {code = "connection"}, or "too_large" (a reply announced over
-- the reader's caps: refused at its header, as core.redis_connect does).
local function failure(self, what, err, code)
  if self.sock then self.sock:close() end
  self.sock = nil
  if code == "too_large" then
    return nil, Error.new { kind = "redis", code = code, message = string.format("%s:%d: %s", self.host, self.port, err) }
  end
  return nil, Error.new { kind = "redis", code = "connection",
    message = string.format("%s:%d: %s: %s", self.host, self.port, what, tostring(err)) }
end

local function now_ms()
  ngx.update_time()
  return ngx.now() * 1000
end

-- The next whole reply: value (an error reply is an Error) or nil, Error;
-- within the command timeout in all, as core.redis_connect's (a deadline,
-- not a per-read timeout: a reply trickling in byte by byte is cut there).
local function read_reply(self)
  local deadline = now_ms() + self.timeout_ms
  while true do
    local ok, v, code = self.reader:get()
    if ok then return v end
    if ok == nil then return failure(self, "protocol error", v, code) end
    local left = deadline - now_ms()
    local data, err
    if left >= 1 then
      self.sock:settimeouts(self.connect_ms, self.timeout_ms, left)
      data, err = self.sock:receiveany(RECEIVE_CHUNK)
    end
    if not data and (left < 1 or err == "timeout") then
      err = string.format("no whole reply within %g s", self.timeout_ms / 1000)
    end
    if not data then return failure(self, "connection lost", err) end
    local fed, ferr, fcode = self.reader:feed(data)
    if not fed then return failure(self, "protocol error", ferr, fcode) end
  end
end

local function check_open(self, fname)
  if not self.sock then error("commprefs.ngx.redis: " .. fname .. ": the connection is closed", 3) end
end

-- conn:command(args [, opts]) -> reply | nil, err (opts, for core.redis_connect's
-- stop_after_signals, mean nothing here: nginx handles signals itself)
function Conn:command(args, _)
  check_open(self, "command")
  local bytes = core.redis_format(args) -- raises on bad args: nothing is sent
  local _, err = self.sock:send(bytes)
  if err then return failure(self, "connection lost", err) end
  local v, rerr = read_reply(self)
  if v == nil then return nil, rerr end
  if Error.is(v) then return nil, v end
  return v
end

-- conn:pipeline({cmd, ...}) -> {reply, ...} | nil, err
function Conn:pipeline(cmds)
  check_open(self, "pipeline")
  if type(cmds) ~= "table" then error("commprefs.ngx.redis: pipeline: bad argument (array of commands expected)", 2) end
  local parts = {}
  for i = 1, #cmds do parts[i] = core.redis_format(cmds[i]) end
  local _, err = self.sock:send(parts)
  if err then return failure(self, "connection lost", err) end
  local out = {}
  for i = 1, #cmds do
    local v, rerr = read_reply(self)
    if v == nil then return nil, rerr end
    out[i] = v
  end
  return out
end

-- conn:close(): the socket goes back to the worker's pool (closed if that fails).
function Conn:close()
  if not self.sock then return end
  local sock = self.sock
  self.sock = nil
  if not sock:setkeepalive(KEEPALIVE_MS, POOL_SIZE) then sock:close() end
end

function Conn:__tostring()
  return string.format("commprefs.ngx.redis (%s%s:%d/%d)", self.sock and "" or "closed, ", self.host, self.port, self.db)
end

local function seconds_opt(opts, k, def)
  local v = opts[k]
  if v == nil then return def end
  if type(v) ~= "number" or not (v > 0 and v <= 86400) then
    error("commprefs.ngx.redis.connect: bad option '" .. k .. "' (seconds, > 0, expected)", 3)
  end
  return v
end

-- A pool per server and identity: a pooled connection is already authenticated
-- and on its database. The password enters the name only as a digest.
local function pool_name(u)
  return string.format("commprefs:redis:%s:%d/%d:%s:%s", u.host, u.port, u.db, u.user or "",
    u.password and ngx.md5(u.password) or "")
end

-- One command while setting up a fresh connection.
-- A refused AUTH is "auth_failed" (it does not heal); others keep their code.
local function setup(self, args, what)
  local v, err = self:command(args)
  if v == nil then
    local code = err.code
    if args[1] == "AUTH" and code ~= "connection" then code = "auth_failed" end
    return nil, Error.new { kind = "redis", code = code,
      message = string.format("%s:%d: %s failed: %s", self.host, self.port, what, err.message) }
  end
  return true
end

-- connect(url, {connect_timeout = 5, timeout = 10}) -> conn | nil, err
function M.connect(url, opts)
  if type(url) ~= "string" then error("commprefs.ngx.redis.connect: bad argument 'url' (string expected)", 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("commprefs.ngx.redis.connect: bad argument 'opts' (table expected)", 2) end
  local ok, u = pcall(core.redis_url, url, "commprefs.ngx.redis.connect")
  if not ok then error(u, 2) end
  local ct, t = seconds_opt(opts, "connect_timeout", 5), seconds_opt(opts, "timeout", 10)
  local sock = ngx.socket.tcp()
  sock:settimeouts(ct * 1000, t * 1000, t * 1000)
  local self = setmetatable({ host = u.host, port = u.port, db = u.db, sock = sock, reader = core.redis_reader(),
    connect_ms = ct * 1000, timeout_ms = t * 1000 }, Conn)
  local okc, err = sock:connect(u.host, u.port, { pool = pool_name(u) })
  if not okc then
    self.sock = nil
    return nil, Error.new { kind = "redis", code = "connection",
      message = string.format("%s:%d: cannot connect: %s", u.host, u.port, tostring(err)) }
  end
  self.reused = (sock:getreusedtimes() or 0) > 0 -- from the pool: it may have died meanwhile
  if not self.reused then
    local done, serr = true, nil
    if u.password then
      done, serr = setup(self, u.user and { "AUTH", u.user, u.password } or { "AUTH", u.password }, "authentication")
    end
    if done then
      if u.db ~= 0 then done, serr = setup(self, { "SELECT", u.db }, "SELECT")
      else done, serr = setup(self, { "PING" }, "PING") end
    end
    if not done then
      if self.sock then self.sock:close() end
      self.sock = nil
      return nil, serr
    end
  end
  return self
end

return M
