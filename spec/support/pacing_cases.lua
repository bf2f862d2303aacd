-- support.pacing_cases: the pacing contract as one table of cases, run by
-- spec/contract/pacing_contract_spec.lua against every backing: the governor's own
-- window (C), the C Redis backing, a lua_shared_dict in a real nginx and
-- Redis over cosockets in a real nginx. Each case's `code` runs where the
-- backing lives, with `P.new(opts)` making a participant (a client of the
-- app: a new governor, and for the shared backings the same backing key):
--   p:try()        -> 0 when an attempt started now (counted), else ms to wait | nil, stop
--   p:sent() p:unsent() p:finish(result) p:new_call()
-- (A backing that grants in start, such as Redis over cosockets, sleeps
-- there: try then reports how long it slept.) P.sleep(ms) and P.now() (ms)
-- are the clock of where the case runs; P.go(p) waits until p may start
-- and starts it. It returns a table that
-- `check(t, backing)` asserts on. `shared = true`:
-- only for backings shared between participants.
local assert = require "luassert"

local M = {}

local function case(c) M[#M + 1] = c end

case { name = "a learned window paces: max attempts go, the next waits one window",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 3, rate_interval_ms = 1000 }
    local waits = {}
    for i = 1, 3 do waits[i] = a:try(); a:sent() end
    return { waits = waits, after = a:try() }
  ]],
  check = function(t)
    assert.same({ 0, 0, 0 }, t.waits)
    assert.is_true(t.after > 900 and t.after < 1200, tostring(t.after))
  end }

-- The hard bound, the same on every backing: a full window's next send goes
-- interval + margin after its first (3 per 2,000 ms: C and the dict
-- 2,045 ms; Redis, whose margin has 50 ms of slack: 2,095).
case { name = "a full window's next send goes the interval and the margin after its first (the hard bound)",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 3, rate_interval_ms = 2000 }
    P.go(a); local t0 = P.now(); a:sent()
    for i = 2, 3 do P.go(a); a:sent() end
    P.go(a)
    return { after = P.now() - t0 }
  ]],
  check = function(t, backing)
    local core = require "commprefs.core"
    local margin = backing:find("redis", 1, true) and core.budget_margin_ms(2000) or core.window_margin_ms(2000)
    local want = 2000 + margin
    assert.is_true(t.after > want - 15 and t.after < want + 25, string.format("went %.1f ms after, want %.1f", t.after, want))
  end }

case { name = "a learned window is shared with every participant", shared = true,
  code = [[
    local a, b = P.new {}, P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 2, rate_interval_ms = 1000 }
    local w1 = b:try(); b:sent()
    local w2 = b:try(); b:sent()
    return { w1 = w1, w2 = w2, after = b:try() }
  ]],
  check = function(t)
    assert.same({ 0, 0 }, { t.w1, t.w2 })
    assert.is_true(t.after > 900, tostring(t.after))
  end }

case { name = "an insane window is never learned (a one-a-day window, 20,000 per second)",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 1, rate_interval_ms = 86400000 }
    local b = P.shared and P.new {} or a
    local waits = {}
    for i = 1, 3 do waits[i] = b:try(); b:sent() end
    return { waits = waits }
  ]],
  check = function(t)
    assert.same({ 0, 0, 0 }, t.waits)
  end }

case { name = "an insane window after a sane one leaves the sane one in force",
  code = [[
    local c = P.new {}
    c:finish { status = 200, attempts = 1, rate_max = 2, rate_interval_ms = 1000 }
    c:finish { status = 200, attempts = 1, rate_max = 20000, rate_interval_ms = 1000 }
    local d = P.shared and P.new {} or c
    local w = {}
    for i = 1, 3 do w[i] = d:try(); d:sent() end
    return { w = w }
  ]],
  check = function(t)
    assert.same({ 0, 0 }, { t.w[1], t.w[2] })
    assert.is_true(t.w[3] > 900, tostring(t.w[3]))
  end }

case { name = "a window set by hand is never replaced by a learned one",
  code = [[
    local a = P.new { rate_max = 1, rate_interval = 1.5 }
    a:finish { status = 200, attempts = 1, rate_max = 100, rate_interval_ms = 10000 }
    local w1 = a:try(); a:sent()
    return { w1 = w1, w2 = a:try() }
  ]],
  check = function(t)
    assert.equal(0, t.w1)
    assert.is_true(t.w2 > 1400, tostring(t.w2))
  end }

case { name = "a window set by hand reaches every participant, and a learned one does not overwrite it", shared = true,
  code = [[
    local a = P.new { rate_max = 1, rate_interval = 1.5 }
    local w0 = a:try(); a:sent()
    local b = P.new {}
    b:finish { status = 200, attempts = 1, rate_max = 100, rate_interval_ms = 10000 } -- over a's window: no
    a:finish { status = 200, attempts = 1, rate_max = 100, rate_interval_ms = 10000 }
    return { w0 = w0, b = b:try() }
  ]],
  check = function(t)
    assert.equal(0, t.w0)
    assert.is_true(t.b > 1400, tostring(t.b))
  end }

case { name = "a 429 holds the participant for the policy's hold",
  code = [[
    local a = P.new {}
    a:try(); a:sent()
    a:finish { status = 429, attempts = 1, retry_after = 1 }
    local b = P.shared and P.new {} or a
    return { a = a:try(), b = b:try() }
  ]],
  check = function(t)
    assert.is_true(t.a > 800 and t.a <= 1100, tostring(t.a))
    assert.is_true(t.b > 800 and t.b <= 1100, tostring(t.b))
  end }

case { name = "the daily limit stops the participant, not the others; a new call when idle tries again",
  code = [[
    local a = P.new {}
    a:try(); a:sent()
    a:finish { status = 429, attempts = 1, daily_remaining = 0 }
    local w, stop = a:try()
    local b = P.new {}
    local other = b:try()
    a:new_call()
    return { w = w or false, stop = stop, other = other, after = a:try() }
  ]],
  check = function(t)
    assert.same({ false, "daily_limit" }, { t.w, t.stop })
    assert.equal(0, t.other)
    assert.equal(0, t.after)
  end }

-- Redis counts an attempt when it grants it, before it is sent, and has no
-- way to take a grant back: an attempt that never reached the wire keeps its
-- slot there (a little speed lost, never a 429). The others free it.
case { name = "an attempt never sent frees its slot (Redis: keeps it, the safe side)",
  code = [[
    local a = P.new { rate_max = 1, rate_interval = 1 }
    local w1 = a:try(); a:unsent()
    local w2 = a:try(); a:sent()
    return { w1 = w1, w2 = w2, full = a:try() }
  ]],
  check = function(t, backing)
    assert.equal(0, t.w1)
    if backing:find("^redis") then
      assert.is_true(t.w2 > 900, tostring(t.w2))
    else
      assert.equal(0, t.w2)
      assert.is_true(t.full > 900, tostring(t.full))
    end
  end }

-- Even pacing (ratelimit.c, the dict's tickets, the Redis script): the
-- first CP_PACE_BURST of a window go at once, then one per
-- (interval + margin) / max. 20 per 1,000 ms: 1,035 / 20 = 51.75 ms apart.
case { name = "a learned window spreads attempts across it: a burst of a few, then evenly spaced",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 20, rate_interval_ms = 1000 }
    local at = {}
    for i = 1, 10 do P.go(a); at[i] = P.now(); a:sent() end
    return { at = at, burst = core.limits.pace_burst }
  ]],
  check = function(t)
    local at, burst = t.at, t.burst
    assert.equal(4, burst)
    for i = 2, burst do assert.is_true(at[i] - at[1] < 10, "burst " .. i .. ": " .. (at[i] - at[1])) end
    for i = burst + 1, #at do -- a send late for its turn is caught up by a shorter gap after it
      local gap = at[i] - at[i - 1]
      assert.is_true(gap > 25 and gap < 90, "gap before send " .. i .. ": " .. gap)
    end
    local mean = (at[#at] - at[burst]) / (#at - burst)
    assert.is_true(mean > 45 and mean < 70, "mean gap " .. mean)
    -- no more than the burst within any 10 ms
    for i = 1, #at - burst do assert.is_true(at[i + burst] - at[i] >= 10, "send " .. i) end
  end }

-- A caller late for its turn does not push the schedule back: the next
-- send goes when it was due (lateness up to half a spacing is caught up).
case { name = "a send late for its turn is caught up by the next one: the schedule holds",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 20, rate_interval_ms = 1000 }
    for i = 1, 5 do P.go(a); a:sent() end
    local t5 = P.now()
    P.sleep(75) -- the sixth was due 51.75 ms after the fifth: 23 ms late
    P.go(a); local t6 = P.now(); a:sent()
    P.go(a); local t7 = P.now(); a:sent()
    return { late = t6 - t5, gap = t7 - t6, due = t7 - t5 }
  ]],
  check = function(t)
    assert.is_true(t.late >= 74 and t.late < 100, "sixth after " .. t.late)
    -- due 2 x 51.75 = 103.5 ms after the fifth (the old rule: 51.75 after the sixth, >= 126)
    assert.is_true(t.due > 98 and t.due < 122, "seventh after " .. t.due)
    assert.is_true(t.gap < 45, "gap " .. t.gap)
  end }

-- A catch-up never sends two at once: the send after one the rolling
-- window held (its bound came after its spacing) goes half a spacing after
-- it at the soonest. Else a burst (a job's first few, or the first sends of
-- workers that had not learned the window) is caught up right after the
-- bound and replayed in every window. 8 per 800 ms: the bound is 833 ms,
-- the spacing 104 ms; four go at once, four spaced, the ninth waits for the
-- bound (the first four leave), the tenth then waits half a spacing (the
-- old rule: at once, with the ninth), not a full one (the lead is kept).
case { name = "a send after one the window's bound held waits half a spacing, no more",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 8, rate_interval_ms = 800 }
    local at = {}
    for i = 1, 10 do P.go(a); at[i] = P.now(); a:sent() end
    return { at = at }
  ]],
  check = function(t)
    local at = t.at
    assert.is_true(at[9] - at[1] > 800, "ninth after " .. (at[9] - at[1]))
    local gap = at[10] - at[9]
    assert.is_true(gap > 45 and gap < 95, "tenth " .. gap .. " ms after the ninth (half a spacing: 52)")
  end }

case { name = "participants share one even schedule", shared = true,
  code = [[
    local a, b = P.new {}, P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 20, rate_interval_ms = 1000 }
    for i = 1, 4 do P.go(a); a:sent() end
    local t0 = P.now()
    P.go(b); local tb = P.now(); b:sent()
    P.go(a); local ta = P.now(); a:sent()
    return { b = tb - t0, a = ta - tb }
  ]],
  check = function(t)
    assert.is_true(t.b > 40 and t.b < 90, "b waited " .. t.b)
    assert.is_true(t.a > 40 and t.a < 90, "a waited " .. t.a)
  end }

-- A 429 although the window had room: the server counted the send that
-- opened the refused request's slot late, by at least (refused send - that
-- send - interval). Here that is ~1,100 - 1,000 ms: the margin becomes it
-- + 10 ms at once (the old rule: 10 ms, doubling once per window).
case { name = "a 429 inside the known window teaches the server's counting delay in one step",
  code = [[
    local a = P.new {}
    a:finish { status = 200, attempts = 1, rate_max = 2, rate_interval_ms = 1000 }
    P.go(a); a:sent(); P.go(a); a:sent()
    P.sleep(1100)
    P.go(a); local t1 = P.now(); a:sent()
    a:finish { status = 429, attempts = 1 }
    P.sleep(200)
    P.go(a); a:sent()
    local w = a:try()
    return { window = w + P.now() - t1 }
  ]],
  check = function(t)
    -- 1,000 + 35 margin + ~75 learned (old rule: ~1,045)
    assert.is_true(t.window > 1090 and t.window < 1160, tostring(t.window))
  end }

-- The participant factories, as code put before each case's code. KEY names
-- a fresh window per case (set by the spec).
M.PRELUDE = {}

local C_PARTICIPANT = [[
  local core = require "commprefs.core"
  local function participant(gov)
    return {
      try = function() local w, stop = gov:next(); if w == 0 then gov:begin() end; return w, stop end,
      sent = function() gov:on_wire() end, unsent = function() gov:unsent() end,
      finish = function(_, res) res.attempts = res.attempts or 1; return gov:finish(res) end,
      new_call = function() gov:new_call() end,
      go = function()
        while true do
          local w, stop = gov:next()
          assert(w, stop)
          if w == 0 then gov:begin(); return end
          require("socket").sleep(w / 1000)
        end
      end }
  end
  local socket = require "socket"
  local function now_ms() return socket.gettime() * 1000 end
  local function sleep_ms(ms) socket.sleep(ms / 1000) end
]]

local LUA_PARTICIPANT = [[
  local core = require "commprefs.core"
  local pacer = require "commprefs.pacer"
  local function participant(gov, opts)
    local p = pacer.new(gov, opts)
    return {
      try = function()
        local w, stop = p:wait()
        if w ~= 0 then return w, stop end
        ngx.update_time()
        local t0 = ngx.now()
        assert(p:start())
        ngx.update_time()
        local slept = (ngx.now() - t0) * 1000
        return slept > 20 and slept or 0
      end,
      sent = function() p:sent() end, unsent = function() p:unsent() end,
      finish = function(_, res) return p:finish(res, true, 1) end,
      new_call = function() gov:new_call() end,
      go = function()
        while true do
          local w, stop = p:wait()
          assert(w, stop)
          if w == 0 then assert(p:start()); return end
          ngx.sleep(w / 1000)
        end
      end }
  end
  local function now_ms() ngx.update_time(); return ngx.now() * 1000 end
  local function sleep_ms(ms) ngx.sleep(ms / 1000) end
]]

-- P's clock and P.go(p), the same for every backing.
local CLOCK = [[
  P.now, P.sleep = now_ms, sleep_ms
  P.go = function(p) p:go() end
]]

M.PRELUDE.window = C_PARTICIPANT .. [[
  P = { shared = false, new = function(opts) return participant(core.governor(opts)) end }
]] .. CLOCK
M.PRELUDE.redis_c = C_PARTICIPANT .. [[
  P = { shared = true, new = function(opts)
    opts.redis_url, opts.redis_key = REDIS_URL, KEY
    return participant(assert(core.governor(opts)))
  end }
]] .. CLOCK
M.PRELUDE.shared_dict = LUA_PARTICIPANT .. [[
  P = { shared = true, new = function(opts)
    return participant(core.governor(opts), { shared_dict = "pace", rate_limit = { key = KEY } })
  end }
]] .. CLOCK
M.PRELUDE.redis_ngx = LUA_PARTICIPANT .. [[
  P = { shared = true, new = function(opts)
    return participant(core.governor(opts), { rate_limit = { redis = REDIS_URL, key = KEY } })
  end }
]] .. CLOCK

return M
