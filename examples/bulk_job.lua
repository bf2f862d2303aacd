-- examples/bulk_job.lua: a resumable bulk job over a file of addresses,
-- paced to HubSpot's rate limit, with a journal to resume after a crash.
--   HUBSPOT_ACCESS_TOKEN=... lua5.4 examples/bulk_job.lua ids.txt job.journal
local commprefs = require "commprefs"

local client = commprefs.new {
  base_url = os.getenv("COMMPREFS_BASE_URL"),
  ca_file = os.getenv("COMMPREFS_CA_FILE"),
  -- no max_concurrency: as many in flight as HubSpot's rate and the latency need
}
local path, journal = arg[1], arg[2]
local source
if path then source = io.lines(path) else
  local n = 0
  source = function() n = n + 1; if n <= 1000 then return "bulk" .. n .. "@example.com" end end
end

local summary = client:bulk_unsubscribe_all(source, {
  journal = journal,
  on_progress = function(done) if done % 500 == 0 then io.stderr:write(done, " done\n") end end,
})
print(string.format("%d done: %d changed, %d unchanged, %d failed (%d skipped from the journal)",
  summary.done, summary.changed, summary.unchanged, summary.failed, summary.skipped))
for _, f in ipairs(summary.failures) do print("failed", f.id, tostring(f.error)) end
client:close()
