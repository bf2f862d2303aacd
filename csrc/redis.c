/* redis.c: owns the blocking Redis connection of the core (hiredis 0.14):
 * redis://[user:pass@]host[:port][/db] URLs, connect and command timeouts,
 * AUTH and SELECT, reconnecting after a lost connection; the Lua objects of
 * core.redis_connect (contract C4); and the budget shared by every process
 * and host on one key (contract C3), whose one server-side script
 * (core.budget_script()) is also what the cosocket side runs.
 *
 * The budget keeps two keys in one Redis Cluster slot (hash tag {K}):
 * commprefs:{K}:window, a sorted set of the times (Redis TIME, ms) requests
 * were granted in the current rolling window, and commprefs:{K}:limits, a
 * hash with HubSpot's learned max, interval and margin (ms: ratelimit.c's
 * plus CP_BUDGET_SLACK_MS, see redis.h), a 429's blocked-until time and when
 * the next grant is due ("due": grants are spaced evenly, ratelimit.c's rule:
 * once CP_PACE_BURST are in the window, one per (interval + margin) / max on
 * a schedule of its own, which catches up a late grant, never sooner than
 * half a spacing after the grant before).
 * Both expire. Only numbers are written: never the token. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "redis.h"
#include "signals.h"
#include "util.h"

#define CONN_MT "commprefs.core.redis"
#define LOST_RETRY_MS 250.0    /* while Redis is lost: ask again after this long */
#define SIGNAL_CHECK_MS 50     /* longest wait for a reply before the signal count is looked at */
#define KEY_MAX 200
#define BUDGET_KEY_FORMAT "commprefs:{%s}:%s" /* one Cluster slot per budget */

/* The budget script. KEYS[1] window (zset), KEYS[2] limits (hash).
 * ARGV[1] = "acquire" (ARGV[2..4] this caller's own max, interval, margin, or
 * "" when it has learned none): 0 = granted and counted, >0 = ms to wait.
 * "learn" max interval margin [manual]: written for every participant; a window
 * set by hand ("manual") is never replaced by a learned one. "throttled" ms:
 * nobody is granted anything for that long. Time comes from Redis alone. */
#define BUDGET_STR_(x) #x
#define BUDGET_STR(x) BUDGET_STR_(x)
static const char BUDGET_SCRIPT[] =
  "-- commprefs budget: one atomic step per acquisition (see csrc/redis.c)\n"
  "local w, s, op = KEYS[1], KEYS[2], ARGV[1]\n"
  "local t = redis.call('TIME')\n"
  "local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000\n"
  "local keep = 3600000\n"
  "if op == 'learn' then\n"
  "  if ARGV[5] == 'manual' then\n"
  "    redis.call('HSET', s, 'max', ARGV[2], 'interval', ARGV[3], 'margin', ARGV[4], 'manual', 1)\n"
  "  elseif not redis.call('HGET', s, 'manual') then\n"
  "    redis.call('HSET', s, 'max', ARGV[2], 'interval', ARGV[3], 'margin', ARGV[4])\n"
  "  end\n"
  "  redis.call('PEXPIRE', s, keep)\n"
  "  return 0\n"
  "elseif op == 'throttled' then\n"
  "  local hold = now + tonumber(ARGV[2])\n"
  "  if hold > (tonumber(redis.call('HGET', s, 'blocked')) or 0) then\n"
  "    redis.call('HSET', s, 'blocked', hold)\n"
  "  end\n"
  "  redis.call('PEXPIRE', s, keep)\n"
  "  return 0\n"
  "elseif op ~= 'acquire' then\n"
  "  return redis.error_reply('commprefs budget: unknown operation')\n"
  "end\n"
  "local l = redis.call('HMGET', s, 'max', 'interval', 'margin', 'blocked', 'due')\n"
  "local max, interval, margin = tonumber(l[1]), tonumber(l[2]), tonumber(l[3])\n"
  "if not max and tonumber(ARGV[2]) then\n"
  "  max, interval, margin = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n"
  "  redis.call('HSET', s, 'max', max, 'interval', interval, 'margin', margin)\n"
  "end\n"
  "local blocked = tonumber(l[4])\n"
  "if blocked and blocked > now then return math.ceil(blocked - now) end\n"
  "interval, margin = interval or 10000, margin or 0\n"
  "redis.call('ZREMRANGEBYSCORE', w, '-inf', now - interval - margin)\n"
  "if max then\n"
  "  local n = redis.call('ZCARD', w)\n"
  "  if n >= max then\n"
  "    local oldest = redis.call('ZRANGE', w, n - max, n - max, 'WITHSCORES')\n"
  "    return math.max(1, math.ceil(tonumber(oldest[2]) + interval + margin - now))\n"
  "  end\n"
  "  local due, spacing = tonumber(l[5]), (interval + margin) / max\n"
  "  local paced = n >= " BUDGET_STR(CP_PACE_BURST) " and due\n"
  "  if paced and due > now then return math.max(1, math.ceil(due - now)) end\n"
  "  redis.call('HSET', s, 'due', (paced and math.max(due, now - spacing / 2) or now) + spacing)\n"
  "end\n"
  "redis.call('ZADD', w, now, redis.call('HINCRBY', s, 'seq', 1))\n"
  "redis.call('PEXPIRE', w, math.ceil(interval + margin) + 1000)\n"
  "redis.call('PEXPIRE', s, keep)\n"
  "return 0\n";

/* ------------------------------------------------------------ connection */

typedef struct {
  redisContext *c;         /* NULL: not connected (connects at next use) */
  cp_resp_limit lim;       /* installed in c's reader */
  char *host, *user, *pass;
  int port, db;
  struct timeval connect_tv, cmd_tv;
  int auth_failed;         /* the last connect failed on AUTH */
  int interrupted;         /* the last command was stopped by SIGINT/SIGTERM */
  int too_large;           /* the last reply announced more than the caps of redis.h */
  int stop_after_signals;  /* signals during a wait that stop it (1, or 2: a command to finish) */
  char err[400];
} cp_redis;

static char *dup_range(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (d) {
    memcpy(d, s, n);
    d[n] = 0;
  }
  return d;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* A percent-decoded copy of s[0..n), or NULL when malformed or out of memory. */
static char *dup_decoded(const char *s, size_t n) {
  char *d = malloc(n + 1);
  size_t i, j = 0;
  if (!d) return NULL;
  for (i = 0; i < n; i++) {
    if (s[i] == '%') {
      int hi = i + 2 < n ? hexval((unsigned char)s[i + 1]) : -1;
      int lo = hi >= 0 ? hexval((unsigned char)s[i + 2]) : -1;
      if (lo < 0) {
        free(d);
        return NULL;
      }
      d[j++] = (char)(hi * 16 + lo);
      i += 2;
    } else d[j++] = s[i];
  }
  d[j] = 0;
  return d;
}

static int parse_number(const char *s, size_t n, long max, long *out) {
  long v = 0;
  size_t i;
  if (n == 0 || n > 9) return -1;
  for (i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return -1;
    v = v * 10 + (s[i] - '0');
  }
  if (v > max) return -1;
  *out = v;
  return 0;
}

static void redis_free_fields(cp_redis *r) {
  if (r->c) redisFree(r->c);
  r->c = NULL;
  if (r->pass) {
    memset(r->pass, 0, strlen(r->pass));
    free(r->pass);
  }
  free(r->host);
  free(r->user);
  r->host = r->user = r->pass = NULL;
}

/* Fills r from url. 0, or -1 with r->err (never showing the password). */
static int redis_parse(cp_redis *r, const char *url) {
  const char *p, *at, *hostend, *slash;
  long port = 6379, db = 0;
  memset(r, 0, sizeof(*r));
  if (strncmp(url, "redis://", 8) != 0) {
    snprintf(r->err, sizeof(r->err), "a redis://[user:pass@]host:port[/db] URL expected");
    return -1;
  }
  p = url + 8;
  slash = strchr(p, '/');
  at = memchr(p, '@', slash ? (size_t)(slash - p) : strlen(p));
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (!colon) {
      snprintf(r->err, sizeof(r->err), "the URL's user information must be user:password or :password");
      return -1;
    }
    if (colon > p) r->user = dup_decoded(p, (size_t)(colon - p));
    r->pass = dup_decoded(colon + 1, (size_t)(at - colon - 1));
    if ((colon > p && !r->user) || !r->pass) {
      snprintf(r->err, sizeof(r->err), "bad percent-encoding in the URL's user information");
      redis_free_fields(r);
      return -1;
    }
    p = at + 1;
  }
  if (*p == '[') { /* [IPv6] */
    hostend = strchr(p, ']');
    if (!hostend) goto bad_host;
    r->host = dup_range(p + 1, (size_t)(hostend - p - 1));
    hostend++;
  } else {
    hostend = p + strcspn(p, ":/");
    r->host = dup_range(p, (size_t)(hostend - p));
  }
  if (!r->host || !*r->host) goto bad_host;
  p = hostend;
  if (*p == ':') {
    size_t n = strcspn(p + 1, "/");
    if (parse_number(p + 1, n, 65535, &port) != 0 || port == 0) {
      snprintf(r->err, sizeof(r->err), "bad port in the redis URL");
      redis_free_fields(r);
      return -1;
    }
    p += 1 + n;
  }
  if (*p == '/' && p[1] && parse_number(p + 1, strlen(p + 1), 1000000, &db) != 0) {
    snprintf(r->err, sizeof(r->err), "bad database number in the redis URL (an integer expected)");
    redis_free_fields(r);
    return -1;
  }
  if (*p && *p != '/') goto bad_host;
  r->port = (int)port;
  r->db = (int)db;
  return 0;
bad_host:
  snprintf(r->err, sizeof(r->err), "bad host in the redis URL");
  redis_free_fields(r);
  return -1;
}

static struct timeval seconds_tv(double s) {
  struct timeval tv;
  tv.tv_sec = (time_t)s;
  tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
  if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1000;
  return tv;
}

static void drop_connection(cp_redis *r) {
  if (r->c) redisFree(r->c);
  r->c = NULL;
}

static double tv_ms(struct timeval tv) { return (double)tv.tv_sec * 1000 + (double)tv.tv_usec / 1000; }

static void io_failed(cp_redis *r);

/* Ends a wait that got no whole reply: the connection is out of step, dropped. */
static int wait_failed(cp_redis *r, const char *why, int interrupted) {
  snprintf(r->err, sizeof(r->err), "%s:%d: %s", r->host, r->port, why);
  r->interrupted = interrupted;
  drop_connection(r);
  return -1;
}

/* The reply of the command appended last: writes what is buffered, then
 * reads until a whole reply is parsed, for at most the command timeout in
 * all (a deadline, not a per-read timeout: a reply trickling in byte by
 * byte is cut there), and stops once r->stop_after_signals SIGINT/SIGTERM
 * are caught during the wait (transport.c's handler, while a caller traps
 * them). 0 with *rep, or -1 with r->err and the connection dropped. */
static int await_reply(cp_redis *r, redisReply **rep) {
  redisContext *c = r->c;
  double deadline = cp_now_ms() + tv_ms(r->cmd_tv);
  int done = 0, sigs = cp_signal_count(), stop_after = r->stop_after_signals > 1 ? 2 : 1;
  void *reply = NULL;
  *rep = NULL;
  r->interrupted = r->too_large = 0;
  while (!done) {
    if (redisBufferWrite(c, &done) != REDIS_OK) {
      io_failed(r);
      return -1;
    }
  }
  for (;;) {
    struct pollfd pfd;
    double left;
    int n;
    if (redisGetReplyFromReader(c, &reply) != REDIS_OK) {
      io_failed(r);
      return -1;
    }
    if (reply) {
      *rep = reply;
      return 0;
    }
    /* a bulk string announced over the cap fails here, at its header, not
     * once hiredis has buffered all of it (its memory would be the reply's size) */
    if (cp_resp_check_pending(c->reader, &r->lim) != 0) {
      r->too_large = 1;
      return wait_failed(r, cp_resp_reader_error(c->reader, &r->lim), 0);
    }
    if (((cp_signal_count() - sigs) & 0x3fffffff) >= stop_after)
      return wait_failed(r, "interrupted by a signal while waiting for Redis", 1);
    left = deadline - cp_now_ms();
    if (left <= 0) {
      char why[80];
      snprintf(why, sizeof(why), "connection lost: no whole reply within %g s", tv_ms(r->cmd_tv) / 1000);
      return wait_failed(r, why, 0);
    }
    pfd.fd = c->fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    n = poll(&pfd, 1, left < SIGNAL_CHECK_MS ? (int)left + 1 : SIGNAL_CHECK_MS);
    if (n < 0 && errno != EINTR) return wait_failed(r, "connection lost: poll failed", 0);
    if (n > 0 && redisBufferRead(c) != REDIS_OK) {
      io_failed(r);
      return -1;
    }
  }
}

/* One command, sent and waited for with await_reply: the reply or NULL. */
static redisReply *command_argv(cp_redis *r, int argc, const char **argv, const size_t *lens) {
  redisReply *rep;
  if (redisAppendCommandArgv(r->c, argc, argv, lens) != REDIS_OK) {
    io_failed(r);
    return NULL;
  }
  return await_reply(r, &rep) == 0 ? rep : NULL;
}

/* One command on the fresh connection during connect: 0 or -1 with r->err. */
static int setup_command(cp_redis *r, int argc, const char **argv, const char *what) {
  redisReply *rep = command_argv(r, argc, argv, NULL);
  if (!rep) {
    size_t wl = strlen(what), n = strlen(r->err);
    if (n + wl + 3 <= sizeof(r->err)) { /* "what: host:port: why" */
      memmove(r->err + wl + 2, r->err, n + 1);
      memcpy(r->err, what, wl);
      r->err[wl] = ':';
      r->err[wl + 1] = ' ';
    }
    return -1;
  }
  if (rep->type == REDIS_REPLY_ERROR) {
    snprintf(r->err, sizeof(r->err), "%s:%d: %s failed: %s", r->host, r->port, what, rep->str);
    freeReplyObject(rep);
    return -1;
  }
  freeReplyObject(rep);
  return 0;
}

/* (Re)connects: TCP with the connect timeout, then AUTH, SELECT or PING. */
static int redis_connect(cp_redis *r) {
  char db[16];
  drop_connection(r);
  r->auth_failed = r->interrupted = r->too_large = 0;
  r->c = redisConnectWithTimeout(r->host, r->port, r->connect_tv);
  if (!r->c || r->c->err) {
    snprintf(r->err, sizeof(r->err), "%s:%d: cannot connect: %s", r->host, r->port,
             r->c ? r->c->errstr : "out of memory");
    drop_connection(r);
    return -1;
  }
  redisSetTimeout(r->c, r->cmd_tv);
  cp_resp_limit_reader(r->c->reader, &r->lim);
  if (r->pass) {
    const char *auth[3] = {"AUTH", r->user ? r->user : r->pass, r->pass};
    if (setup_command(r, r->user ? 3 : 2, auth, "authentication") != 0) {
      r->auth_failed = 1;
      drop_connection(r);
      return -1;
    }
  }
  snprintf(db, sizeof(db), "%d", r->db);
  {
    const char *sel[2] = {"SELECT", db}, *ping[1] = {"PING"};
    int rc = r->db ? setup_command(r, 2, sel, "SELECT") : setup_command(r, 1, ping, "PING");
    if (rc != 0) {
      drop_connection(r);
      return -1;
    }
  }
  return 0;
}

/* A failed read or write: r->err, the connection dropped. A reader error
 * from our caps (an array announced over CP_RESP_MAX_ELEMENTS, refused at
 * its header) is too_large, said as such. */
static void io_failed(cp_redis *r) {
  int reader_err;
  const char *why;
  if (!r->c) return;
  reader_err = r->c->err == REDIS_ERR_PROTOCOL || r->c->err == REDIS_ERR_OOM;
  why = reader_err ? cp_resp_reader_error(r->c->reader, &r->lim) : r->c->errstr;
  r->too_large = reader_err && r->lim.too_large;
  snprintf(r->err, sizeof(r->err), "%s:%d: %s%s", r->host, r->port, r->too_large ? "" : "connection lost: ",
           *why ? why : "connection closed");
  drop_connection(r);
}

/* One command: the reply (caller frees), or NULL with r->err (the connection
 * is then dropped; the next call reconnects first). */
static redisReply *redis_call(cp_redis *r, int argc, const char **argv, const size_t *lens) {
  redisReply *rep;
  if (!r->c && redis_connect(r) != 0) return NULL;
  rep = command_argv(r, argc, argv, lens);
  return rep;
}

/* ------------------------------------------------------------ core.redis_connect */

typedef struct {
  cp_redis r;
  int closed;
} lua_conn;

static lua_conn *check_conn(lua_State *L) {
  lua_conn *c = luaL_checkudata(L, 1, CONN_MT);
  if (c->closed) luaL_error(L, "commprefs: the redis connection is closed");
  return c;
}

static double opt_seconds(lua_State *L, int idx, const char *key, double def) {
  double v;
  if (lua_isnoneornil(L, idx)) return def;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }
  if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0 && lua_tonumber(L, -1) <= 86400))
    luaL_error(L, "commprefs.core.redis_connect: bad option '%s' (seconds, > 0, expected)", key);
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* nil, error: code "auth_failed" (a wrong password does not heal),
 * "interrupted" (SIGINT/SIGTERM during the wait), "too_large" (a reply
 * announced a bulk string or array over the caps of redis.h: refused at its
 * header, the connection dropped) or "connection". */
static int push_failure(lua_State *L, const cp_redis *r) {
  lua_pushnil(L);
  cp_resp_push_error(L, r->err, strlen(r->err),
                     r->auth_failed ? "auth_failed" : r->interrupted ? "interrupted"
                     : r->too_large ? "too_large" : "connection");
  return 2;
}

/* Pushes a reply as a Lua value and frees it on every path (a memory error
 * while converting is raised after the free). */
static void push_reply(lua_State *L, redisReply *rep) {
  lua_pushlightuserdata(L, rep);
  lua_pushcclosure(L, cp_resp_push_reply_protected, 1);
  if (lua_pcall(L, 0, 1, 0) != 0) {
    freeReplyObject(rep);
    lua_error(L);
  }
  freeReplyObject(rep);
}

/* Pushes a reply (freed here); an error reply at the top becomes nil, err. */
static int push_top_reply(lua_State *L, redisReply *rep) {
  int n = 1;
  if (rep->type == REDIS_REPLY_ERROR) {
    lua_pushnil(L);
    n = 2;
  }
  push_reply(L, rep);
  return n;
}

/* core.redis_connect(url, {connect_timeout = 5, timeout = 10}) -> conn | nil, err */
static int core_redis_connect(lua_State *L) {
  const char *url = luaL_checkstring(L, 1);
  double ct, t;
  lua_conn *c;
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  ct = opt_seconds(L, 2, "connect_timeout", 5);
  t = opt_seconds(L, 2, "timeout", 10);
  c = cp_newuserdata(L, sizeof(lua_conn));
  memset(c, 0, sizeof(*c));
  c->closed = 1;
  luaL_setmetatable(L, CONN_MT);
  if (redis_parse(&c->r, url) != 0) return luaL_error(L, "commprefs.core.redis_connect: bad argument 'url' (%s)", c->r.err);
  c->closed = 0;
  c->r.connect_tv = seconds_tv(ct);
  c->r.cmd_tv = seconds_tv(t);
  if (redis_connect(&c->r) != 0) {
    int rc = push_failure(L, &c->r);
    redis_free_fields(&c->r);
    c->closed = 1;
    return rc;
  }
  return 1;
}

/* The option of conn:command: {stop_after_signals = 1 | 2}
 * (default 1: the first SIGINT/SIGTERM caught during the wait stops it; 2:
 * a command the caller must see finished, such as a commit, which only a
 * second signal stops). Raises on a bad option, before anything is sent. */
static int opt_stop_after_signals(lua_State *L, int idx, const char *fname) {
  lua_Integer v;
  if (lua_isnoneornil(L, idx)) return 1;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_getfield(L, idx, "stop_after_signals");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 1;
  }
  v = lua_type(L, -1) == LUA_TNUMBER ? lua_tointeger(L, -1) : 0;
  if ((v != 1 && v != 2) || lua_tonumber(L, -1) != (lua_Number)v) luaL_error(L, "%s: bad option 'stop_after_signals' (1 or 2 expected)", fname);
  lua_pop(L, 1);
  return (int)v;
}

/* conn:command({"SET", "k", "v"} [, {stop_after_signals = 2}]) -> reply | nil, err */
static int conn_command(lua_State *L) {
  lua_conn *c = check_conn(L);
  const char **argv;
  size_t *lens;
  int stop_after = opt_stop_after_signals(L, 3, "commprefs.redis: command");
  int n = cp_resp_check_args(L, 2, "commprefs.redis: command", &argv, &lens);
  redisReply *rep;
  c->r.stop_after_signals = stop_after;
  rep = redis_call(&c->r, n, argv, lens);
  c->r.stop_after_signals = 1;
  free(argv);
  free(lens);
  if (!rep) return push_failure(L, &c->r);
  return push_top_reply(L, rep);
}

/* conn:pipeline({cmd1, cmd2, ...}) -> {reply1, ...} (an error reply is a
 * commprefs.Error in its place) | nil, err when the connection failed. */
static int conn_pipeline(lua_State *L) {
  lua_conn *c = check_conn(L);
  int n, i;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = (int)lua_rawlen(L, 2);
  for (i = 1; i <= n; i++) { /* check everything before sending anything */
    const char **argv;
    size_t *lens;
    lua_rawgeti(L, 2, i);
    cp_resp_check_args(L, lua_gettop(L), "commprefs.redis: pipeline", &argv, &lens);
    free(argv);
    free(lens);
    lua_pop(L, 2); /* its anchor and the command */
  }
  if (!c->r.c && redis_connect(&c->r) != 0) return push_failure(L, &c->r);
  for (i = 1; i <= n; i++) {
    const char **argv;
    size_t *lens;
    int argc, rc;
    lua_rawgeti(L, 2, i);
    argc = cp_resp_check_args(L, lua_gettop(L), "commprefs.redis: pipeline", &argv, &lens);
    rc = redisAppendCommandArgv(c->r.c, argc, argv, lens);
    free(argv);
    free(lens);
    lua_pop(L, 2); /* its anchor and the command (hiredis has copied both) */
    if (rc != REDIS_OK) {
      io_failed(&c->r);
      return push_failure(L, &c->r);
    }
  }
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    redisReply *rep = NULL;
    if (await_reply(&c->r, &rep) != 0) return push_failure(L, &c->r);
    push_reply(L, rep);
    lua_rawseti(L, -2, i);
  }
  return 1;
}

static int conn_close(lua_State *L) {
  lua_conn *c = luaL_checkudata(L, 1, CONN_MT);
  if (!c->closed) redis_free_fields(&c->r);
  c->closed = 1;
  return 0;
}

static int conn_tostring(lua_State *L) {
  lua_conn *c = luaL_checkudata(L, 1, CONN_MT);
  if (c->closed) lua_pushfstring(L, "commprefs.redis (closed, %p)", (void *)c);
  else lua_pushfstring(L, "commprefs.redis (%s:%d/%d, %p)", c->r.host, c->r.port, c->r.db, (void *)c);
  return 1;
}

/* core.redis_url(url) -> {host=, port=, db=, user=, password=}: the one URL
 * parser, for the cosocket side. Raises on a malformed URL (never echoing it). */
static int core_redis_url(lua_State *L) {
  cp_redis r;
  const char *url = luaL_checkstring(L, 1);
  const char *fname = luaL_optstring(L, 2, "commprefs.core.redis_url"); /* who the message names */
  if (redis_parse(&r, url) != 0) return luaL_error(L, "%s: bad argument 'url' (%s)", fname, r.err);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, r.host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, r.port);
  lua_setfield(L, -2, "port");
  lua_pushinteger(L, r.db);
  lua_setfield(L, -2, "db");
  if (r.user) {
    lua_pushstring(L, r.user);
    lua_setfield(L, -2, "user");
  }
  if (r.pass) {
    lua_pushstring(L, r.pass);
    lua_setfield(L, -2, "password");
  }
  redis_free_fields(&r);
  return 1;
}

static int key_ok(const char *key);

/* core.budget_keys(key) -> window_key, limits_key (raises on a bad key). */
static int core_budget_keys(lua_State *L) {
  const char *key = luaL_checkstring(L, 1);
  const char *fname = luaL_optstring(L, 2, "commprefs.core.budget_keys"); /* who the message names */
  if (!key_ok(key)) return luaL_error(L, "%s: bad argument 'key' (1 to 200 characters, no control characters, no { or })", fname);
  lua_pushfstring(L, BUDGET_KEY_FORMAT, key, "window");
  lua_pushfstring(L, BUDGET_KEY_FORMAT, key, "limits");
  return 2;
}

static double lost_wait(double lost_for_ms, double limit_ms);

/* core.budget_lost_wait(lost_for_ms, limit_ms) -> ms to wait before asking
 * again, or nil once Redis has been lost for limit_ms (the budget is gone). */
static int core_budget_lost_wait(lua_State *L) {
  double w = lost_wait(luaL_checknumber(L, 1), luaL_checknumber(L, 2));
  if (w < 0) lua_pushnil(L);
  else lua_pushnumber(L, w);
  return 1;
}

double cp_budget_wait_cap(double wait_ms, long interval_ms) {
  double most = (interval_ms > 0 ? interval_ms : CP_DEFAULT_INTERVAL_MS) + cp_budget_margin_ms(interval_ms > 0 ? interval_ms : CP_DEFAULT_INTERVAL_MS);
  return wait_ms > most ? most : wait_ms;
}

/* core.budget_wait_cap(wait_ms, interval_ms | nil) -> the wait a backing obeys at most */
static int core_budget_wait_cap(lua_State *L) {
  lua_pushnumber(L, cp_budget_wait_cap(luaL_checknumber(L, 1), (long)luaL_optnumber(L, 2, 0)));
  return 1;
}

double cp_budget_margin_ms(long interval_ms) {
  return cp_rl_margin_ms(interval_ms) + CP_BUDGET_SLACK_MS;
}

/* core.budget_margin_ms(interval_ms) -> ms */
static int core_budget_margin_ms(lua_State *L) {
  lua_pushnumber(L, cp_budget_margin_ms((long)luaL_checknumber(L, 1)));
  return 1;
}

static int core_budget_script(lua_State *L) {
  lua_pushlstring(L, BUDGET_SCRIPT, sizeof(BUDGET_SCRIPT) - 1);
  return 1;
}

void cp_register_redis(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"command", conn_command}, {"pipeline", conn_pipeline}, {"close", conn_close}, {NULL, NULL}};
  cp_register_class(L, CONN_MT, methods, conn_close, conn_tostring);
  lua_pushcfunction(L, core_redis_connect);
  lua_setfield(L, -2, "redis_connect");
  lua_pushcfunction(L, core_budget_script);
  lua_setfield(L, -2, "budget_script");
  lua_pushcfunction(L, core_budget_keys);
  lua_setfield(L, -2, "budget_keys");
  lua_pushcfunction(L, core_budget_lost_wait);
  lua_setfield(L, -2, "budget_lost_wait");
  lua_pushcfunction(L, core_redis_url);
  lua_setfield(L, -2, "redis_url");
  lua_pushcfunction(L, core_budget_margin_ms);
  lua_setfield(L, -2, "budget_margin_ms");
  lua_pushcfunction(L, core_budget_wait_cap);
  lua_setfield(L, -2, "budget_wait_cap");
  lua_pushnumber(L, CP_REDIS_DEFAULT_WAIT_S);
  lua_setfield(L, -2, "budget_wait"); /* seconds a lost Redis is waited for, by default */
}

/* ------------------------------------------------------------ the budget (C3) */

typedef struct {
  cp_redis r;
  char *window_key, *limits_key;
  char sha[41];
  long max, interval_ms;   /* learned by this participant (0: none yet) */
  int written;             /* max/interval_ms were written to Redis */
  double lost_since;       /* monotonic ms Redis was first found lost; 0: fine */
  double lost_wait_ms;     /* how long to wait for it */
  char err[480];
} redis_budget;

/* Runs the budget script: EVALSHA, and EVAL (which caches it again) after NOSCRIPT. */
static redisReply *run_script(redis_budget *b, const char *op, const char *a1, const char *a2, const char *a3,
                              const char *a4) {
  const char *argv[10] = {"EVALSHA", b->sha, "2", b->window_key, b->limits_key, op, a1, a2, a3, a4};
  int argc = a1 ? 10 : 6;
  redisReply *rep = redis_call(&b->r, argc, argv, NULL);
  if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0) {
    freeReplyObject(rep);
    argv[0] = "EVAL";
    argv[1] = BUDGET_SCRIPT;
    rep = redis_call(&b->r, argc, argv, NULL);
  }
  return rep;
}

/* While Redis is lost: wait LOST_RETRY_MS (never past the limit) and ask
 * again, until it has been lost for limit_ms: then <0, the budget is gone. */
static double lost_wait(double lost_for_ms, double limit_ms) {
  if (lost_for_ms >= limit_ms) return -1;
  return lost_for_ms + LOST_RETRY_MS > limit_ms ? limit_ms - lost_for_ms : LOST_RETRY_MS;
}

static double budget_lost(redis_budget *b, const char **err) {
  double now = cp_now_ms(), w;
  if (b->lost_since == 0) b->lost_since = now;
  w = lost_wait(now - b->lost_since, b->lost_wait_ms);
  if (w >= 0) return w > 1 ? w : 1;
  snprintf(b->err, sizeof(b->err), "the shared budget in Redis was unavailable for %g s: %s",
           b->lost_wait_ms / 1000, b->r.err);
  *err = b->err;
  return -1;
}

static double budget_acquire(void *ud, const char **err) {
  redis_budget *b = ud;
  char max[24] = "", interval[24] = "", margin[32] = "";
  redisReply *rep;
  double wait;
  if (b->max > 0) {
    snprintf(max, sizeof(max), "%ld", b->max);
    snprintf(interval, sizeof(interval), "%ld", b->interval_ms);
    snprintf(margin, sizeof(margin), "%.3f", cp_budget_margin_ms(b->interval_ms));
  }
  rep = run_script(b, "acquire", max, interval, margin, "");
  if (!rep) return budget_lost(b, err);
  if (rep->type != REDIS_REPLY_INTEGER) {
    snprintf(b->r.err, sizeof(b->r.err), "%s:%d: the budget script failed: %s", b->r.host, b->r.port,
             rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
    freeReplyObject(rep);
    return budget_lost(b, err);
  }
  wait = rep->integer < 0 ? 0 : (double)rep->integer;
  wait = cp_budget_wait_cap(wait, b->interval_ms); /* a reply's absurd wait: ask again within a window */
  freeReplyObject(rep);
  b->lost_since = 0;
  return wait;
}

static void budget_learn(void *ud, long max, long interval_ms, int manual) {
  redis_budget *b = ud;
  char a1[24], a2[24], a3[32];
  redisReply *rep;
  if (max <= 0 || interval_ms <= 0) return;
  if (b->written && max == b->max && interval_ms == b->interval_ms) return;
  b->max = max;
  b->interval_ms = interval_ms;
  snprintf(a1, sizeof(a1), "%ld", max);
  snprintf(a2, sizeof(a2), "%ld", interval_ms);
  snprintf(a3, sizeof(a3), "%.3f", cp_budget_margin_ms(interval_ms));
  rep = run_script(b, "learn", a1, a2, a3, manual ? "manual" : "");
  b->written = rep && rep->type == REDIS_REPLY_INTEGER;
  if (rep) freeReplyObject(rep);
}

static void budget_throttled(void *ud, double retry_after_ms) {
  redis_budget *b = ud;
  char a1[32];
  redisReply *rep;
  if (!(retry_after_ms > 0)) return;
  snprintf(a1, sizeof(a1), "%.0f", retry_after_ms);
  rep = run_script(b, "throttled", a1, "", "", "");
  if (rep) freeReplyObject(rep);
}

static void budget_close(void *ud) {
  redis_budget *b = ud;
  if (!b) return;
  redis_free_fields(&b->r);
  free(b->window_key);
  free(b->limits_key);
  free(b);
}

static char *budget_key(const char *key, const char *suffix) {
  size_t n = strlen(BUDGET_KEY_FORMAT) + strlen(key) + strlen(suffix) + 1;
  char *k = malloc(n);
  if (k) snprintf(k, n, BUDGET_KEY_FORMAT, key, suffix);
  return k;
}

static int key_ok(const char *key) {
  const unsigned char *p;
  if (!*key || strlen(key) > KEY_MAX) return 0;
  for (p = (const unsigned char *)key; *p; p++)
    if (*p < 0x20 || *p == 0x7f || *p == '{' || *p == '}') return 0;
  return 1;
}

int cp_redis_budget_open(cp_backing *bud, const char *url, const char *key, double timeout_s, const char **err) {
  redis_budget *b = calloc(1, sizeof(*b));
  redisReply *rep;
  const char *load[3] = {"SCRIPT", "LOAD", BUDGET_SCRIPT};
  memset(bud, 0, sizeof(*bud));
  bud->close = budget_close;
  if (!b) {
    *err = "out of memory";
    return -1;
  }
  bud->ud = b;
  if (!key_ok(key)) {
    *err = "bad budget key (1 to 200 characters, no control characters, no { or })";
    return -2;
  }
  if (redis_parse(&b->r, url) != 0) {
    *err = b->r.err;
    return -2;
  }
  b->window_key = budget_key(key, "window");
  b->limits_key = budget_key(key, "limits");
  if (!b->window_key || !b->limits_key) {
    *err = "out of memory";
    return -1;
  }
  b->r.connect_tv = b->r.cmd_tv = seconds_tv(timeout_s);
  b->lost_wait_ms = CP_REDIS_DEFAULT_WAIT_S * 1000;
  if (redis_connect(&b->r) != 0) {
    *err = b->r.err;
    return -1;
  }
  rep = redis_call(&b->r, 3, load, NULL);
  if (!rep || rep->type != REDIS_REPLY_STRING || rep->len != 40) {
    if (rep) snprintf(b->r.err, sizeof(b->r.err), "%s:%d: SCRIPT LOAD failed: %s", b->r.host, b->r.port,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
    if (rep) freeReplyObject(rep);
    *err = b->r.err;
    return -1;
  }
  memcpy(b->sha, rep->str, 40);
  b->sha[40] = 0;
  freeReplyObject(rep);
  bud->acquire = budget_acquire;
  bud->learn = budget_learn;
  bud->throttled = budget_throttled;
  return 0;
}

void cp_redis_budget_wait(cp_backing *bud, double lost_s) {
  redis_budget *b = bud->ud;
  if (b && lost_s >= 0) b->lost_wait_ms = lost_s * 1000;
}
