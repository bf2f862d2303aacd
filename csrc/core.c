/* core.c: owns the module commprefs.core: luaopen, the client userdata
 * (config, __gc, __close, __tostring, close, stats) and the registration of
 * the codec functions with their private lua-cjson instance. */
#define _POSIX_C_SOURCE 200809L
#include <string.h>
#include <time.h>
#include "codec.h"
#include "transport.h"

void cp_register_journal(lua_State *L); /* journal.c */
void cp_register_http1(lua_State *L);   /* http1.c */

#define CLIENT_MT "commprefs.core.client"
#define VERSION "0.1.0"

static cp_transport *check_open(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  if (t->closed) luaL_error(L, "commprefs: the client is closed");
  return t;
}

static double opt_number(lua_State *L, const char *key, double def, double min, double max) {
  double v;
  lua_getfield(L, 1, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return def; }
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "commprefs.core.new: %s must be a number", key);
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(v >= min && v <= max)) luaL_error(L, "commprefs.core.new: %s out of range", key);
  return v;
}

static const char *opt_string(lua_State *L, const char *key, const char *def) {
  const char *s;
  lua_getfield(L, 1, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return def; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "commprefs.core.new: %s must be a string", key);
  s = lua_tostring(L, -1);
  lua_pop(L, 1); /* still referenced by the config table */
  return s;
}

/* core.new(config) -> client. The token is kept only inside libcurl's header list. */
static int core_new(lua_State *L) {
  cp_config c;
  cp_transport *t;
  const char *err;
  luaL_checktype(L, 1, LUA_TTABLE);
  c.token = opt_string(L, "token", NULL);
  if (!c.token || !*c.token) luaL_error(L, "commprefs.core.new: token is required");
  c.user_agent = opt_string(L, "user_agent", "commprefs/" VERSION);
  c.ca_file = opt_string(L, "ca_file", NULL);
  lua_getfield(L, 1, "verify_tls");
  c.verify_tls = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
  c.timeout_ms = (long)(opt_number(L, "timeout", 30, 0.001, 86400) * 1000);
  c.connect_timeout_ms = (long)(opt_number(L, "connect_timeout", 10, 0.001, 86400) * 1000);
  c.max_retries = (int)opt_number(L, "max_retries", 5, 0, 100);
  c.max_concurrency = (int)opt_number(L, "max_concurrency", 1, 1, 256);
  c.backoff_base_ms = opt_number(L, "backoff_base", 0.5, 0, 3600) * 1000;
  c.backoff_max_ms = opt_number(L, "backoff_max", 8, 0, 3600) * 1000;
  c.max_retry_after_ms = opt_number(L, "max_retry_after", 60, 0, 86400) * 1000;
  c.rate_max = (int)opt_number(L, "rate_max", 0, 0, 100000);
  c.rate_interval_ms = (long)(opt_number(L, "rate_interval", 10, 0.001, 86400) * 1000);
  t = cp_newuserdata(L, sizeof(cp_transport));
  memset(t, 0, sizeof(*t));
  t->closed = 1; /* until opened: __gc then has nothing to free */
  luaL_setmetatable(L, CLIENT_MT);
  if (cp_transport_open(t, &c, &err) != 0) luaL_error(L, "commprefs.core.new: %s", err);
  return 1;
}

static int client_perform(lua_State *L) {
  return cp_transport_perform(L, check_open(L));
}

static int client_close(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  if (t->active) luaL_error(L, "commprefs: close called from a callback of the running client");
  cp_transport_close(t);
  return 0;
}

static int client_gc(lua_State *L) {
  cp_transport_close(luaL_checkudata(L, 1, CLIENT_MT));
  return 0;
}

static int client_tostring(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  lua_pushfstring(L, "commprefs.core.client (%s%p)", t->closed ? "closed, " : "", (void *)t);
  return 1;
}

static void set_int(lua_State *L, const char *k, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}

/* client:stats() -> {sent=, retries=, throttled=, rate_max=, rate_interval_ms=} */
static int client_stats(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  lua_createtable(L, 0, 5);
  set_int(L, "sent", t->sent);
  set_int(L, "retries", t->retries);
  set_int(L, "throttled", t->throttled);
  set_int(L, "rate_max", t->rl.max);
  set_int(L, "rate_interval_ms", t->rl.interval_ms);
  return 1;
}

/* core.now() -> wall-clock seconds with sub-millisecond precision */
static int core_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, ts.tv_sec + ts.tv_nsec / 1e9);
  return 1;
}

static const luaL_Reg client_methods[] = {
  {"perform", client_perform}, {"close", client_close}, {"stats", client_stats}, {NULL, NULL}};

/* A private lua-cjson instance: cjson.new(), strict about numbers. */
static void push_private_cjson(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "new");
  lua_call(L, 0, 1);
  lua_remove(L, -2);
  lua_getfield(L, -1, "decode_invalid_numbers");
  lua_pushboolean(L, 0);
  lua_call(L, 1, 0);
  lua_getfield(L, -1, "encode_sparse_array"); /* sparse arrays are a caller's bug: raise */
  lua_pushboolean(L, 1);
  lua_pushinteger(L, 0);
  lua_pushinteger(L, 0);
  lua_call(L, 3, 0);
}

int luaopen_commprefs_core(lua_State *L) {
  static const luaL_Reg plain[] = {
    {"new", core_new}, {"now", core_now}, {"escape", cp_escape}, {"has_control", cp_has_control}, {NULL, NULL}};
  static int curl_ready = 0; /* curl_global_init once per process */
  if (!curl_ready) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return luaL_error(L, "curl_global_init failed");
    curl_ready = 1;
  }
  cp_register_class(L, CLIENT_MT, client_methods, client_gc, client_tostring);
  luaL_newlib(L, plain);
  cp_register_journal(L);
  cp_register_http1(L);
  push_private_cjson(L);               /* module, cjson */
  lua_getfield(L, -1, "encode");
  lua_pushcclosure(L, cp_encode, 1);
  lua_setfield(L, -3, "encode");
  lua_getfield(L, -1, "decode");
  lua_getfield(L, -2, "null");
  lua_pushcclosure(L, cp_decode, 2);
  lua_setfield(L, -3, "decode");
  lua_pop(L, 1);
  lua_pushliteral(L, VERSION);
  lua_setfield(L, -2, "_VERSION");
  /* curl_version_info, not curl_version: the latter initialises libldap's SASL
   * globals, which are lost when Lua unloads the module */
  lua_pushfstring(L, "libcurl/%s", curl_version_info(CURLVERSION_NOW)->version);
  lua_setfield(L, -2, "curl_version");
  return 1;
}
