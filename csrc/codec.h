/* codec.h: request encoding (encode.c) and response decoding (decode.c).
 * Neither uses curl, so a non-blocking transport can reuse both. */
#ifndef COMMPREFS_CODEC_H
#define COMMPREFS_CODEC_H

#include "compat.h"

/* encode.c */
int cp_escape(lua_State *L);      /* core.escape(s): one percent-encoded path segment */
/* core.suspect_index(index, n) and core.suspects(s, pidx, index), commprefs.redact's
 * quick check (see encode.c), set in the table at the top of the stack */
void cp_register_suspects(lua_State *L);
int cp_escape_id(lua_State *L);   /* core.escape_id(v, max): escape of a printable-ASCII id, else nil */
int cp_has_control(lua_State *L); /* core.has_control(s): true if s has a control byte */
int cp_encode(lua_State *L);      /* core.encode(v): JSON text (private cjson instance) */

/* decode.c */
int cp_decode(lua_State *L);      /* core.decode(text): normalized value, or nil, message */
/* core.decode(text, "envelope") in C: the JSON text at stack index text
 * (absolute) decoded by cjson's decode at index fn (null: its null) and
 * checked; pushes the value and returns 0, or pushes nothing and returns -1
 * (whatever failed: the caller takes its usual path, which says why). */
int cp_decode_envelope(lua_State *L, int fn, const void *null, int text);

#endif
