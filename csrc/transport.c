/* transport.c: owns the HTTP transport on libcurl's multi interface.
 *
 * client:perform(source, on_done[, deadline]) runs requests ({method=, url=, body=})
 * taken from `source` (an array, or a function returning the next request
 * or nil) over reused connections (keep-alive, HTTP/2 multiplexing where
 * offered). Every attempt goes through the client's governor (governor.c):
 * whether it may start, when it is on the wire, what its end decides under
 * this client's policy (policy.c: retry and when, the attempt's timeouts),
 * the counts, the shared backing; this file only moves bytes and
 * builds result tables. When a request is final, on_done(i, result) is
 * called (i: its position in source); without on_done, perform returns the
 * array of results. perform's second return value is the reason it stopped
 * early ("daily_limit", "interrupted", "budget"), else nil; requests it did
 * not finish then get {stopped = reason, attempts = n}. deadline (the
 * governor's clock, see cp_gov_deadline) bounds the whole perform: attempts
 * are cut at it, and what has not ended by then gets the governor's deadline
 * result (kind "timeout"); the second return value is then "deadline".
 * Requests are pulled
 * from source only when a slot is free, so memory stays bounded by the
 * in-flight count however long the source is. Nothing libcurl points to
 * belongs to Lua: URLs and bodies are copied.
 * client:perform_one(request[, deadline]) is perform({request}, nil,
 * deadline) returning its one result itself (then the stop reason): no
 * source, results or in-flight tables (the single GET path).
 * client:answer_one(method, url, body[, deadline]) is perform_one of
 * {method =, url =, body =} (no table made) whose 2xx answer
 * with a JSON body (a JSON content type, or none) is decoded here, as
 * core.decode(body, "envelope") would: it returns the envelope, the body
 * and whether the body holds a backslash-u escape (for commprefs.response's
 * redaction), and no result table is made; any other result (an answer that
 * does not decode among them) is nil, result: perform_one's. */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <signal.h>
#include <time.h>
#include <sys/types.h>
#include <sys/socket.h>
#include "transport.h"
#include "codec.h"
#include "signals.h"
#include "headers.h"
#include "util.h"

enum { SLOT_FREE, SLOT_WAITING, SLOT_RUNNING };

#define CP_CURLU (LIBCURL_VERSION_NUM >= 0x073f00) /* CURLOPT_CURLU: 7.63.0 */
/* perform_loop's stack; answer_one's request is its url (ARG_SOURCE), ST_METHOD and ST_REQBODY */
enum { ARG_SELF = 1, ARG_SOURCE, ARG_ON_DONE, ST_RESULTS, ST_INFLIGHT, ST_DECODE, ST_BODY, ST_METHOD, ST_REQBODY };


/* ------------------------------------------------------------ easy handles */

static size_t on_body(char *data, size_t size, size_t n, void *ud) {
  cp_slot *s = ud;
  size_t add = size * n;
  if (s->len + add > (size_t)s->owner->policy.max_response) {
    s->too_large = 1;
    return 0; /* curl reports a write error */
  }
  if (s->len + add + 1 > s->cap) {
    size_t cap = s->cap ? s->cap : 16384;
    char *nb;
    while (cap < s->len + add + 1) cap *= 2;
    nb = realloc(s->buf, cap);
    if (!nb) return 0;
    s->buf = nb;
    s->cap = cap;
  }
  memcpy(s->buf + s->len, data, add);
  s->len += add;
  return add;
}

/* libcurl is about to send the request: that is when the rate window counts
 * it. Called again for the same attempt when libcurl resends it on a fresh
 * connection (a reused one died unanswered). A GET is then only replaced
 * (as the cosocket transport replaces a stale pooled connection), but a
 * POST may have been acted on: its replay is an attempt of its own, counted
 * and sent only while retries are left (max_retries = 0: one send). */
static int on_prereq(void *ud, char *ip, char *local_ip, int port, int local_port) {
  cp_slot *s = ud;
  cp_governor *g = s->owner->gov;
  const cp_policy *p = &s->owner->policy;
  (void)ip; (void)local_ip; (void)port; (void)local_port;
  s->length_seen = -1;
  if (!s->on_wire) {
    s->on_wire = 1;
    s->sent_at = cp_now_ms();
    cp_gov_on_wire(g, s->sent_at);
    return CURL_PREREQFUNC_OK;
  }
  if (!s->post) return CURL_PREREQFUNC_OK;
  if (s->attempts + 1 > p->max_retries) {
    s->replay_refused = 1;
    return CURL_PREREQFUNC_ABORT;
  }
  s->attempts++;
  cp_gov_resent(g, cp_now_ms());
  return CURL_PREREQFUNC_OK;
}

/* The HubSpot headers perform acts on, in cp_slot.hubspot's order. */
static const char *const HUBSPOT_HEADERS[4] = {
  "retry-after", "x-hubspot-ratelimit-max", "x-hubspot-ratelimit-interval-milliseconds",
  "x-hubspot-ratelimit-daily-remaining"};

static int name_is(const char *line, size_t n, const char *lower) {
  size_t i, len = strlen(lower);
  if (n != len) return 0;
  for (i = 0; i < len; i++) {
    char c = line[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (c != lower[i]) return 0;
  }
  return 1;
}

/* A Content-Length line: two different values in one answer make its
 * framing ambiguous (which bytes are the body?): 0 refuses the answer. */
static int length_consistent(cp_slot *s, const char *line, size_t len) {
  static const char name[] = "content-length:";
  long v;
  if (len <= sizeof(name) - 1 || strncasecmp(line, name, sizeof(name) - 1) != 0) return 1;
  v = strtol(line + sizeof(name) - 1, NULL, 10);
  if (s->length_seen >= 0 && v != s->length_seen) {
    s->bad_length = 1;
    return 0;
  }
  s->length_seen = v;
  return 1;
}

/* Each header line of the answer: a status line starts a new answer (1xx,
 * a proxy's CONNECT answer); the first of each HubSpot header is kept, its
 * value trimmed (a value too long for any valid one is kept as "?"); two
 * different Content-Length values stop the transfer (libcurl takes them). */
static size_t on_header(char *line, size_t size, size_t n, void *ud) {
  cp_slot *s = ud;
  size_t len = size * n, colon, i;
  const char *v, *end;
  if (len >= 5 && memcmp(line, "HTTP/", 5) == 0) {
    memset(s->hubspot, 0, sizeof(s->hubspot));
    s->length_seen = -1;
    return len;
  }
  if ((line[0] == 'c' || line[0] == 'C') && !length_consistent(s, line, len)) return 0;
  if (len < 12 || (line[0] != 'r' && line[0] != 'R' && line[0] != 'x' && line[0] != 'X')) return len;
  for (colon = 0; colon < len && line[colon] != ':'; colon++) {}
  if (colon == len) return len;
  for (i = 0; i < 4; i++) {
    if (!name_is(line, colon, HUBSPOT_HEADERS[i]) || s->hubspot[i][0]) continue;
    v = line + colon + 1;
    end = line + len;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t')) end--;
    if (end == v) break;
    if ((size_t)(end - v) >= sizeof(s->hubspot[i])) strcpy(s->hubspot[i], "?");
    else {
      memcpy(s->hubspot[i], v, (size_t)(end - v));
      s->hubspot[i][end - v] = '\0';
    }
    break;
  }
  return len;
}

static char *dup_or_null(const char *s) {
  char *d;
  if (!s) return NULL;
  d = malloc(strlen(s) + 1);
  if (d) strcpy(d, s);
  return d;
}

static CURL *new_easy(cp_transport *t, cp_slot *s) {
  const cp_policy *p = &t->policy;
  CURL *e = curl_easy_init();
  if (!e) return NULL;
  s->owner = t;
  s->set_hdr = NULL;
  s->set_post = 0; /* a new handle GETs */
  s->set_timeout = s->set_connect = -1;
  s->url_set = 0;
#if CP_CURLU
  if (!s->url) s->url = curl_url(); /* NULL: URLs go as text */
#endif
  curl_easy_setopt(e, CURLOPT_PRIVATE, s);
  curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, on_prereq);
  curl_easy_setopt(e, CURLOPT_PREREQDATA, s);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, s);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, s->errbuf);
  if (!t->proxy_env) { /* no proxy configured: libcurl need not look in the environment per transfer */
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_NOPROXY, "");
  }
  /* With no proxy the User-Agent line is in the header lists (auth_headers):
   * libcurl's own one costs a formatted copy per transfer (7k instructions a
   * GET, 3k more than a list line); a proxy's CONNECT needs libcurl's. */
  if (t->proxy_env) curl_easy_setopt(e, CURLOPT_USERAGENT, p->user_agent);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)p->max_response);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  /* No Accept-Encoding: HubSpot's answers are small and rate-limited traffic is
   * never bandwidth-bound, while decompression costs CPU on every answer (6%). */
  curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L); /* paths are already encoded exactly */
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L); /* a redirect never carries the token away */
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
#endif
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, p->verify_tls ? 1L : 0L);
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, p->verify_tls ? 2L : 0L);
  if (t->ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, t->ca_file);
  return e;
}

static struct curl_slist *append(struct curl_slist *h, const char *line) {
  struct curl_slist *n = curl_slist_append(h, line);
  if (!n) curl_slist_free_all(h);
  return n;
}

/* User-Agent (when given: ua not NULL nor empty), Authorization (when there
 * is a token) + Accept, and for POST also Content-Type (JSON, or a form) and
 * no Expect. User-Agent first: where libcurl's own line would be. */
static struct curl_slist *auth_headers(const char *ua, const char *token, int post, int form) {
  static const char prefix[] = "Authorization: Bearer ", ua_name[] = "User-Agent: ";
  struct curl_slist *h = NULL;
  if (ua && *ua) {
    size_t len = strlen(ua);
    char *line = malloc(sizeof(ua_name) + len);
    if (!line) return NULL;
    memcpy(line, ua_name, sizeof(ua_name) - 1);
    memcpy(line + sizeof(ua_name) - 1, ua, len + 1);
    h = curl_slist_append(NULL, line);
    free(line);
    if (!h) return NULL;
  }
  if (token) {
    size_t len = strlen(token);
    char *line = malloc(sizeof(prefix) + len);
    if (!line) return NULL;
    memcpy(line, prefix, sizeof(prefix) - 1);
    memcpy(line + sizeof(prefix) - 1, token, len + 1);
    struct curl_slist *n = curl_slist_append(h, line);
    memset(line, 0, sizeof(prefix) + len);
    free(line);
    if (!n) {
      curl_slist_free_all(h);
      return NULL;
    }
    h = n;
  }
  h = append(h, "Accept: application/json");
  if (h && post) h = append(h, form ? "Content-Type: application/x-www-form-urlencoded" : "Content-Type: application/json");
  if (h && post) h = append(h, "Expect:"); /* no 100-continue round trip */
  return h;
}

static void wipe_headers(struct curl_slist *h) {
  struct curl_slist *n;
  for (n = h; n; n = n->next) memset(n->data, 0, strlen(n->data));
  curl_slist_free_all(h);
}

/* Whether the user configured a proxy through the environment libcurl reads. */
static int proxy_configured(void) {
  static const char *const names[] = {"http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                                      "no_proxy", "NO_PROXY"};
  size_t i;
  for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    const char *v = getenv(names[i]);
    if (v && *v) return 1;
  }
  return 0;
}

static void wipe_token(cp_transport *t) {
  if (!t->token) return;
  memset(t->token, 0, strlen(t->token));
  free(t->token);
  t->token = NULL;
}

static void wipe_slot_headers(cp_slot *s) {
  int k;
  for (k = 0; k < 2; k++) {
    if (s->hdr[k]) wipe_headers(s->hdr[k]);
    s->hdr[k] = NULL;
  }
}

int cp_transport_set_token(cp_transport *t, const char *token, double due_in_ms) {
  char *copy = NULL;
  if (token && !(copy = dup_or_null(token))) return -1;
  if (!t->token || !token || strcmp(t->token, token) != 0) {
    wipe_token(t);
    t->token = copy;
    t->token_gen++;
  } else {
    memset(copy, 0, strlen(copy));
    free(copy);
  }
  t->token_due_ms = due_in_ms > 0 ? cp_now_ms() + due_in_ms : 0;
  return 0;
}

/* The token is due: the renewer sets the next one (once: a renewer that
 * cannot leaves the old token, whose refusal the caller handles). */
static void renew_token(lua_State *L, cp_transport *t) {
  t->token_due_ms = 0;
  if (t->renew_ref == LUA_NOREF || t->renew_ref == LUA_REFNIL) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->renew_ref);
  lua_call(L, 0, 0);
}

/* The header list of an attempt about to start in slot s (not running):
 * rebuilt from the current token when a new one was set. NULL: out of memory. */
static struct curl_slist *slot_headers(cp_transport *t, cp_slot *s, int post) {
  if (s->hdr_gen != t->token_gen) {
    wipe_slot_headers(s);
    s->hdr_gen = t->token_gen;
  }
  if (!s->hdr[post]) s->hdr[post] = auth_headers(t->proxy_env ? NULL : t->policy.user_agent, t->token, post, t->form_body);
  return s->hdr[post];
}

int cp_transport_open(cp_transport *t, cp_governor *g, const cp_config *c, const char **err) {
  memset(t, 0, sizeof(*t));
  t->gov = g;
  t->gov_ref = LUA_NOREF;
  t->handle_signals = c->handle_signals;
  t->proxy_env = proxy_configured();
  t->nslots = g->max_concurrency ? g->max_concurrency : CP_ADAPTIVE_SLOTS;
  *err = "out of memory";
  t->ca_file = c->ca_file ? dup_or_null(c->ca_file) : NULL;
  t->form_body = c->form_body;
  t->renew_ref = LUA_NOREF;
  t->token_gen = 1; /* slots start at 0: they build their lists at first use */
  t->token = c->token ? dup_or_null(c->token) : NULL;
  t->multi = curl_multi_init();
  t->slots = calloc((size_t)t->nslots, sizeof(cp_slot));
  if (cp_policy_init(&t->policy, c, t) != 0 || (c->ca_file && !t->ca_file) || (c->token && !t->token) || !t->multi
      || !t->slots) {
    cp_transport_close(t);
    return -1;
  }
  curl_multi_setopt(t->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
  curl_multi_setopt(t->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)t->nslots);
  return 0;
}

/* Forgets every pooled connection (a new multi handle): after an answer that
 * named another request's id, nothing read on those connections is trusted. */
int cp_transport_drop_connections(cp_transport *t) {
  CURLM *m;
  if (t->active) return -1;
  m = curl_multi_init();
  if (!m) return -1;
  curl_multi_cleanup(t->multi);
  t->multi = m;
  curl_multi_setopt(t->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
  curl_multi_setopt(t->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)t->nslots);
  return 0;
}

void cp_transport_close(cp_transport *t) {
  int i;
  if (t->closed) return;
  t->closed = 1;
  for (i = 0; t->slots && i < t->nslots; i++) {
    if (t->slots[i].easy) {
      if (t->slots[i].state == SLOT_RUNNING) curl_multi_remove_handle(t->multi, t->slots[i].easy);
      curl_easy_cleanup(t->slots[i].easy);
    }
#if CP_CURLU
    if (t->slots[i].url) curl_url_cleanup(t->slots[i].url); /* after the easy handle that used it */
    t->slots[i].url = NULL;
    free(t->slots[i].origin);
    t->slots[i].origin = NULL;
#endif
    free(t->slots[i].buf);
    wipe_slot_headers(&t->slots[i]); /* after curl_easy_cleanup: nothing points to them now */
  }
  free(t->slots);
  t->slots = NULL;
  if (t->multi) curl_multi_cleanup(t->multi);
  t->multi = NULL;
  wipe_token(t);
  free(t->ca_file);
  t->ca_file = NULL;
  cp_policy_free(&t->policy);
  t->gov = NULL; /* the caller drops gov_ref */
}

/* ------------------------------------------------------------ one attempt */

/* The length of url's "scheme://authority" part, 0 when it has none. */
static size_t origin_length(const char *url) {
  const char *p = strstr(url, "://");
  if (!p) return 0;
  p += 3;
  return (size_t)(p + strcspn(p, "/?#") - url);
}

/* Whether what follows the authority is "/path" or "/path?query" (query not
 * empty) of printable ASCII without space, '#' or '\\': a whole parse would
 * keep it byte for byte as the path and the query (PATH_AS_IS). */
static int plain_target(const char *r) {
  const char *q = NULL;
  if (*r != '/') return 0;
  for (; *r; r++) {
    unsigned char c = (unsigned char)*r;
    if (c <= 0x20 || c >= 0x7f || c == '#' || c == '\\') return 0;
    if (c == '?' && !q) q = r;
  }
  return !q || q[1] != '\0';
}

/* A URL with the origin url already holds: only its path and query are set. */
static int set_target(cp_slot *s, const char *target) {
  char buf[2048];
  const char *q = strchr(target, '?');
  size_t n = q ? (size_t)(q - target) : strlen(target);
  if (n >= sizeof(buf)) return 0;
  memcpy(buf, target, n);
  buf[n] = '\0';
  return curl_url_set(s->url, CURLUPART_PATH, buf, 0) == CURLUE_OK
         && curl_url_set(s->url, CURLUPART_QUERY, q ? q + 1 : NULL, 0) == CURLUE_OK
         && curl_url_set(s->url, CURLUPART_FRAGMENT, NULL, 0) == CURLUE_OK;
}

/* The URL of the attempt about to start in slot s. Parsed here into the
 * slot's URL handle (CURLOPT_CURLU) with the flags libcurl's own parse of
 * CURLOPT_URL uses (PATH_AS_IS: the paths are encoded exactly): libcurl then
 * copies the handle instead of parsing the text and rebuilding it from its
 * parts, 14k instructions a transfer (7.88); a URL with the origin of the
 * one before (the usual case: one base URL) only sets the path and query
 * (9k less again). A URL that does not parse goes as text (CURLOPT_URL), so
 * libcurl reports it as it always has. */
static void set_url(cp_slot *s, const char *url) {
#if CP_CURLU
  size_t n = origin_length(url);
  if (s->url && s->origin && n == s->origin_len && memcmp(url, s->origin, n) == 0 && plain_target(url + n)
      && set_target(s, url + n)) {
    curl_easy_setopt(s->easy, CURLOPT_CURLU, s->url);
    s->url_set = 1;
    return;
  }
  free(s->origin);
  s->origin = NULL;
  /* cleared first: a URL set on a handle holding one is read relative to it */
  if (s->url && curl_url_set(s->url, CURLUPART_URL, NULL, 0) == CURLUE_OK
      && curl_url_set(s->url, CURLUPART_URL, url, CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME | CURLU_PATH_AS_IS)
             == CURLUE_OK) {
    curl_easy_setopt(s->easy, CURLOPT_CURLU, s->url);
    s->url_set = 1;
    if (n && (s->origin = malloc(n)) != NULL) {
      memcpy(s->origin, url, n);
      s->origin_len = n;
    }
    return;
  }
  if (s->url_set) curl_easy_setopt(s->easy, CURLOPT_CURLU, (CURLU *)NULL);
  s->url_set = 0;
#endif
  curl_easy_setopt(s->easy, CURLOPT_URL, url);
}

static void start_attempt(lua_State *L, cp_transport *t, cp_slot *s, long timeout_ms, long connect_ms) {
  int i = (int)(s - t->slots) + 1;
  const char *method, *url, *body;
  struct curl_slist *headers;
  size_t body_len = 0;
  if (t->single == SINGLE_ANSWER) { /* as the fields of a request table below */
    lua_pushnil(L);
    lua_pushvalue(L, ST_METHOD);
    lua_pushvalue(L, ARG_SOURCE);
    lua_pushvalue(L, ST_REQBODY);
  } else {
    if (t->single) lua_pushvalue(L, ST_INFLIGHT);
    else lua_rawgeti(L, ST_INFLIGHT, i);
    lua_getfield(L, -1, "method");
    lua_getfield(L, -2, "url");
    lua_getfield(L, -3, "body");
  }
  method = lua_tostring(L, -3);
  url = lua_tostring(L, -2);
  body = lua_tolstring(L, -1, &body_len);
  if (!url) luaL_error(L, "perform: request %d has no url", (int)s->index);
  if (!s->easy && !(s->easy = new_easy(t, s))) luaL_error(L, "perform: out of memory");
  s->len = 0;
  s->too_large = 0;
  s->replay_refused = 0;
  s->bad_length = 0;
  s->length_seen = -1;
  s->errbuf[0] = '\0';
  memset(s->hubspot, 0, sizeof(s->hubspot));
  /* libcurl copies the URL and (COPYPOSTFIELDS) the body: nothing it keeps
   * points into a Lua string, which the source or on_done may let go */
  set_url(s, url);
  /* Wait for a connection that may multiplex (HTTP/2, only over TLS) rather
   * than open another; over plain HTTP/1.1 that wait would hold every request
   * until the first answer (the start rule of governor.c needs them to go). */
  curl_easy_setopt(s->easy, CURLOPT_PIPEWAIT, strncmp(url, "https:", 6) == 0 ? 1L : 0L);
  s->post = method && strcmp(method, "POST") == 0;
  if (!(headers = slot_headers(t, s, s->post))) luaL_error(L, "perform: out of memory");
  /* the options that did not change since the handle's last attempt are not set again */
  if (headers != s->set_hdr) curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, headers);
  s->set_hdr = headers;
  if (s->post) {
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    curl_easy_setopt(s->easy, CURLOPT_COPYPOSTFIELDS, body ? body : "");
  } else if (s->set_post) {
    curl_easy_setopt(s->easy, CURLOPT_HTTPGET, 1L);
  }
  s->set_post = s->post;
  lua_pop(L, 4);
  if (timeout_ms != s->set_timeout) curl_easy_setopt(s->easy, CURLOPT_TIMEOUT_MS, timeout_ms); /* DNS, connect, TLS and the exchange */
  if (connect_ms != s->set_connect) curl_easy_setopt(s->easy, CURLOPT_CONNECTTIMEOUT_MS, connect_ms);
  s->set_timeout = timeout_ms;
  s->set_connect = connect_ms;
  s->on_wire = 0;
  cp_gov_paced(t->gov, cp_now_ms() - s->ready_at);
  cp_gov_begin(t->gov);
  curl_multi_add_handle(t->multi, s->easy);
  s->state = SLOT_RUNNING;
}

static const char *error_kind(CURLcode rc, const cp_slot *s) {
  if (s->too_large || rc == CURLE_FILESIZE_EXCEEDED) return "too_large";
  switch (rc) {
  case CURLE_OPERATION_TIMEDOUT: return "timeout";
  case CURLE_SSL_CONNECT_ERROR: case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_CERTPROBLEM: case CURLE_SSL_CIPHER: case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_ENGINE_NOTFOUND: case CURLE_SSL_ENGINE_SETFAILED: case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR: case CURLE_SSL_PINNEDPUBKEYNOTMATCH: case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_USE_SSL_FAILED: case CURLE_SSL_SHUTDOWN_FAILED:
    return "tls";
  default: return "network";
  }
}

/* A HubSpot count header (headers.c's rule), or -1 when absent or not a count. */
static long header_long(const char *v) { return *v ? cp_parse_header_count(v) : -1; }

/* What the attempt in slot s ended with. */
static void read_outcome(cp_slot *s, CURLcode rc, cp_outcome *o) {
  double ra;
  memset(o, 0, sizeof(*o));
  o->attempts = s->attempts;
  o->retry_after_ms = -1;
  o->rate_max = o->rate_interval_ms = o->daily_remaining = -1;
  if (rc != CURLE_OK) {
    o->kind = error_kind(rc, s);
    o->fatal = rc == CURLE_URL_MALFORMAT || rc == CURLE_UNSUPPORTED_PROTOCOL || rc == CURLE_OUT_OF_MEMORY;
    return;
  }
  curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &o->status);
  ra = s->hubspot[0][0] ? cp_parse_retry_after(s->hubspot[0]) : -1;
  o->retry_after_ms = ra >= 0 ? ra * 1000.0 : -1;
  o->rate_max = header_long(s->hubspot[1]);
  o->rate_interval_ms = header_long(s->hubspot[2]);
  o->daily_remaining = header_long(s->hubspot[3]);
}

/* Pushes the C2 result table: {status=, body=, content_type=, retry_after=,
 * attempts=, rate_max=, rate_interval_ms=, daily_remaining=, daily_limit=}
 * (optional fields only when their header came) for an HTTP answer, or
 * {kind=, message=, attempts=} when none came. */
static void push_result(lua_State *L, cp_transport *t, cp_slot *s, CURLcode rc, const cp_outcome *o) {
  char *ctype = NULL;
  lua_createtable(L, 0, 8);
  cp_set_integer(L, "attempts", s->attempts);
  if (rc != CURLE_OK) {
    lua_pushstring(L, o->kind);
    lua_setfield(L, -2, "kind");
    if (strcmp(o->kind, "too_large") == 0)
      lua_pushfstring(L, "the answer is larger than max_response_size (%d bytes)", (int)t->policy.max_response);
    else if (s->replay_refused)
      lua_pushliteral(L, "the connection closed before an answer; not sent again (no retries left)");
    else if (s->bad_length)
      lua_pushliteral(L, "the answer had two different Content-Length values (ambiguous framing): refused");
    else
      lua_pushstring(L, s->errbuf[0] ? s->errbuf : curl_easy_strerror(rc));
    lua_setfield(L, -2, "message");
    return;
  }
  curl_easy_getinfo(s->easy, CURLINFO_CONTENT_TYPE, &ctype);
  cp_set_integer(L, "status", o->status);
  lua_pushlstring(L, s->buf ? s->buf : "", s->len);
  lua_setfield(L, -2, "body");
  if (ctype) {
    lua_pushstring(L, ctype);
    lua_setfield(L, -2, "content_type");
  }
  if (o->retry_after_ms >= 0) cp_set_integer(L, "retry_after", (lua_Integer)(o->retry_after_ms / 1000.0));
  if (o->rate_max >= 0) cp_set_integer(L, "rate_max", o->rate_max);
  if (o->rate_interval_ms >= 0) cp_set_integer(L, "rate_interval_ms", o->rate_interval_ms);
  if (o->daily_remaining >= 0) cp_set_integer(L, "daily_remaining", o->daily_remaining);
  if (o->daily_limit) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "daily_limit");
  }
}

/* ------------------------------------------------------------ the loop */

typedef struct {
  int exhausted;       /* source has no more requests */
  lua_Integer next;    /* position of the next request in source */
  const char *stop;    /* why perform stopped early, or NULL */
  const char *stop_message; /* the budget's reason */
  double deadline;     /* the governor's clock (ms); 0 = none */
} source_state;

static void cleanup_running(cp_transport *t) {
  int i;
  if (t->in_use == 0) return; /* every slot is free */
  for (i = 0; t->slots && i < t->high; i++) {
    if (t->slots[i].state == SLOT_RUNNING) {
      curl_multi_remove_handle(t->multi, t->slots[i].easy);
      cp_gov_abandon(t->gov, t->slots[i].on_wire);
    }
    t->slots[i].state = SLOT_FREE;
  }
  t->in_use = t->high = 0;
}

/* The next request of source, checked, put in flight for slot number i; 0 when source is empty. */
static int take_request(lua_State *L, cp_transport *t, source_state *src, int i) {
  if (t->single) {
    if (src->next == 1) lua_pushvalue(L, ARG_SOURCE);
    else lua_pushnil(L);
  } else if (lua_type(L, ARG_SOURCE) == LUA_TFUNCTION) {
    lua_pushvalue(L, ARG_SOURCE);
    lua_call(L, 0, 1);
  } else {
    lua_rawgeti(L, ARG_SOURCE, (int)src->next);
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    src->exhausted = 1;
    return 0;
  }
  if (!lua_istable(L, -1))
    luaL_error(L, "perform: request %d is a %s, not a table", (int)src->next, luaL_typename(L, -1));
  lua_getfield(L, -1, "url");
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "perform: request %d has no url", (int)src->next);
  lua_pop(L, 1);
  if (t->single) lua_replace(L, ST_INFLIGHT);
  else lua_rawseti(L, ST_INFLIGHT, i);
  return 1;
}

/* Takes the next request from source into slot s; 0 when source is empty. */
static int fill_slot(lua_State *L, cp_transport *t, cp_slot *s, source_state *src) {
  int i = (int)(s - t->slots) + 1;
  if (t->single == SINGLE_ANSWER) { /* its one request: the arguments (checked at the call) */
    if (src->next != 1) {
      src->exhausted = 1;
      return 0;
    }
  } else if (!take_request(L, t, src, i)) {
    return 0;
  }
  s->index = src->next++;
  s->attempts = 0;
  s->not_before = 0;            /* may start at once */
  s->ready_at = cp_now_ms();    /* any later start waited for pacing */
  s->state = SLOT_WAITING;
  t->in_use++;
  if (i > t->high) t->high = i;
  return 1;
}

/* Hands the result at the top of the stack to on_done (or the results table). */
static void deliver(lua_State *L, cp_transport *t, cp_slot *s) {
  int i = (int)(s - t->slots) + 1;
  s->state = SLOT_FREE;
  t->in_use--;
  while (t->high > 0 && t->slots[t->high - 1].state == SLOT_FREE) t->high--;
  if (t->single) { /* the result is perform_one's */
    lua_replace(L, ST_RESULTS);
    return;
  }
  lua_pushnil(L);
  lua_rawseti(L, ST_INFLIGHT, i);
  if (lua_isnil(L, ARG_ON_DONE)) {
    lua_rawseti(L, ST_RESULTS, (int)s->index);
    return;
  }
  lua_pushvalue(L, ARG_ON_DONE);
  lua_insert(L, -2);
  lua_pushinteger(L, s->index);
  lua_insert(L, -2);
  lua_call(L, 2, 0);
}

static void deliver_stopped(lua_State *L, cp_transport *t, cp_slot *s, const source_state *src) {
  if (s->state == SLOT_RUNNING) {
    curl_multi_remove_handle(t->multi, s->easy);
    cp_gov_abandon(t->gov, s->on_wire);
  }
  if (strcmp(src->stop, "deadline") == 0) {
    cp_gov_push_deadline_result(L, s->attempts, NULL);
    deliver(L, t, s);
    return;
  }
  lua_createtable(L, 0, 3);
  lua_pushstring(L, src->stop);
  lua_setfield(L, -2, "stopped");
  cp_set_integer(L, "attempts", s->attempts);
  if (src->stop_message) {
    lua_pushstring(L, src->stop_message);
    lua_setfield(L, -2, "message");
  }
  deliver(L, t, s);
}

/* Stopping: requests not on their way are given back unsent (running ones too when `all`). */
static void stop_slots(lua_State *L, cp_transport *t, const source_state *src, int all) {
  int i;
  for (i = t->high - 1; i >= 0; i--) {
    cp_slot *s = &t->slots[i];
    if (s->state == SLOT_WAITING || (all && s->state == SLOT_RUNNING)) deliver_stopped(L, t, s, src);
  }
}

/* No answer without its question: an HTTP/1.x connection that holds bytes
 * once its answer is complete (a duplicated or unsolicited answer, a proxy's
 * 408) must never carry the next request, or the next call would read them
 * as its own answer. libcurl 7.88 counts such a readable idle socket as
 * alive, so it is shut down here: libcurl then finds it dead and connects
 * afresh. (HTTP/2 frames name their stream: nothing to do there.) */
static void drop_if_unclean(CURL *e) {
  long version = 0;
  curl_socket_t fd = CURL_SOCKET_BAD;
  char b;
  if (curl_easy_getinfo(e, CURLINFO_HTTP_VERSION, &version) != CURLE_OK || version >= CURL_HTTP_VERSION_2_0) return;
  if (curl_easy_getinfo(e, CURLINFO_ACTIVESOCKET, &fd) != CURLE_OK || fd == CURL_SOCKET_BAD) return;
  if (recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0) shutdown(fd, SHUT_RDWR);
}

/* What the last attempt got, for the deadline result's message. */
static const char *last_outcome(lua_State *L, const cp_outcome *o) {
  if (o->status > 0) return lua_pushfstring(L, "HTTP %d", (int)o->status);
  return lua_pushfstring(L, "%s", o->kind ? o->kind : "no answer");
}

/* Whether a content type says JSON (commprefs.response's rule: it names
 * "json" in any letter case; none is taken as JSON). */
static int json_type(const char *ctype) {
  const char *p;
  if (!ctype) return 1;
  for (p = ctype; *p; p++)
    if ((*p == 'j' || *p == 'J') && strncasecmp(p, "json", 4) == 0) return 1;
  return 0;
}

/* Whether the body holds a backslash followed by u anywhere (the bytes
 * commprefs.response's plain find looks for: a backslash-u escape, or bytes that look so). */
static int has_backslash_u(const char *b, size_t n) {
  const char *end = b + n, *p = b;
  while (p + 1 < end && (p = memchr(p, '\\', (size_t)(end - p - 1))) != NULL) {
    if (p[1] == 'u') return 1;
    p++;
  }
  return 0;
}

/* answer_one: the decoded envelope of a 2xx JSON answer pushed (1), with
 * its body at ST_BODY; 0 (nothing pushed) when the answer is not one or
 * does not decode: perform_one's result is made instead. */
static int push_answer(lua_State *L, cp_transport *t, cp_slot *s, CURLcode rc, const cp_outcome *o) {
  char *ctype = NULL;
  if (t->single != SINGLE_ANSWER || rc != CURLE_OK || o->status < 200 || o->status >= 300 || s->len == 0) return 0;
  curl_easy_getinfo(s->easy, CURLINFO_CONTENT_TYPE, &ctype);
  if (!json_type(ctype)) return 0;
  lua_pushlstring(L, s->buf, s->len);
  if (cp_decode_envelope(L, ST_DECODE, t->json_null, lua_gettop(L)) != 0) {
    lua_pop(L, 1);
    return 0;
  }
  lua_insert(L, -2);
  lua_replace(L, ST_BODY);
  t->answered = 1;
  t->escaped = has_backslash_u(s->buf, s->len);
  return 1;
}

static void finish(lua_State *L, cp_transport *t, cp_slot *s, CURLcode rc, double deadline) {
  cp_outcome o;
  cp_decision d;
  double now = cp_now_ms();
  if (rc == CURLE_OK) drop_if_unclean(s->easy);
  curl_multi_remove_handle(t->multi, s->easy);
  if (!s->on_wire) cp_gov_unsent(t->gov);
  s->attempts++;
  read_outcome(s, rc, &o);
  cp_gov_finish(t->gov, &t->policy, &o, s->on_wire, now - s->sent_at, deadline, &d);
  if (d.deadline) {
    cp_gov_push_deadline_result(L, s->attempts, last_outcome(L, &o));
    lua_remove(L, -2);
    deliver(L, t, s);
    return;
  }
  if (d.retry) {
    s->state = SLOT_WAITING;
    s->not_before = s->ready_at = now + d.delay_ms;
    return;
  }
  if (!push_answer(L, t, s, rc, &o)) push_result(L, t, s, rc, &o);
  deliver(L, t, s);
}

/* Starts what may start now; returns ms until something else may start. */
static double start_ready(lua_State *L, cp_transport *t, source_state *src) {
  double wake = 1000, now = cp_now_ms();
  int i;
  for (i = 0; i < t->nslots && !src->stop; i++) {
    cp_slot *s = &t->slots[i];
    double w;
    long timeout_ms, connect_ms = 0;
    if (s->state == SLOT_FREE) {
      /* asked per slot: a start may change it (the start rule, governor.c) */
      if (src->exhausted || t->in_use >= cp_gov_target(t->gov, t->nslots)) {
        if (i >= t->high) break; /* the rest are free too */
        continue;
      }
      if (!fill_slot(L, t, s, src)) continue;
    }
    if (s->state != SLOT_WAITING) continue;
    if (s->not_before > now) {
      if (s->not_before - now < wake) wake = s->not_before - now;
      continue;
    }
    w = cp_gov_next(t->gov, now, src->deadline, &src->stop, &src->stop_message);
    if (w != 0) {
      if (w > 0 && w < wake) wake = w;
      break;
    }
    if (t->token_due_ms > 0 && now >= t->token_due_ms) renew_token(L, t);
    timeout_ms = cp_policy_attempt_timeout(&t->policy, now, src->deadline, &connect_ms);
    start_attempt(L, t, s, timeout_ms > 0 ? timeout_ms : 1, connect_ms > 0 ? connect_ms : 1);
  }
  if (!src->exhausted && !src->stop) { /* the start rule may let one more start then */
    double w = cp_gov_start_wake(t->gov, now);
    if (w >= 0 && w < wake) wake = w;
  }
  if (src->stop) stop_slots(L, t, src, 0);
  return wake;
}

/* The slot whose easy handle e is (the slots in use are below t->high). */
static cp_slot *slot_of(cp_transport *t, CURL *e) {
  int i;
  cp_slot *s = NULL;
  for (i = 0; i < t->high; i++)
    if (t->slots[i].easy == e) return &t->slots[i];
  curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&s);
  return s;
}

static int perform_loop(lua_State *L) {
  cp_transport *t = lua_touserdata(L, ARG_SELF);
  signal_guard *g = lua_touserdata(L, ARG_ON_DONE + 2);
  source_state src = {0, 1, NULL, NULL, 0};
  int running = 0;
  src.deadline = luaL_optnumber(L, ARG_ON_DONE + 1, 0);
  lua_settop(L, ST_METHOD); /* ST_DECODE: answer_one's decode, then its method and body (else nil) */
  lua_pushvalue(L, ST_METHOD);
  lua_pushvalue(L, ST_BODY);
  lua_replace(L, ST_METHOD);
  if (t->single) { /* ST_RESULTS: the result; ST_INFLIGHT: the request while in flight */
    lua_pushnil(L);
    lua_replace(L, ST_RESULTS);
    lua_pushnil(L);
    lua_replace(L, ST_INFLIGHT);
  } else {
    lua_newtable(L);
    lua_replace(L, ST_RESULTS);
    lua_createtable(L, t->nslots < 8 ? t->nslots : 8, 0); /* grows as slots fill */
    lua_replace(L, ST_INFLIGHT);
  }
  lua_pushnil(L);
  lua_replace(L, ST_BODY);
  cp_gov_new_call(t->gov);
  for (;;) {
    CURLMsg *msg;
    int left, delivered = 0;
    double wake;
    if (t->handle_signals && cp_caught_signal()) {
      src.stop = "interrupted";
      stop_slots(L, t, &src, 1);
      break;
    }
    wake = start_ready(L, t, &src);
    if (t->in_use == 0 && (src.exhausted || src.stop)) break;
    curl_multi_perform(t->multi, &running);
    while ((msg = curl_multi_info_read(t->multi, &left)) != NULL) {
      cp_slot *s;
      if (msg->msg != CURLMSG_DONE) continue;
      s = slot_of(t, msg->easy_handle);
      finish(L, t, s, msg->data.result, src.deadline);
      delivered = 1;
    }
    if (delivered) continue; /* refill free slots at once */
    if (t->handle_signals) wake = signals_before_wait(g, wake);
    curl_multi_poll(t->multi, NULL, 0, wake < 1 ? 1 : (int)wake, NULL);
  }
  if (t->answered) { /* answer_one's envelope, body, escaped */
    lua_pushvalue(L, ST_RESULTS);
    lua_pushvalue(L, ST_BODY);
    lua_pushboolean(L, t->escaped);
    return 3;
  }
  if (t->single == SINGLE_ANSWER) { /* answer_one's nil, result */
    lua_pushnil(L);
    lua_pushvalue(L, ST_RESULTS);
    return 2;
  }
  if (lua_isnil(L, ARG_ON_DONE)) lua_pushvalue(L, ST_RESULTS);
  else lua_pushnil(L);
  if (src.stop) lua_pushstring(L, src.stop);
  else lua_pushnil(L);
  return 2;
}

/* Runs perform_loop protected: whatever it raises (a source or on_done
 * error, a request whose __index raises, out of memory), the client is put
 * back in order (nothing running, not busy) before the error goes on. */
int cp_transport_perform(lua_State *L, cp_transport *t, int single, const cp_decoder *dec) {
  signal_guard g;
  int rc, base;
  if (single == SINGLE_ANSWER) { /* (method, url, body, deadline): url as the source, then method, body */
    luaL_checkstring(L, 2);
    luaL_checkstring(L, 3);
    if (!lua_isnil(L, 4)) luaL_checkstring(L, 4);
    lua_settop(L, 5);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 4);
    lua_remove(L, 4);
    lua_remove(L, 2);
    lua_pushnil(L);
    lua_insert(L, ARG_ON_DONE); /* self, url, nil, deadline, method, body */
  } else if (single) {
    luaL_checktype(L, ARG_SOURCE, LUA_TTABLE);
    lua_settop(L, ARG_SOURCE + 1); /* the deadline */
    lua_pushnil(L);
    lua_insert(L, ARG_ON_DONE); /* no on_done: the arguments as perform's */
  } else {
    if (!lua_istable(L, ARG_SOURCE) && !lua_isfunction(L, ARG_SOURCE))
      luaL_argerror(L, ARG_SOURCE, "table or function expected");
    if (!lua_isnoneornil(L, ARG_ON_DONE)) luaL_checktype(L, ARG_ON_DONE, LUA_TFUNCTION);
  }
  if (t->active) luaL_error(L, "perform: the client is busy (called from its own callback)");
  lua_settop(L, single == SINGLE_ANSWER ? ARG_ON_DONE + 3 : ARG_ON_DONE + 1); /* the deadline */
  lua_settop(L, ARG_ON_DONE + 3); /* answer_one's method and body, else nil */
  cleanup_running(t);
  t->active = 1;
  t->single = single;
  t->answered = 0;
  t->json_null = dec ? dec->null : NULL;
  if (t->handle_signals) signals_begin(&g);
  base = lua_gettop(L);
  lua_pushcfunction(L, perform_loop);
  lua_pushvalue(L, ARG_SELF);
  lua_pushvalue(L, ARG_SOURCE);
  lua_pushvalue(L, ARG_ON_DONE);
  lua_pushvalue(L, ARG_ON_DONE + 1); /* the deadline */
  lua_pushlightuserdata(L, &g);
  if (dec) lua_pushvalue(L, dec->fn);
  else lua_pushnil(L);
  lua_pushvalue(L, ARG_ON_DONE + 2);
  lua_pushvalue(L, ARG_ON_DONE + 3);
  rc = lua_pcall(L, 8, LUA_MULTRET, 0);
  if (t->handle_signals) signals_restore(&g);
  t->active = 0;
  t->single = 0;
  t->answered = 0;
  if (rc != 0) cleanup_running(t);
  if (t->handle_signals) signals_reraise(&g);
  if (rc != 0) return lua_error(L);
  return lua_gettop(L) - base;
}
