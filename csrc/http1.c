/* http1.c: owns the sans-I/O HTTP/1.x response reader of the cosocket
 * transport (lua/commprefs/ngx/transport.lua), on Debian's http-parser.
 * Lua feeds it the bytes a socket gave; it reports the status, the headers
 * commprefs needs (content type, Retry-After, HubSpot's rate-limit headers,
 * Location), the body with chunked encoding undone, completion, and whether
 * the connection may be kept. It does no I/O and never yields.
 *
 *   core.http1_response{max_body = n} -> parser   (max_body 0/nil: no limit)
 *   parser:feed(bytes) -> true (complete) | false (more needed) | nil, message, kind
 *       feed("") tells it the peer closed the connection (EOF): a body that
 *       runs to EOF completes, anything else incomplete is a "network" error.
 *       kind is "network" (not a valid response, cut short) or "too_large".
 *   parser:result() -> {status=, body=, content_type=, retry_after=, rate_max=,
 *       rate_interval_ms=, daily_remaining=, location=, keepalive=, extra=}
 *       (each header field only when present and valid; raises before
 *       completion). extra: the number of bytes fed after the end of this
 *       response (in the feed that completed it and any later feed), present
 *       only when > 0; keepalive is then false: the connection must not be
 *       reused, whatever those bytes are (a forged or duplicated answer).
 *   Stricter than http-parser alone: a status line must start with exactly
 *   "HTTP/" (Debian's http-parser checks only the 'H'); two Content-Length
 *   headers are an error even when they agree (http-parser 2.9.4 itself).
 *   parser:close() frees the body at once (also __gc, __close). */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "compat.h"
#include "http1.h"
#include "headers.h"

#define HTTP1_MT "commprefs.core.http1"
static const char HTTP1_KEY = 0; /* the registry key of the metatable (cp_register_key) */
#define check_parser(L, i) ((cp_http1 *)cp_checkudata(L, (i), &HTTP1_KEY, HTTP1_MT))
#define MAX_VALUE 4096 /* longer values of kept headers are cut: none is legitimately that long */

static const char *const KEPT[H1_NHEADERS] = {
  "content-type", "retry-after", "x-hubspot-ratelimit-max",
  "x-hubspot-ratelimit-interval-milliseconds", "x-hubspot-ratelimit-daily-remaining", "location"};
static const size_t KEPT_LEN[H1_NHEADERS] = {12, 11, 23, 41, 35, 8}; /* strlen(KEPT[i]) */

static int fail_with(cp_http1 *r, const char *kind, const char *msg) {
  r->failed = 1;
  r->error_kind = kind;
  r->error = msg;
  return -1;
}

static int grow(char **buf, size_t *cap, size_t need) {
  size_t cap2 = *cap ? *cap : 256;
  char *nb;
  while (cap2 < need) {
    if (cap2 > ((size_t)-1) / 2) return -1;
    cap2 *= 2;
  }
  if (cap2 == *cap) return 0;
  nb = realloc(*buf, cap2);
  if (!nb) return -1;
  *buf = nb;
  *cap = cap2;
  return 0;
}

/* Trims the trailing blanks of the kept value being read. */
static void end_value(cp_http1 *r) {
  int w = r->capturing;
  if (w >= 0 && r->value[w]) {
    while (r->value_len[w] > 0 && (r->value[w][r->value_len[w] - 1] == ' ' || r->value[w][r->value_len[w] - 1] == '\t'))
      r->value_len[w]--;
    r->value[w][r->value_len[w]] = '\0';
  }
  r->capturing = -1;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  cp_http1 *r = p->data;
  if (r->last_was_value) {
    end_value(r);
    r->field_len = 0;
    r->last_was_value = 0;
  }
  if (r->field_len + len < sizeof(r->field)) memcpy(r->field + r->field_len, at, len);
  r->field_len += len; /* may exceed the buffer: then it is no name we keep */
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  cp_http1 *r = p->data;
  if (!r->last_was_value) {
    int i;
    r->last_was_value = 1;
    r->capturing = -1;
    if (r->field_len < sizeof(r->field)) {
      r->field[r->field_len] = '\0';
      for (i = 0; i < H1_NHEADERS; i++) /* the length first: most headers are none we keep */
        if (r->field_len == KEPT_LEN[i] && strcasecmp(r->field, KEPT[i]) == 0) r->capturing = i;
    }
    if (r->capturing >= 0) { /* a repeated header: the last one counts */
      int w = r->capturing;
      if (!r->value[w] && !(r->value[w] = malloc(MAX_VALUE + 1)))
        return fail_with(r, "network", "out of memory reading the response headers");
      r->value_len[w] = 0;
      r->value[w][0] = '\0';
      r->have[w] = 1;
    }
  }
  if (r->capturing >= 0) {
    int w = r->capturing;
    size_t n = r->value_len[w] + len > MAX_VALUE ? MAX_VALUE - r->value_len[w] : len;
    memcpy(r->value[w] + r->value_len[w], at, n);
    r->value_len[w] += n;
  }
  return 0;
}

static int on_headers_complete(http_parser *p) {
  cp_http1 *r = p->data;
  end_value(r);
  r->field_len = 0;
  r->last_was_value = 0;
  if (p->status_code < 100 || p->status_code > 999)
    return fail_with(r, "network", "invalid HTTP response: the status is not three digits");
  if (p->status_code / 100 == 1) return 0; /* informational: the real answer follows */
  r->status = p->status_code;
  if (r->max_body && p->content_length != ULLONG_MAX && p->content_length > r->max_body)
    return fail_with(r, "too_large", "the response body is larger than max_response_size");
  /* an announced length up to 1 MiB is reserved at once; a larger body grows as it comes */
  if (p->content_length != ULLONG_MAX && p->content_length > 0 && p->content_length <= (1u << 20)) {
    if (grow(&r->body, &r->body_cap, (size_t)p->content_length + 1) != 0)
      return fail_with(r, "network", "out of memory reading the response body");
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  cp_http1 *r = p->data;
  if (r->max_body && len > r->max_body - r->body_len)
    return fail_with(r, "too_large", "the response body is larger than max_response_size");
  if (grow(&r->body, &r->body_cap, r->body_len + len + 1) != 0)
    return fail_with(r, "network", "out of memory reading the response body");
  memcpy(r->body + r->body_len, at, len);
  r->body_len += len;
  return 0;
}

static int on_message_complete(http_parser *p) {
  cp_http1 *r = p->data;
  int i;
  if (r->status == 0) { /* the end of a 1xx: forget its headers */
    for (i = 0; i < H1_NHEADERS; i++) r->value_len[i] = 0, r->have[i] = 0;
    return 0;
  }
  r->done = 1;
  http_parser_pause(p, 1); /* anything after this response is not ours */
  return 0;
}

/* http-parser (without HTTP_PARSER_STRICT) checks only the 'H' of "HTTP/":
 * it pauses here, right after that 'H', so that feed() checks the rest. */
static int on_message_begin(http_parser *p) {
  cp_http1 *r = p->data;
  r->begun = 1;
  r->magic = 1;
  http_parser_pause(p, 1);
  return 0;
}

static const http_parser_settings SETTINGS = {
  on_message_begin, NULL, NULL, on_header_field, on_header_value, on_headers_complete, on_body,
  on_message_complete, NULL, NULL};

void cp_http1_init(cp_http1 *r, size_t max_body) {
  memset(r, 0, sizeof(*r));
  http_parser_init(&r->parser, HTTP_RESPONSE);
  r->parser.data = r;
  r->max_body = max_body;
  r->capturing = -1;
}

/* Checks the next bytes of a status line against the rest of "HTTP/"
 * (without consuming them: the parser reads them next). 0, or -1 when wrong. */
static int check_magic(cp_http1 *r, const char *data, size_t len) {
  static const char MAGIC[] = "HTTP/";
  size_t i;
  for (i = 0; i < len && r->magic > 0 && r->magic < 5; i++, r->magic++)
    if (data[i] != MAGIC[r->magic]) return -1;
  return 0;
}

/* Runs http-parser over data, checking each status line it begins (see
 * on_message_begin). Returns the bytes consumed; r->failed on a bad line. */
static size_t execute(cp_http1 *r, const char *data, size_t len) {
  size_t pos = 0;
  for (;;) {
    if (check_magic(r, data + pos, len - pos) != 0) {
      fail_with(r, "network", "invalid HTTP response: the status line does not start with \"HTTP/\"");
      return pos;
    }
    pos += http_parser_execute(&r->parser, &SETTINGS, data + pos, len - pos);
    if (!r->begun) return pos;
    r->begun = 0;
    http_parser_pause(&r->parser, 0);
    if (pos == len) return pos; /* not execute(""): that would mean EOF */
  }
}

int cp_http1_feed(cp_http1 *r, const char *data, size_t len) {
  size_t n;
  enum http_errno e;
  if (r->failed) return H1_ERROR;
  r->fed = 1;
  if (r->done) {
    r->extra += len;
    return H1_DONE;
  }
  n = execute(r, data, len);
  if (r->failed) return H1_ERROR;
  e = HTTP_PARSER_ERRNO(&r->parser);
  if (r->done) {
    r->extra += len - n;
    return H1_DONE;
  }
  if (e != HPE_OK && len == 0) {
    fail_with(r, "network", "the connection closed before the response was complete");
    return H1_ERROR;
  }
  if (e != HPE_OK) {
    snprintf(r->errbuf, sizeof(r->errbuf), "invalid HTTP response: %s", http_errno_description(e));
    fail_with(r, "network", r->errbuf);
    return H1_ERROR;
  }
  if (r->parser.upgrade) {
    fail_with(r, "network", "the server switched protocols");
    return H1_ERROR;
  }
  if (len == 0) {
    fail_with(r, "network", "the connection closed before the response was complete");
    return H1_ERROR;
  }
  return H1_MORE;
}

int cp_http1_keepalive(const cp_http1 *r) {
  return r->done && r->extra == 0 && http_should_keep_alive(&r->parser);
}

long cp_http1_header_long(const cp_http1 *r, int which) {
  return r->have[which] ? cp_parse_header_count(r->value[which]) : -1;
}

void cp_http1_free(cp_http1 *r) {
  int i;
  free(r->body);
  r->body = NULL;
  r->body_len = r->body_cap = 0;
  for (i = 0; i < H1_NHEADERS; i++) {
    free(r->value[i]);
    r->value[i] = NULL;
    r->value_len[i] = 0;
    r->have[i] = 0;
  }
}

#define H1_KEEP_BODY_CAP 65536 /* a reset keeps a body buffer up to this size for the next answer */

void cp_http1_reset(cp_http1 *r) { /* the buffers are kept (values absent: have[] = 0) */
  char *body = r->body, *value[H1_NHEADERS];
  size_t cap = r->body_cap, max = r->max_body;
  int i;
  for (i = 0; i < H1_NHEADERS; i++) value[i] = r->value[i];
  if (cap > H1_KEEP_BODY_CAP) {
    free(body);
    body = NULL;
    cap = 0;
  }
  cp_http1_init(r, max);
  r->body = body;
  r->body_cap = cap;
  for (i = 0; i < H1_NHEADERS; i++) r->value[i] = value[i];
}

/* ------------------------------------------------------------ Lua binding */

static int l_new(lua_State *L) {
  lua_Number max = 0;
  cp_http1 *r;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "max_body");
    if (!lua_isnil(L, -1)) {
      if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0))
        return luaL_error(L, "commprefs.core.http1_response: max_body must be a non-negative number");
      max = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
  }
  r = cp_newuserdata(L, sizeof(cp_http1));
  cp_http1_init(r, max >= (lua_Number)((size_t)-1 / 2) ? 0 : (size_t)max);
  luaL_setmetatable(L, HTTP1_MT);
  return 1;
}

/* nil, message, kind: what feed and take return after an error */
static int push_feed_error(lua_State *L, const cp_http1 *r) {
  lua_pushnil(L);
  lua_pushstring(L, r->error);
  lua_pushstring(L, r->error_kind);
  return 3;
}

static int l_feed(lua_State *L) {
  cp_http1 *r = check_parser(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  int rc = cp_http1_feed(r, s, len);
  if (rc == H1_ERROR) return push_feed_error(L, r);
  lua_pushboolean(L, rc == H1_DONE);
  return 1;
}

static void set_long(lua_State *L, const char *key, long v) {
  if (v < 0) return;
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, key);
}

static void set_value(lua_State *L, const cp_http1 *r, const char *key, int which) {
  if (!r->have[which]) return;
  lua_pushlstring(L, r->value[which], r->value_len[which]);
  lua_setfield(L, -2, key);
}

static int l_result(lua_State *L) {
  cp_http1 *r = check_parser(L, 1);
  if (!r->done) return luaL_error(L, "commprefs: http1 parser:result() before the response is complete");
  lua_createtable(L, 0, 11);
  lua_pushinteger(L, r->status);
  lua_setfield(L, -2, "status");
  lua_pushlstring(L, r->body ? r->body : "", r->body_len);
  lua_setfield(L, -2, "body");
  set_value(L, r, "content_type", H1_CONTENT_TYPE);
  set_value(L, r, "location", H1_LOCATION);
  if (r->have[H1_RETRY_AFTER]) { /* the one Retry-After rule: policy.c */
    double ra = cp_parse_retry_after(r->value[H1_RETRY_AFTER]);
    if (ra >= 0) {
      lua_pushinteger(L, (lua_Integer)ra);
      lua_setfield(L, -2, "retry_after");
    }
  }
  set_long(L, "rate_max", cp_http1_header_long(r, H1_RATE_MAX));
  set_long(L, "rate_interval_ms", cp_http1_header_long(r, H1_RATE_INTERVAL));
  set_long(L, "daily_remaining", cp_http1_header_long(r, H1_DAILY_REMAINING));
  lua_pushboolean(L, cp_http1_keepalive(r));
  lua_setfield(L, -2, "keepalive");
  if (r->extra > 0) { /* only then: the connection must not carry another request */
    lua_pushinteger(L, (lua_Integer)r->extra);
    lua_setfield(L, -2, "extra");
  }
  return 1;
}


/* The result fields take() sets, interned once: its upvalues (cp_register_http1). */
static const char *const TAKEN_KEYS[] = {"status", "body", "content_type", "location", "retry_after",
                                         "rate_max", "rate_interval_ms", "daily_remaining"};
enum { T_STATUS = 1, T_BODY, T_CONTENT_TYPE, T_LOCATION, T_RETRY_AFTER, T_RATE_MAX, T_RATE_INTERVAL,
       T_DAILY_REMAINING, T_N = T_DAILY_REMAINING };

/* Pushes result key k (an upvalue of take); its value follows, then lua_rawset(L, -3). */
static void push_key(lua_State *L, int k) { lua_pushvalue(L, lua_upvalueindex(k)); }

static void set_taken_long(lua_State *L, int k, long v) {
  if (v < 0) return;
  push_key(L, k);
  lua_pushinteger(L, (lua_Integer)v);
  lua_rawset(L, -3);
}

static void set_taken_value(lua_State *L, const cp_http1 *r, int k, int which) {
  push_key(L, k);
  lua_pushlstring(L, r->value[which], r->value_len[which]);
  lua_rawset(L, -3);
}

/* The result table of take(): status, body and the header fields present,
 * location only on a redirect (the transport's C2 contract). */
static void push_taken(lua_State *L, const cp_http1 *r, const char *body, size_t body_len) {
  double ra = r->have[H1_RETRY_AFTER] ? cp_parse_retry_after(r->value[H1_RETRY_AFTER]) : -1;
  long rmax = cp_http1_header_long(r, H1_RATE_MAX), rint = cp_http1_header_long(r, H1_RATE_INTERVAL),
       daily = cp_http1_header_long(r, H1_DAILY_REMAINING);
  int loc = r->have[H1_LOCATION] && r->status >= 300 && r->status <= 399;
  lua_createtable(L, 0, 3 + r->have[H1_CONTENT_TYPE] + loc + (ra >= 0) + (rmax >= 0) + (rint >= 0) + (daily >= 0));
  push_key(L, T_STATUS);
  lua_pushinteger(L, r->status);
  lua_rawset(L, -3);
  push_key(L, T_BODY);
  lua_pushlstring(L, body ? body : "", body_len);
  lua_rawset(L, -3);
  if (r->have[H1_CONTENT_TYPE]) set_taken_value(L, r, T_CONTENT_TYPE, H1_CONTENT_TYPE);
  if (loc) set_taken_value(L, r, T_LOCATION, H1_LOCATION);
  if (ra >= 0) {
    push_key(L, T_RETRY_AFTER);
    lua_pushinteger(L, (lua_Integer)ra);
    lua_rawset(L, -3);
  }
  set_taken_long(L, T_RATE_MAX, rmax);
  set_taken_long(L, T_RATE_INTERVAL, rint);
  set_taken_long(L, T_DAILY_REMAINING, daily);
}

/* parser:take(bytes) -> result, keepalive | false (more needed) | nil, message, kind:
 * feed, result and reset in one call. On completion the result is that of
 * result() without keepalive and extra (keepalive is the second value: false
 * when bytes came after the answer) and location only on a 3xx; the parser
 * is then reset, ready for the next answer. After an error it must be reset
 * (or closed) before another use, as after feed(). */
static int l_take(lua_State *L) {
  cp_http1 *r = check_parser(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  int rc = cp_http1_feed(r, s, len);
  if (rc == H1_ERROR) return push_feed_error(L, r);
  if (rc == H1_MORE) {
    lua_pushboolean(L, 0);
    return 1;
  }
  push_taken(L, r, r->body, r->body_len);
  lua_pushboolean(L, cp_http1_keepalive(r));
  cp_http1_reset(r);
  return 2;
}

/* parser:reset() -> parser: ready for the next answer (same max_body), as new */
static int l_reset(lua_State *L) {
  cp_http1_reset(check_parser(L, 1));
  lua_settop(L, 1);
  return 1;
}

static int l_close(lua_State *L) {
  cp_http1_free(luaL_checkudata(L, 1, HTTP1_MT));
  return 0;
}

static int l_tostring(lua_State *L) {
  cp_http1 *r = luaL_checkudata(L, 1, HTTP1_MT);
  lua_pushfstring(L, "commprefs.core.http1 (%s)", r->failed ? "failed" : r->done ? "complete" : "reading");
  return 1;
}

void cp_register_http1(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"feed", l_feed}, {"result", l_result}, {"reset", l_reset}, {"close", l_close}, {NULL, NULL}};
  int i;
  lua_pushcfunction(L, l_new);
  lua_setfield(L, -2, "http1_response");
  cp_register_class(L, HTTP1_MT, methods, l_close, l_tostring);
  cp_register_key(L, HTTP1_MT, &HTTP1_KEY);
  /* take: with its result keys as upvalues (push_taken) */
  luaL_getmetatable(L, HTTP1_MT);
  lua_getfield(L, -1, "__index");
  for (i = 0; i < T_N; i++) lua_pushstring(L, TAKEN_KEYS[i]);
  lua_pushcclosure(L, l_take, T_N);
  lua_setfield(L, -2, "take");
  lua_pop(L, 2);
}
