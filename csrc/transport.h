/* transport.h: the libcurl transport of a client (see transport.c), the
 * external budget hook (C3) and what the client handle exposes of the
 * policy and the window (C1). */
#ifndef COMMPREFS_TRANSPORT_H
#define COMMPREFS_TRANSPORT_H

#include <curl/curl.h>
#include "compat.h"
#include "ratelimit.h"
#include "policy.h"

/* An external budget shared with other processes (csrc/redis.c implements it). */
typedef struct cp_budget {
  void *ud;
  /* 0: one request may go now and is counted; >0: ms to wait before asking again;
     <0: the budget is gone for good (*err says why): perform stops with "budget". */
  double (*acquire)(void *ud, const char **err);
  void (*learn)(void *ud, long max, long interval_ms);   /* limits from HubSpot's headers */
  void (*throttled)(void *ud, double retry_after_ms);     /* a 429 arrived */
  void (*close)(void *ud);                                /* frees ud */
} cp_budget;

#define CP_ADAPTIVE_SLOTS 256           /* the most in flight when max_concurrency is unset */
#define CP_UNKNOWN_WINDOW_INFLIGHT 8    /* in flight when answers carry no rate headers */
#define CP_DEFAULT_MAX_RESPONSE (16L * 1024 * 1024)

struct cp_transport;

typedef struct {
  struct cp_transport *owner;
  CURL *easy;              /* created at first use */
  char *buf;               /* response body */
  size_t len, cap;
  int state;               /* SLOT_FREE, SLOT_WAITING, SLOT_RUNNING */
  lua_Integer index;       /* the request's number, given back to on_done */
  int attempts;
  int on_wire;             /* this attempt's request has been sent */
  int too_large;           /* this attempt's answer passed max_response_size */
  double sent_at;          /* monotonic ms when this attempt went on the wire */
  double not_before;       /* monotonic ms: earliest start of the next attempt */
  char errbuf[CURL_ERROR_SIZE];
} cp_slot;

typedef struct cp_transport {
  CURLM *multi;
  struct curl_slist *headers;      /* GET: Authorization, Accept (wiped on close) */
  struct curl_slist *post_headers; /* POST: the same plus Content-Type (wiped on close) */
  cp_slot *slots;
  int nslots;                      /* max_concurrency, or CP_ADAPTIVE_SLOTS when adaptive */
  int max_concurrency;             /* 0: adaptive */
  cp_ratelimit rl;
  cp_policy policy;
  cp_budget budget;                /* all NULL: none */
  char *user_agent, *ca_file;
  int verify_tls, closed, active;  /* active: inside perform() */
  int handle_signals;              /* perform stops on SIGINT/SIGTERM */
  long timeout_ms, connect_timeout_ms;
  long max_response;               /* bytes */
  double latency_ms;               /* moving average of attempt latency; 0 = none seen */
  lua_Integer answers;             /* 2xx answers seen */
  lua_Integer sent, retries, throttled; /* counters for stats() */
} cp_transport;

typedef struct {
  const char *token, *user_agent, *ca_file;
  int verify_tls, max_retries, max_concurrency, rate_max, handle_signals;
  long timeout_ms, connect_timeout_ms, rate_interval_ms, max_response;
  double backoff_base_ms, backoff_max_ms, max_retry_after_ms;
} cp_config;

/* 0 on success; -1 with a message in err on failure (nothing left allocated). */
int cp_transport_open(cp_transport *t, const cp_config *cfg, const char **err);
void cp_transport_close(cp_transport *t);
/* client:perform(source, on_done): see transport.c. */
int cp_transport_perform(lua_State *L, cp_transport *t);
/* The policy's decision on an outcome, with the budget told what was learned. */
int cp_transport_decide(cp_transport *t, cp_outcome *o, double *delay_ms);
/* How many requests should be in flight now. */
int cp_transport_target(const cp_transport *t);
void cp_transport_observe_latency(cp_transport *t, double ms);
/* Monotonic milliseconds. */
double cp_now_ms(void);
/* The signal (SIGINT, SIGTERM) that stopped the last perform, or 0. */
int cp_caught_signal(void);
void cp_trap_signals(int on);

#endif
