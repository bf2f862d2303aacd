/* backing.h: the shared pacing backing a governor may own in C (csrc/redis.c
 * implements it over Redis). The backings written in Lua (lua_shared_dict,
 * Redis over cosockets) keep the same four operations in
 * lua/commprefs/pacer.lua; what they are told is decided by the governor
 * alone (governor.c), never by a backing. */
#ifndef COMMPREFS_BACKING_H
#define COMMPREFS_BACKING_H

typedef struct cp_backing {
  void *ud;
  /* 0: one request may go now and is counted; >0: ms to wait before asking again;
     <0: the backing is gone for good (*err says why): the call stops with "budget". */
  double (*acquire)(void *ud, const char **err);
  /* a window every participant keeps; manual: set by hand, never replaced by a learned one */
  void (*learn)(void *ud, long max, long interval_ms, int manual);
  void (*throttled)(void *ud, double hold_ms);            /* a 429 arrived: everybody holds */
  void (*close)(void *ud);                                /* frees ud */
} cp_backing;

#endif
