-- commprefs.pacer: the pacing contract of the cosocket transport: the
-- governor (csrc/governor.c: the local window, the daily rules, what may be
-- learned, every count; inside nginx shared by every client of a worker's
-- bundle, commprefs.shared) plus at most one shared backing:
--   * none: the governor's window paces each nginx worker alone;
--   * a lua_shared_dict (`shared_dict = "name"`, commprefs.ngx.backing_dict):
--     every worker of an nginx paces through one window;
--   * Redis (`rate_limit = {redis =, key =}`, commprefs.ngx.redis_budget):
--     one window for every process and host using the key (the same script
--     as the C backing of csrc/redis.c, which the libcurl path uses).
-- A backing is told only what the governor decides (a window to learn, a
-- hold after a 429); the window set by hand is told once, before the first
-- request. Operations:
--   p:wait(deadline) -> ms before the next attempt may start (0 = now) | nil, stop, why; never yields
--                (stop "deadline": the call's deadline, governor clock, has passed or the wait would pass it)
--   p:start()    -> true | nil, why (the backing is gone); may yield
--   p:sent()     the attempt is on the wire now
--   p:unsent()   it ended before anything was sent
--   p:abandon(on_wire)  it was given up (killed, raised): released everywhere
--   p:finish(result, on_wire, latency_ms, deadline, policy) -> retry, delay_ms, deadline_refused_retry
--                (policy: the calling client's commprefs.core.policy; nil: the governor's own)
--   p:cover(settings)  a client with these settings (a policy's) joined: the backing allows for them
--   p:reserve() -> true | nil, why   takes this thread's place in a shared line now (wait and start use it)
--   p:release()  gives a reserved place up
local M = {}

local Pacer = {}
Pacer.__index = Pacer

function Pacer:wait(deadline)
  local gov = self.gov
  local w, stop, why = gov:next(deadline)
  if w == 0 and self.shared then
    w = self.shared:wait()
    if deadline and w > 0 and gov:clock() + w >= deadline - 1 then return nil, "deadline" end
  end
  return w, stop, why
end

function Pacer:start()
  local shared = self.shared
  if shared then
    if self.manual_max then -- limits set by hand: for every participant, once
      shared:learn(self.manual_max, self.manual_interval, true)
      self.manual_max = nil
    end
    local ok, err = shared:start()
    if not ok then return nil, err end
  end
  self.gov:begin()
  return true
end

function Pacer:sent()
  self.gov:on_wire()
  if self.shared then self.shared:sent() end
end

function Pacer:unsent()
  self.gov:unsent()
  if self.shared then self.shared:unsent() end
end

-- A place in the shared line taken before the request exists (a coalesced
-- batch read gathers callers until its turn): backings that keep a line
-- (the lua_shared_dict) reserve it, others need none. release() gives it up.
function Pacer:reserve()
  local shared = self.shared
  if shared and shared.reserve then return shared:reserve() end
  return true
end

function Pacer:release()
  local shared = self.shared
  if shared and shared.release then shared:release() end
end

function Pacer:abandon(on_wire)
  self.gov:abandon(on_wire)
  if self.shared and not on_wire then self.shared:unsent() end
end

function Pacer:finish(res, on_wire, latency_ms, deadline, policy)
  local retry, delay_ms, hold_ms, learn_max, learn_interval, refused =
    self.gov:finish(res, on_wire, latency_ms, deadline, policy)
  local shared = self.shared
  if shared then
    if learn_max then shared:learn(learn_max, learn_interval) end
    if hold_ms then shared:throttled(hold_ms) end
  end
  return retry, delay_ms, refused
end

function Pacer:cover(settings)
  local shared = self.shared
  if shared and shared.cover then shared:cover(settings) end
end

-- new(governor, {shared_dict =, rate_limit =}): rate_limit is the client's
-- option as given (redis, key, redis_timeout, redis_wait). Raises on a bad
-- Redis URL or a missing dict; does no I/O (it may run in init_by_lua).
function M.new(gov, opts)
  local rl = opts.rate_limit or {}
  local max, interval = gov:manual()
  local shared, backing = nil, "window"
  if rl.redis then
    shared, backing = require("commprefs.ngx.redis_budget").new { url = rl.redis, key = rl.key,
      timeout = rl.redis_timeout, wait = rl.redis_wait }, "redis"
  elseif opts.shared_dict then
    shared, backing = require("commprefs.ngx.backing_dict").new(opts.shared_dict, rl.key, max, interval,
      gov:settings()), "shared_dict"
  end
  if shared then gov:backed() end -- its participants may know the window: no start rule
  return setmetatable({ gov = gov, shared = shared, backing = backing,
    manual_max = shared and max, manual_interval = interval }, Pacer)
end

return M
