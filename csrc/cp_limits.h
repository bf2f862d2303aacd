/* cp_limits.h: every option range and default of commprefs, once. Each row:
 * the name a user writes (the Lua option; rate_limit.max is "rate_limit.max"),
 * the core's config field, the default, the least and the most allowed,
 * whether it must be an integer, and the unit. core.limits exports the
 * table to Lua, where lua/commprefs/check.lua checks options against it with
 * the user's names; the core reads its config with the same rows. */
#ifndef COMMPREFS_LIMITS_H
#define COMMPREFS_LIMITS_H

/* X(option, field, default, min, max, integer, unit) */
#define CP_LIMITS(X) \
  X("timeout",           timeout,          30,     0.001, 86400,        0, "seconds") \
  X("connect_timeout",   connect_timeout,  10,     0.001, 86400,        0, "seconds") \
  X("max_retries",       max_retries,      5,      0,     100,          1, "retries") \
  X("max_concurrency",   max_concurrency,  0,      1,     256,          1, "requests") \
  X("max_response_size", max_response_size, 16777216, 1024, 1073741824, 1, "bytes") \
  X("backoff_base",      backoff_base,     0.5,    0,     3600,         0, "seconds") \
  X("backoff_max",       backoff_max,      8,      0,     3600,         0, "seconds") \
  X("max_retry_after",   max_retry_after,  60,     0,     86400,        0, "seconds") \
  X("rate_limit.max",    rate_max,         0,      1,     10000,        1, "requests") \
  X("rate_limit.interval", rate_interval,  10,     0.001, 86400,        0, "seconds") \
  X("rate_limit.redis_timeout", redis_timeout, 2,  0.001, 3600,         0, "seconds") \
  X("rate_limit.redis_wait", redis_wait,   30,     0,     86400,        0, "seconds") \
  X("batch_size",        batch_size,       100,    1,     1000,         1, "ids") \
  X("coalesce",          coalesce,         0,      0.001, 1,            0, "seconds") \
  X("deadline",          deadline,         0,      0.001, 86400,        0, "seconds")

/* The sane range of a window learned from HubSpot's headers (HubSpot's are
 * 1 s and 10 s): headers outside it are never learned, by any backing. */
#define CP_SANE_MAX_MIN 1
#define CP_SANE_MAX_MAX 10000
#define CP_SANE_INTERVAL_MIN_MS 100
#define CP_SANE_INTERVAL_MAX_MS 60000

#define CP_ADAPTIVE_SLOTS 256        /* the most in flight when max_concurrency is unset */
#define CP_UNKNOWN_WINDOW_INFLIGHT 8 /* in flight when answers carry no rate headers */
#define CP_MAX_ID_BYTES 1024         /* the longest id (bytes) */
#define CP_MAX_TOKEN_BYTES 4096      /* the longest token (bytes) */
#define CP_LOCKED_MIN_DELAY_MS 2000.0 /* a 423 (HubSpot: locks last 2 s) waits at least this long */
#define CP_DEFAULT_INTERVAL_MS 10000 /* HubSpot's usual window, until one is learned */
/* The start of a job, before any answer (governor.c, cp_gov_next): the first
 * request goes alone; when no answer has come CP_PROBE_MS after it started
 * (a long round trip), one more starts every CP_PROVISIONAL_SPACING_MS, at
 * most CP_PROVISIONAL_MAX before the first answer: a fifth of HubSpot's
 * smallest window (100 per 10 s), never more than 4 within 10 ms. Without it
 * a 1 s round trip would cost a job a whole second idle. CP_PROBE_MS is that
 * window's even spacing: the time between the first and second send is a
 * hole every later window keeps (the server counts both), so a longer wait
 * is throughput lost for the whole job (250 ms cost 1.5 % of a 24,000-id job
 * at 20 per 1,000 ms and a 1 s round trip). */
#define CP_PROBE_MS 100.0
#define CP_PROVISIONAL_SPACING_MS 40.0
#define CP_PROVISIONAL_MAX 20

#endif
