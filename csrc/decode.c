/* decode.c: owns response decoding. JSON text is parsed by a private
 * lua-cjson instance (upvalue 1: its decode; upvalue 2: its null), then
 * normalized in place: JSON null becomes absent, and every field the
 * OpenAPI document types as an integer (businessUnitId, subscriptionId,
 * numErrors, and the numeric createdAt/updatedAt of translations) becomes a
 * Lua integer. An integer beyond 2^53 cannot have survived cjson's double
 * exactly, so it is a decode error rather than a silently wrong id. */
#include <string.h>
#include "codec.h"

#define EXACT_LIMIT 9007199254740992.0 /* 2^53 */

static int integer_key(const char *k, size_t n) {
  switch (n) {
  case 9: return memcmp(k, "numErrors", 9) == 0 || memcmp(k, "createdAt", 9) == 0 ||
                 memcmp(k, "updatedAt", 9) == 0;
  case 14: return memcmp(k, "businessUnitId", 14) == 0 || memcmp(k, "subscriptionId", 14) == 0;
  default: return 0;
  }
}

/* Converts the number at the top of the stack, under key k, to an integer. */
static int to_integer(lua_State *L, int t, const char *k) {
  lua_Number d = lua_tonumber(L, -1);
  if (d != d || d > EXACT_LIMIT || d < -EXACT_LIMIT || (lua_Number)(long long)d != d) {
    lua_pushfstring(L, "field %s is not an exact integer", k);
    return -1;
  }
#if LUA_VERSION_NUM >= 503
  lua_pushvalue(L, -2);                 /* key */
  lua_pushinteger(L, (lua_Integer)d);
  lua_rawset(L, t);                     /* replacing an existing key is safe in lua_next */
#else
  (void)t;
#endif
  return 0;
}

static int normalize(lua_State *L, int t, int depth) {
  const void *null = lua_touserdata(L, lua_upvalueindex(2));
  if (depth > 1000) { lua_pushliteral(L, "JSON nested too deeply"); return -1; }
  luaL_checkstack(L, 4, "JSON nested too deeply");
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    int vt = lua_type(L, -1);
    if (vt == LUA_TTABLE) {
      if (normalize(L, lua_gettop(L), depth + 1) != 0) return -1;
    } else if (vt == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == null) {
      lua_pushvalue(L, -2);
      lua_pushnil(L);
      lua_rawset(L, t);                 /* clearing a field is safe in lua_next */
    } else if (vt == LUA_TNUMBER && lua_type(L, -2) == LUA_TSTRING) {
      size_t n;
      const char *k = lua_tolstring(L, -2, &n);
      if (integer_key(k, n) && to_integer(L, t, k) != 0) return -1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

int cp_decode(lua_State *L) {
  luaL_checkstring(L, 1);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  if (lua_pcall(L, 1, 1, 0) != 0) { /* cjson's message names the position */
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  if (lua_type(L, -1) == LUA_TLIGHTUSERDATA) { lua_pop(L, 1); lua_pushnil(L); return 1; }
  if (lua_istable(L, -1) && normalize(L, lua_gettop(L), 0) != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  return 1;
}
