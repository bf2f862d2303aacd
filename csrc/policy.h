/* policy.h: a client's call policy (see policy.c): the one retry rule of
 * commprefs and what each client decides for its own calls (retries,
 * backoff, timeouts, answer size, TLS verification, User-Agent). The
 * governor (governor.c) holds what clients of one app share; the policy is
 * passed with each attempt's end (cp_gov_finish), so clients sharing a
 * governor keep their own. */
#ifndef COMMPREFS_POLICY_H
#define COMMPREFS_POLICY_H

#include "compat.h"
#include "config.h"
#include "ratelimit.h"
#include "cp_limits.h"

#define CP_POLICY_MT "commprefs.core.policy" /* the metatable of a policy userdata */

typedef struct {
  int max_retries;
  double backoff_base_ms, backoff_max_ms, max_retry_after_ms;
  unsigned long long rng;  /* jitter, per policy */
  long timeout_ms, connect_timeout_ms, max_response;
  int verify_tls;
  char *user_agent;        /* owned; NULL once freed */
} cp_policy;

/* How one attempt ended: the result fields the governor and the policy read. */
typedef struct {
  long status;            /* HTTP status; 0 = no answer */
  const char *kind;       /* no answer: "network", "timeout", "tls", "too_large" */
  int fatal;              /* no answer that no retry can fix (a bad URL, ...) */
  int attempts;           /* attempts made, this one included */
  double retry_after_ms;  /* a valid Retry-After, or -1 */
  long rate_max, rate_interval_ms, daily_remaining; /* -1: header absent */
  int daily_limit;        /* out: a 429 because the daily limit is spent */
  double sent_at;         /* when its request was sent (monotonic ms); 0: unknown */
} cp_outcome;

/* The policy of config c (seed: jitter differs per policy): 0, or -1 when
 * out of memory (nothing left allocated). */
int cp_policy_init(cp_policy *p, const cp_config *c, const void *seed);
void cp_policy_free(cp_policy *p);
/* Whether to retry (1) and after how many ms (*delay_ms); a 429 holds the
 * window (the governor has already taught it the answer's headers). */
int cp_policy_decide(cp_policy *p, cp_ratelimit *rl, cp_outcome *o, double now, double *delay_ms);
/* Exponential backoff with jitter before attempt `attempt` + 1. */
double cp_policy_backoff_ms(cp_policy *p, int attempt);
/* An attempt's timeout (ms) and connect timeout, capped by what is left
 * before deadline (0: none); 0 when nothing is left. */
long cp_policy_attempt_timeout(const cp_policy *p, double now, double deadline, long *connect_ms);
/* 1 when max requests per interval_ms is a window HubSpot could mean. */
int cp_sane_window(long max, long interval_ms);

/* core.policy(config[, fname]) -> policy: the commprefs.core.policy userdata. */
void cp_register_policy(lua_State *L);
/* The policy userdata at idx (raises when it is not one). */
cp_policy *cp_check_policy(lua_State *L, int idx);
/* Sets what a transport needs of p (never the token) in the table at the top of the stack. */
void cp_policy_settings(lua_State *L, const cp_policy *p);

#endif
