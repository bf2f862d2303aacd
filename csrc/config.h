/* config.h: a client's configuration as the core reads it from a Lua table
 * (config.c), with the ranges and defaults of cp_limits.h. */
#ifndef COMMPREFS_CONFIG_H
#define COMMPREFS_CONFIG_H

#include "compat.h"
#include "cp_limits.h"

typedef struct {
#define CP_FIELD(opt, field, def, min, max, integer, unit) double field;
  CP_LIMITS(CP_FIELD)
#undef CP_FIELD
  int rate_set;                   /* rate_max was given: the window is set by hand */
  const char *token, *user_agent, *ca_file, *redis_url, *redis_key; /* kept alive by the table */
  int verify_tls, handle_signals;
  int form_body;                  /* POST bodies are forms (an OAuth token endpoint), never JSON */
} cp_config;

/* Reads the table at idx (the core's names: rate_max, rate_interval, redis_url, ...).
 * A wrong type or a value out of range raises, naming the option as the user
 * wrote it (cp_limits.h) and `fname`. */
void cp_config_read(lua_State *L, int idx, const char *fname, cp_config *c);
/* core.limits: {[option] = {default =, min =, max =, integer =, unit =}, max_id_bytes =, ...} */
void cp_register_limits(lua_State *L);

#endif
