/* encode.c: owns request encoding. Path segments are percent-encoded so
 * that the server decodes exactly the caller's id (RFC 3986: everything but
 * unreserved characters is escaped, including '+', '/', '%' and non-ASCII
 * bytes; a segment that is exactly "." or ".." is escaped whole). Bodies are JSON from a private lua-cjson instance (upvalue 1, its
 * encode function), so a user's cjson settings never change what is sent.
 * It also owns the matching of commprefs.redact's quick check (which owns
 * when to rebuild it): core.suspect_index, a C copy of the pieces of
 * redact's index, and core.suspects, one pass of a text over it. */
#include <ctype.h>
#include <limits.h>
#include <stdlib.h>
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

/* ------------------------------------------------ the quick check's index */

/* core.suspect_index(index, n) is commprefs.redact's quick check made once
 * whenever its index changes: a copy of every piece of entries 1..n, in
 * buckets by the byte a match starts with, behind two 2-byte filters (the
 * first two bytes of a match; any two bytes of its first min_len), so that
 * core.suspects reads a text once, reading the filter at every
 * (min_len - 1)-th byte only, with no Lua table access but the result. */
#define PIDX_MT "commprefs.core.suspect_index"
static const char PIDX_KEY = 0; /* the registry key of the metatable (cp_register_key) */

/* One piece as core.suspects looks for it, in the bucket of one first byte. */
typedef struct {
  const unsigned char *bytes; /* into cp_pidx.bytes */
  size_t len;                 /* >= 1: empty pieces are in cp_pidx.base */
  int entry;                  /* the entry number, 1..n */
  int folded;                 /* 1: matched against the text lower-cased (ASCII) */
} cp_piece;

/* The index. Every pointer is malloc'd (never into Lua memory) and freed by
 * pidx_free (__gc, __close), which leaves an index that matches nothing. */
typedef struct {
  unsigned char *bytes; /* every piece's bytes, one block */
  cp_piece *slots;      /* slots[start[c] .. start[c + 1]): pieces a match of which starts with byte c */
  unsigned char *base;  /* base[e]: 1 when entry e has an empty piece (it holds for every text) */
  unsigned char *hit;   /* hit[e] during one scan: entry e is suspected */
  int n;                /* entries 1..n */
  int pieced;           /* how many entries have a non-empty piece */
  unsigned scans;       /* scans so far (a nested one reuses hit: see cp_suspects) */
  size_t start[257];
  unsigned char one[256];   /* one[c]: a 1-byte piece matches byte c (the filter of a text's last byte) */
  unsigned char pair[8192]; /* bit (c1 << 8 | c2): some piece's match may start with bytes c1, c2 */
  size_t min_len;           /* the shortest piece's length (0: no piece) */
  unsigned char near[8192]; /* bit (c1 << 8 | c2): c1, c2 may sit at offsets o, o + 1 < min_len of a match */
} cp_pidx;

/* What a build counts before it allocates: bytes, slots per first byte. */
typedef struct {
  size_t bytes;
  size_t min_len; /* 0: no piece yet */
  size_t per_byte[256];
} pidx_count;

/* c lower-cased if it is an ASCII letter. */
static int lower_ascii(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* The first bytes of s that a match of piece p (len >= 1) can start with,
 * into firsts (0, 1 or 2 of them): p[0] (exact), or the bytes whose ASCII
 * lower case is p[0] (folded: none when p[0] is an upper-case letter). */
static int piece_firsts(const unsigned char *p, int folded, int firsts[2]) {
  int c = p[0];
  if (!folded) {
    firsts[0] = c;
    return 1;
  }
  if (c >= 'A' && c <= 'Z') return 0; /* the lower-cased text never holds it */
  firsts[0] = c;
  if (c >= 'a' && c <= 'z') {
    firsts[1] = c - 32;
    return 2;
  }
  return 1;
}

/* Calls visit(ctx, entry, folded, bytes, len) for every string piece of
 * entries 1..n of the index table at stack index t: each entry's `pieces`
 * (folded 0) then `folded_pieces` (folded 1). Holes, non-table entries or
 * lists, and non-string pieces are skipped. Reads with raw access only, so
 * no Lua code runs and two walks see the same pieces. */
typedef void (*piece_visit)(void *ctx, int entry, int folded, const char *bytes, size_t len);
static void pidx_walk(lua_State *L, int t, int n, piece_visit visit, void *ctx) {
  static const char *const fields[2] = {"pieces", "folded_pieces"};
  int e, k;
  for (e = 1; e <= n; e++) {
    lua_rawgeti(L, t, e);
    for (k = 0; k < 2 && lua_istable(L, -1); k++) {
      int i, count;
      lua_pushstring(L, fields[k]);
      lua_rawget(L, -2);
      count = lua_istable(L, -1) ? (int)lua_rawlen(L, -1) : 0;
      for (i = 1; i <= count; i++) {
        lua_rawgeti(L, -1, i);
        if (lua_type(L, -1) == LUA_TSTRING) {
          size_t len;
          const char *bytes = lua_tolstring(L, -1, &len);
          visit(ctx, e, k, bytes, len);
        }
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
}

/* The counting walk: bytes to copy and slots per first byte. */
static void pidx_count_piece(void *ctx, int entry, int folded, const char *bytes, size_t len) {
  pidx_count *c = ctx;
  int firsts[2], k, nf;
  (void)entry;
  if (len == 0) return;
  nf = piece_firsts((const unsigned char *)bytes, folded, firsts);
  for (k = 0; k < nf; k++) c->per_byte[firsts[k]]++;
  c->bytes += len;
  if (c->min_len == 0 || len < c->min_len) c->min_len = len;
}

/* Sets bit (c1 << 8 | c2) of a 2-byte filter. */
static void set_pair(unsigned char *bits, int c1, int c2) {
  unsigned bit = (unsigned)c1 << 8 | (unsigned)c2;
  bits[bit >> 3] |= (unsigned char)(1u << (bit & 7));
}

/* The text bytes that match byte b of a piece (folded: b and, for a
 * lower-case letter, its upper case), into out; returns how many. */
static int byte_matches(int b, int folded, int out[2]) {
  out[0] = b;
  if (folded && b >= 'a' && b <= 'z') {
    out[1] = b - 32;
    return 2;
  }
  return 1;
}

/* Records in p->near every pair of text bytes that a match of piece may
 * hold at offsets o, o + 1 with o + 1 < p->min_len (for the stepped scan). */
static void pidx_mark_near(cp_pidx *p, const unsigned char *piece, int folded) {
  size_t o;
  for (o = 0; o + 1 < p->min_len; o++) {
    int a[2], b[2], na = byte_matches(piece[o], folded, a), nb = byte_matches(piece[o + 1], folded, b), x, y;
    for (x = 0; x < na; x++)
      for (y = 0; y < nb; y++) set_pair(p->near, a[x], b[y]);
  }
}

/* Records in p's filters that a match of piece (len bytes) may start with
 * byte c: for a 1-byte piece, one[c] and the pair bits of c and every byte;
 * else the pair bits of c and each byte the piece's second byte matches
 * (both cases when folded). */
static void pidx_mark_start(cp_pidx *p, int c, const unsigned char *piece, size_t len, int folded) {
  int seconds[2], k, ns;
  if (len == 1) {
    p->one[c] = 1;
    for (k = 0; k < 256; k++) set_pair(p->pair, c, k);
    return;
  }
  ns = byte_matches(piece[1], folded, seconds);
  for (k = 0; k < ns; k++) set_pair(p->pair, c, seconds[k]);
}

/* The filling walk's state: where the next bytes go, each bucket's next slot. */
typedef struct {
  cp_pidx *p;
  size_t used;
  size_t next[256];
} pidx_fill;

/* The filling walk: copies a piece and puts it in its buckets (an entry
 * with an empty piece is marked in base instead). */
static void pidx_fill_piece(void *ctx, int entry, int folded, const char *bytes, size_t len) {
  pidx_fill *f = ctx;
  int firsts[2], k, nf;
  unsigned char *copy;
  if (len == 0) {
    f->p->base[entry] = 1;
    return;
  }
  copy = f->p->bytes + f->used;
  memcpy(copy, bytes, len);
  f->used += len;
  nf = piece_firsts(copy, folded, firsts);
  for (k = 0; k < nf; k++) {
    cp_piece *slot = &f->p->slots[f->next[firsts[k]]++];
    slot->bytes = copy;
    slot->len = len;
    slot->entry = entry;
    slot->folded = folded;
    pidx_mark_start(f->p, firsts[k], copy, len, folded);
  }
  if (f->p->min_len >= 3) pidx_mark_near(f->p, copy, folded);
}

/* Frees what the index holds; it then matches nothing (safe to call twice). */
static void pidx_free(cp_pidx *p) {
  free(p->bytes);
  free(p->slots);
  free(p->base);
  free(p->hit);
  p->bytes = NULL;
  p->slots = NULL;
  p->base = p->hit = NULL;
  p->n = p->pieced = 0;
  memset(p->start, 0, sizeof(p->start));
  memset(p->one, 0, sizeof(p->one));
  memset(p->pair, 0, sizeof(p->pair));
  memset(p->near, 0, sizeof(p->near));
  p->min_len = 0;
}

/* __gc and __close of an index: frees its blocks (it then matches nothing). */
static int pidx_gc(lua_State *L) {
  pidx_free(luaL_checkudata(L, 1, PIDX_MT));
  return 0;
}

/* __tostring of an index: its entry and slot counts. */
static int pidx_tostring(lua_State *L) {
  cp_pidx *p = luaL_checkudata(L, 1, PIDX_MT);
  lua_pushfstring(L, "commprefs.core.suspect_index (%d entries, %d slots)", p->n, (int)p->start[256]);
  return 1;
}

/* Counts how many entries of p have a slot (the scan stops once all hit). */
static int pidx_count_pieced(const cp_pidx *p) {
  size_t i;
  int e, count = 0;
  for (i = 0; i < p->start[256]; i++) p->hit[p->slots[i].entry] = 1;
  for (e = 1; e <= p->n; e++) count += p->hit[e];
  memset(p->hit, 0, (size_t)p->n + 1);
  return count;
}

/* Allocates p's blocks for the counts (the userdata holds them first, so
 * __gc frees them on any error), or raises. */
static void pidx_alloc(lua_State *L, cp_pidx *p, int n, const pidx_count *c) {
  size_t slots = 0;
  int b;
  for (b = 0; b < 256; b++) {
    p->start[b] = slots;
    slots += c->per_byte[b];
  }
  p->start[256] = slots;
  p->bytes = malloc(c->bytes ? c->bytes : 1);
  p->slots = malloc(slots ? slots * sizeof(cp_piece) : 1);
  p->base = calloc((size_t)n + 1, 1);
  p->hit = calloc((size_t)n + 1, 1);
  if (!p->bytes || !p->slots || !p->base || !p->hit) {
    pidx_free(p);
    luaL_error(L, "commprefs.core.suspect_index: out of memory");
  }
  p->n = n;
  p->min_len = c->min_len;
}

/* core.suspect_index(index, n) -> the piece index of entries index[1..n]
 * (commprefs.redact's entries: `pieces` matched as they are,
 * `folded_pieces`, lower-case, ignoring ASCII letter case), for
 * core.suspects. Every piece is copied. */
static int cp_suspect_index(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 2);
  pidx_count count;
  pidx_fill fill;
  cp_pidx *p;
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_argcheck(L, n >= 0 && n < INT_MAX, 2, "entry count out of range");
  lua_settop(L, 1);
  /* 2: a strong copy of index[1..n]. index has weak values, and any
   * allocation (the userdata, a pushed string) may run the collector: an
   * entry cleared between the counting and the filling walks would leave
   * counted slots unfilled (garbage pointers, lengths, entry numbers). Both
   * walks read the copy, so they see the same entries. */
  lua_newtable(L);
  {
    int e;
    for (e = 1; e <= (int)n; e++) {
      lua_rawgeti(L, 1, e);
      lua_rawseti(L, 2, e);
    }
  }
  memset(&count, 0, sizeof(count));
  pidx_walk(L, 2, (int)n, pidx_count_piece, &count);
  p = cp_newuserdata(L, sizeof(cp_pidx));
  memset(p, 0, sizeof(*p));
  luaL_setmetatable(L, PIDX_MT);
  pidx_alloc(L, p, (int)n, &count);
  fill.p = p;
  fill.used = 0;
  memcpy(fill.next, p->start, sizeof(fill.next));
  pidx_walk(L, 2, (int)n, pidx_fill_piece, &fill);
  p->pieced = pidx_count_pieced(p);
  return 1;
}

/* Whether s[0 .. q->len) is piece q (folded: s lower-cased in ASCII). The
 * caller has checked the length, and the first byte by its bucket. */
static int piece_at(const unsigned char *s, const cp_piece *q) {
  size_t i;
  if (!q->folded) return memcmp(s + 1, q->bytes + 1, q->len - 1) == 0;
  for (i = 1; i < q->len; i++)
    if (lower_ascii(s[i]) != q->bytes[i]) return 0;
  return 1;
}

/* Whether pair bit (c1 << 8 | c2) is set: a match may start with c1, c2. */
static int pair_set(const cp_pidx *p, unsigned bit) { return p->pair[bit >> 3] >> (bit & 7) & 1; }

/* Tries at s (room bytes left) every piece of the bucket of s[0] whose
 * entry is not hit yet; returns how many entries it hit. */
static int try_at(cp_pidx *p, const unsigned char *s, size_t room) {
  size_t k, end = p->start[s[0] + 1];
  int hits = 0;
  for (k = p->start[s[0]]; k < end; k++) {
    const cp_piece *q = &p->slots[k];
    if (q->len <= room && !p->hit[q->entry] && piece_at(s, q)) {
      p->hit[q->entry] = 1;
      hits++;
    }
  }
  return hits;
}

/* Tries every start i in [lo, hi] of s (len bytes) that the pair filter
 * lets through; returns how many entries it hit. */
static int try_starts(cp_pidx *p, const unsigned char *s, size_t len, size_t lo, size_t hi) {
  int hits = 0;
  size_t i;
  for (i = lo; i <= hi; i++)
    if (pair_set(p, (unsigned)s[i] << 8 | s[i + 1])) hits += try_at(p, s + i, len - i);
  return hits;
}

/* The scan when every piece is at least 3 bytes long (step = min_len - 1):
 * a match starting at i holds a near pair at each of i .. i + step - 1, one
 * of which is a multiple of step; so only at multiples j of step is the
 * near filter read, and where it lets j through, the starts j - step + 1 .. j
 * are tried. */
static void scan_stepped(cp_pidx *p, const unsigned char *s, size_t len, int left) {
  size_t step = p->min_len - 1, j;
  for (j = 0; j + 1 < len; j += step) {
    unsigned bit = (unsigned)s[j] << 8 | s[j + 1];
    if (p->near[bit >> 3] >> (bit & 7) & 1) {
      left -= try_starts(p, s, len, j < step ? 0 : j - step + 1, j);
      if (left == 0) return;
    }
  }
}

/* The scan of any index: each start the pair filter lets through is tried
 * (and the last byte, where only a 1-byte piece fits, by one[]). */
static void scan_each(cp_pidx *p, const unsigned char *s, size_t len, int left) {
  size_t i;
  for (i = 0; i + 1 < len; i++) {
    if (pair_set(p, (unsigned)s[i] << 8 | s[i + 1]) && (left -= try_at(p, s + i, len - i)) == 0) return;
  }
  if (p->one[s[len - 1]]) try_at(p, s + len - 1, 1);
}

/* Marks in p->hit every entry with a piece s holds, in one pass over s;
 * stops when every entry with a piece is hit. */
static void pidx_scan(cp_pidx *p, const unsigned char *s, size_t len) {
  p->scans++;
  if (!p->hit) return; /* freed (closed): matches nothing */
  memcpy(p->hit, p->base, (size_t)p->n + 1);
  if (len == 0 || p->pieced == 0) return;
  if (p->min_len >= 3) scan_stepped(p, s, len, p->pieced);
  else scan_each(p, s, len, p->pieced);
}

/* core.suspects(s, pidx, index) -> the array, in entry order, of index[e]
 * for every entry e of pidx (core.suspect_index(index, n)) with a piece s
 * holds, skipping those index no longer has (weak values: collected since);
 * or nil. A piece is held as string.find(s, piece, 1, true) finds it; a
 * folded piece as it is found in s:lower(). */
static int cp_suspects(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  cp_pidx *p = cp_checkudata(L, 2, &PIDX_KEY, PIDX_MT);
  int e, found = 0;
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 3);
  pidx_scan(p, (const unsigned char *)s, len);
  lua_pushnil(L); /* 4: the result, made at the first hit */
  for (e = 1; e <= p->n; e++) {
    if (!p->hit[e]) continue;
    lua_rawgeti(L, 3, e);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      continue;
    }
    if (!found) {
      /* The only allocation here: it may run the collector, whose
       * finalizers may run core.suspects on this index (redact.text of an
       * error, say), which reuses p->hit: then s is scanned again, or the
       * entries after e would be read from the other text's scan. */
      unsigned scans = p->scans;
      lua_newtable(L);
      lua_replace(L, 4);
      if (p->scans != scans) pidx_scan(p, (const unsigned char *)s, len);
    }
    lua_rawseti(L, 4, ++found);
  }
  return 1;
}

/* Sets core.suspect_index and core.suspects in the table at the top of the
 * stack and registers the index's metatable (core.c and every fuzz
 * harness's stand-in core call this). */
void cp_register_suspects(lua_State *L) {
  static const luaL_Reg methods[] = {{NULL, NULL}};
  cp_register_class(L, PIDX_MT, methods, pidx_gc, pidx_tostring);
  cp_register_key(L, PIDX_MT, &PIDX_KEY);
  lua_pushcfunction(L, cp_suspect_index);
  lua_setfield(L, -2, "suspect_index");
  lua_pushcfunction(L, cp_suspects);
  lua_setfield(L, -2, "suspects");
}

int cp_encode(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 1); /* cjson raises on what it cannot encode: a programming error */
  return 1;
}
