/* fuzz/conn_fuzz.c: the framing and desync cases of a keep-alive
 * connection. The input is the server side of a sequence of HTTP/1.1
 * exchanges (answers with framing variants and faults: duplicates at once
 * or late, stray bytes, two Content-Lengths, wrong lengths, cut answers,
 * another id's answer, reads split anywhere); the client is
 * fuzz/conn_check.lua, a model of the cosocket transport's exchange over
 * core.http1_response (csrc/http1.c) with the client's rule on top
 * (commprefs.response.outcome over core.decode, csrc/decode.c, and
 * commprefs.ops.names_other). It aborts when a read returns an answer that
 * names another id than its own (or its own with another status), when a
 * well-formed answer is not read exactly, or when bytes after a complete
 * answer are not flagged as extra (see conn_check.lua for the model). */
/* the core files first: they set their own feature macros */
#include "../csrc/http1.c"
#include "../csrc/headers.c"
#include "../csrc/decode.c"
#include <stdint.h>
#include "fuzz_lua.h"

static lua_State *state(void) {
  static lua_State *L;
  if (L) return L;
  L = fuzz_new_state();               /* core */
  cp_register_http1(L);
  fuzz_push_cjson_decode_upvalues(L); /* core, decode, null */
  lua_pushcclosure(L, cp_decode, 2);
  lua_setfield(L, -2, "decode");
  lua_pop(L, 1);
  /* the model, once: a function of the input kept in the registry */
  fuzz_run(L, "return dofile('" COMMPREFS_ROOT "/fuzz/conn_check.lua')", 0, 1, "loading fuzz/conn_check.lua");
  lua_setfield(L, LUA_REGISTRYINDEX, "commprefs.fuzz.conn_check");
  return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = state();
  lua_getfield(L, LUA_REGISTRYINDEX, "commprefs.fuzz.conn_check");
  lua_pushlstring(L, (const char *)data, size);
  fuzz_abort_on_lua_error(L, lua_pcall(L, 1, 0, 0), "the connection model");
  lua_gc(L, LUA_GCCOLLECT, 0); /* free what this input allocated: libFuzzer's leak check stays quiet */
  return 0;
}
