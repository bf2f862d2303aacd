# commprefs: build, install, test, benchmark. `make help` lists the targets.
LUA ?= lua5.4
ifneq ($(filter luajit lua5.1,$(LUA)),)
  LUA_PC ?= luajit
  LUA_V ?= 5.1
  BUSTED_LUA ?= luajit
else
  LUA_PC ?= lua5.4
  LUA_V ?= 5.4
  BUSTED_LUA ?= lua5.4
endif
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib/lua/$(LUA_V)
LUADIR ?= $(PREFIX)/share/lua/$(LUA_V)
BINDIR ?= $(PREFIX)/bin
SHAREDIR ?= $(PREFIX)/share
BUILD ?= build/$(LUA)
CC ?= cc
CFLAGS ?= -O2 -g
WARN = -std=c99 -Wall -Wextra -Werror -pedantic -Wno-overlength-strings
PKG_CFLAGS := $(shell pkg-config --cflags $(LUA_PC) libcurl 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs libcurl 2>/dev/null)
SRCS = csrc/core.c csrc/transport.c csrc/ratelimit.c csrc/encode.c csrc/decode.c csrc/journal.c
OBJS = $(SRCS:csrc/%.c=$(BUILD)/%.o)
CORE = $(BUILD)/commprefs/core.so
SIM_PORT ?= 8089

.PHONY: all deps install test check-memory bench demo sim clean help
all: $(CORE)

$(BUILD)/%.o: csrc/%.c csrc/*.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC $(PKG_CFLAGS) -c $< -o $@

$(CORE): $(OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(PKG_LIBS)

deps:
	@sh scripts/deps.sh

install: $(CORE)
	install -d $(DESTDIR)$(LIBDIR)/commprefs $(DESTDIR)$(LUADIR)/commprefs $(DESTDIR)$(BINDIR)
	install -m 755 $(CORE) $(DESTDIR)$(LIBDIR)/commprefs/core.so
	install -m 644 lua/commprefs/*.lua $(DESTDIR)$(LUADIR)/commprefs/
	install -m 755 bin/commprefs $(DESTDIR)$(BINDIR)/commprefs
	install -d $(DESTDIR)$(SHAREDIR)/commprefs/sim/hubsim
	install -m 755 sim/run $(DESTDIR)$(SHAREDIR)/commprefs/sim/run
	install -m 644 sim/hubsim/*.lua $(DESTDIR)$(SHAREDIR)/commprefs/sim/hubsim/

test: deps
	$(MAKE) all
	$(MAKE) all LUA=luajit
	busted --lua=lua5.4 spec
	busted --lua=luajit spec

check-memory: deps
	sh scripts/check-memory.sh

# deps first, then a sub-make: pkg-config flags are read when make starts
bench: deps
	$(MAKE) all
	lua5.4 bench/run.lua

demo: deps
	$(MAKE) all
	sh scripts/demo.sh

sim: deps
	SIM_PORT=$(SIM_PORT) sim/run

clean:
	rm -rf build

help:
	@echo "make demo | test | bench | check-memory | sim | install PREFIX=... | LUA=luajit"
