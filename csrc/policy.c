/* policy.c: owns a client's call policy and the retry rule both
 * transports follow: which outcomes are retried (429, 423 after at least
 * 2 s, 5xx, 408, network errors and timeouts; never other 4xx, HubSpot's 477
 * "migration in progress", TLS failures, too-large answers or the daily
 * limit), the delay before a retry (a valid Retry-After, else exponential
 * backoff with jitter, so a 5xx without Retry-After never retries at once),
 * how long a 429 holds the window, and each attempt's timeouts within a
 * call's deadline. A policy is per client (max_retries, backoff, timeouts,
 * max_response_size, verify_tls, user_agent); what clients of one app share
 * (the window, its lessons, the counts) is the governor's (governor.c), and
 * the window arithmetic ratelimit.c's. Also the commprefs.core.policy
 * userdata through which the cosocket transport hands a client's policy to
 * the shared governor with each attempt. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "policy.h"
#include "util.h"

#define POLICY_MT CP_POLICY_MT

int cp_policy_init(cp_policy *p, const cp_config *c, const void *seed) {
  memset(p, 0, sizeof(*p));
  p->max_retries = (int)c->max_retries;
  p->backoff_base_ms = c->backoff_base * 1000;
  p->backoff_max_ms = c->backoff_max * 1000;
  p->max_retry_after_ms = c->max_retry_after * 1000;
  p->rng = (unsigned long long)time(NULL) ^ ((unsigned long long)(size_t)seed << 16) ^ 0x9E3779B97F4A7C15ULL;
  p->timeout_ms = (long)(c->timeout * 1000);
  p->connect_timeout_ms = (long)(c->connect_timeout * 1000);
  p->max_response = (long)c->max_response_size;
  p->verify_tls = c->verify_tls;
  p->user_agent = malloc(strlen(c->user_agent) + 1); /* cp_config_read gives the default one */
  if (!p->user_agent) return -1;
  strcpy(p->user_agent, c->user_agent);
  return 0;
}

void cp_policy_free(cp_policy *p) {
  free(p->user_agent);
  p->user_agent = NULL;
}

long cp_policy_attempt_timeout(const cp_policy *p, double now, double deadline, long *connect_ms) {
  long total = p->timeout_ms, connect = p->connect_timeout_ms;
  if (deadline > 0) {
    double left = deadline - now;
    if (left < 1) return 0;
    if (left < total) total = (long)left;
  }
  if (connect > total) connect = total;
  if (connect_ms) *connect_ms = connect;
  return total;
}

static double uniform(cp_policy *p) { /* xorshift64* */
  p->rng ^= p->rng >> 12;
  p->rng ^= p->rng << 25;
  p->rng ^= p->rng >> 27;
  return (double)((p->rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

double cp_policy_backoff_ms(cp_policy *p, int attempt) {
  double d = p->backoff_base_ms;
  int i;
  for (i = 1; i < attempt && d < p->backoff_max_ms; i++) d *= 2;
  if (d > p->backoff_max_ms) d = p->backoff_max_ms;
  return d / 2 + uniform(p) * d / 2;
}

int cp_sane_window(long max, long interval_ms) {
  return max >= CP_SANE_MAX_MIN && max <= CP_SANE_MAX_MAX &&
         interval_ms >= CP_SANE_INTERVAL_MIN_MS && interval_ms <= CP_SANE_INTERVAL_MAX_MS;
}

static int retryable_failure(const cp_outcome *o) {
  if (o->fatal || !o->kind) return 0;
  return strcmp(o->kind, "network") == 0 || strcmp(o->kind, "timeout") == 0;
}

/* A 429: hold every send for Retry-After, else for a free slot of the known
 * window or the backoff, whichever is longer (a garbage Retry-After never
 * shrinks the window). With the window known, a first 429 is most likely a
 * few ms of clock skew at the window's edge: it holds sends for a twentieth
 * of the interval (jittered), not a whole backoff. */
static double throttled_delay(cp_policy *p, cp_ratelimit *rl, const cp_outcome *o, double now) {
  double wait;
  if (o->retry_after_ms > 0) return o->retry_after_ms;
  if (rl->max > 0 && o->attempts <= 1) {
    double edge = rl->interval_ms / 20.0;
    wait = edge / 2 + uniform(p) * edge / 2;
  } else {
    wait = cp_policy_backoff_ms(p, o->attempts);
  }
  if (rl->max > 0) {
    double slot = cp_rl_wait(rl, now);
    if (slot > wait) wait = slot;
  }
  return wait;
}

int cp_policy_decide(cp_policy *p, cp_ratelimit *rl, cp_outcome *o, double now, double *delay_ms) {
  *delay_ms = 0;
  o->daily_limit = 0;
  if (o->status <= 0) {
    if (!retryable_failure(o)) return 0;
    *delay_ms = cp_policy_backoff_ms(p, o->attempts);
  } else {
    if (o->status == 429) {
      if (o->daily_remaining == 0) { /* not worth retrying before the account's midnight */
        o->daily_limit = 1;
        return 0;
      }
      if (rl->max > 0 && o->retry_after_ms <= 0) cp_rl_skewed(rl, now, o->sent_at);
      *delay_ms = throttled_delay(p, rl, o, now);
      cp_rl_throttled(rl, now, *delay_ms);
    } else if (o->status == 423) { /* HubSpot: "locks last 2 seconds, include a delay of at least 2 seconds" */
      *delay_ms = cp_policy_backoff_ms(p, o->attempts);
      if (o->retry_after_ms > *delay_ms) *delay_ms = o->retry_after_ms;
      if (*delay_ms < CP_LOCKED_MIN_DELAY_MS) *delay_ms = CP_LOCKED_MIN_DELAY_MS + uniform(p) * 250;
    } else if (o->status == 477) { /* migration in progress: hours; the caller stops (commprefs.ops) */
      return 0;
    } else if (o->status >= 500 || o->status == 408) { /* 408: the server (or a proxy) gave up waiting */
      *delay_ms = o->retry_after_ms > 0 ? o->retry_after_ms : cp_policy_backoff_ms(p, o->attempts);
    } else {
      return 0;
    }
    if (o->retry_after_ms > p->max_retry_after_ms) return 0;
  }
  return o->attempts <= p->max_retries;
}

/* ------------------------------------------------------------ Lua */

static const char POLICY_KEY = 0; /* the registry key of the metatable (cp_register_key) */

cp_policy *cp_check_policy(lua_State *L, int idx) {
  cp_policy *p = cp_checkudata(L, idx, &POLICY_KEY, POLICY_MT);
  if (!p->user_agent) luaL_error(L, "commprefs: the policy is closed");
  return p;
}

void cp_policy_settings(lua_State *L, const cp_policy *p) {
  cp_set_integer(L, "timeout_ms", p->timeout_ms);
  cp_set_integer(L, "connect_timeout_ms", p->connect_timeout_ms);
  lua_pushboolean(L, p->verify_tls);
  lua_setfield(L, -2, "verify_tls");
  cp_set_string(L, "user_agent", p->user_agent);
  cp_set_integer(L, "max_response_size", p->max_response);
  cp_set_integer(L, "max_retries", p->max_retries);
}

/* core.policy(config[, fname]): config as core.governor reads it; only the
 * per-client options count (cp_policy). */
static int core_policy(lua_State *L) {
  cp_config c;
  cp_policy *p;
  const char *fname = luaL_optstring(L, 2, "commprefs.core.policy");
  luaL_checktype(L, 1, LUA_TTABLE);
  cp_config_read(L, 1, fname, &c);
  p = cp_newuserdata(L, sizeof(cp_policy));
  memset(p, 0, sizeof(*p)); /* user_agent NULL: __gc has nothing to free */
  luaL_setmetatable(L, POLICY_MT);
  if (cp_policy_init(p, &c, p) != 0) return luaL_error(L, "%s: out of memory", fname);
  return 1;
}

/* p:settings() -> {timeout_ms=, connect_timeout_ms=, verify_tls=, user_agent=, max_response_size=, max_retries=} */
static int policy_settings(lua_State *L) {
  cp_policy *p = cp_check_policy(L, 1);
  lua_createtable(L, 0, 6);
  cp_policy_settings(L, p);
  return 1;
}

static int policy_gc(lua_State *L) {
  cp_policy_free(luaL_checkudata(L, 1, POLICY_MT));
  return 0;
}

static int policy_tostring(lua_State *L) {
  lua_pushfstring(L, POLICY_MT " (%p)", lua_touserdata(L, 1));
  return 1;
}

void cp_register_policy(lua_State *L) {
  static const luaL_Reg methods[] = {{"settings", policy_settings}, {"close", policy_gc}, {NULL, NULL}};
  cp_register_class(L, POLICY_MT, methods, policy_gc, policy_tostring);
  cp_register_key(L, POLICY_MT, &POLICY_KEY);
  lua_pushcfunction(L, core_policy);
  lua_setfield(L, -2, "policy");
}
