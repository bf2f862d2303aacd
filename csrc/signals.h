/* signals.h: the SIGINT/SIGTERM guard of the core (signals.c): a perform
 * (transport.c) installs it lazily and stops when it fires; a blocking Redis
 * wait (redis.c) stops when cp_signal_count changes. */
#ifndef COMMPREFS_SIGNALS_H
#define COMMPREFS_SIGNALS_H

#include <signal.h>

typedef struct {
  struct sigaction old_int, old_term;
  int installed_int, installed_term, nested;
  int armed;           /* the handler is installed (or nested) */
  double since;        /* when the perform started (monotonic ms) */
} signal_guard;

void signals_begin(signal_guard *g);
/* Before a wait of up to wake ms: the wait, cut so the flag is looked at in time. */
double signals_before_wait(signal_guard *g, double wake);
void signals_restore(signal_guard *g);
void signals_reraise(const signal_guard *g);
/* The signal (SIGINT, SIGTERM) that stopped the last perform, or 0. */
int cp_caught_signal(void);
/* Changes each time the handler catches SIGINT/SIGTERM. */
int cp_signal_count(void);
void cp_trap_signals(int on);

#endif
