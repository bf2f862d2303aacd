/* ratelimit.c: owns client-side pacing under a rolling-window rate limit.
 * It keeps the send times of the last `max` requests: a new request may go
 * when fewer than `max` were sent in the last interval (plus a margin for
 * the trip to the server), exactly the rule HubSpot's rolling window applies.
 * On top of that bound it spaces attempts evenly (GCRA-like: one every
 * (interval + margin) / max once CP_PACE_BURST are in the window), so the
 * requests of a window are spread across it, never sent in a burst at its
 * edge, and it learns a server's counting delay from a 429 (cp_rl_skewed). */
#include <stdlib.h>
#include "ratelimit.h"

#define RL_MAX_CAP 100000

double cp_rl_margin_ms(long interval_ms) {
  return 25.0 + interval_ms / 100.0;
}

static double margin_ms(const cp_ratelimit *rl) {
  return cp_rl_margin_ms(rl->interval_ms) + rl->skew_ms;
}

/* Grows a ring of doubles (oldest at *head) to cap entries, keeping its order. */
static int ring_grow(double **ring, int *rcap, int *head, int count, int cap) {
  double *r;
  int i;
  if (cap <= *rcap) return 0;
  r = malloc(sizeof(double) * (size_t)cap);
  if (!r) return -1;
  for (i = 0; i < count; i++) r[i] = (*ring)[(*head + i) % *rcap];
  free(*ring);
  *ring = r;
  *rcap = cap;
  *head = 0;
  return 0;
}

/* The window ring holds max sends; the history twice that (a 429's window
 * reaches back beyond what the window ring still keeps). */
static int rl_resize(cp_ratelimit *rl, int cap) {
  if (cap > RL_MAX_CAP) cap = RL_MAX_CAP;
  if (ring_grow(&rl->sent, &rl->cap, &rl->head, rl->count, cap) != 0) return -1;
  return ring_grow(&rl->hist, &rl->hcap, &rl->hhead, rl->hcount, 2 * cap);
}

int cp_rl_init(cp_ratelimit *rl, int max, long interval_ms) {
  rl->sent = rl->hist = NULL;
  rl->cap = rl->head = rl->count = 0;
  rl->hcap = rl->hhead = rl->hcount = 0;
  rl->next_at = 0;
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
  free(rl->hist);
  rl->sent = rl->hist = NULL;
  rl->cap = rl->count = rl->hcap = rl->hcount = 0;
}

static void rl_expire(cp_ratelimit *rl, double now) {
  double horizon = now - rl->interval_ms - margin_ms(rl);
  while (rl->count > 0 && rl->sent[rl->head] <= horizon) {
    rl->head = (rl->head + 1) % rl->cap;
    rl->count--;
  }
}

double cp_rl_spacing_ms(const cp_ratelimit *rl) {
  return rl->max > 0 ? (rl->interval_ms + margin_ms(rl)) / rl->max : 0;
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
  if (rl->max > 0 && rl->count + rl->pending >= CP_PACE_BURST && rl->next_at > 0) {
    double w = rl->next_at - now; /* even spacing */
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
  if (rl->hcap == 0) return;
  if (rl->hcount == rl->hcap) {
    rl->hhead = (rl->hhead + 1) % rl->hcap;
    rl->hcount--;
  }
  rl->hist[(rl->hhead + rl->hcount) % rl->hcap] = now;
  rl->hcount++;
}

void cp_rl_start(cp_ratelimit *rl, double now) {
  double spacing = cp_rl_spacing_ms(rl), base = now;
  /* within a window's first few (the burst) the schedule starts from this
   * start; after it, it advances from where it was due, not from a late
   * start: lateness is caught up by the next start, which never comes
   * sooner than half a spacing after this one (a full catch-up would send
   * two at once after every start the rolling window held, and so replay a
   * burst at every window's edge) */
  if (rl->count + rl->pending >= CP_PACE_BURST)
    base = rl->next_at > now - spacing / 2 ? rl->next_at : now - spacing / 2;
  rl->pending++;
  rl->next_at = base + spacing;
}

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

/* The least counting delay a 429 for a request sent at sent_at proves: the
 * server held max requests in (sent_at - interval, sent_at]; those we sent
 * in that span it counted, the rest were sends older than the span that it
 * counted late. The oldest of those it still counted is the (max - k)-th
 * newest before the span (k: our sends in it): its delay was at least
 * sent_at - it - interval. -1 when the history cannot tell. */
static double counting_delay(const cp_ratelimit *rl, double sent_at) {
  double edge = sent_at - rl->interval_ms;
  int i, k = 0, need;
  for (i = rl->hcount - 1; i >= 0; i--) {
    double t = rl->hist[(rl->hhead + i) % rl->hcap];
    if (t <= edge) break;
    if (t < sent_at) k++;
  }
  need = rl->max - k; /* old sends the server still counted */
  if (need <= 0 || i - (need - 1) < 0) return -1;
  return sent_at - rl->hist[(rl->hhead + i - (need - 1)) % rl->hcap] - rl->interval_ms;
}

void cp_rl_skewed(cp_ratelimit *rl, double now, double sent_at) {
  double most = rl->interval_ms / 10.0, base = cp_rl_margin_ms(rl->interval_ms);
  double delay = counting_delay(rl, sent_at > 0 && sent_at <= now ? sent_at : now);
  double want = delay >= 0 ? delay + CP_SKEW_LITTLE_MS - base : 0; /* in one step */
  if (!(rl->skew_ms > 0 && now - rl->skewed_at < rl->interval_ms) && want < rl->skew_ms + CP_SKEW_LITTLE_MS)
    want = rl->skew_ms + CP_SKEW_LITTLE_MS; /* a first 429 of this window: at least a little wider */
  if (want > most) want = most;
  if (want > rl->skew_ms) {
    rl->skew_ms = want;
    rl->skewed_at = now;
  }
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
