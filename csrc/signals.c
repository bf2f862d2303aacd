/* signals.c: owns the SIGINT/SIGTERM guard of the core (signals.h).
 * The one piece of global mutable state beyond curl_global_init: a signal
 * handler can only talk to the code it interrupted through a static
 * volatile sig_atomic_t. It holds the number of the SIGINT/SIGTERM caught
 * while a perform ran (0: none); `trapped` says core.trap_signals keeps the
 * handler in place. A perform installs the handler only once it has lasted
 * SIGNAL_LAZY_MS (a short perform makes no system call for it; a signal in
 * its first milliseconds does its usual action, as it would without
 * commprefs), unless the signal is ignored; it then stops within
 * SIGNAL_CHECK_MS when it fires, and restores the previous handler. Then,
 * unless a caller asked for signals to be kept (core.trap_signals, the CLI's
 * bulk jobs and the worker: perform is then "nested" and installs nothing),
 * the signal is raised again, so it does what it would have done without
 * commprefs (lua's "interrupted!", the default termination) right after
 * perform returns. */
#define _POSIX_C_SOURCE 200809L
#include <string.h>
#include <signal.h>
#include "signals.h"
#include "util.h"

#define SIGNAL_CHECK_MS 50  /* longest wait before perform looks at the signal flag */

#define SIGNAL_LAZY_MS 10.0
static volatile sig_atomic_t caught_signal = 0;
static volatile sig_atomic_t trapped = 0;
/* How many SIGINT/SIGTERM the handler has seen (wraps): a wait elsewhere in
 * the core (redis.c) stops when it changes while it waits. */
static volatile sig_atomic_t signal_count = 0;

static void on_signal(int sig) {
  caught_signal = sig;
  signal_count = (signal_count + 1) & 0x3fffffff;
}

int cp_caught_signal(void) { return (int)caught_signal; }
int cp_signal_count(void) { return (int)signal_count; }

/* Installs on_signal for sig unless sig is ignored (then the old action is put back). */
static int install_one(int sig, struct sigaction *old) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  if (sigaction(sig, &sa, old) != 0) return 0;
  if (old->sa_handler == SIG_IGN) {
    sigaction(sig, old, NULL);
    return 0;
  }
  return 1;
}

void signals_begin(signal_guard *g) {
  memset(g, 0, sizeof(*g));
  g->nested = g->armed = trapped != 0;
  if (!g->nested) caught_signal = 0; /* an outer trap keeps what it caught */
  g->since = cp_now_ms();
}

/* Before a wait of up to `wake` ms: installs the handler once the perform
 * has lasted SIGNAL_LAZY_MS; returns the wait, cut so the flag is looked at
 * in time (and the handler installed in time). */
double signals_before_wait(signal_guard *g, double wake) {
  if (!g->armed) {
    double ran = cp_now_ms() - g->since;
    if (ran < SIGNAL_LAZY_MS) return wake < SIGNAL_LAZY_MS - ran ? wake : SIGNAL_LAZY_MS - ran;
    g->installed_int = install_one(SIGINT, &g->old_int);
    g->installed_term = install_one(SIGTERM, &g->old_term);
    g->armed = 1;
  }
  return wake > SIGNAL_CHECK_MS ? SIGNAL_CHECK_MS : wake;
}

void signals_restore(signal_guard *g) {
  if (g->installed_int) sigaction(SIGINT, &g->old_int, NULL);
  if (g->installed_term) sigaction(SIGTERM, &g->old_term, NULL);
}

/* After perform has put the client in order: the signal goes on to its usual action. */
void signals_reraise(const signal_guard *g) {
  if (!g->nested && (g->installed_int || g->installed_term) && caught_signal) raise(caught_signal);
}

/* A scope longer than one perform (the Redis worker's run, which waits in
 * Redis between performs): on != 0 clears the flag and keeps SIGINT/SIGTERM
 * caught (performs inside see it as nested); 0 puts the default action back. */
void cp_trap_signals(int on) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on ? on_signal : SIG_DFL;
  sigemptyset(&sa.sa_mask);
  if (on) caught_signal = 0;
  trapped = on != 0;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
}

