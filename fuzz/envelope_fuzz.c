/* fuzz/envelope_fuzz.c: the response decoder and normaliser (csrc/decode.c)
 * and everything the Lua layer does with what a server sends: for any body,
 * core.decode in each mode, commprefs.response's outcome for 2xx and error
 * statuses with each content type, tostring(err) and pretty(envelope|err)
 * must return without raising (a raise aborts: a finding). Input: byte 0
 * picks the content type, the rest is the body. */
/* the core files first: they set their own feature macros */
#include "../csrc/decode.c"
#include <stdint.h>
#include <string.h>
#include "fuzz_lua.h"

static const char *CHECK =
  "local body, ctype = ...\n"
  "local core = require 'commprefs.core'\n"
  "local response = require 'commprefs.response'\n"
  "local pretty = require('commprefs.pretty').value\n"
  "core.decode(body); core.decode(body, 'envelope'); core.decode(body, 'error')\n"
  "local client = response.fuzz_client\n"
  "for _, status in ipairs { 200, 207, 302, 401, 429, 503 } do\n"
  "  local env, err = response.outcome({ method = 'POST', url = 'http://u:p@h/x' },\n"
  "    { status = status, body = body, content_type = ctype, attempts = 1 }, client)\n"
  "  if env then\n"
  "    assert(type(env) == 'table', 'envelope is not a table')\n"
  "    assert(type(pretty(env)) == 'string')\n"
  "    assert(not pretty(env):find('fuzz-secret-token', 1, true), 'token in pretty(env)')\n"
  "  else\n"
  "    assert(type(tostring(err)) == 'string' and type(pretty(err)) == 'string')\n"
  "    assert(not tostring(err):find('fuzz-secret-token', 1, true), 'token in tostring(err)')\n"
  "    assert(not pretty(err):find('fuzz-secret-token', 1, true), 'token in pretty(err)')\n"
  "  end\n"
  "end\n";

static const char *CTYPES[] = {"application/json", "application/json;charset=utf-8", "text/html",
                               "text/plain", NULL};

static lua_State *state(void) {
  static lua_State *L;
  if (L) return L;
  L = fuzz_new_state();                  /* core */
  fuzz_push_cjson_decode_upvalues(L);    /* core, decode, null */
  lua_pushcclosure(L, cp_decode, 2);
  lua_setfield(L, -2, "decode");
  lua_pop(L, 1);
  /* a client whose token the error path must redact, when redaction exists */
  fuzz_run(L, "local r = require 'commprefs.response'\n"
              "local ok, redact = pcall(require, 'commprefs.redact')\n"
              "if ok then r.fuzz_client = {}; redact.remember(r.fuzz_client, 'fuzz-secret-token') end",
           0, 0, "setup");
  return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = state();
  if (size == 0) return 0;
  lua_pushlstring(L, (const char *)data + 1, size - 1);
  if (CTYPES[data[0] % 5]) lua_pushstring(L, CTYPES[data[0] % 5]); else lua_pushnil(L);
  fuzz_run(L, CHECK, 2, 0, "response handling");
  lua_gc(L, LUA_GCCOLLECT, 0); /* free what this input allocated: libFuzzer's leak check stays quiet */
  return 0;
}
