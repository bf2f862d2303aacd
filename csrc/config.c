/* config.c: owns reading a client's configuration from Lua (config.h) and
 * exporting the limits of cp_limits.h as core.limits: one table of ranges that
 * the core and the Lua option checks (lua/commprefs/check.lua) both read. */
#include <stdio.h>
#include <string.h>
#include "config.h"
#include "ratelimit.h"

#define VERSION_UA "commprefs/0.1.0"

static const char *opt_string(lua_State *L, int idx, const char *fname, const char *key, const char *def) {
  const char *s;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return def; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "%s: bad option '%s' (string expected)", fname, key);
  s = lua_tostring(L, -1);
  lua_pop(L, 1); /* still referenced by the config table */
  return s;
}

static int opt_bool(lua_State *L, int idx, const char *key) {
  int v;
  lua_getfield(L, idx, key);
  v = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* The field `key` of the table at idx within [min, max] (an integer when asked), or def. */
static double opt_number(lua_State *L, int idx, const char *fname, const char *key, const char *opt,
                         double def, double min, double max, int integer) {
  double v;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return def; }
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "%s: bad option '%s' (number expected)", fname, opt);
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(v >= min && v <= max) || (integer && v != (double)(long long)v)) {
    char range[64];
    snprintf(range, sizeof(range), "from %.15g to %.15g", min, max);
    luaL_error(L, "%s: bad option '%s' (%s %s expected)", fname, opt, integer ? "an integer" : "a number", range);
  }
  return v;
}

void cp_config_read(lua_State *L, int idx, const char *fname, cp_config *c) {
  memset(c, 0, sizeof(*c));
#define CP_READ(opt, field, def, min, max, integer, unit) \
  c->field = opt_number(L, idx, fname, #field, opt, def, min, max, integer);
  CP_LIMITS(CP_READ)
#undef CP_READ
  lua_getfield(L, idx, "rate_max");
  c->rate_set = !lua_isnil(L, -1);
  lua_pop(L, 1);
  c->token = opt_string(L, idx, fname, "token", NULL);
  c->user_agent = opt_string(L, idx, fname, "user_agent", VERSION_UA);
  c->ca_file = opt_string(L, idx, fname, "ca_file", NULL);
  c->redis_url = opt_string(L, idx, fname, "redis_url", NULL);
  c->redis_key = opt_string(L, idx, fname, "redis_key", NULL);
  c->verify_tls = opt_bool(L, idx, "verify_tls");
  c->handle_signals = opt_bool(L, idx, "handle_signals");
  lua_getfield(L, idx, "form_body");
  c->form_body = lua_toboolean(L, -1);
  lua_pop(L, 1);
}

/* A limit as Lua shows it: an integer option's limits are integers (100, not 100.0). */
static void push_limit(lua_State *L, double v, int integer) {
  if (integer) lua_pushinteger(L, (lua_Integer)v);
  else lua_pushnumber(L, v);
}

static void push_row(lua_State *L, double def, double min, double max, int integer, const char *unit) {
  lua_createtable(L, 0, 5);
  push_limit(L, def, integer); lua_setfield(L, -2, "default");
  push_limit(L, min, integer); lua_setfield(L, -2, "min");
  push_limit(L, max, integer); lua_setfield(L, -2, "max");
  lua_pushboolean(L, integer); lua_setfield(L, -2, "integer");
  lua_pushstring(L, unit); lua_setfield(L, -2, "unit");
}

void cp_register_limits(lua_State *L) {
  lua_newtable(L);
#define CP_EXPORT(opt, field, def, min, max, integer, unit) \
  push_row(L, def, min, max, integer, unit); lua_setfield(L, -2, opt);
  CP_LIMITS(CP_EXPORT)
#undef CP_EXPORT
  lua_pushinteger(L, CP_MAX_ID_BYTES); lua_setfield(L, -2, "max_id_bytes");
  lua_pushinteger(L, CP_MAX_TOKEN_BYTES); lua_setfield(L, -2, "max_token_bytes");
  lua_pushinteger(L, CP_SANE_MAX_MAX); lua_setfield(L, -2, "sane_max_max");
  lua_pushinteger(L, CP_DEFAULT_INTERVAL_MS); lua_setfield(L, -2, "default_interval_ms");
  lua_pushinteger(L, CP_PACE_BURST); lua_setfield(L, -2, "pace_burst"); /* ratelimit.h: even spacing */
  lua_setfield(L, -2, "limits");
}
