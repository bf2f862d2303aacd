#!/bin/sh
# scripts/demo.sh (make demo): runs examples/ against the local HubSpot
# simulator, or, when HUBSPOT_ACCESS_TOKEN is set, the read-only example
# against HubSpot itself (nothing is changed in a real portal).
set -eu
cd "$(dirname "$0")/.."
export LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;"
export LUA_CPATH="$PWD/build/lua5.4/?.so;;"

if [ -n "${HUBSPOT_ACCESS_TOKEN:-}" ]; then
  echo "== HubSpot (token from HUBSPOT_ACCESS_TOKEN): read-only status check"
  lua5.4 examples/status_check.lua "${COMMPREFS_DEMO_ID:-someone@example.com}"
  exit 0
fi

port=$(lua5.4 -e 'local s=require"socket".bind("127.0.0.1",0); print((select(2,s:getsockname())))')
out=$(SIM_PORT=$port sim/run --daemon --watch $$)
echo "$out" | head -n 1
pid=$(echo "$out" | sed -n 's/^pid=//p')
trap 'kill $pid 2>/dev/null || true' EXIT INT TERM
export HUBSPOT_ACCESS_TOKEN=sim-token COMMPREFS_BASE_URL="http://127.0.0.1:$port"

echo; echo "== examples/status_check.lua: a contact who never opted out"
lua5.4 examples/status_check.lua ada@example.com
echo; echo "== examples/batch_unsubscribe.lua: unsubscribe a list (one bad address)"
lua5.4 examples/batch_unsubscribe.lua
echo; echo "== examples/status_check.lua: the same contact now"
lua5.4 examples/status_check.lua ada@example.com
echo; echo "== examples/bulk_job.lua: 1,000 addresses, 8 requests in flight"
lua5.4 examples/bulk_job.lua
echo; echo "== bin/commprefs status"
bin/commprefs status ada@example.com grace@example.com nobody@example.com

echo; echo "== examples/openresty: nginx (2 workers, one shared_dict) checks recipients and runs a bulk job, over HTTPS"
sh scripts/openresty-demo.sh "$out"
echo; echo "demo done: the simulator on port $port stops now"
