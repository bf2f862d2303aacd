/* fuzz/journal_fuzz.c: the journal (csrc/journal.c) and its reader
 * (commprefs.bulk's read_journal). Input: any bytes as an existing journal
 * file. Opening it must heal a torn last line (the file then ends with "\n"
 * and keeps every byte before), an append must land on its own line, and
 * the reader must return a set of string ids without raising. */
/* the core files first: they set their own feature macros */
#include "../csrc/journal.c"
#include "../csrc/decode.c"
#include "../csrc/config.c"
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include "fuzz_lua.h"

static const char *CHECK =
  "local path, input = ...\n"
  "local core = require 'commprefs.core'\n"
  "local bulk = require 'commprefs.bulk'\n"
  "local j = assert(core.journal(path))\n"
  "local line = '{\"id\":\"z@fuzz.example\",\"op\":\"unsubscribe_all\",\"bu\":0,\"outcome\":\"changed\"}\\n'\n"
  "assert(j:append(line))\n"
  "local done = bulk.read_journal(path, 'unsubscribe_all', 0)\n"
  "j:close()\n"
  "local f = assert(io.open(path, 'rb')); local text = f:read('a'); f:close()\n"
  "local healed = input\n"
  "if #input > 0 and input:sub(-1) ~= '\\n' then healed = input .. '\\n' end\n"
  "assert(text == healed .. line, 'journal heal/append changed bytes')\n"
  "assert(done['z@fuzz.example'], 'appended id not read back')\n"
  "for id in pairs(done) do assert(type(id) == 'string') end\n";

static char journal_path[64];

static lua_State *state(void) {
  static lua_State *L;
  if (L) return L;
  snprintf(journal_path, sizeof journal_path, "/tmp/commprefs-journal-fuzz-%ld", (long)getpid());
  L = fuzz_new_state();                  /* core */
  fuzz_push_cjson_decode_upvalues(L);
  lua_pushcclosure(L, cp_decode, 2);
  lua_setfield(L, -2, "decode");
  cp_register_journal(L);                /* core.journal */
  cp_register_limits(L);                 /* core.limits: bulk.lua's id rule reads them */
  lua_pop(L, 1);
  return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = state();
  FILE *f = fopen(journal_path, "wb");
  if (!f) abort();
  if (size && fwrite(data, 1, size, f) != size) abort();
  fclose(f);
  lua_pushstring(L, journal_path);
  lua_pushlstring(L, (const char *)data, size);
  fuzz_run(L, CHECK, 2, 0, "journal");
  unlink(journal_path);
  lua_gc(L, LUA_GCCOLLECT, 0); /* free what this input allocated: libFuzzer's leak check stays quiet */
  return 0;
}
