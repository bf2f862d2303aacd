-- examples/status_check.lua: is a contact unsubscribed from all email?
--   HUBSPOT_ACCESS_TOKEN=... lua5.4 examples/status_check.lua someone@example.com
local commprefs = require "commprefs"

local client = commprefs.new {
  base_url = os.getenv("COMMPREFS_BASE_URL"), -- nil: https://api.hubapi.com
  ca_file = os.getenv("COMMPREFS_CA_FILE"),
}
local id = arg[1] or "someone@example.com"

local unsubscribed, err = client:is_unsubscribed_from_all(id)
if unsubscribed == nil then
  io.stderr:write(commprefs.pretty(err), "\n")
  os.exit(1)
end
print(id .. (unsubscribed and " is unsubscribed from all email" or " has not unsubscribed from all email"))

-- The whole envelope, as HubSpot sent it (integers as integers, nulls absent).
local env = assert(client:get_unsubscribe_all_status(id))
print(commprefs.pretty(env))
client:close()
