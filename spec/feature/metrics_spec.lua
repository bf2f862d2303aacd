-- commprefs.prometheus(client): the client's counters (counted per attempt by
-- the governor, csrc/governor.c, for both transports) in Prometheus' text
-- format, checked by Debian's promtool; in OpenResty with metrics.shared_dict
-- every worker's counts added up in the dict.
local sim = require "support.sim"
local prom = require "support.prom"
local commprefs = require "commprefs"

local promtool, value = prom.check, prom.value

describe("commprefs.prometheus", function()
  before_each(function() sim.reset() end)

  it("renders what the client did, 503s and retries included, and promtool accepts it", function()
    sim.fault { kind = "status", status = 503, count = 2 }
    local c = commprefs.new { token = "sim-token", base_url = sim.url, backoff_base = 0.01, backoff_max = 0.02,
      cache = { ttl = 60 } }
    assert.is_false(c:is_unsubscribed_from_all("m1@example.com")) -- two 503s, then the answer
    assert.is_false(c:is_unsubscribed_from_all("m1@example.com")) -- the cache
    local text = commprefs.prometheus(c)
    c:close()
    assert.matches("rc=0", promtool(text))
    assert.equal(2, value(text, 'commprefs_requests_total{status="503"}'))
    assert.equal(1, value(text, 'commprefs_requests_total{status="200"}'))
    assert.equal(2, value(text, "commprefs_retries_total"))
    assert.equal(3, value(text, "commprefs_request_duration_seconds_count"))
    assert.equal(1, value(text, "commprefs_cache_hits_total"))
    assert.equal(100, value(text, "commprefs_rate_limit_max"))
    assert.is_nil(text:find("sim-token", 1, true))
  end)

  it("inside nginx with two workers and metrics.shared_dict: one /metrics for every worker", function()
    local nginx = require "support.nginx"
    local inst = nginx.start { workers = 2, conf = "lua_shared_dict metrics 1m;", env = { SIM_URL = sim.url },
      server = [[location = /metrics { content_by_lua_block {
        package.loaded.mclient = package.loaded.mclient or require("commprefs").new { token = "sim-token",
          base_url = os.getenv("SIM_URL"), metrics = { shared_dict = "metrics" } }
        ngx.print(require("commprefs").prometheus(package.loaded.mclient)) } }
      location = /read { content_by_lua_block {
        package.loaded.mclient = package.loaded.mclient or require("commprefs").new { token = "sim-token",
          base_url = os.getenv("SIM_URL"), metrics = { shared_dict = "metrics" } }
        local a, e = package.loaded.mclient:is_unsubscribed_from_all(ngx.unescape_uri(ngx.var.arg_id)); ngx.say(tostring(a), e and (" " .. tostring(e)) or "", " ", ngx.worker.pid()) } }]] }
    sim.fault { kind = "status", status = 503, count = 1 }
    local pids, reads, n = {}, 0, 0
    for _ = 1, 10 do -- until both workers have answered reads
      local paths = {}
      for i = 1, 20 do n = n + 1; paths[i] = "/read?id=n" .. n .. "%40example.com" end
      local answers = nginx.concurrent(inst, paths, 20)
      for i = 1, 20 do
        local answer, pid = answers[i].body:match("^(%S+) (%d+)\n$")
        assert.equal("false", answer, answers[i].body)
        pids[pid] = true
      end
      reads = reads + 20
      if next(pids, next(pids)) then break end
    end
    assert.is_not_nil(next(pids, next(pids)), "one worker answered every read")
    require("socket").sleep(1.5) -- every worker's timer has flushed
    local status, text = nginx.request(inst, "GET", "/metrics")
    local errors = inst:errors()
    inst:stop()
    assert.equal(200, status, text)
    assert.matches("rc=0", promtool(text))
    assert.equal(reads, value(text, 'commprefs_requests_total{status="200"}'), text)
    assert.equal(1, value(text, 'commprefs_requests_total{status="503"}'))
    assert.equal("", table.concat(errors, "\n"))
  end)
end)
