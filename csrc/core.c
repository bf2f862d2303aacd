/* core.c: owns the module commprefs.core: luaopen, the client userdata
 * (config, __gc, __close, __tostring, close, stats) and the registration of
 * the codec functions with their private lua-cjson instance. */
#define _POSIX_C_SOURCE 200809L
#include <string.h>
#include <time.h>
#include "codec.h"
#include "transport.h"
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

/* The shared budget of redis_url/redis_key (csrc/redis.c) for client t at
 * the top of the stack. Returns 1 (the client), or 2 (nil, message) when
 * Redis cannot be reached or refuses us: a runtime failure. A bad URL or key
 * raises. redis_timeout: connect and command timeout (s, default 2);
 * redis_wait: how long a lost Redis is waited for mid-job (s, default 30). */
static int open_redis_budget(lua_State *L, cp_transport *t) {
  const char *url = opt_string(L, "redis_url", NULL), *key = opt_string(L, "redis_key", NULL), *err = NULL;
  double timeout_s = opt_number(L, "redis_timeout", 2, 0.001, 3600);
  double wait_s = opt_number(L, "redis_wait", CP_REDIS_DEFAULT_WAIT_S, 0, 86400);
  cp_budget b;
  int rc;
  if (!url) return 1;
  if (!key) return luaL_error(L, "commprefs.core.new: redis_key is required with redis_url");
  rc = cp_redis_budget_open(&b, url, key, timeout_s, &err);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    b.close(b.ud);
    if (rc == -2) return luaL_error(L, "commprefs.core.new: %s", lua_tostring(L, -1));
    return 2;
  }
  cp_redis_budget_wait(&b, wait_s);
  if (t->rl.manual) b.learn(b.ud, t->rl.max, t->rl.interval_ms); /* limits set by hand: for everyone */
  t->budget = b;
  return 1;
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
  c.max_concurrency = (int)opt_number(L, "max_concurrency", 0, 0, 256); /* 0: adaptive */
  c.max_response = (long)opt_number(L, "max_response_size", (double)CP_DEFAULT_MAX_RESPONSE, 1024, 1073741824.0);
  lua_getfield(L, 1, "handle_signals");
  c.handle_signals = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 1);
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
  return open_redis_budget(L, t);
}

static int client_perform(lua_State *L) {
  return cp_transport_perform(L, check_open(L));
}

/* ---- C1: the policy and the window, for transports written in Lua ---- */

static long field_long(lua_State *L, int idx, const char *k) {
  long v = -1;
  lua_getfield(L, idx, k);
  if (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) >= 0) v = (long)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* client:decide(result[, on_wire]) -> retry, delay_ms (sets result.daily_limit = true when so).
 * on_wire = false: the attempt never went on the wire (h:pace_unsent was called). */
static int client_decide(lua_State *L) {
  cp_transport *t = check_open(L);
  cp_outcome o;
  double delay;
  int retry;
  luaL_checktype(L, 2, LUA_TTABLE);
  memset(&o, 0, sizeof(o));
  o.status = field_long(L, 2, "status");
  if (o.status < 0) o.status = 0;
  lua_getfield(L, 2, "kind");
  o.kind = lua_tostring(L, -1); /* kept alive by the result table */
  lua_pop(L, 1);
  if (o.status == 0 && !o.kind) luaL_argerror(L, 2, "a result with status or kind expected");
  o.attempts = (int)field_long(L, 2, "attempts");
  if (o.attempts < 1) o.attempts = 1;
  o.retry_after_ms = field_long(L, 2, "retry_after");
  if (o.retry_after_ms >= 0) o.retry_after_ms *= 1000.0;
  o.rate_max = field_long(L, 2, "rate_max");
  o.rate_interval_ms = field_long(L, 2, "rate_interval_ms");
  o.daily_remaining = field_long(L, 2, "daily_remaining");
  if (lua_isnoneornil(L, 3) || lua_toboolean(L, 3))
    cp_rl_answered(&t->rl); /* the attempt h:pace_sent announced has ended */
  retry = cp_transport_decide(t, &o, &delay);
  if (retry) t->retries++; /* as transport.c's finish() counts for libcurl */
  if (o.daily_limit) {
    lua_pushboolean(L, 1);
    lua_setfield(L, 2, "daily_limit");
  }
  lua_pushboolean(L, retry);
  lua_pushnumber(L, delay);
  return 2;
}

#define DAILY_POLL_MS 10 /* while the day's last requests are on the wire */

/* client:pace_wait() -> ms (0: send now)[, "daily_limit" once HubSpot's daily limit is spent
 * and nothing is on the wire]. The daily rules of transport.c's start_ready: no new start
 * without room for it, and no stop while answers may still say some remain. */
static int client_pace_wait(lua_State *L) {
  cp_transport *t = check_open(L);
  double w = cp_rl_wait(&t->rl, cp_now_ms());
  if (cp_rl_daily_spent(&t->rl) && t->rl.on_wire == 0) {
    lua_pushnumber(L, w);
    lua_pushliteral(L, "daily_limit");
    return 2;
  }
  if (!cp_rl_daily_room(&t->rl) && w < DAILY_POLL_MS) w = DAILY_POLL_MS;
  lua_pushnumber(L, w);
  return 1;
}

static int client_pace_start(lua_State *L) { cp_rl_start(&check_open(L)->rl); return 0; }
static int client_pace_unsent(lua_State *L) { cp_rl_unsent(&check_open(L)->rl); return 0; }
static int client_pace_sent(lua_State *L) {
  cp_transport *t = check_open(L);
  cp_rl_sent(&t->rl, cp_now_ms());
  t->sent++;
  return 0;
}

static int client_in_flight_target(lua_State *L) {
  lua_pushinteger(L, cp_transport_target(check_open(L)));
  return 1;
}

static int client_observe_latency(lua_State *L) {
  cp_transport_observe_latency(check_open(L), luaL_checknumber(L, 2));
  return 0;
}

/* client:settings() -> what a transport needs (never the token) */
static int client_settings(lua_State *L) {
  cp_transport *t = check_open(L);
  lua_createtable(L, 0, 9);
  lua_pushinteger(L, t->timeout_ms); lua_setfield(L, -2, "timeout_ms");
  lua_pushinteger(L, t->connect_timeout_ms); lua_setfield(L, -2, "connect_timeout_ms");
  lua_pushboolean(L, t->verify_tls); lua_setfield(L, -2, "verify_tls");
  lua_pushstring(L, t->user_agent); lua_setfield(L, -2, "user_agent");
  if (t->ca_file) { lua_pushstring(L, t->ca_file); lua_setfield(L, -2, "ca_file"); }
  lua_pushinteger(L, t->max_response); lua_setfield(L, -2, "max_response_size");
  if (t->max_concurrency) { lua_pushinteger(L, t->max_concurrency); lua_setfield(L, -2, "max_concurrency"); }
  if (t->rl.max > 0) { lua_pushinteger(L, t->rl.max); lua_setfield(L, -2, "rate_max"); }
  lua_pushinteger(L, t->rl.interval_ms); lua_setfield(L, -2, "rate_interval_ms");
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
  set_int(L, "in_flight_target", cp_transport_target(t));
  lua_pushnumber(L, t->latency_ms);
  lua_setfield(L, -2, "latency_ms");
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
  {"perform", client_perform}, {"close", client_close}, {"stats", client_stats},
  {"decide", client_decide}, {"pace_wait", client_pace_wait}, {"pace_start", client_pace_start},
  {"pace_sent", client_pace_sent}, {"pace_unsent", client_pace_unsent},
  {"in_flight_target", client_in_flight_target}, {"observe_latency", client_observe_latency},
  {"settings", client_settings}, {NULL, NULL}};

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
    {"new", core_new}, {"now", core_now}, {"escape", cp_escape}, {"has_control", cp_has_control},
    {"sane_window", core_sane_window}, {"window_margin_ms", core_window_margin_ms},
    {"retry_after", core_retry_after}, {"caught_signal", core_caught_signal},
    {"trap_signals", core_trap_signals}, {NULL, NULL}};
  static int curl_ready = 0; /* curl_global_init once per process */
  if (!curl_ready) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return luaL_error(L, "curl_global_init failed");
    curl_ready = 1;
  }
  cp_register_class(L, CLIENT_MT, client_methods, client_gc, client_tostring);
  luaL_newlib(L, plain);
  cp_register_journal(L);
  cp_register_http1(L);
  cp_register_resp(L);
  cp_register_redis(L);
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
