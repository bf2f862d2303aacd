/* decode.c: owns response decoding. JSON text is parsed by a private
 * lua-cjson instance (upvalue 1: its decode; upvalue 2: its null), then
 * checked and normalized in place, once, here:
 *   core.decode(text)             any JSON (journal lines): null becomes
 *                                 absent, known integer fields become Lua integers;
 *   core.decode(text, "envelope") a 2xx answer: an object whose fields have
 *                                 the types of the OpenAPI document's response
 *                                 schemas (SCHEMAS below); any field of the wrong
 *                                 type is a decode error naming its path;
 *   core.decode(text, "error")    an error body (Error / StandardError): an
 *                                 object; fields of the wrong type are dropped,
 *                                 so whatever is kept has its documented type.
 * Unknown fields pass through (null removed). Integers must be exact: cjson
 * reads numbers as doubles (Debian's lua-cjson 2.1.0 has no big-number mode:
 * its only decode options are decode_invalid_numbers and decode_max_depth),
 * and 2^53 + 1 rounds to 2^53 before we see it, so |n| >= 2^53 in an integer
 * field is refused (error or dropped), never silently changed; LuaJIT could
 * not hold such an integer anyway. Lua 5.4 gets Lua integers; LuaJIT exact
 * doubles. */
#include <string.h>
#include "codec.h"

#define EXACT_LIMIT 9007199254740992.0 /* 2^53 */
#define MAX_DEPTH 1000

/* ------------------------------------------------------------------ schemas */

enum { T_STRING = 1, T_INTEGER, T_BOOLEAN, T_OBJECT, T_ARRAY, T_STRING_OR_OBJECT, T_CONTEXT };

/* A field: its name, type, and for T_OBJECT the object's fields (NULL: any
 * object), for T_ARRAY the fields of its items (which are objects). */
typedef struct field {
  const char *key;
  size_t len; /* strlen(key): compared before the bytes */
  int type;
  const struct field *sub;
} field;

/* A field of a schema table (F) and its end (F_END). */
#define F(key, type, sub) {key, sizeof(key) - 1, type, sub}
#define F_END {NULL, 0, 0, NULL}

/* components.schemas of communication-preferences-2026-03.openapi.json */
static const field ERROR_DETAIL[] = {
  F("message", T_STRING, NULL), F("in", T_STRING, NULL), F("code", T_STRING, NULL),
  F("subCategory", T_STRING, NULL), F("context", T_CONTEXT, NULL), F_END};

static const field STANDARD_ERROR[] = {
  F("status", T_STRING, NULL), F("id", T_STRING, NULL), F("category", T_STRING, NULL),
  F("subCategory", T_STRING_OR_OBJECT, NULL), F("message", T_STRING, NULL),
  F("errors", T_ARRAY, ERROR_DETAIL), F("context", T_CONTEXT, NULL), F("links", T_OBJECT, NULL),
  F_END};

static const field TRANSLATION[] = { /* PublicSubscriptionTranslation */
  F("subscriptionId", T_INTEGER, NULL), F("languageCode", T_STRING, NULL), F("name", T_STRING, NULL),
  F("description", T_STRING, NULL), F("createdAt", T_INTEGER, NULL), F("updatedAt", T_INTEGER, NULL),
  F_END};

#define STATUS_FIELDS                                                                               \
  F("subscriberIdString", T_STRING, NULL), F("subscriptionId", T_INTEGER, NULL),                    \
  F("status", T_STRING, NULL), F("source", T_STRING, NULL), F("channel", T_STRING, NULL),           \
  F("timestamp", T_STRING, NULL), F("legalBasis", T_STRING, NULL),                                  \
  F("legalBasisExplanation", T_STRING, NULL), F("setStatusSuccessReason", T_STRING, NULL),          \
  F("subscriptionName", T_STRING, NULL), F("businessUnitId", T_INTEGER, NULL),                      \
F("wideStatusType", T_STRING, NULL)

static const field STATUS[] = {STATUS_FIELDS, F_END}; /* PublicStatus, PublicWideStatus */

/* One item of `results`: PublicStatus, PublicWideStatus, SubscriptionDefinition,
 * Public(Wide)StatusBulkResponse or PublicBulkOptOutFromAllResponse. */
static const field RESULT[] = {
  STATUS_FIELDS, F("statuses", T_ARRAY, STATUS), F("wideStatuses", T_ARRAY, STATUS),
  F("id", T_STRING, NULL), F("name", T_STRING, NULL), F("description", T_STRING, NULL),
  F("purpose", T_STRING, NULL), F("communicationMethod", T_STRING, NULL),
  F("isActive", T_BOOLEAN, NULL), F("isDefault", T_BOOLEAN, NULL), F("isInternal", T_BOOLEAN, NULL),
  F("createdAt", T_STRING, NULL), F("updatedAt", T_STRING, NULL),
  F("subscriptionTranslations", T_ARRAY, TRANSLATION), F_END};

/* Every 2xx answer: the ActionResponse/BatchResponse envelopes and LinkGenerationResponse. */
static const field ENVELOPE[] = {
  F("status", T_STRING, NULL), F("results", T_ARRAY, RESULT), F("errors", T_ARRAY, STANDARD_ERROR),
  F("numErrors", T_INTEGER, NULL), F("links", T_OBJECT, NULL), F("startedAt", T_STRING, NULL),
  F("completedAt", T_STRING, NULL), F("requestedAt", T_STRING, NULL),
  F("subscriberIdString", T_STRING, NULL), F("managePreferencesUrl", T_STRING, NULL),
  F("unsubscribeAllUrl", T_STRING, NULL), F("unsubscribeSingleUrl", T_STRING, NULL),
  F_END};

/* Error, StandardError, and the legacy errorType/policyName of HubSpot's 429s. */
static const field ERROR_BODY[] = {
  F("category", T_STRING, NULL), F("errorType", T_STRING, NULL), F("message", T_STRING, NULL),
  F("correlationId", T_STRING, NULL), F("subCategory", T_STRING_OR_OBJECT, NULL),
  F("context", T_CONTEXT, NULL), F("errors", T_ARRAY, ERROR_DETAIL), F("links", T_OBJECT, NULL),
  F("policyName", T_STRING, NULL), F("status", T_STRING, NULL), F("id", T_STRING, NULL),
  F_END};

static const field *find_field(const field *fields, const char *k, size_t n) {
  if (n == 0) return NULL; /* no field is named "" */
  for (; fields->key; fields++)
    if (fields->len == n && fields->key[0] == k[0] && memcmp(fields->key, k, n) == 0) return fields;
  return NULL;
}

/* ------------------------------------------------------------------ helpers */

/* Result of checking one value: OK, DROP it (lenient mode), or FAILED (message pushed). */
enum { OK = 0, DROP = 1, FAILED = -1 };

typedef struct checker {
  int strict;       /* 1: a wrong type fails the decode; 0: the value is dropped */
  const void *null; /* cjson's null (a light userdata) */
} checker;

/* Where a value sits, for messages: a chain of keys or indexes on the C stack. */
typedef struct path {
  const struct path *up;
  const char *key; /* NULL: index */
  lua_Integer index;
} path;

static void push_path(lua_State *L, const path *p) {
  if (!p) { lua_pushliteral(L, ""); return; }
  push_path(L, p->up);
  if (p->key) lua_pushfstring(L, "%s%s", p->up ? "." : "", p->key);
  else lua_pushfstring(L, "[%d]", (int)p->index);
  lua_concat(L, 2);
}

static int is_null(lua_State *L, const checker *c, int i) {
  return lua_type(L, i) == LUA_TLIGHTUSERDATA && lua_touserdata(L, i) == c->null;
}

/* cjson gives arrays dense keys 1..n and objects string keys: a non-empty
 * table with a length is an array, one without is an object. */
static const char *json_type(lua_State *L, int i) {
  switch (lua_type(L, i)) {
  case LUA_TSTRING: return "string";
  case LUA_TNUMBER: return "number";
  case LUA_TBOOLEAN: return "boolean";
  case LUA_TTABLE: return lua_rawlen(L, i) > 0 ? "array" : "object";
  default: return "null";
  }
}

static int fail(lua_State *L, const path *p, const char *expected, const char *got) {
  push_path(L, p);
  lua_pushfstring(L, "field %s: %s expected, got %s", lua_tostring(L, -1), expected, got);
  return -1;
}

static int fail_inexact(lua_State *L, const path *p) {
  push_path(L, p);
  lua_pushfstring(L, "field %s is not an exact integer (fractional, or beyond 2^53)", lua_tostring(L, -1));
  return -1;
}

/* Removes JSON nulls from a table of unknown shape, recursively. */
static int drop_nulls(lua_State *L, const checker *c, int t, int depth) {
  if (depth > MAX_DEPTH) { lua_pushliteral(L, "JSON nested too deeply"); return -1; }
  luaL_checkstack(L, 4, "JSON nested too deeply");
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    if (lua_type(L, -1) == LUA_TTABLE) {
      if (drop_nulls(L, c, lua_gettop(L), depth + 1) != 0) return -1;
    } else if (is_null(L, c, -1)) {
      lua_pushvalue(L, -2);
      lua_pushnil(L);
      lua_rawset(L, t); /* clearing a field is safe in lua_next */
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* ------------------------------------------------------------------ checking */


static int check_fields(lua_State *L, const checker *c, int t, const field *fields, const path *p, int depth);
static int check_items(lua_State *L, const checker *c, int a, const field *item_fields, int item_type,
                       const path *p, int depth);

static int wrong(lua_State *L, const checker *c, const path *p, const char *expected, int v) {
  return c->strict ? fail(L, p, expected, json_type(L, v)) : DROP;
}

/* An exact integer in the 2^53 range; on Lua 5.4 the value at v becomes a Lua integer. */
static int check_integer(lua_State *L, const checker *c, int v, const path *p) {
  lua_Number d;
  if (lua_type(L, v) != LUA_TNUMBER) return wrong(L, c, p, "integer", v);
#if LUA_VERSION_NUM >= 503
  if (lua_isinteger(L, v)) {
    lua_Integer i = lua_tointeger(L, v);
    if (i < 9007199254740992LL && i > -9007199254740992LL) return OK;
    return c->strict ? fail_inexact(L, p) : DROP;
  }
#endif
  d = lua_tonumber(L, v);
  if (d != d || d >= EXACT_LIMIT || d <= -EXACT_LIMIT || (lua_Number)(long long)d != d)
    return c->strict ? fail_inexact(L, p) : DROP;
#if LUA_VERSION_NUM >= 503
  lua_pushinteger(L, (lua_Integer)d);
  lua_replace(L, v);
#endif
  return OK;
}

/* Checks the value at stack index v against type ty (sub: see field). */
static int check_value(lua_State *L, const checker *c, int v, int ty, const field *sub, const path *p,
                       int depth) {
  int lt = lua_type(L, v);
  if (depth > MAX_DEPTH) { lua_pushliteral(L, "JSON nested too deeply"); return FAILED; }
  switch (ty) {
  case T_STRING: return lt == LUA_TSTRING ? OK : wrong(L, c, p, "string", v);
  case T_BOOLEAN: return lt == LUA_TBOOLEAN ? OK : wrong(L, c, p, "boolean", v);
  case T_INTEGER: return check_integer(L, c, v, p);
  case T_STRING_OR_OBJECT:
    if (lt == LUA_TSTRING) return OK;
    /* fall through */
  case T_OBJECT:
    if (lt != LUA_TTABLE || lua_rawlen(L, v) > 0) return wrong(L, c, p, "object", v);
    return sub ? check_fields(L, c, v, sub, p, depth + 1) : drop_nulls(L, c, v, depth + 1);
  case T_ARRAY:
    if (lt != LUA_TTABLE) return wrong(L, c, p, "array", v);
    return check_items(L, c, v, sub, T_OBJECT, p, depth + 1);
  case T_CONTEXT: { /* an object of arrays of strings */
    if (lt != LUA_TTABLE || lua_rawlen(L, v) > 0) return wrong(L, c, p, "object", v);
    lua_pushnil(L);
    while (lua_next(L, v) != 0) {
      path here = {p, lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?", 0};
      int r = is_null(L, c, -1) ? DROP
            : lua_type(L, -1) != LUA_TTABLE ? wrong(L, c, &here, "array", lua_gettop(L))
            : check_items(L, c, lua_gettop(L), NULL, T_STRING, &here, depth + 1);
      if (r == FAILED) return FAILED;
      if (r == DROP) {
        lua_pushvalue(L, -2);
        lua_pushnil(L);
        lua_rawset(L, v);
      }
      lua_pop(L, 1);
    }
    return OK;
  }
  default: return OK;
  }
}

/* An object's known fields get their types; nulls go; unknown fields keep their value. */
static int check_fields(lua_State *L, const checker *c, int t, const field *fields, const path *p, int depth) {
  luaL_checkstack(L, 8, "JSON nested too deeply");
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    int v = lua_gettop(L), r = OK;
    const field *f = NULL;
    size_t n;
    if (lua_type(L, -2) == LUA_TSTRING) {
      const char *k = lua_tolstring(L, -2, &n);
      f = find_field(fields, k, n);
    }
    if (is_null(L, c, v)) r = DROP;
    else if (f) {
      path here = {p, f->key, 0};
      r = check_value(L, c, v, f->type, f->sub, &here, depth);
    } else if (lua_type(L, v) == LUA_TTABLE) r = drop_nulls(L, c, v, depth + 1);
    if (r == FAILED) return FAILED;
    /* store the dropped (nil) or normalized value: only an integer is replaced
     * (Lua 5.4: it became a Lua integer); tables are checked in place */
    if (r == DROP || (f && f->type == T_INTEGER && LUA_VERSION_NUM >= 503)) {
      lua_pushvalue(L, -2);
      if (r == DROP) lua_pushnil(L); else lua_pushvalue(L, v);
      lua_rawset(L, t); /* replacing or clearing an existing key is safe in lua_next */
    }
    lua_settop(L, v - 1);
  }
  return OK;
}

/* An array's items: objects with item_fields, or strings. In lenient mode bad
 * items are removed and the rest moved down, so the array stays dense. */
static int check_items(lua_State *L, const checker *c, int a, const field *item_fields, int item_type,
                       const path *p, int depth) {
  lua_Integer n = (lua_Integer)lua_rawlen(L, a), i, kept = 0;
  if (n == 0) {
    lua_pushnil(L);
    if (lua_next(L, a) != 0) { lua_pop(L, 2); return wrong(L, c, p, "array", a); }
    return OK;
  }
  luaL_checkstack(L, 8, "JSON nested too deeply");
  for (i = 1; i <= n; i++) {
    path here = {p, NULL, i};
    int r;
    lua_rawgeti(L, a, (int)i);
    r = is_null(L, c, -1) ? wrong(L, c, &here, item_type == T_STRING ? "string" : "object", lua_gettop(L))
                       : check_value(L, c, lua_gettop(L), item_type, item_fields, &here, depth);
    if (r == FAILED) return FAILED;
    if (r == DROP) { lua_pop(L, 1); continue; }
    lua_rawseti(L, a, (int)++kept);
  }
  for (i = kept + 1; i <= n; i++) {
    lua_pushnil(L);
    lua_rawseti(L, a, (int)i);
  }
  return OK;
}

/* ------------------------------------------------------------------ generic */

static int integer_key(const char *k, size_t n) {
  switch (n) {
  case 9: return memcmp(k, "numErrors", 9) == 0 || memcmp(k, "createdAt", 9) == 0 ||
                 memcmp(k, "updatedAt", 9) == 0;
  case 14: return memcmp(k, "businessUnitId", 14) == 0 || memcmp(k, "subscriptionId", 14) == 0;
  default: return 0;
  }
}

/* Any JSON: nulls go, numbers under integer keys become exact integers or fail. */
static int normalize(lua_State *L, const checker *strict, int t, int depth) {
  if (depth > MAX_DEPTH) { lua_pushliteral(L, "JSON nested too deeply"); return -1; }
  luaL_checkstack(L, 6, "JSON nested too deeply");
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    int vt = lua_type(L, -1);
    if (vt == LUA_TTABLE) {
      if (normalize(L, strict, lua_gettop(L), depth + 1) != 0) return -1;
    } else if (is_null(L, strict, -1)) {
      lua_pushvalue(L, -2);
      lua_pushnil(L);
      lua_rawset(L, t);
    } else if (vt == LUA_TNUMBER && lua_type(L, -2) == LUA_TSTRING) {
      size_t n;
      const char *k = lua_tolstring(L, -2, &n);
      if (integer_key(k, n)) {
        path here = {NULL, k, 0};
        if (check_integer(L, strict, lua_gettop(L), &here) != OK) return -1;
        lua_pushvalue(L, -2);
        lua_pushvalue(L, -2);
        lua_rawset(L, t);
      }
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* ------------------------------------------------------------------ entry */

static int decode_failed(lua_State *L) { /* message on top */
  lua_pushnil(L);
  lua_insert(L, -2);
  return 2;
}

/* The text at index text decoded by cjson's decode at index fn: the value
 * pushed (0), or cjson's message, which names the position (-1). */
static int parse(lua_State *L, int fn, int text) {
  lua_pushvalue(L, fn);
  lua_pushvalue(L, text);
  return lua_pcall(L, 1, 1, 0) != 0 ? -1 : 0;
}

/* The value on top: an object checked against fields by c, or the message (-1). */
static int check_object(lua_State *L, const checker *c, const field *fields) {
  int v = lua_gettop(L);
  if (lua_type(L, v) != LUA_TTABLE || lua_rawlen(L, v) > 0) {
    lua_pushfstring(L, "a JSON object expected, got %s", json_type(L, v));
    return -1;
  }
  if (check_fields(L, c, v, fields, NULL, 0) == FAILED) return -1;
  lua_settop(L, v);
  return 0;
}

int cp_decode_envelope(lua_State *L, int fn, const void *null, int text) {
  checker strict;
  int top = lua_gettop(L);
  strict.strict = 1;
  strict.null = null;
  if (parse(L, fn, text) == 0 && check_object(L, &strict, ENVELOPE) == 0) return 0;
  lua_settop(L, top);
  return -1;
}

/* core.decode(text [, "envelope" | "error"]) -> value, or nil, message */
int cp_decode(lua_State *L) {
  static const char *const modes[] = {"any", "envelope", "error", NULL};
  checker c;
  int mode, v;
  luaL_checkstring(L, 1);
  mode = luaL_checkoption(L, 2, "any", modes);
  lua_settop(L, 1);
  c.strict = mode != 2;
  c.null = lua_touserdata(L, lua_upvalueindex(2));
  if (parse(L, lua_upvalueindex(1), 1) != 0) return decode_failed(L);
  v = lua_gettop(L);
  if (mode == 0) {
    if (is_null(L, &c, v)) { lua_pop(L, 1); lua_pushnil(L); return 1; }
    if (lua_istable(L, v) && normalize(L, &c, v, 0) != 0) return decode_failed(L);
    lua_settop(L, v);
    return 1;
  }
  if (check_object(L, &c, mode == 1 ? ENVELOPE : ERROR_BODY) != 0) return decode_failed(L);
  return 1;
}
