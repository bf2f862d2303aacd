-- spec/feature/cli_spec.lua: the command line as a user meets it (issues 16, 17): the real
-- bin/commprefs run as a subprocess, by the VM this spec runs on (lua5.4 or
-- luajit), against the simulator. Owns: ids as HubSpot sees them in --file and
-- stdin (BOM, CRLF, Unicode white space, invisible characters refused before
-- anything is sent, letter-case duplicates), "one line, exit 2" for every usage
-- and input error, --version, status --json, and `commprefs sim` cleaning up.
local sim = require "support.sim"
local proc = require "support.proc"
local cjson = require "cjson"
local commprefs = require "commprefs"

local VM = jit and "luajit" or "lua5.4"
local BUILD = os.getenv("COMMPREFS_BUILD") or ("build/" .. VM)

local function tmpfile(name) return proc.tmpfile("cli", name) end

local function write_file(path, bytes)
  local f = assert(io.open(path, "wb"))
  f:write(bytes)
  f:close()
end

-- os.execute's exit code under Lua 5.4 (true/nil, "exit", code) and LuaJIT (raw wait status).
local function exec(cmd)
  local a, _, c = os.execute(cmd)
  if type(a) == "number" then return a >= 256 and math.floor(a / 256) or a end
  return c
end

-- Runs `VM bin/commprefs ARGS` (stdin from opts.stdin, a path); returns code, stdout, stderr.
local function cli(args, opts)
  opts = opts or {}
  local out, err = tmpfile("out"), tmpfile("err")
  local cmd = string.format("COMMPREFS_BUILD=%s HUBSPOT_ACCESS_TOKEN=%s COMMPREFS_BASE_URL=%s %s bin/commprefs %s <%s >%s 2>%s",
    BUILD, opts.token or "sim-token", sim.url, VM, args, opts.stdin or "/dev/null", out, err)
  local code = exec(cmd)
  local o, e = proc.slurp(out), proc.slurp(err)
  os.remove(out); os.remove(err)
  return code, o, e
end

local lines_of = proc.lines

-- Makes these addresses unsubscribed in the simulator (through the library, not the CLI).
local function unsubscribe(ids)
  local c = commprefs.new { token = "sim-token", base_url = sim.url }
  assert(c:batch_unsubscribe_all(ids))
  c:close()
end

-- The ids the simulator was asked about after its first `after` requests, in order.
local function ids_sent(after)
  local sent, log = {}, sim.log()
  for i = (after or 0) + 1, #log do
    local r = log[i]
    local body = type(r.body) == "string" and r.body ~= "" and cjson.decode(r.body)
    for _, id in ipairs(type(body) == "table" and body.inputs or {}) do sent[#sent + 1] = id end
    local one = tostring(r.path):match("/statuses/([^/]+)/unsubscribe%-all")
    if one and one ~= "batch" then sent[#sent + 1] = one end
  end
  return sent
end

local BOM, NBSP, ZWSP, IDEO = "\239\187\191", "\194\160", "\226\128\139", "\227\128\128"

describe("commprefs CLI (" .. VM .. ")", function()
  before_each(function() sim.reset() end)

  describe("ids as HubSpot sees them", function()
    local unsubscribed = { "ada@example.com", "bob@example.com", "cy@example.com", "dee@example.com", "eve@example.com" }
    -- an export from a spreadsheet: BOM, CRLF, NBSP / ideographic / zero-width padding, tabs
    local export = BOM .. "ada@example.com\r\n"
      .. NBSP .. "bob@example.com" .. NBSP .. "\r\n"
      .. "\t cy@example.com " .. ZWSP .. "\r\n"
      .. "kept@example.com\r\n"
      .. IDEO .. "dee@example.com\226\128\175\r\n"      -- U+3000 before, U+202F after
      .. "\226\128\130eve@example.com\239\187\191\r\n"  -- U+2002 before, U+FEFF after
      .. "\r\n"

    it("check --file reports every unsubscribed address of a BOM/CRLF/NBSP export", function()
      unsubscribe(unsubscribed)
      local before = #sim.log()
      local input = tmpfile("export.txt")
      write_file(input, export)
      local code, out, err = cli("check --quiet --file " .. input)
      assert.equal(1, code, err) -- the blank last line is a bad line (reported), nothing else
      assert.same(unsubscribed, lines_of(out))
      assert.matches(":7: blank line, skipped", err, 1, true)
      assert.same({ "ada@example.com", "bob@example.com", "cy@example.com", "kept@example.com",
        "dee@example.com", "eve@example.com" }, ids_sent(before))
      os.remove(input)
    end)

    it("reads the same export from stdin", function()
      unsubscribe(unsubscribed)
      local input = tmpfile("export.txt")
      write_file(input, export)
      local code, out = cli("check --quiet -", { stdin = input })
      assert.equal(1, code)
      assert.same(unsubscribed, lines_of(out))
      os.remove(input)
    end)

    it("sends an address met in two letter cases once, as first spelled", function()
      unsubscribe({ "Ada.Lovelace@Example.com" })
      local before = #sim.log()
      local input = tmpfile("cases.txt")
      write_file(input, "Ada.Lovelace@Example.com\nada.lovelace@example.com\nADA.LOVELACE@EXAMPLE.COM\n")
      local code, out, err = cli("check --quiet --file " .. input)
      assert.equal(0, code, err)
      assert.equal("Ada.Lovelace@Example.com\n", out)
      assert.matches(":2: duplicate of line 1, sent once", err, 1, true)
      assert.matches(":3: duplicate of line 1, sent once", err, 1, true)
      assert.same({ "Ada.Lovelace@Example.com" }, ids_sent(before))
      os.remove(input)
    end)

    -- each one inside an id, on line 3: one line naming line 3, exit 2, nothing sent
    local inside = {
      { "U+200B", ZWSP }, { "U+00A0", NBSP }, { "U+0020", " " }, { "U+0009", "\t" },
      { "U+202E", "\226\128\174" }, { "U+2028", "\226\128\168" }, { "U+200E", "\226\128\142" },
      { "U+2066", "\226\129\166" }, { "U+0085", "\194\133" }, { "U+0007", "\7" }, { "U+FEFF", BOM },
      { "U+2060", "\226\129\160" }, { "U+3000", IDEO },
    }
    for _, case in ipairs(inside) do
      it("refuses " .. case[1] .. " inside an id: one line with the line number, exit 2, nothing sent", function()
        local input = tmpfile("inside.txt")
        write_file(input, "ok1@example.com\r\nok2@example.com\r\nev" .. case[2] .. "e@example.com\r\nok3@example.com\r\n")
        for _, cmd in ipairs { "check --file " .. input, "unsubscribe-all --file " .. input, "check -" } do
          local code, out, err = cli(cmd, { stdin = input })
          assert.equal(2, code, cmd .. ": " .. err)
          assert.equal("", out)
          local l = lines_of(err)
          assert.equal(1, #l, err)
          assert.matches(":3: invisible or control character " .. case[1] .. " inside the id; nothing was sent", l[1], 1, true)
        end
        assert.same({}, sim.log())
        os.remove(input)
      end)
    end

    it("applies the same rules to ids given as arguments", function()
      local code, out, err = cli("status --quiet " .. NBSP .. "ada@example.com ada@EXAMPLE.com")
      assert.equal(0, code, err)
      assert.matches("ada@example%.com%s+no", out)
      assert.equal(1, #ids_sent())
      code, out, err = cli("status 'ok@example.com' 'e" .. ZWSP .. "ve@example.com'")
      assert.equal(2, code)
      assert.equal(1, #lines_of(err), err)
      assert.matches("argument 2: invisible or control character U+200B", err, 1, true)
      assert.equal(1, #ids_sent())
    end)
  end)

  describe("usage and input errors: one line, exit 2, nothing sent", function()
    local dir = tmpfile("dir")
    local ids = tmpfile("ids.txt")
    setup(function()
      os.execute("mkdir -p " .. dir)
      write_file(ids, "a@example.com\n")
    end)
    teardown(function()
      os.remove(ids); os.execute("rm -rf " .. dir)
    end)
    local cases = {
      { "a missing --file", function() return "check --file /nonexistent/ids.txt" end, "/nonexistent/ids.txt: No such file" },
      { "an unreadable --file", function() return "check --file /proc/self/mem" end, "cannot read /proc/self/mem" },
      { "a directory as --file", function() return "check --file " .. dir end, "Is a directory" },
      { "a directory on stdin", function() return "unsubscribe-all -" end, "Is a directory", dir },
      { "--file without a value", function() return "check --file" end, "--file needs a value" },
      { "two output formats", function() return "status --json --table a@example.com" end, "--json and --table conflict" },
      { "--jsonl and --json", function() return "check --jsonl --json --file " .. ids end, "--jsonl and --json conflict" },
      { "--file and -", function() return "check --file " .. ids .. " -" end, "conflict: give one input" },
      { "two --file", function() return "check --file " .. ids .. " --file /etc/hostname" end, "conflict: give one input" },
      { "ids and --file", function() return "unsubscribe-all a@example.com --file " .. ids end, "give ids or --file, not both" },
      { "--batch-size above HubSpot's 100", function() return "check --batch-size 101 --file " .. ids end, "--batch-size must be at most 100" },
      { "--batch-size 0", function() return "status --batch-size 0 a@example.com" end, "--batch-size must be an integer >= 1" },
      { "--batch-size not a number", function() return "status --batch-size=ten a@example.com" end, "--batch-size must be an integer" },
      { "an unknown flag", function() return "check --frobnicate --file " .. ids end, "unknown option --frobnicate" },
      { "an unknown --flag=value", function() return "status --colour=red a@example.com" end, "unknown option --colour" },
      { "a value for a flag", function() return "status --json=yes a@example.com" end, "--json takes no value" },
      { "an unknown command", function() return "frobnicate" end, "unknown command 'frobnicate'" },
      { "no command", function() return "" end, "no command given" },
      { "check without input", function() return "check" end, "check needs --file FILE or -" },
      { "the token on the command line", function() return "status --token=pat-secret a@example.com" end, "never taken from the command line" },
      { "--rate malformed", function() return "status --rate fast a@example.com" end, "--rate must look like" },
      { "no token", function() return "status a@example.com" end, "no token", nil, "''" },
    }
    for _, case in ipairs(cases) do
      it(case[1], function()
        local code, out, err = cli(case[2](), { stdin = case[4], token = case[5] })
        assert.equal(2, code, err)
        assert.equal("", out)
        local l = lines_of(err)
        assert.equal(1, #l, err)
        assert.matches("^commprefs: ", l[1])
        assert.matches(case[3], l[1], 1, true)
        assert.matches("; see commprefs [%w%- ]*%-%-help$", l[1])
        assert.is_nil(err:lower():find("traceback", 1, true))
        assert.is_nil(err:lower():find("stack", 1, true))
        assert.is_nil(err:find("pat-secret", 1, true))
        assert.same({}, sim.log())
      end)
    end

    it("names the command's help in the line", function()
      local _, _, err = cli("check --frobnicate")
      assert.equal("; see commprefs check --help\n", err:sub(-#"; see commprefs check --help\n"))
      _, _, err = cli("--frobnicate")
      assert.equal("; see commprefs --help\n", err:sub(-#"; see commprefs --help\n"))
    end)
  end)

  it("--version prints the library's version", function()
    local code, out, err = cli("--version")
    assert.equal(0, code, err)
    assert.equal("commprefs " .. commprefs._VERSION .. "\n", out)
    assert.matches("^%d+%.%d+%.%d+$", commprefs._VERSION)
  end)

  it("status --json gives every answer", function()
    unsubscribe({ "yes@example.com" })
    local code, out, err = cli("status --json --quiet yes@example.com no@example.com")
    assert.equal(0, code, err)
    local doc = cjson.decode(out)
    assert.equal(1, doc.unsubscribed)
    assert.equal(1, doc.subscribed)
    table.sort(doc.results, function(a, b) return a.id > b.id end)
    assert.equal("yes@example.com", doc.results[1].id)
    assert.is_true(doc.results[1].unsubscribed)
    assert.equal("PORTAL_WIDE", doc.results[1].scope)
    assert.equal("no@example.com", doc.results[2].id)
    assert.is_false(doc.results[2].unsubscribed)
  end)

  it("status --json says which ids failed instead of guessing", function()
    local code, out = cli("status --json --quiet --rate 100/1 --base-url http://127.0.0.1:1 x@example.com")
    assert.equal(1, code)
    local doc = cjson.decode(out)
    assert.equal("x@example.com", doc.results[1].id)
    assert.is_nil(doc.results[1].unsubscribed)
    assert.matches("network", doc.results[1].error)
  end)

  describe("commprefs sim", function()
    for _, sig in ipairs { { "INT", 130 }, { "TERM", 143 } } do
      it("removes its temporary prefix and stops nginx on SIG" .. sig[1], function()
        local port, tls_port, out, codef = proc.free_port(), proc.free_port(), tmpfile("sim.out"), tmpfile("sim.code")
        while tls_port == port do tls_port = proc.free_port() end
        local p = io.popen(string.format("sh -c 'SIM_TLS_PORT=%d %s bin/commprefs sim --port %d >%s 2>&1 & pid=$!; echo $pid; wait $pid; echo $? >%s' 2>/dev/null &",
          tls_port, VM, port, out, codef))
        local pid = p:read("*l")
        p:close()
        finally(function() exec("kill -KILL " .. pid .. " 2>/dev/null") end) -- only if it outlived the test
        local prefix
        for _ = 1, 150 do
          prefix = proc.slurp(out):match("prefix=(%S+)")
          if prefix and exec("curl -sf -o /dev/null http://127.0.0.1:" .. port .. "/__sim/health") == 0 then break end
          prefix = nil
          exec("sleep 0.1")
        end
        assert.is_not_nil(prefix, proc.slurp(out))
        local nginx = proc.slurp(prefix .. "/logs/nginx.pid"):match("%d+")
        assert.is_not_nil(nginx)
        exec("kill -" .. sig[1] .. " " .. pid)
        for _ = 1, 100 do
          if proc.slurp(codef) ~= "" then break end
          exec("sleep 0.1")
        end
        assert.equal(tostring(sig[2]), proc.slurp(codef):match("%d+"))
        assert.is_nil(io.open(prefix), prefix .. " is left")
        assert.is_nil(io.open(prefix .. ".exit"))
        assert.is_false(proc.alive(nginx))
        os.remove(out); os.remove(codef)
      end)
    end
  end)
end)
