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
} cp_ratelimit;

/* The margin (ms) added to the window for the trip to the server. */
double cp_rl_margin_ms(long interval_ms);

int cp_rl_init(cp_ratelimit *rl, int max, long interval_ms);
void cp_rl_free(cp_ratelimit *rl);
/* Milliseconds to wait before the next send is allowed (0 = now). */
double cp_rl_wait(cp_ratelimit *rl, double now);
/* An attempt is started (pending) / is sent now (recorded) / ended unsent. */
void cp_rl_start(cp_ratelimit *rl);
void cp_rl_sent(cp_ratelimit *rl, double now);
void cp_rl_unsent(cp_ratelimit *rl);
/* One more send at now in the window (a replay of an attempt already on the wire). */
void cp_rl_record(cp_ratelimit *rl, double now);
/* Learn the window from X-HubSpot-RateLimit-Max / -Interval-Milliseconds. */
void cp_rl_learn(cp_ratelimit *rl, long max, long interval_ms);
/* A 429 arrived: hold every send for hold_ms (policy.c decides how long). */
void cp_rl_throttled(cp_ratelimit *rl, double now, double hold_ms);
/* A 429 although the known window had room (the server counted an earlier
 * request later than we sent it: scheduling or network delay): widen the margin
 * (10 ms, doubling, at most a tenth of the interval; once per interval, as the
 * 429s of one late burst arrive together) for this window's life. */
void cp_rl_skewed(cp_ratelimit *rl, double now);
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
