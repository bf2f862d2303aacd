/* transport.h: the libcurl transport (transport.c): a client userdata that
 * drives a governor (governor.h) over libcurl's multi interface, under the
 * policy (policy.h) of its own config. */
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
  int post;                /* this request is a POST */
  int replay_refused;      /* libcurl would have resent it on a fresh connection: no retries left */
  int bad_length;          /* the answer had two different Content-Length values */
  long length_seen;        /* the Content-Length of this answer's header block, -1: none yet */
  int too_large;           /* this attempt's answer passed max_response_size */
  double sent_at;          /* monotonic ms when this attempt went on the wire */
  double not_before;       /* monotonic ms: earliest start of the next attempt */
  double ready_at;         /* monotonic ms: when it could have started (pacing waits count from here) */
  /* the HubSpot headers of this attempt's answer (header callback), "" = absent:
   * Retry-After, X-HubSpot-RateLimit-Max, -Interval-Milliseconds, -Daily-Remaining */
  char hubspot[4][64];
  struct curl_slist *hdr[2]; /* this slot's GET / POST header lists (wiped when replaced) */
  unsigned hdr_gen;        /* the token generation they were built from */
  char errbuf[CURL_ERROR_SIZE];
  /* what the easy handle was last given (a setopt is skipped when unchanged) */
  CURLU *url;              /* the attempt's URL, parsed here (NULL: given as text) */
  int url_set;             /* the easy handle has url as its CURLOPT_CURLU */
  char *origin;            /* "scheme://authority" of the last URL url parsed whole (NULL: none) */
  size_t origin_len;
  const struct curl_slist *set_hdr;
  int set_post;
  long set_timeout, set_connect;
} cp_slot;

typedef struct cp_transport {
  CURLM *multi;
  char *token;                     /* the current access token (wiped when replaced), NULL: none sent */
  unsigned token_gen;              /* bumped by every new token: slots rebuild their header lists */
  int form_body;                   /* POSTs carry forms (an OAuth token endpoint) */
  double token_due_ms;             /* monotonic ms when the token should be renewed; 0: never */
  int renew_ref;                   /* registry reference to the renewer (LUA_NOREF: none) */
  cp_slot *slots;
  int nslots;                      /* max_concurrency, or CP_ADAPTIVE_SLOTS when adaptive */
  int in_use;                      /* slots not free */
  int high;                        /* slots at and above this index are free */
  cp_governor *gov;                /* the attempt lifecycle: kept alive by gov_ref */
  cp_policy policy;                /* this client's retries, timeouts, TLS, User-Agent (its config's) */
  int gov_ref;                     /* registry reference to the governor userdata */
  char *ca_file;
  int closed, active;              /* active: inside perform() */
  int handle_signals;              /* perform stops on SIGINT/SIGTERM */
  int proxy_env;                   /* the user configured a proxy in the environment */
  int single;                      /* inside perform_one (SINGLE_RESULT) or answer_one (SINGLE_ANSWER) */
  const void *json_null;           /* answer_one: cjson's null (a light userdata's pointer) */
  int answered;                    /* answer_one: the result is the decoded envelope of a 2xx answer */
  int escaped;                     /* ... whose body holds a backslash-u escape */
} cp_transport;

/* cp_transport_perform's modes: perform, perform_one, answer_one. */
enum { PERFORM_MANY = 0, SINGLE_RESULT = 1, SINGLE_ANSWER = 2 };

/* answer_one's decoder: cjson's decode (a stack index, or an upvalue's) and its null. */
typedef struct {
  int fn;
  const void *null;
} cp_decoder;

/* Opens t over governor g (the caller keeps it alive and sets gov_ref) with
 * the policy of config c: 0, or -1 with a message in err (nothing left allocated). */
int cp_transport_open(cp_transport *t, cp_governor *g, const cp_config *c, const char **err);
void cp_transport_close(cp_transport *t);
/* Sets the token later attempts send (NULL: none); due_in_ms > 0: when an
 * attempt starts after that long, the renewer (client:set_renewer, a Lua
 * function that sets the next token) is called first, once. Callable at any time,
 * inside perform too: attempts on the wire keep the header lists they were
 * started with. 0, or -1: out of memory (the old token stays). */
int cp_transport_set_token(cp_transport *t, const char *token, double due_in_ms);
/* Drops every pooled connection: 0, or -1 (inside perform, or out of memory). */
int cp_transport_drop_connections(cp_transport *t);
/* client:perform(source, on_done[, deadline]) (mode PERFORM_MANY),
 * client:perform_one(request[, deadline]) (SINGLE_RESULT) or
 * client:answer_one(request[, deadline]) (SINGLE_ANSWER, with dec): see transport.c. */
int cp_transport_perform(lua_State *L, cp_transport *t, int mode, const cp_decoder *dec);
#include "signals.h"

#endif
