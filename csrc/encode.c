/* encode.c: owns request encoding. Path segments are percent-encoded so
 * that the server decodes exactly the caller's id (RFC 3986: everything but
 * unreserved characters is escaped, including '+', '/', '%' and non-ASCII
 * bytes; a segment that is exactly "." or ".." is escaped whole). Bodies are JSON from a private lua-cjson instance (upvalue 1, its
 * encode function), so a user's cjson settings never change what is sent. */
#include <string.h>
#include "codec.h"

static int unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '.' || c == '_' || c == '~';
}

int cp_escape(lua_State *L) {
  static const char hex[] = "0123456789ABCDEF";
  size_t len, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  luaL_Buffer b;
  /* "." and ".." are dot-segments that a server would resolve: escape them */
  int dots = (len == 1 || len == 2) && s[0] == '.' && s[len - 1] == '.';
  luaL_buffinit(L, &b);
  for (i = 0; i < len; i++) {
    if (unreserved(s[i]) && !dots) {
      luaL_addchar(&b, (char)s[i]);
    } else {
      luaL_addchar(&b, '%');
      luaL_addchar(&b, hex[s[i] >> 4]);
      luaL_addchar(&b, hex[s[i] & 15]);
    }
  }
  luaL_pushresult(&b);
  return 1;
}

int cp_has_control(lua_State *L) {
  size_t len, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  for (i = 0; i < len; i++) {
    if (s[i] < 0x20 || s[i] == 0x7f) {
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  lua_pushboolean(L, 0);
  return 1;
}

/* Whether s holds piece (lower-case) at some position, ignoring ASCII case. */
static int has_folded(const char *s, size_t n, const char *piece, size_t m) {
  int c, k;
  if (m == 0) return 1;
  if (m > n) return 0;
  c = (unsigned char)piece[0];
  for (k = 0; k < 2; k++) { /* the first byte as it is, then upper-cased (a letter) */
    const char *at = s, *last = s + (n - m);
    int want = k == 0 ? c : (c >= 'a' && c <= 'z' ? c - 32 : -1);
    if (want < 0) break;
    while (at <= last && (at = memchr(at, want, (size_t)(last - at) + 1)) != NULL) {
      size_t i;
      for (i = 1; i < m; i++) {
        int b = (unsigned char)at[i];
        if (b >= 'A' && b <= 'Z') b += 32;
        if (b != (unsigned char)piece[i]) break;
      }
      if (i == m) return 1;
      at++;
    }
  }
  return 0;
}

/* core.any_folded(s, pieces) -> whether s holds any of the lower-case
 * strings of the array pieces, ignoring ASCII letter case (as finding them
 * in s:lower(), without making that string: commprefs.redact's quick check). */
int cp_any_folded(lua_State *L) {
  size_t n, m;
  const char *s = luaL_checklstring(L, 1, &n);
  int i, count;
  luaL_checktype(L, 2, LUA_TTABLE);
  count = (int)lua_rawlen(L, 2);
  for (i = 1; i <= count; i++) {
    const char *piece;
    lua_rawgeti(L, 2, i);
    piece = lua_tolstring(L, -1, &m);
    if (piece && has_folded(s, n, piece, m)) {
      lua_pushboolean(L, 1);
      return 1;
    }
    lua_pop(L, 1);
  }
  lua_pushboolean(L, 0);
  return 1;
}

int cp_encode(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 1); /* cjson raises on what it cannot encode: a programming error */
  return 1;
}
