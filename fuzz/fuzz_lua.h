/* fuzz/fuzz_lua.h: what every libFuzzer harness of commprefs shares: one
 * Lua 5.4 state per process with this checkout's lua/ on package.path and a
 * stand-in `commprefs.core` module holding only the C pieces the harness
 * compiled in (the harness #includes the csrc C files it tests, so they are
 * built with the fuzzer's sanitizers). Debian's lua-cjson is loaded by
 * `require "cjson"` from /usr/lib/x86_64-linux-gnu/lua/5.4/cjson.so, which
 * lua5.4's default package.cpath already searches.
 *
 * Every state's stand-in core also holds encode.c's pure pieces (escape,
 * escape_id, has_control, and suspect_index and suspects with the index's
 * metatable, by cp_register_suspects as core.c does): the Lua modules a
 * harness loads need them (commprefs.redact's quick check is
 * core.suspects, with no Lua copy).
 *
 * fuzz_abort_on_lua_error: a Lua error where the code promises none (a raise
 * on server input) is a finding: print it and abort(), so libFuzzer saves
 * the input as a crash. */
#ifndef COMMPREFS_FUZZ_LUA_H
#define COMMPREFS_FUZZ_LUA_H

#include <stdio.h>
#include <stdlib.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
#include "../csrc/encode.c"

#ifndef COMMPREFS_ROOT
#define COMMPREFS_ROOT "."
#endif

static void fuzz_abort_on_lua_error(lua_State *L, int status, const char *what) {
  if (status == LUA_OK) return;
  fprintf(stderr, "fuzz: %s raised: %s\n", what, lua_tostring(L, -1));
  abort();
}

/* Runs chunk (Lua source) with n arguments taken from the stack; aborts if it raises. */
static void fuzz_run(lua_State *L, const char *chunk, int nargs, int nresults, const char *what) {
  int status = luaL_loadstring(L, chunk);
  fuzz_abort_on_lua_error(L, status, what);
  lua_insert(L, -(nargs + 1));
  fuzz_abort_on_lua_error(L, lua_pcall(L, nargs, nresults, 0), what);
}

/* A new state: standard libraries, this checkout's lua/ first on package.path,
 * a `commprefs.core` table with encode.c's pure pieces left on the stack for
 * the harness to fill (it is package.loaded["commprefs.core"]). */
static lua_State *fuzz_new_state(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  fuzz_run(L, "package.path = '" COMMPREFS_ROOT "/lua/?.lua;' .. package.path", 0, 0, "setup");
  static const luaL_Reg encode_pieces[] = {
    {"escape", cp_escape}, {"escape_id", cp_escape_id}, {"has_control", cp_has_control}, {NULL, NULL}};
  lua_newtable(L);
  luaL_setfuncs(L, encode_pieces, 0);
  cp_register_suspects(L);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "commprefs.core");
  lua_pop(L, 2);
  return L;
}

/* Pushes what core.c gives cp_decode as upvalues: a private cjson's decode and its null. */
static void fuzz_push_cjson_decode_upvalues(lua_State *L) {
  fuzz_run(L, "local c = require('cjson').new(); c.decode_invalid_numbers(false);"
              " return c.decode, c.null, c.encode", 0, 3, "cjson");
  lua_pop(L, 1);
}

#endif
