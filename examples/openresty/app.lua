-- examples/openresty/app.lua: the Lua side of examples/openresty/nginx.conf.
--   init()             init_by_lua: one client for every worker (no I/O here)
--   check_recipient()  access_by_lua: 403 when ?to= unsubscribed from all email
--   init_worker()      init_worker_by_lua: a background bulk job, from ngx.timer.at
--   job_status()       content_by_lua: that job's summary as JSON
local commprefs = require "commprefs"
local cjson = require "cjson"

local M = {}
local client

function M.init()
  client = commprefs.new {
    base_url = os.getenv("COMMPREFS_BASE_URL"), -- nil: https://api.hubapi.com
    shared_dict = "commprefs",                  -- every worker paces through one window
    timeout = 5,                                -- a request waits at most this long
  }
end

function M.check_recipient()
  local to = ngx.var.arg_to and ngx.unescape_uri(ngx.var.arg_to)
  if not to or to == "" then return ngx.exit(ngx.HTTP_BAD_REQUEST) end
  local unsubscribed, err = client:is_unsubscribed_from_all(to)
  if unsubscribed == nil then -- HubSpot could not say: fail closed
    ngx.log(ngx.ERR, "commprefs: ", tostring(err))
    ngx.status = ngx.HTTP_SERVICE_UNAVAILABLE
    ngx.say("cannot check ", to, " now: ", err.kind)
    return ngx.exit(ngx.HTTP_SERVICE_UNAVAILABLE)
  end
  if unsubscribed then
    ngx.status = ngx.HTTP_FORBIDDEN
    ngx.say(to, " unsubscribed from all email: not sending")
    return ngx.exit(ngx.HTTP_FORBIDDEN)
  end
end

-- Runs in a timer (cosockets work there, not in init_worker itself).
local function unsubscribe_file(premature, path)
  if premature then return end
  local jobs = ngx.shared.jobs
  jobs:set("state", "running")
  local ok, summary = pcall(client.bulk_unsubscribe_all, client, io.lines(path),
    { journal = os.getenv("COMMPREFS_JOURNAL") })
  if not ok then
    ngx.log(ngx.ERR, "commprefs bulk job failed: ", tostring(summary))
    jobs:set("state", cjson.encode { error = tostring(summary) })
    return
  end
  summary.failures = #summary.failures -- the count is enough here
  ngx.log(ngx.NOTICE, "commprefs bulk job: ", summary.done, " done, ", summary.failed, " failed")
  jobs:set("state", cjson.encode(summary))
end

function M.init_worker()
  local path = os.getenv("COMMPREFS_UNSUBSCRIBE_FILE")
  if path and ngx.worker.id() == 0 then -- one worker runs the job
    assert(ngx.timer.at(0, unsubscribe_file, path))
  end
end

function M.job_status()
  ngx.header.content_type = "application/json"
  ngx.say(ngx.shared.jobs:get("state") or '"not started"')
end

return M
