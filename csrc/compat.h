/* compat.h: the few Lua 5.2+ API calls the core uses, for Lua 5.1 as
 * LuaJIT 2.1 (the VM of OpenResty) provides it. LuaJIT already has
 * luaL_setfuncs, luaL_setmetatable and luaL_newlib. */
#ifndef COMMPREFS_COMPAT_H
#define COMMPREFS_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen(L, (i))
#endif

#if LUA_VERSION_NUM >= 504
#define cp_newuserdata(L, sz) lua_newuserdatauv(L, (sz), 0)
#else
#define cp_newuserdata(L, sz) lua_newuserdata(L, (sz))
#endif

#endif
