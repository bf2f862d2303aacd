/* transport.c: owns the HTTP transport on libcurl's multi interface.
 *
 * client:perform(source, on_done) runs requests ({method=, url=, body=})
 * taken from `source` (an array, or a function returning the next request
 * or nil) with up to max_concurrency in flight over reused connections
 * (keep-alive, HTTP/2 multiplexing where offered). Each request is retried
 * on 429, 5xx, network errors and timeouts with exponential backoff and
 * jitter, honouring Retry-After, and every attempt is paced by the client's
 * rate limiter (ratelimit.c). When a request is final, on_done(i, result)
 * is called (i: its position in source); without on_done, perform returns
 * the array of results. A result is {status=, body=, content_type=,
 * retry_after=, attempts=} for any HTTP answer, or {kind=, message=,
 * attempts=} when none came ("network", "timeout", "tls").
 * Requests are pulled from source only when a slot is free, so memory stays
 * bounded by max_concurrency however long the source is. */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "transport.h"

enum { SLOT_FREE, SLOT_WAITING, SLOT_RUNNING };
enum { ARG_SELF = 1, ARG_SOURCE, ARG_ON_DONE, ST_RESULTS, ST_INFLIGHT };

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static double uniform(cp_transport *t) { /* xorshift64*, per client */
  t->rng ^= t->rng >> 12;
  t->rng ^= t->rng << 25;
  t->rng ^= t->rng >> 27;
  return (double)((t->rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static size_t on_body(char *data, size_t size, size_t n, void *ud) {
  cp_slot *s = ud;
  size_t add = size * n;
  if (s->len + add + 1 > s->cap) {
    size_t cap = s->cap ? s->cap : 16384;
    char *nb;
    while (cap < s->len + add + 1) cap *= 2;
    nb = realloc(s->buf, cap);
    if (!nb) return 0; /* curl reports a write error */
    s->buf = nb;
    s->cap = cap;
  }
  memcpy(s->buf + s->len, data, add);
  s->len += add;
  return add;
}

/* libcurl is about to send the request: that is when the rate window counts it. */
static int on_prereq(void *ud, char *ip, char *local_ip, int port, int local_port) {
  cp_slot *s = ud;
  (void)ip; (void)local_ip; (void)port; (void)local_port;
  if (!s->on_wire) {
    s->on_wire = 1;
    cp_rl_sent(&s->owner->rl, now_ms());
  }
  return CURL_PREREQFUNC_OK;
}

static char *dup_or_null(const char *s) {
  char *d;
  if (!s) return NULL;
  d = malloc(strlen(s) + 1);
  if (d) strcpy(d, s);
  return d;
}

static CURL *new_easy(cp_transport *t, cp_slot *s) {
  CURL *e = curl_easy_init();
  if (!e) return NULL;
  s->owner = t;
  curl_easy_setopt(e, CURLOPT_PRIVATE, s);
  curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, on_prereq);
  curl_easy_setopt(e, CURLOPT_PREREQDATA, s);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, s->errbuf);
  curl_easy_setopt(e, CURLOPT_USERAGENT, t->user_agent);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, t->timeout_ms);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, t->connect_timeout_ms);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
  /* No Accept-Encoding: HubSpot's answers are small and rate-limited traffic is
   * never bandwidth-bound, while decompression costs CPU on every answer (6%). */
  curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L); /* paths are already encoded exactly */
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L); /* a redirect never carries the token away */
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
#endif
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, t->verify_tls ? 1L : 0L);
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, t->verify_tls ? 2L : 0L);
  if (t->ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, t->ca_file);
  return e;
}

static struct curl_slist *append(struct curl_slist *h, const char *line) {
  struct curl_slist *n = curl_slist_append(h, line);
  if (!n) curl_slist_free_all(h);
  return n;
}

/* Authorization + Accept, and for POST also Content-Type and no Expect. */
static struct curl_slist *auth_headers(const char *token, int post) {
  static const char prefix[] = "Authorization: Bearer ";
  struct curl_slist *h;
  size_t len = strlen(token);
  char *line = malloc(sizeof(prefix) + len);
  if (!line) return NULL;
  memcpy(line, prefix, sizeof(prefix) - 1);
  memcpy(line + sizeof(prefix) - 1, token, len + 1);
  h = curl_slist_append(NULL, line);
  memset(line, 0, sizeof(prefix) + len);
  free(line);
  if (h) h = append(h, "Accept: application/json");
  if (h && post) h = append(h, "Content-Type: application/json");
  if (h && post) h = append(h, "Expect:"); /* no 100-continue round trip */
  return h;
}

static void wipe_headers(struct curl_slist *h) {
  struct curl_slist *n;
  for (n = h; n; n = n->next) memset(n->data, 0, strlen(n->data));
  curl_slist_free_all(h);
}

int cp_transport_open(cp_transport *t, const cp_config *c, const char **err) {
  int i;
  memset(t, 0, sizeof(*t));
  t->verify_tls = c->verify_tls;
  t->timeout_ms = c->timeout_ms;
  t->connect_timeout_ms = c->connect_timeout_ms;
  t->max_retries = c->max_retries;
  t->backoff_base_ms = c->backoff_base_ms;
  t->backoff_max_ms = c->backoff_max_ms;
  t->max_retry_after_ms = c->max_retry_after_ms;
  t->rng = (unsigned long long)time(NULL) ^ ((unsigned long long)(size_t)t << 16) ^ 0x9E3779B97F4A7C15ULL;
  t->nslots = c->max_concurrency;
  *err = "out of memory";
  if (cp_rl_init(&t->rl, c->rate_max, c->rate_interval_ms) != 0) goto fail;
  t->user_agent = dup_or_null(c->user_agent);
  t->ca_file = dup_or_null(c->ca_file);
  t->headers = auth_headers(c->token, 0);
  t->post_headers = auth_headers(c->token, 1);
  t->multi = curl_multi_init();
  t->slots = calloc((size_t)t->nslots, sizeof(cp_slot));
  if (!t->user_agent || (c->ca_file && !t->ca_file) || !t->headers || !t->post_headers || !t->multi || !t->slots)
    goto fail;
  curl_multi_setopt(t->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
  curl_multi_setopt(t->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)t->nslots);
  for (i = 0; i < t->nslots; i++) {
    if (!(t->slots[i].easy = new_easy(t, &t->slots[i]))) goto fail;
  }
  return 0;
fail:
  cp_transport_close(t);
  return -1;
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
    free(t->slots[i].buf);
  }
  free(t->slots);
  t->slots = NULL;
  if (t->multi) curl_multi_cleanup(t->multi);
  t->multi = NULL;
  if (t->headers) wipe_headers(t->headers);
  if (t->post_headers) wipe_headers(t->post_headers);
  t->headers = t->post_headers = NULL;
  free(t->user_agent);
  free(t->ca_file);
  t->user_agent = t->ca_file = NULL;
  cp_rl_free(&t->rl);
}

/* ------------------------------------------------------------ one attempt */

static void start_attempt(lua_State *L, cp_transport *t, cp_slot *s) {
  int i = (int)(s - t->slots) + 1;
  const char *method, *url, *body;
  size_t body_len = 0;
  lua_rawgeti(L, ST_INFLIGHT, i);
  lua_getfield(L, -1, "method");
  lua_getfield(L, -2, "url");
  lua_getfield(L, -3, "body");
  method = lua_tostring(L, -3);
  url = lua_tostring(L, -2);
  body = lua_tolstring(L, -1, &body_len);
  /* the strings stay alive: the request table is held in the in-flight table */
  lua_pop(L, 4);
  s->len = 0;
  s->errbuf[0] = '\0';
  curl_easy_setopt(s->easy, CURLOPT_URL, url);
  if (method && strcmp(method, "POST") == 0) {
    curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, t->post_headers);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE, (long)body_len);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, body ? body : "");
  } else {
    curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, t->headers);
    curl_easy_setopt(s->easy, CURLOPT_HTTPGET, 1L);
  }
  s->on_wire = 0;
  cp_rl_start(&t->rl);
  t->sent++;
  curl_multi_add_handle(t->multi, s->easy);
  s->state = SLOT_RUNNING;
}

static const char *error_kind(CURLcode rc) {
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

static long header_long(CURL *e, const char *name) {
  struct curl_header *h;
  if (curl_easy_header(e, name, 0, CURLH_HEADER, -1, &h) != CURLHE_OK) return -1;
  return strtol(h->value, NULL, 10);
}

static double backoff_ms(cp_transport *t, int attempt) {
  double d = t->backoff_base_ms;
  int i;
  for (i = 1; i < attempt && d < t->backoff_max_ms; i++) d *= 2;
  if (d > t->backoff_max_ms) d = t->backoff_max_ms;
  return d / 2 + uniform(t) * d / 2;
}

/* Pushes the result table of a finished attempt; returns 1 if worth a retry.
 * *retry_after_ms gets the server's Retry-After (or -1). */
static int push_result(lua_State *L, cp_transport *t, cp_slot *s, CURLcode rc, double *retry_after_ms) {
  long status = 0;
  curl_off_t ra = -1;
  char *ctype = NULL;
  *retry_after_ms = -1;
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, s->attempts);
  lua_setfield(L, -2, "attempts");
  if (rc != CURLE_OK) {
    lua_pushstring(L, error_kind(rc));
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, s->errbuf[0] ? s->errbuf : curl_easy_strerror(rc));
    lua_setfield(L, -2, "message");
    return rc != CURLE_URL_MALFORMAT && rc != CURLE_UNSUPPORTED_PROTOCOL &&
           strcmp(error_kind(rc), "tls") != 0;
  }
  curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(s->easy, CURLINFO_CONTENT_TYPE, &ctype);
  curl_easy_getinfo(s->easy, CURLINFO_RETRY_AFTER, &ra);
  cp_rl_learn(&t->rl, header_long(s->easy, "X-HubSpot-RateLimit-Max"),
              header_long(s->easy, "X-HubSpot-RateLimit-Interval-Milliseconds"));
  lua_pushinteger(L, status);
  lua_setfield(L, -2, "status");
  lua_pushlstring(L, s->buf ? s->buf : "", s->len);
  lua_setfield(L, -2, "body");
  if (ctype) {
    lua_pushstring(L, ctype);
    lua_setfield(L, -2, "content_type");
  }
  if (ra >= 0) {
    *retry_after_ms = (double)ra * 1000.0;
    lua_pushinteger(L, (lua_Integer)ra);
    lua_setfield(L, -2, "retry_after");
  }
  if (status == 429) {
    int daily_out = header_long(s->easy, "X-HubSpot-RateLimit-Daily-Remaining") == 0;
    t->throttled++;
    cp_rl_throttled(&t->rl, now_ms(), *retry_after_ms > 0 ? *retry_after_ms : 0);
    if (daily_out) {
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "daily_limit");
      return 0; /* not worth retrying before the account's midnight */
    }
    return 1;
  }
  return status >= 500;
}

/* ------------------------------------------------------------ the loop */

typedef struct {
  int exhausted;       /* source has no more requests */
  lua_Integer next;    /* position of the next request in source */
} source_state;

static void cleanup_running(cp_transport *t) {
  int i;
  for (i = 0; i < t->nslots; i++) {
    if (t->slots[i].state == SLOT_RUNNING) {
      curl_multi_remove_handle(t->multi, t->slots[i].easy);
      if (!t->slots[i].on_wire) cp_rl_unsent(&t->rl);
    }
    t->slots[i].state = SLOT_FREE;
  }
}

/* Raises the error at the top of the stack after putting the client back in order. */
static int fail(lua_State *L, cp_transport *t) {
  cleanup_running(t);
  t->active = 0;
  return lua_error(L);
}

/* Takes the next request from source into slot s; 0 when source is empty. */
static int fill_slot(lua_State *L, cp_transport *t, cp_slot *s, source_state *src) {
  int i = (int)(s - t->slots) + 1;
  if (lua_type(L, ARG_SOURCE) == LUA_TFUNCTION) {
    lua_pushvalue(L, ARG_SOURCE);
    if (lua_pcall(L, 0, 1, 0) != 0) fail(L, t);
  } else {
    lua_rawgeti(L, ARG_SOURCE, (int)src->next);
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    src->exhausted = 1;
    return 0;
  }
  if (!lua_istable(L, -1)) {
    lua_pushfstring(L, "perform: request %d is a %s, not a table", (int)src->next, luaL_typename(L, -1));
    fail(L, t);
  }
  lua_getfield(L, -1, "url");
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pushfstring(L, "perform: request %d has no url", (int)src->next);
    fail(L, t);
  }
  lua_pop(L, 1);
  lua_rawseti(L, ST_INFLIGHT, i);
  s->index = src->next++;
  s->attempts = 0;
  s->not_before = 0;
  s->state = SLOT_WAITING;
  return 1;
}

static void deliver(lua_State *L, cp_transport *t, cp_slot *s) {
  int i = (int)(s - t->slots) + 1;
  s->state = SLOT_FREE;
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
  if (lua_pcall(L, 2, 0, 0) != 0) fail(L, t);
}

static void finish(lua_State *L, cp_transport *t, cp_slot *s, CURLcode rc) {
  double ra;
  int retry;
  curl_multi_remove_handle(t->multi, s->easy);
  if (!s->on_wire) cp_rl_unsent(&t->rl);
  s->attempts++;
  retry = push_result(L, t, s, rc, &ra);
  if (retry && s->attempts <= t->max_retries && ra <= t->max_retry_after_ms) {
    lua_pop(L, 1);
    t->retries++;
    s->state = SLOT_WAITING;
    s->not_before = now_ms() + (ra >= 0 ? ra : backoff_ms(t, s->attempts));
    return;
  }
  deliver(L, t, s);
}

/* Starts what may start now; returns ms until something else may start. */
static double start_ready(lua_State *L, cp_transport *t, source_state *src) {
  double wake = 1000, now = now_ms();
  int i;
  for (i = 0; i < t->nslots; i++) {
    cp_slot *s = &t->slots[i];
    if (s->state == SLOT_FREE && !src->exhausted) fill_slot(L, t, s, src);
    if (s->state != SLOT_WAITING) continue;
    if (s->not_before > now) {
      if (s->not_before - now < wake) wake = s->not_before - now;
      continue;
    }
    {
      double w = cp_rl_wait(&t->rl, now);
      if (w > 0) {
        if (w < wake) wake = w;
        break;
      }
    }
    start_attempt(L, t, s);
  }
  return wake;
}

static int busy(cp_transport *t) {
  int i;
  for (i = 0; i < t->nslots; i++)
    if (t->slots[i].state != SLOT_FREE) return 1;
  return 0;
}

int cp_transport_perform(lua_State *L, cp_transport *t) {
  source_state src = {0, 1};
  int running = 0;
  if (!lua_istable(L, ARG_SOURCE) && !lua_isfunction(L, ARG_SOURCE))
    luaL_argerror(L, ARG_SOURCE, "table or function expected");
  if (!lua_isnoneornil(L, ARG_ON_DONE)) luaL_checktype(L, ARG_ON_DONE, LUA_TFUNCTION);
  if (t->active) luaL_error(L, "perform: the client is busy (called from its own callback)");
  lua_settop(L, ARG_ON_DONE);
  lua_newtable(L); /* ST_RESULTS */
  lua_createtable(L, t->nslots, 0); /* ST_INFLIGHT */
  cleanup_running(t); /* a previous call interrupted by an error */
  t->active = 1;
  for (;;) {
    CURLMsg *msg;
    int left, delivered = 0;
    double wake = start_ready(L, t, &src);
    if (!busy(t) && src.exhausted) break;
    curl_multi_perform(t->multi, &running);
    while ((msg = curl_multi_info_read(t->multi, &left)) != NULL) {
      cp_slot *s;
      if (msg->msg != CURLMSG_DONE) continue;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
      finish(L, t, s, msg->data.result);
      delivered = 1;
    }
    if (delivered) continue; /* refill free slots at once */
    curl_multi_poll(t->multi, NULL, 0, wake < 1 ? 1 : (int)wake, NULL);
  }
  t->active = 0;
  lua_settop(L, ST_RESULTS);
  return lua_isnil(L, ARG_ON_DONE) ? 1 : 0;
}
