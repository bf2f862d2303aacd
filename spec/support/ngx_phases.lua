-- support.ngx_phases: loaded inside the nginx of spec/contract/ngx_transport_spec.lua
-- from init_by_lua, init_worker_by_lua, log_by_lua, ... : try(phase) makes a
-- client with transport "auto", calls get_status once and records in the
-- lua_shared_dict spec_phases what happened ("ok <n results>", "error ...",
-- or "raised: <message>"). The client made in init_by_lua is kept as
-- package.loaded.spec_phases_client for later requests. The base URL names
-- the simulator as localhost: these clients are a bundle of their own
-- (commprefs.shared), apart from the spec's clients of SIM_URL, so what a
-- case does to its bundle (a 429 hold, a budget set by hand) stays its own.
local M = {}

function M.try(phase)
  local commprefs = require "commprefs"
  local url = os.getenv("SIM_URL"):gsub("127%.0%.0%.1", "localhost")
  local c = commprefs.new { token = "sim-token", base_url = url, max_retries = 0 }
  local ok, env, err = pcall(c.get_status, c, phase .. "@example.com")
  local text
  if not ok then text = "raised: " .. tostring(env)
  elseif env then text = "ok " .. #env.results
  else text = "error " .. tostring(err) end
  if phase == "init" then package.loaded.spec_phases_client = c end
  ngx.shared.spec_phases:set(phase, text)
end

return M
