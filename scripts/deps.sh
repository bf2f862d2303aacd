#!/bin/sh
# scripts/deps.sh: install, from Debian's packages, whatever the build, the
# simulator, the tests and the benchmarks need and this machine lacks.
# (libnginx-mod-http-lua needs OpenResty's LuaJIT branch, so the LuaJIT
# build uses luajit2 / libluajit2-5.1-dev too.)
set -e
PKGS="build-essential pkg-config lua5.4 liblua5.4-dev libcurl4-openssl-dev lua-cjson lua-busted
lua-socket nginx libnginx-mod-http-lua luajit2 libluajit2-5.1-dev luarocks wrk openssl curl
valgrind bsdutils libhttp-parser-dev libhiredis-dev redis-server clang libclang-rt-14-dev
lua-resty-core lua-resty-lrucache prometheus"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps: installing$missing"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
# Debian's nginx package may start a system nginx on port 80; the project never needs it.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true; fi
# Likewise the prometheus package's own server: the specs need only its promtool.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
pkill -x prometheus >/dev/null 2>&1 || true
