/* fuzz/resp_fuzz.c: the Redis pieces of the core that read what a server (or a
 * user) gives them: csrc/resp.c's reply reader (hiredis underneath, with our
 * array limit and reply -> Lua conversion) fed in arbitrary pieces; the
 * command formatter round-tripped through the reader (what is formatted must
 * read back as the same strings); and csrc/redis.c's redis:// URL parser.
 * None may crash, leak or raise except where documented (a bad URL raises).
 * Input: byte 0 picks the mode (0 reader, 1 format round trip, 2 URL), the
 * rest is the data. */
/* the core files first: they set their own feature macros */
#include "../csrc/redis.c"
#include "../csrc/resp.c"
#include "../csrc/ratelimit.c"
#include "../csrc/util.c"
#include "../csrc/signals.c"
#include <stdint.h>
#include <string.h>
#include <time.h>
#include "fuzz_lua.h"

static const char *CHECK =
  "local data, mode = ...\n"
  "local core = require 'commprefs.core'\n"
  "local Error = require 'commprefs.error'\n"
  "if mode == 0 then\n"
  "  local rd, pos = core.redis_reader(), 1\n"
  "  while pos <= #data do\n"
  "    local n = data:byte(pos) % 32 + 1\n"
  "    local fed, err = rd:feed(data:sub(pos + 1, pos + n))\n"
  "    pos = pos + n + 1\n"
  "    if not fed then assert(type(err) == 'string') break end\n"
  "    while true do\n"
  "      local ok, v = rd:get()\n"
  "      if ok == nil then assert(type(v) == 'string') break end\n"
  "      if not ok then break end\n"
  "      assert(v ~= nil)\n"
  "      if Error.is(v) then assert(type(tostring(v)) == 'string') end\n"
  "    end\n"
  "  end\n"
  "  rd:close()\n"
  "elseif mode == 1 then\n"
  "  local args = {}\n"
  "  for part in (data .. '\\255'):gmatch('(.-)\\255') do args[#args + 1] = part end\n"
  "  local rd = core.redis_reader()\n"
  "  assert(rd:feed(core.redis_format(args)))\n"
  "  local ok, v = rd:get()\n"
  "  assert(ok == true and type(v) == 'table' and #v == #args, 'the formatted command does not read back')\n"
  "  for i = 1, #args do assert(v[i] == args[i], 'argument ' .. i .. ' changed') end\n"
  "  assert(rd:get() == false)\n"
  "  rd:close()\n"
  "else\n"
  "  local ok, u = pcall(core.redis_url, data)\n"
  "  if ok then\n"
  "    assert(type(u.host) == 'string' and u.host ~= '' and u.port >= 1 and u.port <= 65535 and u.db >= 0)\n"
  "  else\n"
  "    assert(tostring(u):find('^commprefs.core.redis_url: bad argument'), tostring(u))\n"
  "  end\n"
  "end\n";

static lua_State *state(void) {
  static lua_State *L;
  if (L) return L;
  L = fuzz_new_state(); /* core */
  cp_register_resp(L);
  cp_register_redis(L);
  lua_pop(L, 1);
  return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = state();
  if (size == 0) return 0;
  lua_pushlstring(L, (const char *)data + 1, size - 1);
  lua_pushinteger(L, data[0] % 3);
  fuzz_run(L, CHECK, 2, 0, "redis reply/format/url");
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
