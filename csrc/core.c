/* core.c: owns the module commprefs.core: luaopen, the libcurl client
 * userdata (core.new: a transport over a governor; perform, perform_one,
 * answer_one, governor, close)
 * and the registration of the other parts (governor, policy, limits, codecs with
 * their private lua-cjson instance, journal, http1, resp, redis). */
#define _POSIX_C_SOURCE 200809L
#include <string.h>
#include <time.h>
#include "codec.h"
#include "transport.h"
#include "headers.h"
#include "redis.h"

void cp_register_journal(lua_State *L); /* journal.c */
void cp_register_http1(lua_State *L);   /* http1.c */

#define CLIENT_MT "commprefs.core.client"
#define VERSION "0.1.0"

static cp_transport *check_open(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  if (t->closed) luaL_error(L, "commprefs: the client is closed");
  return t;
}

/* core.new(config[, governor]) -> client | nil, message. The client sends over
 * libcurl and drives `governor` (made from config when not given: then a
 * Redis backing that cannot be reached is nil, message). The token is kept
 * only inside libcurl's header lists. */
static int core_new(lua_State *L) {
  cp_config c;
  cp_transport *t;
  cp_governor *g;
  const char *err;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 2);
  cp_config_read(L, 1, "commprefs.core.new", &c);
  if ((!c.token || !*c.token) && !c.form_body) luaL_error(L, "commprefs.core.new: token is required");
  if (lua_isnil(L, 2)) {
    lua_settop(L, 1);
    if (cp_push_governor(L, 1, "commprefs.core.new") == 2) return 2;
  }
  g = cp_check_governor(L, 2);
  t = cp_newuserdata(L, sizeof(cp_transport));
  memset(t, 0, sizeof(*t));
  t->closed = 1; /* until opened: __gc then has nothing to free */
  t->gov_ref = LUA_NOREF;
  t->renew_ref = LUA_NOREF;
  luaL_setmetatable(L, CLIENT_MT);
  if (cp_transport_open(t, g, &c, &err) != 0) luaL_error(L, "commprefs.core.new: %s", err);
  lua_pushvalue(L, 2);
  t->gov_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* the governor lives as long as the client */
  return 1;
}

static int client_perform(lua_State *L) {
  return cp_transport_perform(L, check_open(L), PERFORM_MANY, NULL);
}

/* client:perform_one(request[, deadline]) -> result, stop reason: perform of
 * the one request, without the array around it or around the results. */
static int client_perform_one(lua_State *L) {
  return cp_transport_perform(L, check_open(L), SINGLE_RESULT, NULL);
}

/* client:answer_one(method, url, body[, deadline]) -> envelope, body, escaped
 * | nil, result: perform_one of that request (no table made for it), with a
 * 2xx JSON answer decoded in the same call
 * (upvalues: the private cjson's decode and null, as core.decode's). */
static int client_answer_one(lua_State *L) {
  cp_decoder dec;
  dec.fn = lua_upvalueindex(1);
  dec.null = lua_touserdata(L, lua_upvalueindex(2));
  return cp_transport_perform(L, check_open(L), SINGLE_ANSWER, &dec);
}

/* Adds answer_one, a closure over the private cjson's decode and null (on
 * the stack's top), to the client methods. */
static void register_answer_one(lua_State *L) {
  luaL_getmetatable(L, CLIENT_MT);
  lua_getfield(L, -1, "__index");
  lua_pushvalue(L, -4);
  lua_pushvalue(L, -4);
  lua_pushcclosure(L, client_answer_one, 2);
  lua_setfield(L, -2, "answer_one");
  lua_pop(L, 2);
}

/* client:set_token(token[, due_in_s]) -> true: later attempts send it; a
 * token with spaces, control characters or over CP_MAX_TOKEN_BYTES raises.
 * Callable inside perform (from its callbacks). due_in_s: after that long,
 * the renewer is called before the next attempt starts. */
static int client_set_token(lua_State *L) {
  cp_transport *t = check_open(L);
  size_t len;
  const char *token = luaL_checklstring(L, 2, &len);
  size_t i;
  if (len == 0 || len > CP_MAX_TOKEN_BYTES) luaL_argerror(L, 2, "a token of 1 to max_token_bytes bytes expected");
  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)token[i];
    if (ch <= 32 || ch == 127) luaL_argerror(L, 2, "a token without spaces or control characters expected");
  }
  if (cp_transport_set_token(t, token, luaL_optnumber(L, 3, 0) * 1000.0) != 0) luaL_error(L, "commprefs: out of memory");
  lua_pushboolean(L, 1);
  return 1;
}

/* client:set_renewer(fn | nil): fn() is called when the token is due (it calls set_token). */
static int client_set_renewer(lua_State *L) {
  cp_transport *t = check_open(L);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  luaL_unref(L, LUA_REGISTRYINDEX, t->renew_ref);
  t->renew_ref = lua_isnil(L, 2) ? LUA_NOREF : luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* client:drop_connections() -> true | nil when it cannot (inside perform) */
static int client_drop_connections(lua_State *L) {
  if (cp_transport_drop_connections(check_open(L)) != 0) return 0;
  lua_pushboolean(L, 1);
  return 1;
}

/* client:governor() -> the governor it drives */
static int client_governor(lua_State *L) {
  cp_transport *t = check_open(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->gov_ref);
  return 1;
}

/* core.sane_window(max, interval_ms) -> max, interval_ms | nil */
static int core_sane_window(lua_State *L) {
  lua_Number m = luaL_checknumber(L, 1), iv = luaL_checknumber(L, 2);
  if (m != (long)m || iv != (long)iv || !cp_sane_window((long)m, (long)iv)) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushinteger(L, (lua_Integer)m);
  lua_pushinteger(L, (lua_Integer)iv);
  return 2;
}

static int core_window_margin_ms(lua_State *L) {
  lua_pushnumber(L, cp_rl_margin_ms((long)luaL_checknumber(L, 1)));
  return 1;
}

/* core.retry_after(header_value) -> seconds | nil (the one Retry-After rule) */
static int core_retry_after(lua_State *L) {
  double s = cp_parse_retry_after(luaL_checkstring(L, 1));
  if (s < 0) lua_pushnil(L);
  else lua_pushinteger(L, (lua_Integer)s);
  return 1;
}

/* core.caught_signal() -> the signal number that stopped the last perform, or nil */
static int core_caught_signal(lua_State *L) {
  int sig = cp_caught_signal();
  if (sig) lua_pushinteger(L, sig);
  else lua_pushnil(L);
  return 1;
}

/* core.trap_signals(on): true keeps SIGINT/SIGTERM caught (flag cleared) until
 * core.trap_signals(false) restores their default action; core.caught_signal() reads it. */
static int core_trap_signals(lua_State *L) {
  cp_trap_signals(lua_toboolean(L, 1));
  return 0;
}

static void client_release(lua_State *L, cp_transport *t) {
  cp_transport_close(t);
  luaL_unref(L, LUA_REGISTRYINDEX, t->renew_ref);
  t->renew_ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, t->gov_ref);
  t->gov_ref = LUA_NOREF;
}

static int client_close(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  if (t->active) luaL_error(L, "commprefs: close called from a callback of the running client");
  client_release(L, t);
  return 0;
}

static int client_gc(lua_State *L) {
  client_release(L, luaL_checkudata(L, 1, CLIENT_MT));
  return 0;
}

static int client_tostring(lua_State *L) {
  cp_transport *t = luaL_checkudata(L, 1, CLIENT_MT);
  lua_pushfstring(L, "commprefs.core.client (%s%p)", t->closed ? "closed, " : "", (void *)t);
  return 1;
}

/* core.error_type(mt): the metatable of the errors the core returns (commprefs.Error). */
static int core_error_type(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, CP_ERROR_TYPE);
  return 0;
}

/* The fallback error's __tostring, for the core used without the Lua layer. */
static int core_error_tostring(lua_State *L) {
  lua_getfield(L, 1, "message");
  lua_pushfstring(L, "commprefs: redis: %s", lua_isstring(L, -1) ? lua_tostring(L, -1) : "(no message)");
  return 1;
}

static void register_error_fallback(lua_State *L) {
  if (luaL_newmetatable(L, CP_CORE_ERROR_MT)) {
    lua_pushcfunction(L, core_error_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}

/* core.now() -> wall-clock seconds with sub-millisecond precision */
static int core_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, ts.tv_sec + ts.tv_nsec / 1e9);
  return 1;
}

static const luaL_Reg client_methods[] = {
  {"perform", client_perform}, {"perform_one", client_perform_one}, {"close", client_close}, {"governor", client_governor},
  {"drop_connections", client_drop_connections}, {"set_token", client_set_token}, {"set_renewer", client_set_renewer}, {NULL, NULL}};

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
    {"new", core_new}, {"now", core_now}, {"escape", cp_escape}, {"escape_id", cp_escape_id}, {"has_control", cp_has_control},
    {"sane_window", core_sane_window}, {"window_margin_ms", core_window_margin_ms},
    {"retry_after", core_retry_after}, {"caught_signal", core_caught_signal},
    {"trap_signals", core_trap_signals}, {"error_type", core_error_type}, {NULL, NULL}};
  static int curl_ready = 0; /* curl_global_init once per process */
  if (!curl_ready) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return luaL_error(L, "curl_global_init failed");
    curl_ready = 1;
  }
  cp_register_class(L, CLIENT_MT, client_methods, client_gc, client_tostring);
  register_error_fallback(L);
  luaL_newlib(L, plain);
  cp_register_suspects(L);
  cp_register_journal(L);
  cp_register_http1(L);
  cp_register_resp(L);
  cp_register_redis(L);
  cp_register_policy(L);   /* before the governor: its methods hold the policy's metatable */
  cp_register_governor(L);
  cp_register_limits(L);
  push_private_cjson(L);               /* module, cjson */
  lua_getfield(L, -1, "encode");
  lua_pushcclosure(L, cp_encode, 1);
  lua_setfield(L, -3, "encode");
  lua_getfield(L, -1, "decode");
  lua_getfield(L, -2, "null");
  register_answer_one(L);
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
