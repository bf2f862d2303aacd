#!/bin/sh
# scripts/openresty-demo.sh (run by scripts/demo.sh): examples/openresty/
# against a running simulator. $1 is sim/run's first line ("hubsim: http://...
# https://... ca_file=..."). Starts a copy of examples/openresty/nginx.conf in
# its own prefix through sim/daemon (stopped when this script ends), with this
# checkout's Lua modules, the LuaJIT build of the core, and the simulator's CA
# as lua_ssl_trusted_certificate, then shows the request-path check and the
# background bulk job.
set -eu
cd "$(dirname "$0")/.."
tls_url=$(echo "$1" | sed -n 's|.*\(https://[^ ]*\).*|\1|p')
ca=$(echo "$1" | sed -n 's|.*ca_file=\([^ ]*\).*|\1|p')
[ -f build/luajit/commprefs/core.so ] || { echo "openresty-demo: build the LuaJIT core first (make LUA=luajit)" >&2; exit 1; }

prefix=$(mktemp -d "${TMPDIR:-/tmp}/commprefs-openresty.XXXXXX")
chmod 755 "$prefix" # nginx workers run as nobody when the master is root
mkdir -p "$prefix/logs" "$prefix/tmp" "$prefix/work"
chmod 1777 "$prefix/work"
port=$(lua5.4 -e 'local s=require"socket".bind("127.0.0.1",0); print((select(2,s:getsockname())))')
cp "$ca" "$prefix/ca.pem" # workers (nobody, when the master is root) read it: the simulator's prefix is private
chmod 644 "$prefix/ca.pem"
# the Lua modules and the core as `make install` would place them, inside the
# prefix: the workers (nobody, when the master is root) may not enter the
# checkout (root's home and mktemp -d directories are mode 700)
mkdir -p "$prefix/share" "$prefix/lib/commprefs"
cp -R lua/commprefs "$prefix/share/"
cp build/luajit/commprefs/core.so "$prefix/lib/commprefs/"
chmod -R a+rX "$prefix/share" "$prefix/lib"
sed -e "s|listen 127.0.0.1:8080|listen 127.0.0.1:$port|" \
    -e "s|/usr/local/share/lua/5.1|$prefix/share|g" -e "s|/usr/local/lib/lua/5.1|$prefix/lib|" \
    -e "s|/etc/ssl/certs/ca-certificates.crt|$prefix/ca.pem|" examples/openresty/nginx.conf > "$prefix/nginx.conf"
cp examples/openresty/app.lua "$prefix/"
i=1
while [ $i -le 500 ]; do echo "job$i@example.com"; i=$((i + 1)); done > "$prefix/work/unsubscribe.txt"

out=$(env -u LD_PRELOAD HUBSPOT_ACCESS_TOKEN=sim-token COMMPREFS_BASE_URL="$tls_url" \
  COMMPREFS_UNSUBSCRIBE_FILE="$prefix/work/unsubscribe.txt" COMMPREFS_JOURNAL="$prefix/work/job.journal" \
  sim/daemon "$prefix" "$prefix/nginx.conf" "http://127.0.0.1:$port/health" $$)
pid=$(echo "$out" | sed -n 's/^pid=//p')
trap 'kill $pid 2>/dev/null || true' EXIT INT TERM
url="http://127.0.0.1:$port"
echo "nginx: $url (prefix $prefix), HubSpot = the simulator at $tls_url, verified with its CA"

show() { printf '%s -> ' "$1"; curl -sS -w ' [%{http_code}]\n' "$url$1" | tr -d '\n'; echo; }
echo; echo "-- the request-path check (access_by_lua): a contact who never opted out, then one who did"
show "/send?to=nobody%40example.com"
show "/send?to=ada%40example.com"
echo; echo "-- the background job (ngx.timer.at from init_worker_by_lua): 500 addresses"
for _ in $(seq 1 100); do
  state=$(curl -sS "$url/job")
  case "$state" in *done*|*error*) break ;; esac
  sleep 0.1
done
echo "/job -> $state"
show "/send?to=job1%40example.com"
echo "nginx's error log, from the example's Lua:"
grep -E '\[lua\]|\[error\]' "$prefix/logs/error.log" | sed 's/^/  /' | tail -n 5
case "$state" in
  *done*) ;;
  *) echo "openresty-demo: the background job did not finish: $state" >&2; exit 1 ;;
esac
if grep -q '\[error\]' "$prefix/logs/error.log"; then
  echo "openresty-demo: nginx logged errors (above)" >&2; exit 1
fi
