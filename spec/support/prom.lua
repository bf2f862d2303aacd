-- support.prom: reading Prometheus' text format in the specs: Debian's
-- promtool on a text (its verdict and output), and the value of one series.
local M = {}

-- promtool check metrics on text: its output, ending "rc=N" (rc=0: accepted).
function M.check(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  local p = io.popen("promtool check metrics < " .. path .. " 2>&1; echo rc=$?")
  local out = p:read("*a")
  p:close()
  os.remove(path)
  return out
end

-- Whether every label of want ('a="x",b="y"') is among labels.
local function has_labels(labels, want)
  for pair in want:gmatch('[%w_]+="[^"]*"') do
    if not ("," .. labels .. ","):find("," .. pair .. ",", 1, true) then return false end
  end
  return true
end

-- The value of the first series of text named as series ('name' or
-- 'name{label="v",...}'), whatever other labels it has; nil when none.
function M.value(text, series)
  local name, want = series:match("^([%w_:]+){(.*)}$")
  name, want = name or series, want or ""
  for line in text:gmatch("[^\n]+") do
    local n, labels, v = line:match("^([%w_:]+){(.*)} (%S+)$")
    if not n then n, v = line:match("^([%w_:]+) (%S+)$"); labels = "" end
    if n == name and has_labels(labels, want) then return tonumber(v) end
  end
end

return M
