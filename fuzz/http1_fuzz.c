/* fuzz/http1_fuzz.c: csrc/http1.c, the HTTP/1.x response reader of the
 * cosocket transport, on whatever a server may send: the input is cut into
 * pieces of varying size (as sockets deliver them) and fed through the C API
 * and through the Lua binding (core.http1_response), sometimes followed by
 * EOF. Nothing may crash, leak, read out of bounds or raise; a completed
 * answer respects max_body, and a status, body and keep-alive are reported
 * consistently; it began with "HTTP/" (after any blank lines); bytes after
 * it are counted in extra, and then it is never kept alive. Input: byte 0
 * picks max_body (0 = none, else small limits) and the piece sizes; the
 * rest is the bytes of the response. */
/* the core files first: they set their own feature macros */
#include "../csrc/http1.c"
#include "../csrc/headers.c"
#include <assert.h>
#include <stdint.h>
#include "fuzz_lua.h"

static const char *CHECK =
  "local data, max, step, eof = ...\n"
  "local core = require 'commprefs.core'\n"
  "local p = core.http1_response { max_body = max }\n"
  "local pos, done, err, kind = 1, false\n"
  "while pos <= #data and done == false do\n"
  "  done, err, kind = p:feed(data:sub(pos, pos + step - 1))\n"
  "  pos = pos + step\n"
  "end\n"
  "if done == false and eof then done, err, kind = p:feed('') end\n"
  "if done == nil then\n"
  "  assert(type(err) == 'string' and (kind == 'network' or kind == 'too_large'), tostring(kind))\n"
  "  assert(not pcall(p.result, p))\n"
  "elseif done then\n"
  "  local r = p:result()\n"
  "  assert(r.status >= 200 and r.status <= 999, r.status)\n"
  "  assert(max == 0 or #r.body <= max)\n"
  "  assert(type(r.keepalive) == 'boolean')\n"
  "  assert(data:find('^[\\r\\n]*HTTP/'), 'a status line not starting with HTTP/ was accepted')\n"
  "  assert(r.extra == nil or (math.type(r.extra) == 'integer' and r.extra > 0 and not r.keepalive), 'extra')\n"
  "  for _, k in ipairs { 'retry_after', 'rate_max', 'rate_interval_ms', 'daily_remaining' } do\n"
  "    assert(r[k] == nil or (math.type(r[k]) == 'integer' and r[k] >= 0), k)\n"
  "  end\n"
  "end\n"
  "p:close()\n";

static lua_State *state(void) {
  static lua_State *L;
  if (L) return L;
  L = fuzz_new_state(); /* core */
  cp_register_http1(L);
  lua_pop(L, 1);
  return L;
}

/* The C API alone, in pieces of `step` bytes. */
static void feed_c(const uint8_t *data, size_t size, size_t max, size_t step, int eof) {
  cp_http1 r;
  size_t pos = 0;
  int rc = H1_MORE;
  cp_http1_init(&r, max);
  while (pos < size && rc == H1_MORE) {
    size_t n = size - pos < step ? size - pos : step;
    rc = cp_http1_feed(&r, (const char *)data + pos, n);
    pos += n;
  }
  if (rc == H1_MORE && eof) rc = cp_http1_feed(&r, "", 0);
  if (rc == H1_DONE) {
    assert(r.status >= 100);
    assert(max == 0 || r.body_len <= max);
    assert(r.extra <= size);
    assert(r.extra == 0 || !cp_http1_keepalive(&r));
  }
  if (rc == H1_ERROR) assert(r.error && r.error_kind);
  cp_http1_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const size_t MAX[4] = {0, 16, 100, 4096};
  lua_State *L = state();
  size_t max, step;
  int eof;
  if (size == 0) return 0;
  max = MAX[data[0] & 3];
  step = ((data[0] >> 2) & 15) + 1;
  if (step == 16) step = 4096;
  eof = (data[0] >> 6) & 1;
  feed_c(data + 1, size - 1, max, step, eof);
  lua_pushlstring(L, (const char *)data + 1, size - 1);
  lua_pushinteger(L, (lua_Integer)max);
  lua_pushinteger(L, (lua_Integer)step);
  lua_pushboolean(L, eof);
  fuzz_run(L, CHECK, 4, 0, "http1 response reader");
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
