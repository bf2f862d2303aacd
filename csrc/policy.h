/* policy.h: the one retry policy of commprefs (see policy.c), asked by the
 * governor (governor.c) for both transports. */
#ifndef COMMPREFS_POLICY_H
#define COMMPREFS_POLICY_H

#include "ratelimit.h"
#include "cp_limits.h"

typedef struct {
  int max_retries;
  double backoff_base_ms, backoff_max_ms, max_retry_after_ms;
  unsigned long long rng;  /* jitter, per client */
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

void cp_policy_init(cp_policy *p, int max_retries, double backoff_base_ms, double backoff_max_ms,
                    double max_retry_after_ms, const void *seed);
/* Whether to retry (1) and after how many ms (*delay_ms); a 429 holds the
 * window (the governor has already taught it the answer's headers). */
int cp_policy_decide(cp_policy *p, cp_ratelimit *rl, cp_outcome *o, double now, double *delay_ms);
/* Exponential backoff with jitter before attempt `attempt` + 1. */
double cp_policy_backoff_ms(cp_policy *p, int attempt);
/* 1 when max requests per interval_ms is a window HubSpot could mean. */
int cp_sane_window(long max, long interval_ms);

#endif
