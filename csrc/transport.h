/* transport.h: the libcurl transport (transport.c): a client userdata that
 * drives a governor (governor.h) over libcurl's multi interface. */
#ifndef COMMPREFS_TRANSPORT_H
#define COMMPREFS_TRANSPORT_H

#include <curl/curl.h>
#include "compat.h"
#include "governor.h"


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
  int in_use;                      /* slots not free */
  cp_governor *gov;                /* the attempt lifecycle: kept alive by gov_ref */
  int gov_ref;                     /* registry reference to the governor userdata */
  char *ca_file;
  int closed, active;              /* active: inside perform() */
  int handle_signals;              /* perform stops on SIGINT/SIGTERM */
} cp_transport;

/* Opens t over governor g (the caller keeps it alive and sets gov_ref): 0, or -1
 * with a message in err (nothing left allocated). */
int cp_transport_open(cp_transport *t, cp_governor *g, const cp_config *c, const char **err);
void cp_transport_close(cp_transport *t);
/* Drops every pooled connection: 0, or -1 (inside perform, or out of memory). */
int cp_transport_drop_connections(cp_transport *t);
/* client:perform(source, on_done): see transport.c. */
int cp_transport_perform(lua_State *L, cp_transport *t);
/* The signal (SIGINT, SIGTERM) that stopped the last perform, or 0. */
int cp_caught_signal(void);
/* Changes each time the handler catches SIGINT/SIGTERM (see transport.c). */
int cp_signal_count(void);
void cp_trap_signals(int on);

#endif
