-- examples/batch_unsubscribe.lua: unsubscribe a list of contacts from all email.
-- Lists longer than batch_size (100) are split into requests and merged back.
--   HUBSPOT_ACCESS_TOKEN=... lua5.4 examples/batch_unsubscribe.lua a@example.com b@example.com
local commprefs = require "commprefs"

local client = commprefs.new {
  base_url = os.getenv("COMMPREFS_BASE_URL"),
  ca_file = os.getenv("COMMPREFS_CA_FILE"),
}
local ids = #arg > 0 and { table.unpack(arg) } or { "ada@example.com", "grace@example.com", "not-an-address" }

local env, err = client:batch_unsubscribe_all(ids)
if not env then
  io.stderr:write(commprefs.pretty(err), "\n")
  if err.failed_inputs then io.stderr:write("not processed: ", table.concat(err.failed_inputs, ", "), "\n") end
  os.exit(1)
end
print(commprefs.pretty(env))

-- Unsubscribing again changes nothing: HubSpot says NO_STATUS_CHANGE.
local again = assert(client:batch_unsubscribe_all({ ids[1] }))
print(ids[1] .. ": " .. again.results[1].statuses[1].setStatusSuccessReason)
client:close()
