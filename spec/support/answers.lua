-- support.answers: owns the HubSpot answer bodies the scripted servers send
-- (a GET of statuses/ID/unsubscribe-all, unsubscribed when ID starts with
-- "u" in either case), for spec/support/rawserver.lua and the connection
-- fuzzer's model (fuzz/conn_check.lua). No dependencies: both load it with
-- dofile from their own directory.
local M = {}

function M.status_body(id)
  return string.format('{"status":"COMPLETE","results":[{"subscriberIdString":"%s","wideStatusType":'
    .. '"PORTAL_WIDE","status":"%s","channel":"EMAIL","timestamp":"2026-01-01T00:00:00Z"}],'
    .. '"startedAt":"2026-01-01T00:00:00Z","completedAt":"2026-01-01T00:00:00Z"}',
    id, id:sub(1, 1):lower() == "u" and "UNSUBSCRIBED" or "SUBSCRIBED")
end

return M
