-- support.http1: feeding core.http1_response (csrc/http1.c) in the specs.
local core = require "commprefs.core"

local M = {}

-- Feeds chunks to a new parser (opts: core.http1_response's) until it is
-- done or fails: the parser, then feed's last done, err, kind.
function M.parse(chunks, opts)
  local p = core.http1_response(opts)
  local done, err, kind
  for _, c in ipairs(chunks) do
    done, err, kind = p:feed(c)
    if done ~= false then break end
  end
  return p, done, err, kind
end

return M
