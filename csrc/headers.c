/* headers.c: owns the reading of the header values commprefs acts on:
 * Retry-After and the X-HubSpot-RateLimit-* counts. One rule for both
 * transports: a value is taken only when it is exactly what the header
 * allows, else it counts as absent. */
#include <stdlib.h>
#include <ctype.h>
#include <time.h>
#include <curl/curl.h>
#include "headers.h"

double cp_parse_retry_after(const char *v) {
  const char *p;
  time_t when;
  if (!v) return -1;
  while (*v == ' ' || *v == '\t') v++;
  for (p = v; isdigit((unsigned char)*p); p++) {}
  if (p > v && p - v <= 9) { /* delta-seconds */
    const char *q = p;
    while (*q == ' ' || *q == '\t') q++;
    if (*q == '\0') return (double)strtol(v, NULL, 10);
    return -1;
  }
  if (p > v) return -1; /* absurdly many digits */
  when = curl_getdate(v, NULL); /* HTTP-date */
  if (when == (time_t)-1) return -1;
  return when > time(NULL) ? (double)(when - time(NULL)) : 0;
}

long cp_parse_header_count(const char *v) {
  const char *p;
  if (!v) return -1;
  for (p = v; *p; p++)
    if (!isdigit((unsigned char)*p) || p - v >= 18) return -1;
  return p > v ? strtol(v, NULL, 10) : -1;
}
