/* governor.h: the one attempt lifecycle both transports drive (governor.c).
 *
 *   cp_gov_new_call    a call starts: when nothing is in flight, the day may have turned
 *   cp_gov_next        may an attempt start now? ms to wait, 0 = yes (a C backing has
 *                      counted it), <0 = stop (*stop: "daily_limit" or "budget")
 *   cp_gov_begin       an attempt starts (it counts for the window until it ends)
 *   cp_gov_on_wire     its request is being sent now
 *   cp_gov_unsent      it ended before anything was sent
 *   cp_gov_finish      it ended with outcome o: the decision under the caller's
 *                      policy (retry and when; what the shared backing is told)
 *                      and every count of stats()
 *
 * A governor is what clients of one HubSpot app share (inside nginx, every
 * client of a worker's bundle, lua/commprefs/shared.lua): the window and
 * what it learned, the daily rules, the budget stated by hand (rate_max,
 * max_concurrency), the C backing and the counts. What each client decides
 * for its own calls is its policy (policy.h): passed to cp_gov_finish and
 * cp_policy_attempt_timeout per attempt. g->policy is the policy of the
 * governor's own config, for callers that give none (core.governor alone,
 * a token endpoint's sender).
 *
 * A call's deadline (the `deadline` option, or one a caller gives) is an
 * absolute monotonic ms time (cp_gov_deadline; 0 = none): cp_gov_next stops
 * ("deadline") once it has passed or a wait would pass it, each attempt's
 * timeout is capped by the time left (cp_policy_attempt_timeout), and
 * cp_gov_finish refuses a retry whose delay would pass it. The answer is
 * then the deadline result (cp_gov_push_deadline_result): kind "timeout".
 *
 * The libcurl loop (transport.c) calls these from C with its own policy;
 * the cosocket transport (lua/commprefs/ngx/transport.lua) through the
 * commprefs.core.governor userdata with the calling client's
 * commprefs.core.policy. Nothing else counts, learns or applies the daily
 * rules. */
#ifndef COMMPREFS_GOVERNOR_H
#define COMMPREFS_GOVERNOR_H

#include "compat.h"
#include "config.h"
#include "policy.h"
#include "ratelimit.h"
#include "backing.h"

/* The request duration histogram's upper bounds (seconds), Prometheus' defaults. */
#define CP_DURATION_BUCKETS {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}
#define CP_NBUCKETS 11
#define CP_KINDS {"network", "timeout", "tls", "too_large"}
#define CP_NKINDS 4

/* What an operator watches (client:stats(), commprefs.prometheus): counted
 * per attempt, here only, for both transports. */
typedef struct {
  lua_Integer by_status[500];        /* answers by HTTP status 100..599 */
  lua_Integer by_kind[CP_NKINDS + 1]; /* attempts without an answer, by kind (last: other) */
  lua_Integer throttled_daily;       /* 429s because the daily limit is spent */
  lua_Integer duration_count[CP_NBUCKETS]; /* answered attempts at most each bound */
  lua_Integer duration_n;
  double duration_sum_s;
  double paced_s;                    /* time attempts waited for pacing or the budget */
  lua_Integer paced;                 /* attempts that had to wait */
} cp_metrics;

typedef struct {
  cp_policy policy;       /* the policy of the governor's own config: for callers that give none */
  cp_ratelimit rl;
  cp_backing backing;     /* all NULL: none in C (a Lua backing may be told by the caller) */
  int max_concurrency;    /* 0: adaptive */
  double latency_ms;      /* moving average of answered attempts; 0 = none seen */
  lua_Integer answers, sent, retries, throttled;
  lua_Integer finished;   /* attempts ended, whatever the outcome (0: the job's start, see cp_gov_next) */
  int early_starts;       /* attempts started before any ended */
  int backed;             /* a Lua shared budget paces it too (g:backed()) */
  double first_start_ms, last_start_ms; /* of those */
  cp_metrics m;
  int closed;
  double deadline_ms;     /* the config's `deadline`, for g:deadline() without seconds; 0 = none */
} cp_governor;

/* What the caller (and a shared backing) must do after an attempt ended. */
typedef struct {
  int retry;              /* send again, after delay_ms */
  double delay_ms;
  int daily_limit;        /* a 429 because HubSpot's daily limit is spent */
  long learn_max, learn_interval_ms; /* > 0: tell the shared backing this window */
  double hold_ms;         /* >= 0: tell the shared backing to hold everybody that long */
  int deadline;           /* a retry was due but the call's deadline would pass first */
} cp_decision;

int cp_gov_init(cp_governor *g, const cp_config *c);   /* 0, or -1: out of memory */
void cp_gov_free(cp_governor *g);
void cp_gov_new_call(cp_governor *g);
/* The absolute deadline of a call starting at now: now + seconds (seconds > 0),
 * else now + the deadline option; 0 when there is none. */
double cp_gov_deadline(const cp_governor *g, double now, double seconds);
double cp_gov_next(cp_governor *g, double now, double deadline, const char **stop, const char **why);
void cp_gov_begin(cp_governor *g);
void cp_gov_on_wire(cp_governor *g, double now);
/* the transport sent the same attempt again (a replay on a fresh connection): counted, window too */
void cp_gov_resent(cp_governor *g, double now);
void cp_gov_unsent(cp_governor *g);
/* an attempt waited ms for pacing or the budget before it could begin */
void cp_gov_paced(cp_governor *g, double ms);
/* it was abandoned (the call stopped or raised): on the wire or not */
void cp_gov_abandon(cp_governor *g, int on_wire);
/* p: the policy of the client whose attempt it was (retries, backoff, jitter). */
void cp_gov_finish(cp_governor *g, cp_policy *p, cp_outcome *o, int on_wire, double latency_ms, double deadline,
                   cp_decision *d);
/* Pushes the answer of a call whose deadline passed: {kind = "timeout", code =
 * "deadline", attempts =, message =} (last: what the last attempt got, or NULL). */
void cp_gov_push_deadline_result(lua_State *L, int attempts, const char *last);
/* How many attempts should be in flight now (cap: the most the transport can run). */
int cp_gov_target(const cp_governor *g, int cap);
/* ms until the start rule (cp_limits.h, CP_PROBE_MS) lets one more attempt
 * start, when it holds one back; else -1. */
double cp_gov_start_wake(const cp_governor *g, double now);
/* The window set by hand, for a shared backing at its start (0 when none). */
int cp_gov_manual(const cp_governor *g, long *max, long *interval_ms);

/* core.governor(config) -> governor | nil, err (a Redis backing that cannot be reached). */
void cp_register_governor(lua_State *L);
/* The governor userdata at idx (raises when it is not one, or closed). */
cp_governor *cp_check_governor(lua_State *L, int idx);
/* Pushes a new governor made from the config table at idx (cp_config_read's
 * names): 1 (the governor), or 2 (nil, message) when its Redis backing cannot
 * be reached: a runtime failure. Bad options raise, naming fname. */
int cp_push_governor(lua_State *L, int idx, const char *fname);

#endif
