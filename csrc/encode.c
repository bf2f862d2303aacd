/* encode.c: owns request encoding. Path segments are percent-encoded so
 * that the server decodes exactly the caller's id (RFC 3986: everything but
 * unreserved characters is escaped, including '+', '/', '%' and non-ASCII
 * bytes; a segment that is exactly "." or ".." is escaped whole). Bodies are JSON from a private lua-cjson instance (upvalue 1, its
 * encode function), so a user's cjson settings never change what is sent. */
#include <ctype.h>
#include <string.h>
#include "codec.h"

static int unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '.' || c == '_' || c == '~';
}

/* What escape_id does with each byte: 0 refuse (not printable ASCII: the
 * long way), 1 keep (unreserved), 3 escape (%XX). */
static const unsigned char ID_BYTE[256] = {
  ['\x20'] = 3, ['!'] = 3, ['"'] = 3, ['#'] = 3, ['$'] = 3, ['%'] = 3, ['&'] = 3, ['\''] = 3, ['('] = 3, [')'] = 3,
  ['*'] = 3, ['+'] = 3, [','] = 3, ['-'] = 1, ['.'] = 1, ['/'] = 3, ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1,
  ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1, [':'] = 3, [';'] = 3, ['<'] = 3, ['='] = 3,
  ['>'] = 3, ['?'] = 3, ['@'] = 3, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1,
  ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1,
  ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1, ['['] = 3,
  ['\\'] = 3, [']'] = 3, ['^'] = 3, ['_'] = 1, ['`'] = 3, ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1,
  ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1,
  ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1,
  ['z'] = 1, ['{'] = 3, ['|'] = 3, ['}'] = 3, ['~'] = 1};

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

/* core.escape_id(v, max) -> the escaped segment of an id that needs no
 * further check: a string of 1..max bytes, each printable ASCII (0x20..0x7E),
 * is valid UTF-8 without control or invisible characters, so
 * commprefs.check.id passes it; else nil, and the caller checks v the long
 * way (which raises) and escapes it with core.escape. The GET path's id
 * check and escape in one call, same bytes as core.escape. */
int cp_escape_id(lua_State *L) {
  static const char hex[] = "0123456789ABCDEF";
  size_t len, i, out = 0;
  const unsigned char *s;
  lua_Integer max = luaL_checkinteger(L, 2);
  char buf[768], *d = buf;
  int dots;
  if (lua_type(L, 1) != LUA_TSTRING) return 0;
  s = (const unsigned char *)lua_tolstring(L, 1, &len);
  if (len == 0 || (lua_Integer)len > max || len > sizeof(buf) / 3) return 0;
  for (i = 0; i < len; i++) {
    unsigned char k = ID_BYTE[s[i]];
    if (!k) return 0;
    out += k;
  }
  dots = (len == 1 || len == 2) && s[0] == '.' && s[len - 1] == '.'; /* dot-segments: escaped whole */
  if (out == len && !dots) { /* nothing to escape: the string itself */
    lua_settop(L, 1);
    return 1;
  }
  for (i = 0; i < len; i++) {
    if (ID_BYTE[s[i]] == 1 && !dots) *d++ = (char)s[i];
    else {
      *d++ = '%';
      *d++ = hex[s[i] >> 4];
      *d++ = hex[s[i] & 15];
    }
  }
  lua_pushlstring(L, buf, (size_t)(d - buf));
  return 1;
}

/* Whether p (n bytes) occurs in s (len bytes). */
static int occurs(const unsigned char *s, size_t len, const unsigned char *p, size_t n) {
  const unsigned char *at = s, *end;
  if (n == 0) return 1;
  if (n > len) return 0;
  end = s + (len - n) + 1; /* one past the last possible start */
  while (at < end && (at = memchr(at, p[0], (size_t)(end - at))) != NULL) {
    if (memcmp(at + 1, p + 1, n - 1) == 0) return 1;
    at++;
  }
  return 0;
}

/* Whether any string of the array at index a occurs in s. */
static int any_occurs(lua_State *L, int a, const unsigned char *s, size_t len) {
  int i, n = (int)lua_rawlen(L, a), hit = 0;
  for (i = 1; i <= n && !hit; i++) {
    lua_rawgeti(L, a, i);
    if (lua_type(L, -1) == LUA_TSTRING) {
      size_t plen;
      const unsigned char *p = (const unsigned char *)lua_tolstring(L, -1, &plen);
      hit = occurs(s, len, p, plen);
    }
    lua_pop(L, 1);
  }
  return hit;
}

/* tolower changes only what isupper holds: of ASCII, A-Z alone (the other
 * ASCII bytes are digits, punctuation, space or controls in every locale) */
static unsigned char fold(unsigned char ch) {
  return (ch >= 'A' && ch <= 'Z') || ch >= 0x80 ? (unsigned char)tolower(ch) : ch;
}

/* Whether lower(s) holds p (n > 0 bytes), looking in s for the bytes of
 * firsts (those whose lower case is p[0]) and folding only what follows. */
static int occurs_folded(const unsigned char *s, size_t len, const unsigned char *p, size_t n,
                         const unsigned char *firsts, size_t nf) {
  size_t f, k;
  if (n > len) return 0;
  for (f = 0; f < nf; f++) {
    const unsigned char *at = s, *end = s + (len - n) + 1;
    while (at < end && (at = memchr(at, firsts[f], (size_t)(end - at))) != NULL) {
      for (k = 1; k < n && fold(at[k]) == p[k]; k++) {}
      if (k == n) return 1;
      at++;
    }
  }
  return 0;
}

/* core.has_piece(s, exact, folded[, firsts]) -> whether s holds any string of
 * the array `exact`, or s:lower() any of the array `folded` (commprefs.redact's
 * quick check). firsts[i]: the bytes whose lower case is folded[i]'s first
 * byte (string.lower's): then s is searched for them and only what follows a
 * match is folded; without firsts s is lower-cased byte by byte with tolower,
 * as string.lower does, into a buffer that is not a Lua string. */
int cp_has_piece(lua_State *L) {
  size_t len, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  unsigned char small[2048], *low;
  int n;
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (any_occurs(L, 2, s, len)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  n = (int)lua_rawlen(L, 3);
  if (n == 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (lua_istable(L, 4)) {
    int k, hit = 0;
    for (k = 1; k <= n && !hit; k++) {
      size_t plen, nf;
      const unsigned char *p, *firsts;
      lua_rawgeti(L, 3, k);
      lua_rawgeti(L, 4, k);
      p = lua_type(L, -2) == LUA_TSTRING ? (const unsigned char *)lua_tolstring(L, -2, &plen) : NULL;
      firsts = lua_type(L, -1) == LUA_TSTRING ? (const unsigned char *)lua_tolstring(L, -1, &nf) : NULL;
      if (p && plen == 0) hit = 1;
      else if (p && firsts) hit = occurs_folded(s, len, p, plen, firsts, nf);
      lua_pop(L, 2);
    }
    lua_pushboolean(L, hit);
    return 1;
  }
  low = len <= sizeof(small) ? small : lua_newuserdata(L, len); /* on the stack until we return */
  for (i = 0; i < len; i++) low[i] = fold(s[i]);
  lua_pushboolean(L, any_occurs(L, 3, low, len));
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

int cp_encode(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 1); /* cjson raises on what it cannot encode: a programming error */
  return 1;
}
