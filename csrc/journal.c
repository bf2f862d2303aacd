/* journal.c: owns the durable append-only journal of bulk jobs. Each
 * append is one write() of whole lines followed by fdatasync(), so once
 * append returns, those outcomes survive a crash or kill -9. A journal whose
 * last line was cut short is first ended with a newline, so later lines
 * never fuse with a torn one. An open journal is locked (flock, exclusive,
 * released when it is closed or the process ends): a second job on the same
 * journal fails at once, naming the process that holds it (from /proc/locks). */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include "compat.h"

#define JOURNAL_MT "commprefs.core.journal"

typedef struct { int fd; } journal;

static int push_errno(lua_State *L, const char *what, const char *path) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s %s: %s", what, path, strerror(errno));
  return 2;
}

static int write_all(int fd, const char *s, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    s += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Ends a torn last line: appends "\n" if the file is not empty and does not end with one. */
static int heal(int fd) {
  char last;
  off_t size = lseek(fd, 0, SEEK_END);
  if (size <= 0) return 0;
  if (pread(fd, &last, 1, size - 1) != 1) return -1;
  return last == '\n' ? 0 : write_all(fd, "\n", 1);
}

/* The pid holding a flock on fd's file, from /proc/locks (Linux), or 0. */
static long lock_holder(int fd) {
  struct stat st;
  char line[256];
  long holder = 0;
  FILE *f;
  if (fstat(fd, &st) != 0 || !(f = fopen("/proc/locks", "r"))) return 0;
  while (!holder && fgets(line, sizeof line, f)) {
    long pid;
    unsigned long ino;
    char kind[16];
    /* "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF" */
    if (sscanf(line, "%*[^:]: %15s %*s %*s %ld %*x:%*x:%lu", kind, &pid, &ino) == 3 &&
        strcmp(kind, "FLOCK") == 0 && ino == (unsigned long)st.st_ino && pid != (long)getpid())
      holder = pid;
  }
  fclose(f);
  return holder;
}

/* Locks the open journal fd; on failure closes it and pushes nil, message. */
static int lock_or_fail(lua_State *L, int fd, const char *path) {
  long holder;
  if (flock(fd, LOCK_EX | LOCK_NB) == 0) return 0;
  if (errno != EWOULDBLOCK) {
    int e = errno;
    close(fd);
    errno = e;
    return push_errno(L, "cannot lock journal", path);
  }
  holder = lock_holder(fd);
  close(fd);
  lua_pushnil(L);
  if (holder > 0)
    lua_pushfstring(L, "journal %s is in use by another job (process %d); wait for it to end or use another journal",
                    path, (int)holder);
  else
    lua_pushfstring(L, "journal %s is in use by another job; wait for it to end or use another journal", path);
  return 2;
}

/* core.journal(path) -> journal (locked), or nil, message */
static int journal_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  journal *j;
  int fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return push_errno(L, "cannot open journal", path);
  if (lock_or_fail(L, fd, path) != 0) return 2;
  if (heal(fd) != 0) {
    int e = errno;
    close(fd);
    errno = e;
    return push_errno(L, "cannot repair journal", path);
  }
  j = cp_newuserdata(L, sizeof(journal));
  j->fd = fd;
  luaL_setmetatable(L, JOURNAL_MT);
  return 1;
}

static journal *check_journal(lua_State *L) {
  journal *j = luaL_checkudata(L, 1, JOURNAL_MT);
  if (j->fd < 0) luaL_error(L, "commprefs: the journal is closed");
  return j;
}

/* journal:append(text) -> true, or nil, message. Durable when it returns true. */
static int journal_append(lua_State *L) {
  journal *j = check_journal(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  if (write_all(j->fd, s, n) != 0 || fdatasync(j->fd) != 0) return push_errno(L, "journal", "write");
  lua_pushboolean(L, 1);
  return 1;
}

static int journal_close(lua_State *L) {
  journal *j = luaL_checkudata(L, 1, JOURNAL_MT);
  if (j->fd >= 0) close(j->fd);
  j->fd = -1;
  return 0;
}

static int journal_tostring(lua_State *L) {
  journal *j = luaL_checkudata(L, 1, JOURNAL_MT);
  lua_pushfstring(L, "commprefs.core.journal (%s)", j->fd < 0 ? "closed" : "open");
  return 1;
}

void cp_register_journal(lua_State *L) {
  static const luaL_Reg methods[] = {{"append", journal_append}, {"close", journal_close}, {NULL, NULL}};
  lua_pushcfunction(L, journal_open);
  lua_setfield(L, -2, "journal");
  cp_register_class(L, JOURNAL_MT, methods, journal_close, journal_tostring);
}
