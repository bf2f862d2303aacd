/* headers.h: the one reading of HubSpot's header values (headers.c), for
 * libcurl's headers (transport.c) and http1.c's kept values alike. */
#ifndef COMMPREFS_HEADERS_H
#define COMMPREFS_HEADERS_H

/* A Retry-After value (delta-seconds or HTTP-date) in seconds, or -1 when invalid. */
double cp_parse_retry_after(const char *value);
/* An X-HubSpot-RateLimit-* value: 1 to 18 digits, nothing else; -1 otherwise. */
long cp_parse_header_count(const char *value);

#endif
