/* transport.h: the libcurl transport of a client (see transport.c). */
#ifndef COMMPREFS_TRANSPORT_H
#define COMMPREFS_TRANSPORT_H

#include <curl/curl.h>
#include "compat.h"
#include "ratelimit.h"

struct cp_transport;

typedef struct {
  struct cp_transport *owner;
  CURL *easy;
  char *buf;               /* response body */
  size_t len, cap;
  int state;               /* SLOT_FREE, SLOT_WAITING, SLOT_RUNNING */
  lua_Integer index;       /* the request's number, given back to on_done */
  int attempts;
  int on_wire;             /* this attempt's request has been sent */
  double not_before;       /* monotonic ms: earliest start of the next attempt */
  char errbuf[CURL_ERROR_SIZE];
} cp_slot;

typedef struct cp_transport {
  CURLM *multi;
  struct curl_slist *headers;      /* GET: Authorization, Accept (wiped on close) */
  struct curl_slist *post_headers; /* POST: the same plus Content-Type (wiped on close) */
  cp_slot *slots;
  int nslots;
  cp_ratelimit rl;
  char *user_agent, *ca_file;
  int verify_tls, closed, active; /* active: inside perform() */
  long timeout_ms, connect_timeout_ms;
  int max_retries;
  double backoff_base_ms, backoff_max_ms, max_retry_after_ms;
  unsigned long long rng;
  lua_Integer sent, retries, throttled; /* counters for stats() */
} cp_transport;

typedef struct {
  const char *token, *user_agent, *ca_file;
  int verify_tls, max_retries, max_concurrency, rate_max;
  long timeout_ms, connect_timeout_ms, rate_interval_ms;
  double backoff_base_ms, backoff_max_ms, max_retry_after_ms;
} cp_config;

/* 0 on success; -1 with a message in err on failure (nothing left allocated). */
int cp_transport_open(cp_transport *t, const cp_config *cfg, const char **err);
void cp_transport_close(cp_transport *t);
/* client:perform(source, on_done): see transport.c. */
int cp_transport_perform(lua_State *L, cp_transport *t);

#endif
