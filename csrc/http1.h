/* http1.h: a sans-I/O HTTP/1.x response reader on Debian's http-parser
 * (see http1.c). Plain C so that the Lua binding and the fuzzer share it. */
#ifndef COMMPREFS_HTTP1_H
#define COMMPREFS_HTTP1_H

#include <stddef.h>
#include <http_parser.h>

/* The response headers commprefs keeps (any other header is skipped). */
enum { H1_CONTENT_TYPE, H1_RETRY_AFTER, H1_RATE_MAX, H1_RATE_INTERVAL, H1_DAILY_REMAINING,
       H1_LOCATION, H1_NHEADERS };

enum { H1_MORE = 0, H1_DONE = 1, H1_ERROR = -1 };

typedef struct {
  http_parser parser;
  size_t max_body;            /* 0: no limit */
  char *body;                 /* owned: the decoded body (chunked already undone) */
  size_t body_len, body_cap;
  char *value[H1_NHEADERS];   /* owned: the kept headers' values, NUL-terminated (kept by reset) */
  size_t value_len[H1_NHEADERS];
  int have[H1_NHEADERS];      /* 1: that header came with this response (value[] holds it) */
  char field[48];             /* the header name being read (longer names are none we keep) */
  size_t field_len;
  int capturing;              /* H1_* of the value being read, or -1 */
  int last_was_value;
  int status;                 /* 0 until the final (non-1xx) headers are in */
  int done, failed;
  int fed;                    /* 1 once anything was fed (cp_http1_feed) */
  size_t extra;               /* bytes received after the end of the response (fed with it or later) */
  int magic;                  /* how much of "HTTP/" the current status line has matched: 0 none yet, 5 all */
  int begun;                  /* set by on_message_begin: the parser paused right after a status line's 'H' */
  const char *error;          /* static text or errbuf when failed */
  char errbuf[96];
  const char *error_kind;     /* "network" or "too_large" */
} cp_http1;

void cp_http1_init(cp_http1 *r, size_t max_body);
/* Feeds bytes received; len 0 means the peer closed (EOF). Returns H1_DONE
 * once the response is complete, H1_MORE while more is needed, H1_ERROR
 * (r->error, r->error_kind) when the bytes are not a valid response, the
 * body exceeds max_body, or EOF came before the end. Sticky once DONE/ERROR.
 * Stricter than http-parser built without HTTP_PARSER_STRICT (Debian's): a
 * status line must start with exactly "HTTP/". Bytes fed after the end of
 * the response (in the same call or later ones) are counted in r->extra. */
int cp_http1_feed(cp_http1 *r, const char *data, size_t len);
/* 1 when the connection may carry another request after this response
 * (never when extra > 0: those bytes are no answer to a request of ours). */
int cp_http1_keepalive(const cp_http1 *r);
/* A kept header as a non-negative integer, or -1 when absent or invalid. */
long cp_http1_header_long(const cp_http1 *r, int which);
void cp_http1_free(cp_http1 *r);
/* Makes r a new reader with the same max_body (a small body buffer is kept). */
void cp_http1_reset(cp_http1 *r);

#endif
