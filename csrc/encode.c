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

int cp_encode(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 1); /* cjson raises on what it cannot encode: a programming error */
  return 1;
}
