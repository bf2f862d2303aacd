rockspec_format = "3.0"
package = "commprefs"
version = "0.1.0-1"
source = { url = "git+file:///dev/null" } -- built from a checkout: luarocks make
description = {
  summary = "HubSpot Communication Preferences API (2026-03 / v4) client: C core on libcurl",
  detailed = [[
Who has unsubscribed from all email, and unsubscribing many contacts from all
email, correct to the last address and as fast as HubSpot's rate limit allows:
concurrent requests, adaptive pacing, retries, resumable bulk jobs and a
command line. Ships a local HubSpot simulator for tests and demos.
]],
  license = "MIT",
}
dependencies = { "lua >= 5.1", "lua-cjson >= 2.1" } -- Debian: lua-cjson
external_dependencies = { CURL = { library = "curl" }, HIREDIS = { header = "hiredis/hiredis.h", library = "hiredis" } } -- Debian: libcurl4-openssl-dev, libhiredis-dev
build = {
  type = "make",
  build_variables = { CFLAGS = "$(CFLAGS)", LUA = "lua$(LUA_VERSION)" },
  install_variables = {
    LUA = "lua$(LUA_VERSION)", LIBDIR = "$(LIBDIR)", LUADIR = "$(LUADIR)", BINDIR = "$(BINDIR)",
    SHAREDIR = "$(PREFIX)/share",
  },
}
