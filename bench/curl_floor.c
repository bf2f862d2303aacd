/* bench/curl_floor.c: the floor of the libcurl transport (make bench, part 1):
 * N keep-alive GETs of one URL with libcurl's easy API and one reused handle,
 * the same request headers commprefs sends, the body kept in memory and
 * nothing else. Prints the CPU (user + system, getrusage) of the timed loop.
 *   curl_floor URL N [WARMUP] */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <curl/curl.h>

typedef struct { char *buf; size_t len, cap; } body;

static size_t on_body(char *data, size_t size, size_t n, void *ud) {
  body *b = ud;
  size_t add = size * n;
  if (b->len + add > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 16384;
    char *nb;
    while (cap < b->len + add) cap *= 2;
    nb = realloc(b->buf, cap);
    if (!nb) return 0;
    b->buf = nb;
    b->cap = cap;
  }
  memcpy(b->buf + b->len, data, add);
  b->len += add;
  return add;
}

static double cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int get(CURL *e, body *b) {
  long code = 0;
  b->len = 0;
  if (curl_easy_perform(e) != CURLE_OK) return -1;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
  return code == 200 ? 0 : -1;
}

int main(int argc, char **argv) {
  CURL *e;
  struct curl_slist *h = NULL;
  body b = {NULL, 0, 0};
  long n, warm, i;
  double t0;
  if (argc < 3) {
    fprintf(stderr, "usage: curl_floor URL N [WARMUP]\n");
    return 2;
  }
  n = atol(argv[2]);
  warm = argc > 3 ? atol(argv[3]) : 0;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  e = curl_easy_init();
  h = curl_slist_append(h, "Authorization: Bearer sim-token");
  h = curl_slist_append(h, "Accept: application/json");
  curl_easy_setopt(e, CURLOPT_URL, argv[1]);
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  for (i = 0; i < warm; i++)
    if (get(e, &b) != 0) return 1;
  t0 = cpu_seconds();
  for (i = 0; i < n; i++)
    if (get(e, &b) != 0) return 1;
  printf("%.9f\n", cpu_seconds() - t0);
  curl_slist_free_all(h);
  curl_easy_cleanup(e);
  free(b.buf);
  curl_global_cleanup();
  return 0;
}
