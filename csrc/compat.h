/* compat.h: the few Lua 5.2+ API calls the core uses, for Lua 5.1 as
 * LuaJIT 2.1 (the VM of OpenResty) provides it (LuaJIT already has
 * luaL_setfuncs, luaL_setmetatable and luaL_newlib), and the one helper
 * every userdata class of the core shares. */
#ifndef COMMPREFS_COMPAT_H
#define COMMPREFS_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen(L, (i))
#define lua_absindex(L, i) ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)
#endif

#if LUA_VERSION_NUM >= 504
#define cp_newuserdata(L, sz) lua_newuserdatauv(L, (sz), 0)
#else
#define cp_newuserdata(L, sz) lua_newuserdata(L, (sz))
#endif

/* Creates metatable `name` once per Lua state: methods as __index, gc as
 * __gc and __close (Lua 5.4 to-be-closed variables), and __tostring. */
static inline void cp_register_class(lua_State *L, const char *name, const luaL_Reg *methods,
                                     lua_CFunction gc, lua_CFunction tostring) {
  if (!luaL_newmetatable(L, name)) { /* loaded before: keep it */
    lua_pop(L, 1);
    return;
  }
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__name");
  lua_pop(L, 1);
}

/* Keeps metatable `name` in the registry under the light userdata key too,
 * for cp_checkudata (a lookup by address instead of by name: the hot
 * methods check their self on every call). */
static inline void cp_register_key(lua_State *L, const char *name, const void *key) {
  lua_pushlightuserdata(L, (void *)key);
  luaL_getmetatable(L, name);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* luaL_checkudata(L, idx, name) for a class registered with cp_register_key:
 * the same answer, and the same error for anything else. */
static inline void *cp_checkudata(lua_State *L, int idx, const void *key, const char *name) {
  if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
    int same;
    lua_pushlightuserdata(L, (void *)key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    same = lua_rawequal(L, -1, -2) && !lua_isnil(L, -1);
    lua_pop(L, 2);
    if (same) return lua_touserdata(L, idx);
  }
  return luaL_checkudata(L, idx, name);
}

#endif
