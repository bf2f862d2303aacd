/* policy.c: owns the retry policy, the one rule both transports follow:
 * which outcomes are retried (429, 423 after at least 2 s, 5xx, network
 * errors and timeouts; never other 4xx, HubSpot's 477 "migration in
 * progress", TLS failures, too-large answers or the daily limit), the delay
 * before a retry (a valid Retry-After, else exponential backoff with jitter,
 * so a 5xx without Retry-After never retries at once) and how long a 429
 * holds the window. What an answer teaches the window is governor.c's; the
 * window arithmetic ratelimit.c's. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "policy.h"

void cp_policy_init(cp_policy *p, int max_retries, double backoff_base_ms, double backoff_max_ms,
                    double max_retry_after_ms, const void *seed) {
  p->max_retries = max_retries;
  p->backoff_base_ms = backoff_base_ms;
  p->backoff_max_ms = backoff_max_ms;
  p->max_retry_after_ms = max_retry_after_ms;
  p->rng = (unsigned long long)time(NULL) ^ ((unsigned long long)(size_t)seed << 16) ^ 0x9E3779B97F4A7C15ULL;
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
    } else if (o->status >= 500) {
      *delay_ms = o->retry_after_ms > 0 ? o->retry_after_ms : cp_policy_backoff_ms(p, o->attempts);
    } else {
      return 0;
    }
    if (o->retry_after_ms > p->max_retry_after_ms) return 0;
  }
  return o->attempts <= p->max_retries;
}
