/* util.h: the few helpers every part of the core shares: the monotonic
 * clock and setting a field of the table at the top of the Lua stack. */
#ifndef COMMPREFS_UTIL_H
#define COMMPREFS_UTIL_H

#include "compat.h"

/* Monotonic milliseconds. */
double cp_now_ms(void);
/* t[k] = v for the table at the top of the stack. */
void cp_set_integer(lua_State *L, const char *k, lua_Integer v);
void cp_set_number(lua_State *L, const char *k, lua_Number v);
void cp_set_string(lua_State *L, const char *k, const char *v);

#endif
