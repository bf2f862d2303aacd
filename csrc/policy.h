/* policy.h: the one retry policy of commprefs (see policy.c). Both transports
 * (libcurl in transport.c, cosockets through client:decide) use it. */
#ifndef COMMPREFS_POLICY_H
#define COMMPREFS_POLICY_H

#include "ratelimit.h"

/* The documented sane range of a learned window (HubSpot's are 1 s and 10 s):
 * headers outside it are ignored. */
#define CP_SANE_MAX_MIN 1
#define CP_SANE_MAX_MAX 10000
#define CP_SANE_INTERVAL_MIN_MS 100
#define CP_SANE_INTERVAL_MAX_MS 60000

typedef struct {
  int max_retries;
  double backoff_base_ms, backoff_max_ms, max_retry_after_ms;
  unsigned long long rng;  /* jitter, per client */
} cp_policy;

/* How one attempt ended: the C2 result fields the policy reads. */
typedef struct {
  long status;            /* HTTP status; 0 = no answer */
  const char *kind;       /* no answer: "network", "timeout", "tls", "too_large" */
  int fatal;              /* no answer that no retry can fix (a bad URL, ...) */
  int attempts;           /* attempts made, this one included */
  double retry_after_ms;  /* a valid Retry-After, or -1 */
  long rate_max, rate_interval_ms, daily_remaining; /* -1: header absent */
  int daily_limit;        /* out: a 429 because the daily limit is spent */
  int learned;            /* out: the window was learned from this answer */
} cp_outcome;

void cp_policy_init(cp_policy *p, int max_retries, double backoff_base_ms, double backoff_max_ms,
                    double max_retry_after_ms, const void *seed);
/* Learns from the outcome into the window and says whether to retry (1) and
 * after how many ms (*delay_ms). */
int cp_policy_decide(cp_policy *p, cp_ratelimit *rl, cp_outcome *o, double now, double *delay_ms);
/* Exponential backoff with jitter before attempt `attempt` + 1. */
double cp_policy_backoff_ms(cp_policy *p, int attempt);
/* 1 when max requests per interval_ms is a window HubSpot could mean. */
int cp_sane_window(long max, long interval_ms);
/* A Retry-After header value (delta-seconds or HTTP-date) in seconds, or -1 when invalid. */
double cp_parse_retry_after(const char *value);

#endif
