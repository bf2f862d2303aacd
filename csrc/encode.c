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

/* Whether s holds piece at some position (bytes as they are). */
static int has_exact(const char *s, size_t n, const char *piece, size_t m) {
  const char *at = s, *last;
  if (m == 0) return 1;
  if (m > n) return 0;
  last = s + (n - m);
  while (at <= last && (at = memchr(at, (unsigned char)piece[0], (size_t)(last - at) + 1)) != NULL) {
    if (memcmp(at, piece, m) == 0) return 1;
    at++;
  }
  return 0;
}

/* Whether s holds any string of the array at stack index t (folded: its
 * strings are lower-case and s is read ignoring ASCII letter case). */
static int holds_any(lua_State *L, int t, const char *s, size_t n, int folded) {
  int i, count = (int)lua_rawlen(L, t);
  for (i = 1; i <= count; i++) {
    size_t m;
    const char *piece;
    int hit;
    lua_rawgeti(L, t, i);
    piece = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &m) : NULL;
    hit = piece && (folded ? has_folded(s, n, piece, m) : has_exact(s, n, piece, m));
    lua_pop(L, 1);
    if (hit) return 1;
  }
  return 0;
}

/* Whether text s passes the quick check of entry e (stack index e): one of
 * its `pieces` as they are, or of its `folded_pieces` in any letter case. */
static int entry_suspected(lua_State *L, int e, const char *s, size_t n) {
  static const char *const fields[2] = {"pieces", "folded_pieces"};
  int k, hit = 0;
  for (k = 0; k < 2 && !hit; k++) {
    lua_pushstring(L, fields[k]);
    lua_rawget(L, e);
    hit = lua_istable(L, -1) && holds_any(L, lua_gettop(L), s, n, k);
    lua_pop(L, 1);
  }
  return hit;
}

/* core.suspects(s, entries, n) -> the array of those of entries[1..n]
 * (commprefs.redact's entries; holes skipped) whose quick check s passes,
 * or nil: the whole quick check in one call, s never copied. */
int cp_suspects(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  int i, count, found = 0;
  luaL_checktype(L, 2, LUA_TTABLE);
  count = (int)luaL_checkinteger(L, 3);
  lua_settop(L, 3);
  lua_pushnil(L); /* 4: the result, made at the first hit */
  for (i = 1; i <= count; i++) {
    lua_rawgeti(L, 2, i);
    if (lua_istable(L, 5) && entry_suspected(L, 5, s, n)) {
      if (!found) {
        lua_newtable(L);
        lua_replace(L, 4);
      }
      lua_rawseti(L, 4, ++found);
    } else {
      lua_pop(L, 1);
    }
  }
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
