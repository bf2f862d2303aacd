-- spec/feature/ngx_env_spec.lua: commprefs inside a real nginx (issue 7): calls do
-- not block the worker, and every worker of an nginx paces through one
-- window kept in a lua_shared_dict. Each test starts its own simulator and
-- nginx (spec/support/nginx.lua) on free ports.
local nginx = require "support.nginx"
local sim = require "support.sim"
local cjson = require "cjson"
local socket = require "socket"

local function admin(s, method, path, body) return s.admin(method, path, body, s) end

-- the most requests the simulator saw in any `window_ms` (its log's times)
local function busiest_window(s, window_ms)
  local times = {}
  for _, r in ipairs(admin(s, "GET", "log").requests) do
    if r.path:find("/communication-preferences/", 1, true) then times[#times + 1] = r.time * 1000 end
  end
  table.sort(times)
  local most, first = 0, 1
  for last = 1, #times do
    while times[last] - times[first] >= window_ms do first = first + 1 end
    most = math.max(most, last - first + 1)
  end
  return most, #times
end

describe("commprefs in nginx", function()
  describe("options", function()
    it("refuses shared_dict outside nginx, naming the option", function()
      local commprefs = require "commprefs"
      assert.has_error(function() commprefs.new { token = "t", shared_dict = "pace" } end,
        "commprefs.new: bad option 'shared_dict' (no lua_shared_dict named 'pace': it exists only inside nginx)")
    end)

    it("refuses a shared_dict nginx.conf does not declare, and sends nothing", function()
      local s = sim.start { SIM_RATE = "off" }
      local inst = nginx.start { conf = "lua_shared_dict pace 1m;", env = { SIM_URL = s.url } }
      finally(function() inst:stop(); s:stop() end)
      local status, body = nginx.run(inst, [[
        local commprefs = require "commprefs"
        local ok, err = pcall(commprefs.new, { token = "sim-token", base_url = os.getenv("SIM_URL"), shared_dict = "nope" })
        local c = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), shared_dict = "pace" }
        local yes = c:is_unsubscribed_from_all("x@example.com")
        return { ok = ok, err = err, answer = yes, backing = c:_pacer().backing }
      ]])
      assert.equals(200, status, body)
      local t = cjson.decode(body)
      assert.is_false(t.ok)
      assert.matches("bad option 'shared_dict' %(no lua_shared_dict named 'nope': declare it in nginx.conf's http block%)", t.err)
      assert.is_false(t.answer)
      assert.equals("shared_dict", t.backing)
      assert.equals(1, #admin(s, "GET", "log").requests) -- only the good client's call
    end)
  end)

  describe("non-blocking", function()
    local s, inst
    local ids, expected = {}, {}
    setup(function()
      s = sim.start { SIM_RATE = "off", SIM_LATENCY = "200" }
      for i = 1, 40 do ids[i] = "nb" .. i .. "@example.com"; expected[i] = i % 2 == 0 and "yes" or "no" end
      local unsub = {}
      for i = 2, 40, 2 do unsub[#unsub + 1] = ids[i] end
      local c = require("commprefs").new { token = "sim-token", base_url = s.url }
      assert(c:batch_unsubscribe_all(unsub))
      c:close()
      -- one client per worker, made in init_by_lua (the master) and used by every request
      inst = nginx.start {
        workers = 1,
        env = { SIM_URL = s.url },
        conf = [[
          init_by_lua_block {
            local commprefs = require "commprefs"
            package.loaded.nb_client = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL") }
            package.loaded.nb_curl = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"), transport = "curl" }
          }
        ]],
        server = [[
          location = /ping { return 200 "pong"; }
          location = /check { content_by_lua_block {
            local via = ngx.var.arg_via
            local client = via == "curl" and package.loaded.nb_curl or via == "shared" and package.loaded.nb_client
              or require("commprefs").new { token = "sim-token", base_url = os.getenv("SIM_URL") }
            local yes, err = client:is_unsubscribed_from_all(ngx.unescape_uri(ngx.var.arg_id))
            if yes == nil then ngx.status = 502; ngx.say(tostring(err)); return end
            ngx.print(yes and "yes" or "no")
          } }
        ]],
      }
    end)
    teardown(function() if inst then inst:stop() end; if s then s:stop() end end)

    local function forty(via)
      local paths = {}
      for i = 1, 40 do paths[i] = "/check?via=" .. via .. "&id=" .. ids[i]:gsub("@", "%%40") end
      local t0 = socket.gettime()
      local answers = nginx.concurrent(inst, paths, 20, { after = { delay = 0.05, path = "/ping" } })
      local wall = socket.gettime() - t0
      for i = 1, 40 do
        local a = answers[i]
        assert.equals(200, a.status, tostring(a.body or a.err) .. "\n" .. table.concat(inst:errors(), "\n"))
        assert.equals(expected[i], a.body, ids[i])
      end
      assert.equals(200, answers.after.status)
      assert.equals("pong", answers.after.body)
      assert.is_true(wall < 1.0, string.format("40 reads took %.2f s", wall))
      assert.is_true(answers.after.seconds < 0.1, string.format("/ping took %.3f s", answers.after.seconds))
      assert.same({}, inst:errors())
    end

    it("answers 40 concurrent reads at 200 ms latency within 1.0 s, and /ping within 0.1 s meanwhile", function()
      forty("request") -- a client per request
    end)

    it("a client made in init_by_lua serves concurrent requests the same way", function()
      forty("shared")
    end)

    it("blocks the worker with transport = \"curl\" (what the figure above guards against)", function()
      local paths = {}
      for i = 1, 8 do paths[i] = "/check?via=curl&id=" .. ids[i]:gsub("@", "%%40") end
      local answers = nginx.concurrent(inst, paths, 20, { after = { delay = 0.05, path = "/ping" } })
      for i = 1, 8 do assert.equals(expected[i], answers[i].body) end
      assert.is_true(answers.after.seconds > 0.3, string.format("/ping took %.3f s", answers.after.seconds))
    end)
  end)

  -- The pacer's backings (window, shared_dict, Redis) are checked case by
  -- case in spec/contract/pacing_contract_spec.lua.

  describe("limits learned into the shared_dict", function()
    -- client A learns HubSpot's 20 per 1,000 ms from one answer; client B (its own
    -- C window, 30 in flight by hand) never saw a header and sends 30 GETs at once.
    -- B takes API version 2026-09: a bundle of its own in this worker (commprefs.shared
    -- shares one governor between clients of one token, base URL and version), as a
    -- client of another worker would be.
    local function burst(shared_dict)
      local s = sim.start { SIM_RATE = "20/1000", SIM_LATENCY = "20" }
      local inst = nginx.start { conf = "lua_shared_dict pace 1m;", env = { SIM_URL = s.url } }
      local status, body = nginx.run(inst, string.format([[
        local commprefs = require "commprefs"
        local opts = { token = "sim-token", base_url = os.getenv("SIM_URL"), shared_dict = %s }
        local a = commprefs.new(opts)
        assert(a:is_unsubscribed_from_all("learner@example.com") == false)
        opts.max_concurrency, opts.batch_size, opts.api_version = 30, 1, "2026-09"
        local b = commprefs.new(opts)
        local ids = {}
        for i = 1, 30 do ids[i] = "burst" .. i .. "@example.com" end
        local env, err = b:batch_get_unsubscribe_all_status(ids)
        return { results = env and #env.results, err = err and tostring(err), throttled = b:stats().throttled }
      ]], shared_dict and '"pace"' or "nil"), 30)
      local busiest = busiest_window(s, 1000)
      local sim_429s = admin(s, "GET", "log").throttled
      inst:stop()
      s:stop()
      assert.equals(200, status, body)
      return cjson.decode(body), busiest, sim_429s
    end

    it("paces a client that never saw HubSpot's headers by the limit another learned", function()
      local r, busiest, sim_429s = burst(true)
      assert.equals(30, r.results, r.err)
      assert.equals(0, r.throttled)
      assert.equals(0, sim_429s)
      assert.is_true(busiest <= 20, busiest .. " requests in one second")
    end)

    it("without shared_dict that client runs into HubSpot's limit", function()
      local r, _, sim_429s = burst(false)
      assert.is_true(sim_429s > 0 and r.throttled > 0, "no 429 seen")
    end)
  end)

  describe("two workers, one shared_dict", function()
    -- bulk jobs from ngx.timer.at in every worker; the simulator allows 20
    -- requests per 1,000 ms; the limit is learned from its headers.
    local PER_WORKER, BATCH = 200, 5
    local function run_jobs(shared_dict)
      local s = sim.start { SIM_RATE = "20/1000", SIM_LATENCY = "20" }
      local inst = nginx.start {
        workers = 2,
        env = { SIM_URL = s.url },
        conf = string.format([[
          lua_shared_dict pace 1m;
          lua_shared_dict jobs 1m;
          init_worker_by_lua_block {
            ngx.timer.at(0, function()
              local commprefs = require "commprefs"
              local cjson = require "cjson"
              local w = ngx.worker.id()
              local c = commprefs.new { token = "sim-token", base_url = os.getenv("SIM_URL"),
                batch_size = %d, shared_dict = %s }
              local ids = {}
              for i = 1, %d do ids[i] = "w" .. w .. "-" .. i .. "@example.com" end
              ngx.update_time()
              local started = ngx.now()
              local ok, summary = pcall(c.bulk_unsubscribe_all, c, ids)
              ngx.update_time()
              local st = c:stats()
              ngx.shared.jobs:set("job" .. w, cjson.encode { ok = ok, started = started, ended = ngx.now(),
                done = ok and summary.done, failed = ok and summary.failed, err = not ok and tostring(summary) or nil,
                throttled = st.throttled, sent = st.sent })
            end)
          }
        ]], BATCH, shared_dict and '"pace"' or "nil", PER_WORKER),
      }
      local jobs
      for _ = 1, 300 do
        local status, body = nginx.run(inst, [[
          local a, b = ngx.shared.jobs:get("job0"), ngx.shared.jobs:get("job1")
          return a and b and ("[" .. a .. "," .. b .. "]") or ""
        ]])
        assert.equals(200, status, body)
        if body ~= "" then jobs = cjson.decode(body); break end
        socket.sleep(0.1)
      end
      local errors = inst:errors()
      local state = admin(s, "GET", "state").subscribers
      local busiest, requests = busiest_window(s, 1000)
      local sim_429s = admin(s, "GET", "log").throttled
      inst:stop()
      s:stop()
      assert.truthy(jobs, "the jobs did not finish in 30 s")
      return jobs, state, busiest, requests, errors, sim_429s
    end

    it("paces every worker through the dict: 0 429s, every id done, within 1/0.85 of the bound", function()
      local jobs, state, busiest, requests, errors, sim_429s = run_jobs(true)
      local throttled, sent = 0, 0
      for w, job in ipairs(jobs) do
        assert.is_true(job.ok, job.err)
        assert.equals(PER_WORKER, job.done, "worker " .. (w - 1))
        assert.equals(0, job.failed)
        throttled, sent = throttled + job.throttled, sent + job.sent
      end
      for w = 0, 1 do
        for i = 1, PER_WORKER do assert.truthy(state["w" .. w .. "-" .. i .. "@example.com"], "w" .. w .. "-" .. i) end
      end
      local need = 2 * math.ceil(PER_WORKER / BATCH)
      assert.equals(need, sent)
      assert.equals(need, requests)
      assert.equals(0, throttled)
      assert.equals(0, sim_429s)
      assert.is_true(busiest <= 20, busiest .. " requests in one second")
      local wall = math.max(jobs[1].ended, jobs[2].ended) - math.min(jobs[1].started, jobs[2].started)
      local bound = need / 20
      assert.is_true(wall <= bound / 0.85, string.format("%.2f s for a bound of %.2f s", wall, bound))
      assert.same({}, errors)
    end)

    it("without shared_dict, each worker paces alone: together they exceed the limit", function()
      local jobs, _, busiest, _, _, sim_429s = run_jobs(false)
      assert.equals(PER_WORKER, jobs[1].done)
      assert.equals(PER_WORKER, jobs[2].done)
      assert.is_true(sim_429s > 0 or busiest > 20, "busiest second: " .. busiest)
    end)
  end)
end)
