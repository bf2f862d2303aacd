#!/bin/sh
# scripts/check-memory.sh: the C core's memory checks (make check-memory).
#  1. the specs that drive the core, under valgrind memcheck: any error or
#     any block definitely lost fails;
#  2. the same specs with the core built with AddressSanitizer + UBSan
#     (the Lua interpreter is not instrumented, so libasan is preloaded).
# The simulator and the command line run in child processes, outside both.
# busted runs in this process (no --lua, which would re-exec it outside valgrind).
set -eu
cd "$(dirname "$0")/.."
SPECS="spec/contract/client_spec.lua spec/feature/bulk_spec.lua spec/feature/redis_spec.lua spec/contract/transport_spec.lua spec/contract/ngx_transport_spec.lua spec/feature/harden_spec.lua spec/feature/hostile_spec.lua"

echo "== valgrind memcheck (Lua 5.4)"
make -s all
make -s all LUA=luajit # nginx (LuaJIT) in the Redis spec loads this build
valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
  --show-leak-kinds=definite --keep-debuginfo=yes --num-callers=30 \
  lua5.4 /usr/bin/busted -o TAP $SPECS > build/valgrind.tap 2> build/valgrind.log || {
  status=$?
  tail -40 build/valgrind.log
  grep -E '^not ok' build/valgrind.tap || true
  echo "check-memory: valgrind run failed (exit $status)"
  exit 1
}
grep -E '^ok|^not ok' build/valgrind.tap | tail -n 1 >/dev/null
echo "valgrind: $(grep -c '^ok' build/valgrind.tap) specs passed, 0 errors, nothing definitely lost"

echo "== AddressSanitizer + UndefinedBehaviorSanitizer (Lua 5.4)"
make -s all BUILD=build/asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
  LDFLAGS="-fsanitize=address,undefined"
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  COMMPREFS_BUILD=build/asan lua5.4 /usr/bin/busted -o TAP $SPECS > build/asan.tap 2> build/asan.log || {
  tail -40 build/asan.log
  grep -E '^not ok' build/asan.tap || true
  echo "check-memory: sanitizer run failed"
  exit 1
}
if grep -q "runtime error\|AddressSanitizer" build/asan.log; then cat build/asan.log; exit 1; fi
echo "asan+ubsan: $(grep -c '^ok' build/asan.tap) specs passed, no report"
