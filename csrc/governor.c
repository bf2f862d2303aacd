/* governor.c: owns the attempt lifecycle (governor.h): the daily and new-day
 * rules, what a window may learn (sane, and never over a window set by hand),
 * what a shared backing is told, the in-flight target and every count of
 * stats(); and the commprefs.core.governor userdata through which transports
 * written in Lua drive it. A governor is what clients of one app share; the
 * retry decision and each attempt's timeouts are the calling client's policy
 * (policy.c), the window arithmetic ratelimit.c's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "governor.h"
#include "redis.h"
#include "util.h"

#define GOV_MT "commprefs.core.governor"
#define DAILY_POLL_MS 10.0 /* while the day's last requests are on the wire */

int cp_gov_init(cp_governor *g, const cp_config *c) {
  memset(g, 0, sizeof(*g));
  g->max_concurrency = (int)c->max_concurrency;
  g->deadline_ms = c->deadline * 1000;
  if (cp_policy_init(&g->policy, c, g) != 0) {
    g->closed = 1;
    return -1;
  }
  if (cp_rl_init(&g->rl, c->rate_set ? (int)c->rate_max : 0, (long)(c->rate_interval * 1000)) != 0) {
    cp_policy_free(&g->policy);
    g->closed = 1;
    return -1;
  }
  return 0;
}

void cp_gov_free(cp_governor *g) {
  if (g->closed) return;
  g->closed = 1;
  cp_rl_free(&g->rl);
  cp_policy_free(&g->policy);
  if (g->backing.close) g->backing.close(g->backing.ud);
  memset(&g->backing, 0, sizeof(g->backing));
}

/* HubSpot's day ends at the account's midnight, which no header gives: a new
 * call made while nothing is in flight forgets what Daily-Remaining said (its
 * first answer tells again). */
void cp_gov_new_call(cp_governor *g) {
  if (g->rl.on_wire == 0 && g->rl.pending == 0) g->rl.daily_left = -1;
}

static double next_window(cp_governor *g, double now, const char **stop, const char **why);

double cp_gov_deadline(const cp_governor *g, double now, double seconds) {
  if (seconds > 0) return now + seconds * 1000;
  return g->deadline_ms > 0 ? now + g->deadline_ms : 0;
}

/* Whether waiting w ms from now would reach the deadline (0: none). */
static int past_deadline(double now, double w, double deadline) {
  return deadline > 0 && now + (w > 0 ? w : 0) >= deadline - 1;
}

double cp_gov_next(cp_governor *g, double now, double deadline, const char **stop, const char **why) {
  double w;
  *stop = NULL;
  *why = NULL;
  if (past_deadline(now, 0, deadline)) {
    *stop = "deadline";
    return -1;
  }
  w = next_window(g, now, stop, why);
  if (!*stop && w > 0 && past_deadline(now, w, deadline)) {
    *stop = "deadline";
    return -1;
  }
  return w;
}

/* Before any attempt has ended and with no window known (learned or set by
 * hand), no max_concurrency and no shared budget (whose participants may
 * know the window already): the start rule of cp_limits.h (CP_PROBE_MS). */
static int at_start(const cp_governor *g) {
  return g->finished == 0 && g->rl.max <= 0 && g->max_concurrency == 0 && !g->backed && !g->backing.acquire;
}

/* When the start rule lets the next attempt start (0: no rule applies). */
static double start_due(const cp_governor *g) {
  double due;
  if (!at_start(g) || g->early_starts == 0) return 0;
  due = g->first_start_ms + CP_PROBE_MS;
  if (g->last_start_ms + CP_PROVISIONAL_SPACING_MS > due) due = g->last_start_ms + CP_PROVISIONAL_SPACING_MS;
  return due;
}

/* ms until the start rule lets one more attempt start; -1 when it holds
 * none back (the transports wake for it: the target grows then). */
double cp_gov_start_wake(const cp_governor *g, double now) {
  double due = start_due(g);
  if (due <= 0 || g->early_starts >= CP_PROVISIONAL_MAX) return -1;
  return due > now ? due - now : 0;
}

/* cp_gov_next without a deadline: the daily rules, the window, the C backing. */
static double next_window(cp_governor *g, double now, const char **stop, const char **why) {
  double w;
  if (cp_rl_daily_spent(&g->rl)) {
    if (g->rl.on_wire > 0) return DAILY_POLL_MS; /* their answers may say some remain */
    *stop = "daily_limit";
    return -1;
  }
  if (!cp_rl_daily_room(&g->rl)) return DAILY_POLL_MS; /* what is left of the day is on its way */
  w = cp_rl_wait(&g->rl, now);
  if (at_start(g) && g->early_starts > 0) {
    double s = g->early_starts >= CP_PROVISIONAL_MAX ? CP_PROBE_MS : start_due(g) - now; /* the rest: after an answer */
    if (s > w) w = s;
  }
  if (w > 0 || !g->backing.acquire) return w;
  w = g->backing.acquire(g->backing.ud, why);
  if (w < 0) {
    *stop = "budget";
    if (!*why) *why = "the shared budget is gone";
  }
  return w;
}

void cp_gov_begin(cp_governor *g) {
  double now = cp_now_ms();
  if (at_start(g)) {
    if (g->early_starts == 0) g->first_start_ms = now;
    g->early_starts++;
    g->last_start_ms = now;
  }
  cp_rl_start(&g->rl, now);
}

void cp_gov_on_wire(cp_governor *g, double now) {
  cp_rl_sent(&g->rl, now);
  g->sent++;
}

void cp_gov_unsent(cp_governor *g) { cp_rl_unsent(&g->rl); }

void cp_gov_paced(cp_governor *g, double ms) {
  if (!(ms > 1)) return; /* under a millisecond: no wait worth telling */
  g->m.paced++;
  g->m.paced_s += ms / 1000.0;
}

void cp_gov_resent(cp_governor *g, double now) {
  cp_rl_record(&g->rl, now);
  g->sent++;
  g->retries++;
}

void cp_gov_abandon(cp_governor *g, int on_wire) {
  g->finished++;
  if (on_wire) cp_rl_answered(&g->rl);
  else cp_rl_unsent(&g->rl);
}

static void observe_latency(cp_governor *g, double ms) {
  if (!(ms >= 0)) return;
  g->latency_ms = g->latency_ms > 0 ? 0.8 * g->latency_ms + 0.2 * ms : ms;
}

/* The one rule of learning: a sane window, never over one set by hand. */
static int learn_window(cp_governor *g, const cp_outcome *o) {
  if (g->rl.manual || !cp_sane_window(o->rate_max, o->rate_interval_ms)) return 0;
  cp_rl_learn(&g->rl, o->rate_max, o->rate_interval_ms);
  return 1;
}

static void tell_backing(cp_governor *g, const cp_decision *d) {
  if (d->learn_max > 0 && g->backing.learn) g->backing.learn(g->backing.ud, d->learn_max, d->learn_interval_ms, 0);
  if (d->hold_ms >= 0 && g->backing.throttled) g->backing.throttled(g->backing.ud, d->hold_ms);
}

static void count_outcome(cp_metrics *m, const cp_outcome *o, int on_wire, double latency_ms) {
  static const double bounds[] = CP_DURATION_BUCKETS;
  static const char *kinds[] = CP_KINDS;
  int i;
  if (o->status >= 100 && o->status <= 599) m->by_status[o->status - 100]++;
  else if (o->status <= 0) {
    for (i = 0; i < CP_NKINDS && !(o->kind && strcmp(o->kind, kinds[i]) == 0); i++) {}
    m->by_kind[i]++;
  }
  if (o->status <= 0 || !on_wire || !(latency_ms >= 0)) return;
  for (i = 0; i < CP_NBUCKETS; i++)
    if (latency_ms / 1000.0 <= bounds[i]) m->duration_count[i]++;
  m->duration_n++;
  m->duration_sum_s += latency_ms / 1000.0;
}

void cp_gov_finish(cp_governor *g, cp_policy *p, cp_outcome *o, int on_wire, double latency_ms, double deadline,
                   cp_decision *d) {
  double now;
  memset(d, 0, sizeof(*d));
  d->hold_ms = -1;
  if (on_wire) cp_rl_answered(&g->rl);
  g->finished++;
  if (o->status > 0) {
    if (on_wire) observe_latency(g, latency_ms);
    if (learn_window(g, o)) {
      d->learn_max = o->rate_max;
      d->learn_interval_ms = o->rate_interval_ms;
    }
    if (o->daily_remaining >= 0) cp_rl_daily(&g->rl, o->daily_remaining);
  }
  now = cp_now_ms();
  o->sent_at = on_wire && latency_ms >= 0 ? now - latency_ms : 0;
  d->retry = cp_policy_decide(p, &g->rl, o, now, &d->delay_ms);
  if (d->retry && past_deadline(now, d->delay_ms, deadline)) {
    d->retry = 0; /* the next attempt could not start in time: the call ends now */
    d->deadline = 1;
  }
  d->daily_limit = o->daily_limit;
  /* a 2xx: HubSpot's would carry the window (an edge's 5xx or a 429 may not) */
  if (o->status >= 200 && o->status < 300) g->answers++;
  if (o->status == 429) g->throttled++;
  if (o->daily_limit) g->m.throttled_daily++;
  count_outcome(&g->m, o, on_wire, latency_ms);
  if (o->status == 429 && !o->daily_limit) d->hold_ms = d->delay_ms;
  if (d->retry) g->retries++;
  tell_backing(g, d);
}

void cp_gov_push_deadline_result(lua_State *L, int attempts, const char *last) {
  lua_createtable(L, 0, 4);
  lua_pushliteral(L, "timeout");
  lua_setfield(L, -2, "kind");
  lua_pushliteral(L, "deadline");
  lua_setfield(L, -2, "code");
  cp_set_integer(L, "attempts", attempts);
  if (last)
    lua_pushfstring(L, "the call's deadline passed after %d attempt%s (the last: %s)", attempts,
                    attempts == 1 ? "" : "s", last);
  else
    lua_pushfstring(L, "the call's deadline passed after %d attempt%s", attempts, attempts == 1 ? "" : "s");
  lua_setfield(L, -2, "message");
}

/* One attempt until a 2xx answer has been seen (HubSpot's headers give the
 * window; a server that sends none has no window to learn), except at the
 * start of a job whose first answer is slow to come (the start rule,
 * cp_gov_next paces it); then the learned rate times the observed latency,
 * with headroom; max_concurrency caps it. */
int cp_gov_target(const cp_governor *g, int cap) {
  double need;
  if (g->max_concurrency && g->max_concurrency < cap) cap = g->max_concurrency;
  if (g->rl.max <= 0) {
    if (at_start(g) && g->early_starts > 0 && cp_now_ms() >= g->first_start_ms + CP_PROBE_MS) {
      int n = g->early_starts + 1; /* one more than started: nothing is pulled far ahead of its turn */
      if (n > CP_PROVISIONAL_MAX) n = CP_PROVISIONAL_MAX;
      return cap < n ? cap : n;
    }
    if (g->answers == 0) return 1;
    if (g->max_concurrency) return cap;
    return cap < CP_UNKNOWN_WINDOW_INFLIGHT ? cap : CP_UNKNOWN_WINDOW_INFLIGHT;
  }
  if (g->latency_ms <= 0) return g->rl.max < cap ? g->rl.max : cap;
  need = (double)g->rl.max / (g->rl.interval_ms + cp_rl_margin_ms(g->rl.interval_ms)) * g->latency_ms;
  need = need * 1.25 + 2;
  return need >= cap ? cap : (int)need;
}

int cp_gov_manual(const cp_governor *g, long *max, long *interval_ms) {
  if (!g->rl.manual) return 0;
  *max = g->rl.max;
  *interval_ms = g->rl.interval_ms;
  return 1;
}

/* ------------------------------------------------------------ Lua */

static const char GOV_KEY = 0; /* the registry key of the metatable (cp_register_key) */

cp_governor *cp_check_governor(lua_State *L, int idx) {
  cp_governor *g = cp_checkudata(L, idx, &GOV_KEY, GOV_MT);
  if (g->closed) luaL_error(L, "commprefs: the client is closed");
  return g;
}

/* The governor a method was called on (argument 1): cp_check_governor's
 * answer and errors, checked against the metatable each method holds as its
 * first upvalue (cp_register_governor) instead of one in the registry. */
static cp_governor *check_self(lua_State *L) {
  cp_governor *g = NULL;
  if (lua_type(L, 1) == LUA_TUSERDATA && lua_getmetatable(L, 1)) {
    if (lua_rawequal(L, -1, lua_upvalueindex(1))) g = lua_touserdata(L, 1);
    lua_pop(L, 1);
  }
  if (!g) g = luaL_checkudata(L, 1, GOV_MT);
  if (g->closed) luaL_error(L, "commprefs: the client is closed");
  return g;
}

/* The policy argument idx of a method (the calling client's), or the
 * governor's own when none is given (raising as cp_check_policy does),
 * checked against the policy metatable each method holds as its second
 * upvalue (cp_register_governor) instead of one in the registry. */
static cp_policy *opt_policy(lua_State *L, int idx, cp_governor *g) {
  cp_policy *p = NULL;
  if (lua_isnoneornil(L, idx)) return &g->policy;
  if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
    if (lua_rawequal(L, -1, lua_upvalueindex(2))) p = lua_touserdata(L, idx);
    lua_pop(L, 1);
  }
  return p && p->user_agent ? p : cp_check_policy(L, idx); /* a closed policy: its error */
}

/* The C Redis backing of redis_url/redis_key: 1, or 2 (nil, message) when
 * Redis cannot be reached or refuses us. A bad URL or key raises. */
static int open_backing(lua_State *L, cp_governor *g, const cp_config *c, const char *fname) {
  const char *err = NULL;
  cp_backing b;
  long max, interval;
  int rc;
  if (!c->redis_url) return 1;
  if (!c->redis_key) return luaL_error(L, "%s: bad option 'rate_limit.key' (required with rate_limit.redis)", fname);
  rc = cp_redis_budget_open(&b, c->redis_url, c->redis_key, c->redis_timeout, &err);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    b.close(b.ud);
    if (rc == -2) return luaL_error(L, "%s: %s", fname, lua_tostring(L, -1));
    return 2;
  }
  cp_redis_budget_wait(&b, c->redis_wait);
  g->backing = b;
  if (cp_gov_manual(g, &max, &interval)) b.learn(b.ud, max, interval, 1); /* set by hand: for everyone */
  return 1;
}

int cp_push_governor(lua_State *L, int idx, const char *fname) {
  cp_config c;
  cp_governor *g;
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  cp_config_read(L, idx, fname, &c);
  g = cp_newuserdata(L, sizeof(cp_governor));
  memset(g, 0, sizeof(*g));
  g->closed = 1; /* until initialised: __gc then has nothing to free */
  luaL_setmetatable(L, GOV_MT);
  if (cp_gov_init(g, &c) != 0) return luaL_error(L, "%s: out of memory", fname);
  return open_backing(L, g, &c, fname);
}

/* core.governor(config[, fname]): fname names the caller in messages (commprefs.new). */
static int core_governor(lua_State *L) {
  const char *fname = luaL_optstring(L, 2, "commprefs.core.governor");
  lua_settop(L, 1);
  return cp_push_governor(L, 1, fname);
}

static int gov_new_call(lua_State *L) {
  cp_gov_new_call(check_self(L));
  return 0;
}

/* g:next([deadline]) -> ms (0: start now) | nil, "daily_limit" | nil, "budget", why
 * | nil, "deadline" */
static int gov_next(lua_State *L) {
  const char *stop, *why;
  double w = cp_gov_next(check_self(L), cp_now_ms(), luaL_optnumber(L, 2, 0), &stop, &why);
  if (!stop) {
    lua_pushnumber(L, w);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, stop);
  if (why) lua_pushstring(L, why);
  else lua_pushnil(L);
  return 3;
}

static int gov_begin(lua_State *L) { cp_gov_begin(check_self(L)); return 0; }

/* g:try_start([deadline[, policy[, new_call]]]): g:next, g:begin and
 * g:attempt_timeout in one call, for a pacer without a shared backing (the
 * cosocket GET path); new_call: g:new_call first. Returns
 *   timeout_ms, connect_timeout_ms    the attempt has begun (as g:begin)
 *   nil, nil, ms                      wait ms first (nothing begun)
 *   nil, nil, nil, stop[, why]        g:next's stop, or "deadline" when no time is left
 *                                     for an attempt (begun, then unsent, as the
 *                                     separate calls would have it) */
static int gov_try_start(lua_State *L) {
  cp_governor *g = check_self(L);
  double deadline = luaL_optnumber(L, 2, 0);
  cp_policy *p = opt_policy(L, 3, g);
  const char *stop, *why;
  long connect = 0, total;
  double w;
  if (lua_toboolean(L, 4)) cp_gov_new_call(g);
  w = cp_gov_next(g, cp_now_ms(), deadline, &stop, &why);
  lua_pushnil(L);
  lua_pushnil(L);
  if (stop) {
    lua_pushnil(L);
    lua_pushstring(L, stop);
    if (why) lua_pushstring(L, why);
    else lua_pushnil(L);
    return 5;
  }
  if (w > 0) {
    lua_pushnumber(L, w);
    return 3;
  }
  lua_pop(L, 2);
  cp_gov_begin(g);
  total = cp_policy_attempt_timeout(p, cp_now_ms(), deadline, &connect);
  if (total <= 0) {
    cp_gov_unsent(g);
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushliteral(L, "deadline");
    return 4;
  }
  lua_pushinteger(L, total);
  lua_pushinteger(L, connect);
  return 2;
}
static int gov_on_wire(lua_State *L) { cp_gov_on_wire(check_self(L), cp_now_ms()); return 0; }
static int gov_resent(lua_State *L) { cp_gov_resent(check_self(L), cp_now_ms()); return 0; }
static int gov_paced(lua_State *L) { cp_gov_paced(check_self(L), luaL_checknumber(L, 2)); return 0; }
static int gov_unsent(lua_State *L) { cp_gov_unsent(check_self(L)); return 0; }
static int gov_abandon(lua_State *L) {
  cp_gov_abandon(check_self(L), lua_toboolean(L, 2));
  return 0;
}

/* The result fields g:finish reads, interned once: its upvalues after the
 * two metatables (cp_register_governor). */
static const char *const FINISH_KEYS[] = {"status", "kind", "attempts", "retry_after", "rate_max",
                                          "rate_interval_ms", "daily_remaining"};
enum { K_STATUS = 3, K_KIND, K_ATTEMPTS, K_RETRY_AFTER, K_RATE_MAX, K_RATE_INTERVAL, K_DAILY_REMAINING, K_N = K_DAILY_REMAINING - 2 };

/* Field k (an upvalue index of FINISH_KEYS) of the result table at idx (a
 * plain table made by a transport: read raw). */
static long field_long(lua_State *L, int idx, int k) {
  long v = -1;
  lua_pushvalue(L, lua_upvalueindex(k));
  lua_rawget(L, idx);
  if (lua_type(L, -1) == LUA_TNUMBER) {
    lua_Number n = lua_tonumber(L, -1);
    if (n >= 0 && n < 1e15) v = (long)n;
  }
  lua_pop(L, 1);
  return v;
}

/* The outcome of a result table ({status= | kind=, attempts=, retry_after=, rate headers}). */
static void read_outcome(lua_State *L, int idx, cp_outcome *o) {
  memset(o, 0, sizeof(*o));
  o->status = field_long(L, idx, K_STATUS);
  if (o->status < 0) o->status = 0;
  lua_pushvalue(L, lua_upvalueindex(K_KIND));
  lua_rawget(L, idx);
  o->kind = lua_tostring(L, -1); /* kept alive by the result table */
  lua_pop(L, 1);
  if (o->status == 0 && !o->kind) luaL_argerror(L, idx, "a result with status or kind expected");
  o->attempts = (int)field_long(L, idx, K_ATTEMPTS);
  if (o->attempts < 1) o->attempts = 1;
  o->retry_after_ms = field_long(L, idx, K_RETRY_AFTER);
  if (o->retry_after_ms >= 0) o->retry_after_ms *= 1000.0;
  o->rate_max = field_long(L, idx, K_RATE_MAX);
  o->rate_interval_ms = field_long(L, idx, K_RATE_INTERVAL);
  o->daily_remaining = field_long(L, idx, K_DAILY_REMAINING);
}

/* g:finish(result[, on_wire = true[, latency_ms[, deadline[, policy]]]]) -> retry, delay_ms,
 * hold_ms | nil, learn_max | nil, learn_interval_ms | nil (what a Lua backing must be told),
 * true when the deadline refused a retry (the answer is then g:deadline_result).
 * policy: the calling client's (commprefs.core.policy), else the governor's own.
 * Sets result.daily_limit = true when HubSpot's daily limit is spent. */
static int gov_finish(lua_State *L) {
  cp_governor *g = check_self(L);
  cp_policy *p = opt_policy(L, 6, g);
  cp_outcome o;
  cp_decision d;
  luaL_checktype(L, 2, LUA_TTABLE);
  read_outcome(L, 2, &o);
  cp_gov_finish(g, p, &o, lua_isnoneornil(L, 3) || lua_toboolean(L, 3), luaL_optnumber(L, 4, -1),
                luaL_optnumber(L, 5, 0), &d);
  if (d.daily_limit) {
    lua_pushboolean(L, 1);
    lua_setfield(L, 2, "daily_limit");
  }
  lua_pushboolean(L, d.retry);
  lua_pushnumber(L, d.delay_ms);
  if (d.hold_ms >= 0) lua_pushnumber(L, d.hold_ms);
  else lua_pushnil(L);
  if (d.learn_max > 0) {
    lua_pushinteger(L, d.learn_max);
    lua_pushinteger(L, d.learn_interval_ms);
  } else {
    lua_pushnil(L);
    lua_pushnil(L);
  }
  if (!d.deadline) return 5;
  lua_pushboolean(L, 1);
  return 6;
}

/* g:clock() -> the governor's clock (monotonic ms), which deadlines are in */
static int gov_clock(lua_State *L) {
  lua_pushnumber(L, cp_now_ms());
  return 1;
}

/* g:deadline([seconds]) -> the absolute deadline of a call starting now
 * (seconds, else the deadline option), or nil when there is none */
static int gov_deadline(lua_State *L) {
  double d = cp_gov_deadline(check_self(L), cp_now_ms(), luaL_optnumber(L, 2, 0));
  if (d <= 0) return 0;
  lua_pushnumber(L, d);
  return 1;
}

/* g:attempt_timeout([deadline[, policy]]) -> timeout_ms, connect_timeout_ms | nil (no time
 * left); policy: the calling client's, else the governor's own. */
static int gov_attempt_timeout(lua_State *L) {
  cp_governor *g = check_self(L);
  long connect = 0;
  long total = cp_policy_attempt_timeout(opt_policy(L, 3, g), cp_now_ms(), luaL_optnumber(L, 2, 0),
                                         &connect);
  if (total <= 0) return 0;
  lua_pushinteger(L, total);
  lua_pushinteger(L, connect);
  return 2;
}

/* g:deadline_result(attempts[, last]) -> the answer of a call whose deadline passed */
static int gov_deadline_result(lua_State *L) {
  check_self(L);
  cp_gov_push_deadline_result(L, (int)luaL_optinteger(L, 2, 0), luaL_optstring(L, 3, NULL));
  return 1;
}

/* g:start_wake() -> ms until the start rule lets one more attempt start, or nil */
static int gov_start_wake(lua_State *L) {
  double w = cp_gov_start_wake(check_self(L), cp_now_ms());
  if (w < 0) return 0;
  lua_pushnumber(L, w);
  return 1;
}

/* g:backed(): a shared budget (a Lua backing) paces this governor too: no start rule */
static int gov_backed(lua_State *L) {
  check_self(L)->backed = 1;
  return 0;
}

static int gov_target(lua_State *L) {
  lua_pushinteger(L, cp_gov_target(check_self(L), CP_ADAPTIVE_SLOTS));
  return 1;
}

/* g:manual() -> max, interval_ms of the window set by hand, or nil */
static int gov_manual(lua_State *L) {
  long max, interval;
  if (!cp_gov_manual(check_self(L), &max, &interval)) return 0;
  lua_pushinteger(L, max);
  lua_pushinteger(L, interval);
  return 2;
}

/* g:settings([policy]) -> what a transport needs (never the token): the
 * governor's budget and the policy's (the governor's own when none is given) */
static int gov_settings(lua_State *L) {
  cp_governor *g = check_self(L);
  cp_policy *p = opt_policy(L, 2, g);
  lua_createtable(L, 0, 9);
  cp_policy_settings(L, p);
  if (g->max_concurrency) cp_set_integer(L, "max_concurrency", g->max_concurrency);
  if (g->rl.max > 0) cp_set_integer(L, "rate_max", g->rl.max);
  cp_set_integer(L, "rate_interval_ms", g->rl.interval_ms);
  return 1;
}

/* stats().by_status = {["200"] = n, ...}, by_kind = {network = n, ...},
 * duration = {bounds = {...}, counts = {...}, count =, sum =}, throttled_daily,
 * paced, paced_seconds, daily_remaining (when known). */
static void push_metrics(lua_State *L, const cp_governor *g) {
  static const double bounds[] = CP_DURATION_BUCKETS;
  static const char *kinds[] = CP_KINDS;
  int i;
  lua_newtable(L);
  for (i = 0; i < 500; i++) /* string keys ("200"): stats() stays JSON-encodable */
    if (g->m.by_status[i]) {
      char k[16];
      snprintf(k, sizeof(k), "%d", i + 100);
      cp_set_integer(L, k, g->m.by_status[i]);
    }
  lua_setfield(L, -2, "by_status");
  lua_newtable(L);
  for (i = 0; i <= CP_NKINDS; i++)
    if (g->m.by_kind[i]) cp_set_integer(L, i < CP_NKINDS ? kinds[i] : "other", g->m.by_kind[i]);
  lua_setfield(L, -2, "by_kind");
  lua_createtable(L, 0, 4);
  lua_createtable(L, CP_NBUCKETS, 0);
  for (i = 0; i < CP_NBUCKETS; i++) { lua_pushnumber(L, bounds[i]); lua_rawseti(L, -2, i + 1); }
  lua_setfield(L, -2, "bounds");
  lua_createtable(L, CP_NBUCKETS, 0);
  for (i = 0; i < CP_NBUCKETS; i++) { lua_pushinteger(L, g->m.duration_count[i]); lua_rawseti(L, -2, i + 1); }
  lua_setfield(L, -2, "counts");
  cp_set_integer(L, "count", g->m.duration_n);
  cp_set_number(L, "sum", g->m.duration_sum_s);
  lua_setfield(L, -2, "duration");
  cp_set_integer(L, "throttled_daily", g->m.throttled_daily);
  cp_set_integer(L, "paced", g->m.paced);
  cp_set_number(L, "paced_seconds", g->m.paced_s);
  if (!g->closed && g->rl.daily_left >= 0) cp_set_integer(L, "daily_remaining", g->rl.daily_left);
}

/* g:stats() -> {sent=, retries=, throttled=, answers=, rate_max=, rate_interval_ms=,
 * in_flight_target=, latency_ms=} */
static int gov_stats(lua_State *L) {
  cp_governor *g = luaL_checkudata(L, 1, GOV_MT);
  lua_createtable(L, 0, 16);
  cp_set_integer(L, "sent", g->sent);
  cp_set_integer(L, "retries", g->retries);
  cp_set_integer(L, "throttled", g->throttled);
  cp_set_integer(L, "answers", g->answers);
  cp_set_integer(L, "rate_max", g->closed ? 0 : g->rl.max);
  cp_set_integer(L, "rate_interval_ms", g->closed ? 0 : g->rl.interval_ms);
  cp_set_integer(L, "in_flight_target", g->closed ? 0 : cp_gov_target(g, CP_ADAPTIVE_SLOTS));
  cp_set_number(L, "latency_ms", g->latency_ms);
  push_metrics(L, g);
  return 1;
}

static int gov_gc(lua_State *L) {
  cp_gov_free(luaL_checkudata(L, 1, GOV_MT));
  return 0;
}

static int gov_tostring(lua_State *L) {
  cp_governor *g = cp_checkudata(L, 1, &GOV_KEY, GOV_MT);
  lua_pushfstring(L, GOV_MT " (%s%p)", g->closed ? "closed, " : "", (void *)g);
  return 1;
}

void cp_register_governor(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"new_call", gov_new_call}, {"next", gov_next}, {"begin", gov_begin}, {"on_wire", gov_on_wire}, {"resent", gov_resent}, {"paced", gov_paced},
    {"unsent", gov_unsent}, {"abandon", gov_abandon}, {"target", gov_target},
    {"manual", gov_manual}, {"settings", gov_settings}, {"start_wake", gov_start_wake}, {"backed", gov_backed},
    {"stats", gov_stats}, {"close", gov_gc},
    {"clock", gov_clock}, {"deadline", gov_deadline}, {"attempt_timeout", gov_attempt_timeout},
    {"deadline_result", gov_deadline_result}, {"try_start", gov_try_start},
    {NULL, NULL}};
  int i;
  cp_register_class(L, GOV_MT, methods, gov_gc, gov_tostring);
  cp_register_key(L, GOV_MT, &GOV_KEY);
  /* every method with the metatable (check_self) and the policy's
   * (opt_policy: cp_register_policy first) as its upvalues; finish with its
   * result keys after them (field_long) */
  luaL_getmetatable(L, GOV_MT);
  lua_getfield(L, -1, "__index");
  lua_pushvalue(L, -2);
  luaL_getmetatable(L, CP_POLICY_MT);
  if (!lua_istable(L, -1)) luaL_error(L, "commprefs: the policy class must be registered before the governor");
  luaL_setfuncs(L, methods, 2);
  lua_pushvalue(L, -2);
  luaL_getmetatable(L, CP_POLICY_MT);
  for (i = 0; i < K_N; i++) lua_pushstring(L, FINISH_KEYS[i]);
  lua_pushcclosure(L, gov_finish, 2 + K_N);
  lua_setfield(L, -2, "finish");
  lua_pop(L, 2);
  lua_pushcfunction(L, core_governor);
  lua_setfield(L, -2, "governor");
}
