-- spec/feature/harden_spec.lua: issue 10's defects 5-9 and 11 (Lua side, CLI, journal,
-- simulator, packaging): answers checked once against the OpenAPI document's
-- types, integers kept exact, echoed tokens redacted, journals locked, the
-- CLI's journal errors, argument limits at new(), --no-verify-tls. The
-- hostile-server cases themselves are in spec/feature/hostile_spec.lua.
local sim = require "support.sim"
local hostile = require "support.hostile"
local cjson = require "cjson"
local commprefs = require "commprefs"
local core = commprefs.core

local unpack = table.unpack or unpack
local TOKEN = hostile.TOKEN

local function tmpfile(name) return require("support.proc").tmpfile("harden", name) end

local function slurp(p)
  local f = io.open(p, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- os.execute's exit code under Lua 5.4 (true/nil, "exit", code) and LuaJIT (raw wait status).
local function exec(cmd)
  local a, _, c = os.execute(cmd)
  if type(a) == "number" then return a >= 256 and math.floor(a / 256) or a end
  return c
end

-- The command line (a Lua 5.4 script): under LuaJIT it needs the Lua 5.4 build.
local CLI_BUILD = os.getenv("COMMPREFS_BUILD") and ("COMMPREFS_BUILD=" .. os.getenv("COMMPREFS_BUILD"):gsub("luajit", "lua5.4")) or ""

-- Runs bin/commprefs; returns exit code, stdout, stderr.
local function cli(args, opts)
  opts = opts or {}
  local out, err = tmpfile("out"), tmpfile("err")
  local cmd = string.format("%s %s HUBSPOT_ACCESS_TOKEN=%s COMMPREFS_BASE_URL=%s %s bin/commprefs %s >%s 2>%s",
    CLI_BUILD, opts.env or "", opts.token or "sim-token", opts.base_url or sim.url, opts.prefix or "", args, out, err)
  local code = exec(cmd)
  local o, e = slurp(out), slurp(err)
  os.remove(out); os.remove(err)
  return code, o, e
end

local function client(opts) return sim.client(opts, { max_retries = 0, backoff_base = 0.5, backoff_max = 8 }) end

------------------------------------------------------------------ decoding

-- The 2xx response schemas of the OpenAPI document, and every property path in
-- them with its type: { path = {"results", 1, "statuses", 1, "subscriptionId"}, type = "integer" }.
local function schema_fields()
  local doc = cjson.decode(slurp("spec/fixtures/communication-preferences-2026-03.openapi.json"))
  local schemas = doc.components.schemas
  local function resolve(s) return s["$ref"] and schemas[s["$ref"]:match("[^/]+$")] or s end
  local fields, roots = {}, {}
  for _, ops in pairs(doc.paths) do
    for _, op in pairs(ops) do
      for code, r in pairs(type(op) == "table" and op.responses or {}) do
        local s = r.content and r.content["application/json"] and r.content["application/json"].schema
        if s and code:match("^2") then roots[#roots + 1] = resolve(s) end
      end
    end
  end
  local function walk(s, prefix, depth)
    s = resolve(s)
    if depth > 4 then return end
    for name, p in pairs(s.properties or {}) do
      p = resolve(p)
      local path = { unpack(prefix) }
      path[#path + 1] = name
      local ty = p.type or "object"
      fields[#fields + 1] = { path = path, type = ty, format = p.format }
      if ty == "array" and p.items and resolve(p.items).properties then
        local item = { unpack(path) }
        item[#item + 1] = 1
        walk(p.items, item, depth + 1)
      end
    end
  end
  for _, root in ipairs(roots) do walk(root, {}, 0) end
  return fields
end

-- A JSON text holding value at path (arrays for numeric steps).
local function doc_at(path, value_json)
  local text = value_json
  for i = #path, 1, -1 do
    local step = path[i]
    text = type(step) == "number" and "[" .. text .. "]" or string.format('{"%s":%s}', step, text)
  end
  return text
end

local WRONG = {
  string = { "5", "true", "{\"a\":1}", "[\"x\"]" },
  integer = { "\"7\"", "1.5", "true", "{}", "9007199254740993", "-9007199254740993", "9007199254740992" },
  boolean = { "\"true\"", "1" },
  array = { "5", "\"x\"", "{\"a\":1}", "true" },
  object = { "5", "\"x\"", "[1]", "true" },
}
-- Error documents subCategory as a string, StandardError as an object: either is accepted.
local LENIENT = { subCategory = true }
local RIGHT = { string = "\"s\"", integer = "42", boolean = "true", array = "[]", object = "{}" }

describe("answers are checked once, where they are decoded", function()
  it("rejects every wrong-typed field of every 2xx schema of the OpenAPI document, naming it", function()
    local n = 0
    for _, f in ipairs(schema_fields()) do
      local ty = f.type
      for _, bad in ipairs(LENIENT[f.path[#f.path]] and {} or WRONG[ty]) do
        local text = doc_at(f.path, bad)
        local v, err = core.decode(text, "envelope")
        assert.is_nil(v, "accepted " .. text)
        assert.matches(f.path[#f.path], err, 1, true)
        n = n + 1
      end
      local ok_text = doc_at(f.path, RIGHT[ty])
      assert.is_table(core.decode(ok_text, "envelope"), "refused " .. ok_text)
    end
    assert.is_true(n > 100, "only " .. n .. " checks")
  end)

  it("keeps integers exact: 2^53 + 1 is an error, never 2^53", function()
    for _, big in ipairs { "9007199254740993", "9007199254740992", "-9007199254740993", "1e300" } do
      local v, err = core.decode('{"results":[{"subscriptionId":' .. big .. '}]}', "envelope")
      assert.is_nil(v, big)
      assert.matches("results[1].subscriptionId", err, 1, true)
      assert.is_nil(core.decode('{"subscriptionId":' .. big .. '}'), big .. " (any JSON)")
    end
    local v = core.decode('{"results":[{"subscriptionId":9007199254740991}]}', "envelope")
    assert.equal(9007199254740991, v.results[1].subscriptionId)
    if math.type then assert.equal("integer", math.type(v.results[1].subscriptionId)) end
  end)

  it("keeps only the documented types of an error body", function()
    local e = core.decode('{"message":{"x":1},"category":true,"correlationId":[1],"subCategory":{"a":1},'
      .. '"context":{"a":["x",{"b":1},"y"],"b":3},"errors":[5,{"message":"m","in":{"x":1}}],"policyName":7}', "error")
    assert.is_nil(e.message); assert.is_nil(e.category); assert.is_nil(e.correlationId); assert.is_nil(e.policyName)
    assert.same({ a = 1 }, e.subCategory)
    assert.same({ a = { "x", "y" } }, e.context)
    assert.same({ { message = "m" } }, e.errors)
  end)

  it("tostring and pretty never raise, whatever an Error or envelope holds", function()
    local odd = { { x = 1 }, true, 5, "s", { 1, { 2 } }, setmetatable({}, { __tostring = function() error("no") end }) }
    for _, a in ipairs(odd) do
      local e = commprefs.Error.new { kind = a, status = a, category = a, message = a, correlation_id = a,
        method = a, url = a, errors = { a, { message = a, ["in"] = a } }, context = { k = a, [1] = { a } } }
      assert.is_string(tostring(e))
      assert.is_string(commprefs.pretty(e))
      assert.is_string(commprefs.pretty { status = a, results = { a, { statuses = a }, { wideStatuses = { a } } },
        numErrors = a, errors = { a, { category = a } } })
    end
  end)
end)

------------------------------------------------------------------ tokens

describe("the token", function()
  local srv
  setup(function() srv = hostile.start() end)
  teardown(function() hostile.stop(srv) end)

  it("is not kept in the client table", function()
    local c = commprefs.new { token = TOKEN, base_url = srv.url .. "/echo401-json" }
    hostile.assert_no_token(c, "client")
    hostile.assert_no_token(getmetatable(c), "client metatable")
    c:close()
  end)

  it("is redacted when the server escapes it in JSON (\\u sequences)", function()
    local escaped = TOKEN:gsub(".", function(ch) return string.format("\\u%04x", ch:byte()) end)
    local body = '{"message":"token ' .. escaped .. '","correlationId":"' .. escaped .. '","category":"X"}'
    local c = commprefs.new { token = TOKEN, base_url = srv.url .. "/" .. hostile.respond(401, "application/json", body),
      max_retries = 0 }
    local env, err = c:get_status("a@b.co")
    assert.is_nil(env)
    hostile.assert_no_token(err, "err")
    assert.matches("<redacted>", err.message, 1, true)
    assert.is_falsy(tostring(err):find(TOKEN, 1, true))
    c:close()
  end)

  it("is redacted from a 2xx answer that echoes it, verbatim or escaped", function()
    local escaped = TOKEN:gsub(".", function(ch) return string.format("\\u%04x", ch:byte()) end)
    for _, echo in ipairs { TOKEN, escaped } do
      local body = '{"status":"COMPLETE","results":[{"subscriberIdString":"a@b.co","status":"x ' .. echo
        .. '","wideStatusType":"PORTAL_WIDE","channel":"EMAIL","timestamp":"t"}],"startedAt":"a","completedAt":"b"}'
      local c = commprefs.new { token = TOKEN, max_retries = 0,
        base_url = srv.url .. "/" .. hostile.respond(200, "application/json", body) }
      local env = assert(c:get_unsubscribe_all_status("a@b.co"))
      hostile.assert_no_token(env, "envelope")
      assert.equal("x <redacted>", env.results[1].status)
      assert.is_falsy(commprefs.pretty(env):find(TOKEN, 1, true))
      c:close()
    end
  end)

  it("never reaches the CLI's stderr, --json output or journal", function()
    local journal = tmpfile("journal")
    for _, fmt in ipairs { "--table", "--json", "--jsonl" } do
      local code, out, err = cli("unsubscribe-all " .. fmt .. " --journal " .. journal .. " a@b.co c@d.co",
        { token = TOKEN, base_url = srv.url .. "/echo401-plain" })
      assert.equal(3, code, err) -- a request-wide 401 stops the job (issue 15): exit 3, the ids left unsent
      assert.is_falsy((out .. err):find(TOKEN, 1, true), out .. err)
      assert.matches("<redacted>", out .. err, 1, true)
    end
    local text = slurp(journal)
    assert.is_falsy(text:find(TOKEN, 1, true), text) -- empty: ids refused as a whole are not journaled
    os.remove(journal)
  end)
end)

------------------------------------------------------------------ journal

describe("a journal", function()
  before_each(function() sim.reset() end)

  it("held by another job makes a second one fail at once, naming the holder, nothing sent", function()
    local path = tmpfile("journal")
    local held = assert(core.journal(path)) -- this process holds it, as a running job would
    local code, _, err = cli("unsubscribe-all --journal " .. path .. " a@b.co c@d.co")
    assert.equal(2, code, err)
    assert.matches("^commprefs: journal " .. path:gsub("%p", "%%%0") .. " is in use by another job %(process %d+%)", err)
    assert.equal(1, select(2, err:gsub("\n", "")), "more than one line: " .. err)
    assert.equal(0, #sim.log(), "requests were sent")
    local c = client()
    local s, jerr = c:bulk_unsubscribe_all({ "a@b.co" }, { journal = path })
    assert.is_nil(s)
    assert.equal("journal", jerr.kind)
    assert.equal(0, #sim.log(), "requests were sent")
    held:close()
    assert.is_table(c:bulk_unsubscribe_all({ "a@b.co" }, { journal = path }), "free again after close")
    c:close()
    os.remove(path)
  end)

  it("shared by two command-line jobs at once: the second stops at once, each id done once", function()
    local socket = require "socket"
    sim.reset { latency = 200 }
    local path, list = tmpfile("journal"), tmpfile("ids")
    local f = assert(io.open(list, "w"))
    for i = 1, 4000 do f:write("two", i, "@example.com\n") end
    f:close()
    local args = "unsubscribe-all --quiet --concurrency 2 --journal " .. path .. " --file " .. list
    local p = io.popen(string.format("sh -c 'echo $$; %s HUBSPOT_ACCESS_TOKEN=sim-token COMMPREFS_BASE_URL=%s exec bin/commprefs %s >/dev/null 2>&1'",
      CLI_BUILD, sim.url, args))
    local first_pid = p:read("*l")
    local deadline = socket.gettime() + 30
    while #(slurp(path) or "") == 0 and socket.gettime() < deadline do socket.sleep(0.02) end
    local t0 = socket.gettime()
    local code, _, err = cli(args)
    local took = socket.gettime() - t0
    p:read("*a") -- the first job has ended
    p:close()
    assert.equal(2, code, err)
    assert.matches("is in use by another job (process " .. first_pid .. ")", err, 1, true)
    assert.is_true(took < 5, "the second job took " .. took .. " s to give up")
    local seen, n = {}, 0
    for line in io.lines(path) do
      local rec = cjson.decode(line)
      assert.is_nil(seen[rec.id], rec.id .. " journaled twice")
      seen[rec.id], n = true, n + 1
    end
    assert.equal(4000, n)
    sim.reset()
    os.remove(path); os.remove(list)
  end)

  it("that cannot be opened stops the CLI with one line naming it, exit 2, nothing sent", function()
    local dir = tmpfile("dir")
    assert(exec("mkdir " .. dir) == 0)
    local cases = {
      { path = dir .. "/missing/journal", why = "No such file or directory" },
      { path = dir, why = "Is a directory" },
    }
    local is_root = exec("test $(id -u) = 0") == 0
    local locked = dir .. "/root-only"
    assert(io.open(locked, "w")):close()
    exec("chmod 600 " .. locked)
    if is_root then
      cases[#cases + 1] = { path = locked, why = "Permission denied",
        prefix = "setpriv --reuid=65534 --regid=65534 --clear-groups" }
      local immutable = dir .. "/immutable"
      assert(io.open(immutable, "w")):close()
      if exec("chattr +i " .. immutable .. " 2>/dev/null") == 0 then
        cases[#cases + 1] = { path = immutable, why = "Operation not permitted", cleanup = "chattr -i " .. immutable }
      end
    else
      exec("chmod 000 " .. locked)
      cases[#cases + 1] = { path = locked, why = "Permission denied" }
    end
    for _, case in ipairs(cases) do
      local code, _, err = cli("unsubscribe-all --journal " .. case.path .. " a@b.co", { prefix = case.prefix })
      if case.cleanup then exec(case.cleanup) end
      assert.equal(2, code, case.path .. ": " .. err)
      assert.matches("^commprefs: cannot open journal " .. case.path:gsub("%p", "%%%0") .. ": " .. case.why .. "\n$", err)
      assert.equal(0, #sim.log(), "requests were sent")
    end
    exec("chattr -i " .. dir .. "/immutable 2>/dev/null; rm -rf " .. dir)
  end)
end)

------------------------------------------------------------------ arguments

describe("new() and the calls refuse before anything is sent", function()
  before_each(function() sim.reset() end)

  it("a base_url with a query, a fragment or user:password@", function()
    for _, u in ipairs { sim.url .. "?x=1", sim.url .. "/#top", "http://user:pass@127.0.0.1:1", "http://u@127.0.0.1:1/" } do
      local ok, err = pcall(commprefs.new, { token = "sim-token", base_url = u })
      assert.is_false(ok, u)
      assert.matches("commprefs.new: bad option 'base_url'", err, 1, true)
    end
  end)

  it("ids over 1 KB and tokens over 4 KB", function()
    local long = string.rep("a", 1024 * 1024) .. "@b.co"
    local ok, err = pcall(commprefs.new, { token = string.rep("t", 4097), base_url = sim.url })
    assert.is_false(ok)
    assert.matches("bad argument 'token' (4097 bytes long, at most 4096 allowed)", err, 1, true)
    local c = client()
    for _, call in ipairs {
      function() return c:get_unsubscribe_all_status(long) end,
      function() return c:is_unsubscribed_from_all(long) end,
      function() return c:batch_get_unsubscribe_all_status { "a@b.co", long } end,
      function() return c:bulk_unsubscribe_all { "a@b.co", long } end,
      function() return c:unsubscribe_all(string.rep("x", 1025)) end,
    } do
      local ok2, err2 = pcall(call)
      assert.is_false(ok2)
      assert.matches("at most 1024", err2, 1, true)
    end
    assert.is_table(c:get_unsubscribe_all_status(string.rep("x", 1019) .. "@b.co"), "1024 bytes are fine")
    assert.equal(1, #sim.log())
    c:close()
  end)

  it("a ca_file that does not exist", function()
    local ok, err = pcall(commprefs.new, { token = "sim-token", base_url = sim.tls_url, ca_file = "/nonexistent/ca.pem" })
    assert.is_false(ok)
    assert.matches("commprefs.new: bad option 'ca_file' (cannot read it: /nonexistent/ca.pem", err, 1, true)
  end)

  it("the CLI warns on stderr when TLS is not verified", function()
    local code, out, err = cli("status --no-verify-tls a@b.co")
    assert.equal(0, code, err)
    assert.matches("warning: --no-verify-tls", err, 1, true)
    assert.matches("a@b.co", out, 1, true)
    local code2, _, err2 = cli("status a@b.co")
    assert.equal(0, code2)
    assert.is_falsy(err2:find("warning", 1, true))
  end)
end)

------------------------------------------------------------------ simulator and packaging

describe("the simulator", function()
  it("does not route an id holding ..%2F..%2F__sim to its admin API", function()
    sim.reset()
    for _, path in ipairs { "statuses/..%2F..%2F..%2F__sim%2Fstate?channel=EMAIL",
      "statuses/..%2F..%2F..%2F__sim%2Fstate/unsubscribe-all?channel=EMAIL" } do
      local code, body = sim.raw("GET", "/communication-preferences/2026-03/" .. path)
      assert.is_falsy(body:find('"subscribers"', 1, true) or body:find("admin path", 1, true),
        "the admin API answered " .. path .. ": " .. body)
      assert.is_true(code == 200 or code == 400 or code == 404, tostring(code))
    end
    local env, err = client():get_status("../../../__sim/state")
    assert.is_nil(env and env.subscribers, "the client reached the admin API")
    assert.is_true(env ~= nil or err.kind == "http")
  end)
end)

describe("the rockspec", function()
  it("declares lua-cjson", function()
    local spec = {}
    local f = assert(loadfile("commprefs-0.1.0-1.rockspec", "t", spec))
    f()
    local found = false
    for _, d in ipairs(spec.dependencies) do found = found or d:match("^lua%-cjson") ~= nil end
    assert.is_true(found, table.concat(spec.dependencies, ", "))
  end)
end)
