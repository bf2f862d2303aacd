/* ratelimit.h: client-side pacing under a rolling-window rate limit
 * (HubSpot's "N requests per interval"). No curl, no Lua. */
#ifndef COMMPREFS_RATELIMIT_H
#define COMMPREFS_RATELIMIT_H

typedef struct {
  int max;            /* requests per window; 0 = not known yet */
  long interval_ms;   /* window length */
  int manual;         /* set by the user: headers do not change it */
  double *sent;       /* ring of send times (ms), capacity cap */
  int cap, head, count;
  int pending;        /* attempts started but not yet on the wire: they count too */
  double blocked_until; /* after a 429: no sends before this time */
  long daily_left;    /* the lowest Daily-Remaining answered (the latest count); -1 unknown */
  int on_wire;        /* sent and not answered yet */
  double skew_ms;     /* margin learned from 429s inside the known window (clock skew) */
  double skewed_at;   /* when skew_ms last grew */
  double next_at;     /* even spacing: when the next attempt is due (GCRA's theoretical time); 0 = none */
  double *hist;       /* ring of the last hcap send times, never expired (cp_rl_skewed reads it) */
  int hcap, hhead, hcount;
} cp_ratelimit;

/* Even pacing: with the window known, the first CP_PACE_BURST attempts of a
 * window may start at once (a job's first requests); after that one starts
 * every (interval + margin) / max, so a window's requests never leave in a
 * burst at its edge. The schedule runs on its own clock (a start that came
 * late does not push every later one back: up to half a spacing of lateness is
 * caught up, the next start never sooner than half a spacing after the one
 * before), so the bound is reached and a burst (a job's first few, several
 * workers' first sends) is never replayed as one at every window's edge.
 * The rolling-window rule stays the hard bound. */
#define CP_PACE_BURST 4

/* The margin (ms) added to the window for the trip to the server. */
double cp_rl_margin_ms(long interval_ms);

int cp_rl_init(cp_ratelimit *rl, int max, long interval_ms);
void cp_rl_free(cp_ratelimit *rl);
/* Milliseconds to wait before the next send is allowed (0 = now). */
double cp_rl_wait(cp_ratelimit *rl, double now);
/* The even spacing of a known window: (interval + margin) / max ms. */
double cp_rl_spacing_ms(const cp_ratelimit *rl);
/* An attempt is started (pending) / is sent now (recorded) / ended unsent. */
void cp_rl_start(cp_ratelimit *rl, double now);
void cp_rl_sent(cp_ratelimit *rl, double now);
void cp_rl_unsent(cp_ratelimit *rl);
/* One more send at now in the window (a replay of an attempt already on the wire). */
void cp_rl_record(cp_ratelimit *rl, double now);
/* Learn the window from X-HubSpot-RateLimit-Max / -Interval-Milliseconds. */
void cp_rl_learn(cp_ratelimit *rl, long max, long interval_ms);
/* A 429 arrived: hold every send for hold_ms (policy.c decides how long). */
void cp_rl_throttled(cp_ratelimit *rl, double now, double hold_ms);
/* A 429 although the known window had room (the server counted an earlier
 * request later than we sent it: scheduling or network delay). The refused
 * request was sent at sent_at (now when unknown); the server still counted
 * the send that opened its slot, so its counting delay was at least
 * sent_at - that send - interval: the margin becomes that + CP_SKEW_LITTLE_MS
 * in one step (at least CP_SKEW_LITTLE_MS wider than before, once per
 * interval, as the 429s of one late burst arrive together; at most a tenth of
 * the interval) for this window's life. */
#define CP_SKEW_LITTLE_MS 10.0
void cp_rl_skewed(cp_ratelimit *rl, double now, double sent_at);
/* A request that was on the wire has ended (answered or failed). */
void cp_rl_answered(cp_ratelimit *rl);
/* X-HubSpot-RateLimit-Daily-Remaining said `remaining` (call after cp_rl_answered).
 * HubSpot's count only goes down within a day, but answers come out of order: the
 * lowest value is the latest count, and every request still on the wire may be
 * counted after it. What is left = daily_left - on_wire (exact once nothing is on
 * the wire). A value far above the lowest (more than reordering explains) is a
 * new day and is taken. spent = nothing left. */
void cp_rl_daily(cp_ratelimit *rl, long remaining);
int cp_rl_daily_spent(const cp_ratelimit *rl);
/* 1 when one more attempt may start without passing the daily limit (attempts
 * started but not yet sent count). */
int cp_rl_daily_room(const cp_ratelimit *rl);

#endif
