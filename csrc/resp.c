/* resp.c: owns the Redis protocol pieces of the core, all over hiredis (no
 * protocol code of ours): turning a hiredis reply into Lua values (shared by
 * the blocking connection in redis.c), the sans-I/O reply reader
 * core.redis_reader() and the command formatter core.redis_format(args) that
 * the cosocket side (lua/commprefs/ngx/redis.lua) drives, core.redis_null,
 * and the limit on array sizes a server may announce.
 *
 * Lua values of a reply: bulk string -> string, integer -> integer, array ->
 * Lua array, nil -> core.redis_null, status -> {ok = "OK"}, error ->
 * commprefs.Error {kind = "redis", message = "..."} (at the top level the
 * callers return it as nil, err). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "redis.h"

#define READER_MT "commprefs.core.redis_reader"

/* The address of this constant is core.redis_null (a lightuserdata). */
static const char redis_null_tag = 0;

void cp_resp_push_null(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&redis_null_tag);
}

/* The first word of an error reply when it is Redis' error class
 * ("WRONGTYPE ...", "NOSCRIPT ...", "ERR ..."): 2 or more capitals. */
static void push_reply_code(lua_State *L, const char *msg, size_t len) {
  size_t n = 0;
  while (n < len && n < 32 && msg[n] >= 'A' && msg[n] <= 'Z') n++;
  if (n >= 2 && (n == len || msg[n] == ' ' || msg[n] == '-')) lua_pushlstring(L, msg, n);
  else lua_pushliteral(L, "ERR");
}

/* Pushes an error {kind = "redis", message = msg, code = code} with the
 * metatable Lua registered as core.error_type (commprefs.Error), else the
 * core's own (with __tostring): the core never requires a Lua module.
 * code NULL: an error reply, whose code is its class. */
void cp_resp_push_error(lua_State *L, const char *msg, size_t len, const char *code) {
  lua_createtable(L, 0, 3);
  lua_pushliteral(L, "redis");
  lua_setfield(L, -2, "kind");
  lua_pushlstring(L, msg, len);
  lua_setfield(L, -2, "message");
  if (code) lua_pushstring(L, code);
  else push_reply_code(L, msg, len);
  lua_setfield(L, -2, "code");
  lua_getfield(L, LUA_REGISTRYINDEX, CP_ERROR_TYPE);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    luaL_getmetatable(L, CP_CORE_ERROR_MT);
  }
  lua_setmetatable(L, -2);
}

void cp_resp_push_reply(lua_State *L, const redisReply *r) {
  size_t i;
  luaL_checkstack(L, 4, "commprefs: redis reply too deep");
  switch (r->type) {
  case REDIS_REPLY_STRING: lua_pushlstring(L, r->str, r->len); break;
  case REDIS_REPLY_INTEGER: lua_pushinteger(L, (lua_Integer)r->integer); break;
  case REDIS_REPLY_STATUS:
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, r->str, r->len);
    lua_setfield(L, -2, "ok");
    break;
  case REDIS_REPLY_ERROR: cp_resp_push_error(L, r->str, r->len, NULL); break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(L, r->elements > 1 << 20 ? 0 : (int)r->elements, 0);
    for (i = 0; i < r->elements; i++) {
      cp_resp_push_reply(L, r->element[i]);
      lua_rawseti(L, -2, (int)(i + 1));
    }
    break;
  default: cp_resp_push_null(L); break;
  }
}

/* ------------------------------------------------------------ size limits */

enum { TOO_MANY_ELEMENTS = 1, TOO_LONG_STRING = 2 }; /* cp_resp_limit.too_large */

static void *capped_array(const redisReadTask *task, int elements) {
  cp_resp_limit *lim = task->privdata;
  if (elements < 0 || elements > CP_RESP_MAX_ELEMENTS) {
    lim->too_large = TOO_MANY_ELEMENTS;
    return NULL; /* the reader fails with an out-of-memory error we rename */
  }
  return lim->base->createArray(task, elements);
}

static void *capped_string(const redisReadTask *task, char *str, size_t len) {
  cp_resp_limit *lim = task->privdata;
  if (len > (size_t)CP_RESP_MAX_BULK) {
    lim->too_large = TOO_LONG_STRING;
    return NULL;
  }
  return lim->base->createString(task, str, len);
}

void cp_resp_limit_reader(redisReader *r, cp_resp_limit *lim) {
  lim->base = r->fn;
  lim->fns = *r->fn;
  lim->fns.createArray = capped_array;
  lim->fns.createString = capped_string;
  lim->too_large = 0;
  r->fn = &lim->fns;
  r->privdata = lim;
}

const char *cp_resp_reader_error(const redisReader *r, const cp_resp_limit *lim) {
  if (lim->too_large == TOO_MANY_ELEMENTS)
    return "protocol error: the server announced an array of more than 1048576 elements";
  if (lim->too_large == TOO_LONG_STRING)
    return "protocol error: the server announced a string of more than 67108864 bytes";
  return r->errstr;
}

/* 1 when the item hiredis is in the middle of is over CP_RESP_MAX_BULK: a
 * bulk string whose announced length (its digits so far) is, or a status,
 * error or integer line that is already longer. hiredis parses a bulk
 * header at every redisReaderGetReply but calls createString only once the
 * whole string is buffered; this looks at the header while it waits. */
static int pending_too_long(const redisReader *r) {
  const char *p, *end;
  long long n = 0;
  int type;
  if (r->err || r->ridx < 0) return 0;
  type = r->rstack[r->ridx].type;
  p = r->buf + r->pos;
  end = r->buf + r->len;
  if (type == REDIS_REPLY_STATUS || type == REDIS_REPLY_ERROR || type == REDIS_REPLY_INTEGER)
    return (size_t)(end - p) > (size_t)CP_RESP_MAX_BULK + 2 && !memchr(p, '\r', (size_t)(end - p));
  if (type != REDIS_REPLY_STRING) return 0;
  for (; p < end && *p >= '0' && *p <= '9'; p++) {
    n = n * 10 + (*p - '0');
    if (n > CP_RESP_MAX_BULK) return 1;
  }
  return 0;
}

/* Fails the reader (sticky, as hiredis's own errors) when pending_too_long. */
int cp_resp_check_pending(redisReader *r, cp_resp_limit *lim) {
  if (!pending_too_long(r)) return 0;
  lim->too_large = TOO_LONG_STRING;
  r->err = REDIS_ERR_PROTOCOL;
  snprintf(r->errstr, sizeof(r->errstr), "%s", cp_resp_reader_error(r, lim));
  return -1;
}

/* ------------------------------------------------------------ core.redis_reader() */

typedef struct {
  redisReader *r;
  cp_resp_limit lim;
} lua_reader;

static lua_reader *check_reader(lua_State *L) {
  lua_reader *lr = luaL_checkudata(L, 1, READER_MT);
  if (!lr->r) luaL_error(L, "commprefs: the redis reader is closed");
  return lr;
}

/* nil, err, code: code "too_large" (an item announced over the caps of
 * redis.h) or "protocol" (any other protocol error). The stream is unusable. */
static int push_reader_failure(lua_State *L, const lua_reader *lr) {
  lua_pushnil(L);
  lua_pushstring(L, cp_resp_reader_error(lr->r, &lr->lim));
  if (lr->lim.too_large) lua_pushliteral(L, "too_large");
  else lua_pushliteral(L, "protocol");
  return 3;
}

/* reader:feed(bytes) -> true | nil, err, code (see push_reader_failure) */
static int reader_feed(lua_State *L) {
  lua_reader *lr = check_reader(L);
  size_t len;
  const char *buf = luaL_checklstring(L, 2, &len);
  if (lr->r->err || cp_resp_check_pending(lr->r, &lr->lim) != 0 || redisReaderFeed(lr->r, buf, len) != REDIS_OK)
    return push_reader_failure(L, lr);
  lua_pushboolean(L, 1);
  return 1;
}

/* reader:get() -> true, value (a whole reply) | false (more bytes needed) |
 * nil, err, code (see push_reader_failure). An error reply is value = commprefs.Error. */
static int reader_get(lua_State *L) {
  lua_reader *lr = check_reader(L);
  void *reply = NULL;
  if (lr->r->err || redisReaderGetReply(lr->r, &reply) != REDIS_OK) return push_reader_failure(L, lr);
  if (!reply && cp_resp_check_pending(lr->r, &lr->lim) != 0) return push_reader_failure(L, lr);
  if (!reply) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushboolean(L, 1);
  /* the reply is freed even if building the Lua value runs out of memory */
  lua_pushlightuserdata(L, reply);
  lua_pushcclosure(L, cp_resp_push_reply_protected, 1);
  if (lua_pcall(L, 0, 1, 0) != 0) {
    freeReplyObject(reply);
    return lua_error(L);
  }
  freeReplyObject(reply);
  return 2;
}

int cp_resp_push_reply_protected(lua_State *L) {
  cp_resp_push_reply(L, lua_touserdata(L, lua_upvalueindex(1)));
  return 1;
}

static int reader_close(lua_State *L) {
  lua_reader *lr = luaL_checkudata(L, 1, READER_MT);
  if (lr->r) redisReaderFree(lr->r);
  lr->r = NULL;
  return 0;
}

static int reader_tostring(lua_State *L) {
  lua_reader *lr = luaL_checkudata(L, 1, READER_MT);
  lua_pushfstring(L, "commprefs.core.redis_reader (%s%p)", lr->r ? "" : "closed, ", (void *)lr);
  return 1;
}

static int core_redis_reader(lua_State *L) {
  lua_reader *lr = cp_newuserdata(L, sizeof(lua_reader));
  lr->r = NULL;
  luaL_setmetatable(L, READER_MT);
  lr->r = redisReaderCreate();
  if (!lr->r) return luaL_error(L, "commprefs.core.redis_reader: out of memory");
  cp_resp_limit_reader(lr->r, &lr->lim);
  return 1;
}

/* ------------------------------------------------------------ core.redis_format(args) */

/* Reads the array of strings/numbers at index idx into argv/lens (allocated
 * with malloc; the strings stay owned by the table, which the caller keeps on
 * the stack). Raises naming fname on a bad argument. Returns argc. */
int cp_resp_check_args(lua_State *L, int idx, const char *fname, const char ***argv, size_t **lens) {
  int n, i;
  luaL_checktype(L, idx, LUA_TTABLE);
  n = (int)lua_rawlen(L, idx);
  if (n < 1) luaL_error(L, "%s: bad argument (non-empty array of strings expected)", fname);
  for (i = 1; i <= n; i++) {
    int t;
    lua_rawgeti(L, idx, i);
    t = lua_type(L, -1);
    lua_pop(L, 1);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luaL_error(L, "%s: bad argument (element %d: string expected, got %s)", fname, i, lua_typename(L, t));
  }
  *argv = malloc(sizeof(char *) * (size_t)n);
  *lens = malloc(sizeof(size_t) * (size_t)n);
  if (!*argv || !*lens) {
    free(*argv);
    free(*lens);
    luaL_error(L, "%s: out of memory", fname);
  }
  lua_newtable(L); /* the anchor: numbers as strings live here, never in the caller's table */
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, i);
    if (lua_type(L, -1) == LUA_TNUMBER) {
      lua_tostring(L, -1);
      lua_pushvalue(L, -1);
      lua_rawseti(L, -3, i);
    }
    (*argv)[i - 1] = lua_tolstring(L, -1, &(*lens)[i - 1]);
    lua_pop(L, 1);
  }
  return n;
}

/* core.redis_format({"SET", "k", "v"}) -> the command's bytes in the Redis protocol */
static int core_redis_format(lua_State *L) {
  const char **argv;
  size_t *lens;
  char *cmd = NULL;
  int n = cp_resp_check_args(L, 1, "commprefs.core.redis_format", &argv, &lens);
  long long len = redisFormatCommandArgv(&cmd, n, argv, lens);
  free(argv);
  free(lens);
  if (len < 0 || !cmd) return luaL_error(L, "commprefs.core.redis_format: out of memory");
  lua_pushlstring(L, cmd, (size_t)len);
  redisFreeCommand(cmd);
  return 1;
}

void cp_register_resp(lua_State *L) {
  static const luaL_Reg reader_methods[] = {
    {"feed", reader_feed}, {"get", reader_get}, {"close", reader_close}, {NULL, NULL}};
  cp_register_class(L, READER_MT, reader_methods, reader_close, reader_tostring);
  lua_pushcfunction(L, core_redis_reader);
  lua_setfield(L, -2, "redis_reader");
  lua_pushcfunction(L, core_redis_format);
  lua_setfield(L, -2, "redis_format");
  cp_resp_push_null(L);
  lua_setfield(L, -2, "redis_null");
}
