/* redis.h: Redis in the core (hiredis 0.14). redis.c: the blocking connection
 * (redis://[user:pass@]host:port[/db], connect and command timeouts, AUTH,
 * SELECT), core.redis_connect conn objects (contract C4) and the shared
 * budget behind the C3 hook; resp.c: reply <-> Lua values, the sans-I/O
 * reader and formatter for the cosocket side. */
#ifndef COMMPREFS_REDIS_H
#define COMMPREFS_REDIS_H

#include <sys/time.h>
#include <hiredis/hiredis.h>
#include "compat.h"
#include "backing.h"
#include "ratelimit.h"
#include "cp_limits.h"

/* The most elements a reply array may announce (bigger: a protocol error). */
#define CP_RESP_MAX_ELEMENTS (1 << 20)
/* The longest bulk string (or status/error line) a reply may hold (longer: a protocol error). */
#define CP_RESP_MAX_BULK (64L << 20)
/* The budget counts a request when it grants it, before it is sent, and its
 * participants are other processes and hosts: the spread between a grant and
 * the request reaching HubSpot is wider than inside one process, so the
 * budget's window adds this much to ratelimit.c's margin (cp_rl_margin_ms).
 * Measured on a 2-core host under heavy load: the spread reached ~55 ms. */
#define CP_BUDGET_SLACK_MS 50.0
/* The margin (ms) the shared budget adds to HubSpot's interval: core.budget_margin_ms. */
double cp_budget_margin_ms(long interval_ms);
/* The longest wait a budget's reply is obeyed for (one window and its margin):
 * after it the backing is asked again, so no reply can stall a caller for ever. */
double cp_budget_wait_cap(double wait_ms, long interval_ms);
/* How long a budget waits for a lost Redis before perform stops with
 * "budget", unless set with cp_redis_budget_wait (seconds). */
#define CP_REDIS_DEFAULT_WAIT_S 30.0

/* A reader's array limit: lives as long as the reader it is installed in. */
typedef struct {
  redisReplyObjectFunctions fns;
  const redisReplyObjectFunctions *base;
  int too_large;
} cp_resp_limit;

void cp_resp_limit_reader(redisReader *r, cp_resp_limit *lim);
const char *cp_resp_reader_error(const redisReader *r, const cp_resp_limit *lim);
/* After a redisReaderGetReply that gave no reply: -1 (and the reader failed,
 * lim->too_large set) when the item hiredis waits for is already known to be
 * over CP_RESP_MAX_BULK (a bulk string's header, or an unended status line),
 * so that nobody buffers it first; else 0. */
int cp_resp_check_pending(redisReader *r, cp_resp_limit *lim);
void cp_resp_push_null(lua_State *L);
/* Registry keys: the Error metatable Lua gives (core.error_type), and the core's fallback. */
#define CP_ERROR_TYPE "commprefs.Error"
#define CP_CORE_ERROR_MT "commprefs.core.error"
/* Pushes {kind = "redis", message =, code =} (code NULL: an error reply's class). */
void cp_resp_push_error(lua_State *L, const char *msg, size_t len, const char *code);
void cp_resp_push_reply(lua_State *L, const redisReply *r);
/* A C function with the reply as upvalue 1 (a lightuserdata), for lua_pcall. */
int cp_resp_push_reply_protected(lua_State *L);
/* Checks the command array at idx and fills argv/lens (malloc'd: the caller
 * frees them). Pushes one table that keeps converted numbers alive: the
 * pointers are valid while it stays on the stack. The array is not changed. */
int cp_resp_check_args(lua_State *L, int idx, const char *fname, const char ***argv, size_t **lens);
void cp_register_resp(lua_State *L);   /* core.redis_reader, core.redis_format, core.redis_null */
void cp_register_redis(lua_State *L);  /* core.redis_connect, core.budget_script */

/* The budget (C3). On success returns 0 with b filled in. On failure returns -1
 * and *err points to a message that stays valid until b->close(b->ud), which
 * the caller then calls too (b->close is always set). Never includes the
 * password. timeout_s: the connect and command timeout. */
int cp_redis_budget_open(cp_backing *b, const char *url, const char *key, double timeout_s, const char **err);
/* How long (seconds) acquire keeps answering "wait" while Redis is lost and
 * reconnecting before it answers <0 (perform then stops with "budget"). */
void cp_redis_budget_wait(cp_backing *b, double lost_s);

#endif
