/* ratelimit.c: owns client-side pacing under a rolling-window rate limit.
 * It keeps the send times of the last `max` requests: a new request may go
 * when fewer than `max` were sent in the last interval (plus a margin for
 * the trip to the server), exactly the rule HubSpot's rolling window applies. */
#include <stdlib.h>
#include "ratelimit.h"

#define RL_MAX_CAP 100000

double cp_rl_margin_ms(long interval_ms) {
  return 25.0 + interval_ms / 100.0;
}

static double margin_ms(const cp_ratelimit *rl) {
  return cp_rl_margin_ms(rl->interval_ms) + rl->skew_ms;
}

static int rl_resize(cp_ratelimit *rl, int cap) {
  double *ring;
  int i;
  if (cap > RL_MAX_CAP) cap = RL_MAX_CAP;
  if (cap <= rl->cap) return 0;
  ring = malloc(sizeof(double) * (size_t)cap);
  if (!ring) return -1;
  for (i = 0; i < rl->count; i++) ring[i] = rl->sent[(rl->head + i) % rl->cap];
  free(rl->sent);
  rl->sent = ring;
  rl->cap = cap;
  rl->head = 0;
  return 0;
}

int cp_rl_init(cp_ratelimit *rl, int max, long interval_ms) {
  rl->sent = NULL;
  rl->cap = rl->head = rl->count = 0;
  rl->blocked_until = 0;
  rl->pending = 0;
  rl->daily_left = -1;
  rl->on_wire = 0;
  rl->skew_ms = 0;
  rl->skewed_at = 0;
  rl->max = max > 0 ? max : 0;
  rl->interval_ms = interval_ms > 0 ? interval_ms : 10000;
  rl->manual = max > 0;
  return rl_resize(rl, rl->max > 0 ? rl->max : 256);
}

void cp_rl_free(cp_ratelimit *rl) {
  free(rl->sent);
  rl->sent = NULL;
  rl->cap = rl->count = 0;
}

static void rl_expire(cp_ratelimit *rl, double now) {
  double horizon = now - rl->interval_ms - margin_ms(rl);
  while (rl->count > 0 && rl->sent[rl->head] <= horizon) {
    rl->head = (rl->head + 1) % rl->cap;
    rl->count--;
  }
}

double cp_rl_wait(cp_ratelimit *rl, double now) {
  double wait = rl->blocked_until > now ? rl->blocked_until - now : 0;
  rl_expire(rl, now);
  if (rl->max > 0 && rl->pending >= rl->max) return 1.0; /* wait for sends to land */
  if (rl->max > 0 && rl->count + rl->pending >= rl->max) {
    /* the oldest of the sends that must leave the window first */
    double oldest = rl->sent[(rl->head + rl->count + rl->pending - rl->max) % rl->cap];
    double w = oldest + rl->interval_ms + margin_ms(rl) - now;
    if (w > wait) wait = w;
  }
  return wait > 0 ? wait : 0;
}

void cp_rl_record(cp_ratelimit *rl, double now) {
  if (rl->count == rl->cap) { /* full ring: forget the oldest */
    rl->head = (rl->head + 1) % rl->cap;
    rl->count--;
  }
  rl->sent[(rl->head + rl->count) % rl->cap] = now;
  rl->count++;
}

void cp_rl_start(cp_ratelimit *rl) { rl->pending++; }

void cp_rl_sent(cp_ratelimit *rl, double now) {
  if (rl->pending > 0) rl->pending--;
  rl->on_wire++;
  cp_rl_record(rl, now);
}

void cp_rl_unsent(cp_ratelimit *rl) {
  if (rl->pending > 0) rl->pending--;
}

void cp_rl_learn(cp_ratelimit *rl, long max, long interval_ms) {
  if (rl->manual || max <= 0 || interval_ms <= 0) return;
  if (rl_resize(rl, (int)(max > RL_MAX_CAP ? RL_MAX_CAP : max)) != 0) return;
  rl->max = (int)(max > rl->cap ? rl->cap : max);
  rl->interval_ms = interval_ms;
}

void cp_rl_throttled(cp_ratelimit *rl, double now, double hold_ms) {
  if (hold_ms > 0 && now + hold_ms > rl->blocked_until) rl->blocked_until = now + hold_ms;
}

void cp_rl_skewed(cp_ratelimit *rl, double now) {
  double most = rl->interval_ms / 10.0;
  if (rl->skew_ms > 0 && now - rl->skewed_at < rl->interval_ms) return;
  rl->skewed_at = now;
  rl->skew_ms = rl->skew_ms > 0 ? rl->skew_ms * 2 : 10.0;
  if (rl->skew_ms > most) rl->skew_ms = most;
}

void cp_rl_answered(cp_ratelimit *rl) {
  if (rl->on_wire > 0) rl->on_wire--;
}

/* More than answers out of order can explain: a new day. */
#define RL_NEW_DAY_JUMP 1000

void cp_rl_daily(cp_ratelimit *rl, long remaining) {
  if (remaining < 0) return;
  if (rl->daily_left < 0 || remaining < rl->daily_left || remaining > rl->daily_left + RL_NEW_DAY_JUMP)
    rl->daily_left = remaining;
}

int cp_rl_daily_spent(const cp_ratelimit *rl) {
  return rl->daily_left >= 0 && rl->daily_left <= rl->on_wire;
}

int cp_rl_daily_room(const cp_ratelimit *rl) {
  return rl->daily_left < 0 || rl->daily_left > rl->on_wire + rl->pending;
}
