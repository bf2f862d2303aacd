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
PKG_LIBS := $(shell pkg-config --libs libcurl 2>/dev/null) -lhttp_parser -lhiredis
SRCS = csrc/core.c csrc/config.c csrc/governor.c csrc/transport.c csrc/signals.c csrc/policy.c csrc/ratelimit.c csrc/headers.c csrc/util.c csrc/encode.c csrc/decode.c csrc/journal.c csrc/http1.c csrc/resp.c csrc/redis.c
OBJS = $(SRCS:csrc/%.c=$(BUILD)/%.o)
CORE = $(BUILD)/commprefs/core.so
SIM_PORT ?= 8089

.PHONY: all deps install test check-memory bench demo sim clean help fuzz
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
	install -d $(DESTDIR)$(LUADIR)/commprefs/ngx
	install -m 644 lua/commprefs/ngx/*.lua $(DESTDIR)$(LUADIR)/commprefs/ngx/
	install -m 755 bin/commprefs $(DESTDIR)$(BINDIR)/commprefs
	install -d $(DESTDIR)$(SHAREDIR)/commprefs/sim/hubsim
	install -m 755 sim/run sim/daemon $(DESTDIR)$(SHAREDIR)/commprefs/sim/
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
	$(MAKE) all LUA=luajit
	$(MAKE) build/curl_floor
	lua5.4 bench/run.lua

# the libcurl transport's floor (bench/curl_floor.c): a bare easy-API GET loop
build/curl_floor: bench/curl_floor.c
	@mkdir -p build
	$(CC) $(WARN) $(CFLAGS) -o $@ $< $(PKG_LIBS)

demo: deps
	$(MAKE) all
	$(MAKE) all LUA=luajit
	sh scripts/demo.sh

sim: deps
	SIM_PORT=$(SIM_PORT) sim/run

# libFuzzer + ASan/UBSan (Debian's clang 14): every fuzz/NAME_fuzz.c runs for
# FUZZ_SECONDS on its seed corpus fuzz/corpus/NAME/; any crash fails. See fuzz/README.
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang-14
FUZZ_BUILD ?= build/fuzz
FUZZ_FLAGS = -std=c99 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=all -DCOMMPREFS_ROOT='"$(CURDIR)"' -Icsrc $(shell pkg-config --cflags lua5.4)
FUZZ_LIBS = $(shell pkg-config --libs lua5.4) $(PKG_LIBS) -lm -ldl
FUZZERS = $(patsubst fuzz/%.c,$(FUZZ_BUILD)/%,$(wildcard fuzz/*_fuzz.c))

$(FUZZ_BUILD)/%_fuzz: fuzz/%_fuzz.c fuzz/*.h csrc/*.c csrc/*.h
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) $< -o $@ $(FUZZ_LIBS)

fuzz: deps
	$(MAKE) $(FUZZERS)
	@for f in $(FUZZERS); do name=$$(basename $$f _fuzz); \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$name fuzz/corpus/$$name; \
	  echo "== fuzz $$name for $(FUZZ_SECONDS) s"; \
	  ASAN_OPTIONS=detect_leaks=1 $$f -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/$$name- \
	    $(FUZZ_BUILD)/corpus/$$name fuzz/corpus/$$name > $(FUZZ_BUILD)/$$name.log 2>&1 \
	    || { tail -60 $(FUZZ_BUILD)/$$name.log; echo "fuzz: $$name found a crash (input saved as $(FUZZ_BUILD)/$$name-*)"; exit 1; }; \
	  grep -E "^stat::number_of_executed_units|Done [0-9]+ runs" $(FUZZ_BUILD)/$$name.log | tail -2; \
	done

clean:
	rm -rf build

help:
	@echo "make demo | test | bench | check-memory | fuzz [FUZZ_SECONDS=60] | sim | install PREFIX=... | LUA=luajit"
