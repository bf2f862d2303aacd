-- spec/feature/operating_spec.lua: running the command line's long jobs as
-- services (issue 17, "Operating commprefs"): --metrics-file of the worker
-- (against a real redis-server) and of the bulk commands, checked by
-- promtool while they run and after they end (HubSpot answering 503 some of
-- the time, its daily limit, SIGTERM), a bad path refused before anything is
-- sent; the bulk commands' log off a terminal (start, progress, stop;
-- --log-format json); the line when pacing holds requests back. The real
-- bin/commprefs, run by this spec's VM, stderr a file (not a terminal).
local sim = require "support.sim"
local redis = require "support.redis"
local proc = require "support.proc"
local prom = require "support.prom"
local core = require "commprefs.core"
local socket = require "socket"
local cjson = require "cjson"

local VM = sim.vm
local BUILD = os.getenv("COMMPREFS_BUILD") or ("build/" .. VM)
local TOKEN = "sim-token"
local STAMP = "%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ"

-- Starts `VM bin/commprefs ARGS` in the background: {pid=, dir=} (support.proc).
local function start(args)
  return proc.spawn(string.format("env COMMPREFS_BUILD=%s HUBSPOT_ACCESS_TOKEN=%s COMMPREFS_BASE_URL=%s %s bin/commprefs %s",
    BUILD, TOKEN, sim.url, VM, args))
end

-- Runs it to its end: exit code, stdout, stderr.
local function run(args, timeout) return proc.wait(start(args), timeout) end

local function tmpfile(name) return proc.tmpfile("operating", name) end

local function addresses(n, prefix)
  local t = {}
  for i = 1, n do t[i] = prefix .. i .. "@example.com" end
  return t
end

local function id_file(lines)
  local path = tmpfile("ids.txt")
  local f = assert(io.open(path, "w"))
  f:write(table.concat(lines, "\n"), "\n")
  f:close()
  return path
end

local lines_of = proc.lines

local function count(s, pattern) return select(2, s:gsub(pattern, "")) end

-- The file's inode number ("" when there is no file).
local function inode(path)
  local p = io.popen("stat -c %i " .. path .. " 2>/dev/null")
  local out = p:read("*a")
  p:close()
  return (out:gsub("%s", ""))
end

-- The texts of the metrics file read while p runs (every 0.1 s) whose
-- PREFIX_running gauge says 1, and how many files (inodes) held them. Every
-- read is a whole file (the writes are atomic): it ends with a line end and
-- holds the running gauge.
local function reads_while_running(p, path, prefix)
  local texts, inodes, files = {}, {}, 0
  while proc.slurp(p.dir .. "/rc") == "" do
    local ino, text = inode(path), proc.slurp(path)
    if text ~= "" then
      assert.matches("\n$", text)
      local running = prom.value(text, prefix .. "_running")
      assert.is_not_nil(running, text)
      if running == 1 then texts[#texts + 1] = text end
      if ino ~= "" and not inodes[ino] then inodes[ino] = true; files = files + 1 end
    end
    socket.sleep(0.1)
  end
  return texts, files
end

-- Queues 503 answers on about a quarter of the requests, `n` of them at
-- most; returns a function telling how many were answered so far.
local function some_503s(n)
  sim.fault { kind = "status", status = 503, p = 0.25, count = n }
  return function()
    local left = sim.admin("GET", "faults").faults[1]
    return n - (left and left.count or 0)
  end
end

-- Asserts the values of series ({[series] = value}) in a metrics text.
local function assert_values(text, expected)
  for series, v in pairs(expected) do assert.equal(v, prom.value(text, series), series) end
end

-- Asserts that the text counts every 503 the simulator answered (played()) as
-- HubSpot's answers to the job (series: the requests_total series with the
-- job's labels), and that neither the file nor the log holds the token.
local function assert_503s_no_token(text, err, played, series)
  local n503 = played()
  assert.is_true(n503 >= 1, "the simulator answered no 503")
  assert.equal(n503, prom.value(text, series))
  assert.is_nil(text:find(TOKEN, 1, true))
  assert.is_nil(err:find(TOKEN, 1, true))
end

local function leftovers(path)
  local p = io.popen("ls " .. path .. ".tmp-* 2>/dev/null")
  local out = p:read("*a")
  p:close()
  return out
end

local R, conn -- the redis-server of this file

describe("operating the command line's jobs", function()
  setup(function()
    R = redis.start()
    conn = assert(core.redis_connect(R.url, { timeout = 10 }))
  end)
  teardown(function() conn:close(); redis.stop(R) end)
  before_each(function() sim.reset() end)

  ------------------------------------------------------------------ --metrics-file

  describe("--metrics-file", function()
    it("of a bulk job: rewritten while it runs, promtool passes mid-run and at the end, the 503s and the job's counts in it, never the token", function()
      local played = some_503s(6)
      local input = id_file(addresses(300, "mb"))
      local file = tmpfile("bulk.prom")
      local p = start("unsubscribe-all --file " .. input .. " --batch-size 10 --rate 4/1 --log-interval 1 --metrics-file " .. file)
      local texts, files = reads_while_running(p, file, "commprefs_bulk")
      local code, _, err = proc.wait(p, 120)
      assert.equal(0, code, err)
      assert.is_true(#texts >= 2, "read " .. #texts .. " times while it ran")
      assert.is_true(files >= 2, "rewritten in place, not replaced by a rename") -- a new file (inode) per write
      local first, last = texts[1], texts[#texts]
      assert.matches("rc=0", prom.check(first))
      assert.matches("rc=0", prom.check(last))
      local done = 'commprefs_bulk_ids_done_total{outcome="changed"}'
      assert.is_true(prom.value(first, done) < prom.value(last, done), "the file was not rewritten while the job ran")
      assert.is_true(prom.value(last, done) < 300)
      local text = proc.slurp(file)
      assert.matches("rc=0", prom.check(text))
      assert_values(text, { commprefs_bulk_running = 0, [done] = 300, commprefs_bulk_ids = 300,
        ['commprefs_bulk_ids_done_total{outcome="failed"}'] = 0, commprefs_bulk_ids_remaining = 0,
        ['commprefs_rate_limit_max{command="unsubscribe-all"}'] = 4 })
      assert_503s_no_token(text, err, played, 'commprefs_requests_total{command="unsubscribe-all",status="503"}')
      assert.equal(prom.value(text, 'commprefs_requests_total{status="503"}'), prom.value(text, "commprefs_retries_total"))
      assert.equal("", leftovers(file))
      os.remove(input); os.remove(file)
    end)

    it("of the worker: rewritten while it runs, promtool passes, 503s, results by outcome and pending in it; written at exit on SIGTERM", function()
      local stream, results = "om" .. math.random(1e6), "om-results" .. math.random(1e6)
      local cmds = {}
      for i, a in ipairs(addresses(300, "mw")) do cmds[i] = { "XADD", stream, "*", "id", a } end
      assert(conn:pipeline(cmds))
      local played = some_503s(6)
      local file = tmpfile("worker.prom")
      local p = start(string.format("worker --redis %s --stream %s --group g --results %s --consumer ops-1"
        .. " --batch-size 10 --rate 4/1 --log-interval 1 --metrics-file %s", R.url, stream, results, file))
      local texts, inodes, files = {}, {}, 0
      local deadline = socket.gettime() + 120
      while socket.gettime() < deadline and conn:command({ "XLEN", results }) < 300 do
        local ino, text = inode(file), proc.slurp(file)
        if text ~= "" and prom.value(text, "commprefs_worker_running") == 1 then texts[#texts + 1] = text end
        if ino ~= "" and not inodes[ino] then inodes[ino] = true; files = files + 1 end
        socket.sleep(0.1)
      end
      socket.sleep(1.5) -- a tick after the last results: the group's pending count is 0
      local before_stop = proc.slurp(file)
      os.execute("kill -TERM " .. p.pid)
      local code, _, err = proc.wait(p, 30)
      assert.equal(0, code, err)
      assert.is_true(#texts >= 2, "read " .. #texts .. " times while it ran")
      assert.is_true(files >= 2, "rewritten in place, not replaced by a rename")
      local read = "commprefs_worker_entries_read_total"
      assert.is_true(prom.value(texts[1], read) < prom.value(texts[#texts], read), "the file was not rewritten while the worker ran")
      assert.matches("rc=0", prom.check(texts[1]))
      assert.equal(1, prom.value(before_stop, "commprefs_worker_running"))
      local text = proc.slurp(file)
      assert.matches("rc=0", prom.check(text))
      assert_values(text, { commprefs_worker_running = 0, [read] = 300,
        ['commprefs_worker_results_total{consumer="ops-1",outcome="changed"}'] = 300,
        ['commprefs_worker_results_total{outcome="failed"}'] = 0, ['commprefs_worker_results_total{outcome="missing"}'] = 0,
        commprefs_worker_dead_letters_total = 0, commprefs_worker_redeliveries_total = 0,
        commprefs_worker_pending = 0, commprefs_worker_lag = 0 })
      assert_503s_no_token(text, err, played, 'commprefs_requests_total{consumer="ops-1",status="503"}')
      assert.matches("metrics to " .. file:gsub("%p", "%%%0"), err)
      assert.equal("", leftovers(file))
      os.remove(file)
    end)

    it("at HubSpot's daily limit: written at exit 3 with the ids not sent; the stop line says why and what to do", function()
      sim.reset { daily = 3 } -- 5 requests needed
      local input, journal, file = id_file(addresses(500, "md")), tmpfile("journal"), tmpfile("daily.prom")
      local code, _, err = run("unsubscribe-all --file " .. input .. " --journal " .. journal .. " --metrics-file " .. file)
      sim.new_day()
      assert.equal(3, code, err)
      local text = proc.slurp(file)
      assert.matches("rc=0", prom.check(text))
      assert_values(text, { commprefs_bulk_running = 0, ['commprefs_bulk_ids_done_total{outcome="changed"}'] = 300,
        commprefs_bulk_ids_remaining = 200, commprefs_bulk_ids = 500, commprefs_daily_remaining = 0 })
      assert.matches('journal="' .. journal:gsub("%p", "%%%0") .. '"', text)
      local stop = lines_of(err)[#lines_of(err)]
      assert.matches("^" .. STAMP .. " commprefs unsubscribe%-all: ended early %(daily_limit%), exit 3: 300 of 500 ids done"
        .. " %(300 changed, 0 unchanged, 0 failed%), 0 already in the journal, 200 not sent; .*; next: after HubSpot's"
        .. " day resets %(midnight in the account's time zone%), rerun with the same %-%-journal to resume$", stop)
      assert.matches("commprefs: stopped: HubSpot's daily request limit is spent", err, 1, true)
      os.remove(input); os.remove(journal); os.remove(file)
    end)

    it("a path that cannot be written is a usage error: one line, exit 2, nothing sent, nothing read from Redis", function()
      local dir = tmpfile("dir")
      assert(os.execute("mkdir -p " .. dir))
      local input = id_file({ "a@example.com" })
      local stream = "never" .. math.random(1e6)
      conn:command({ "XADD", stream, "*", "id", "a@example.com" })
      local commands = {
        { "unsubscribe-all", "unsubscribe-all a@example.com" },
        { "status", "status a@example.com" },
        { "check", "check --file " .. input },
        { "worker", string.format("worker --redis %s --stream %s --group g --results %s-r", R.url, stream, stream) },
      }
      local bad = { { "/nonexistent-commprefs-dir/m.prom", "No such file or directory" }, { dir, "Is a directory" },
        { dir .. "/", "Is a directory" }, { "/dev/null", "not a regular file" } }
      for _, c in ipairs(commands) do
        for _, b in ipairs(bad) do
          local code, out, err = run(c[2] .. " --metrics-file " .. b[1])
          assert.equal(2, code, c[2] .. ": " .. err)
          assert.equal("", out)
          local l = lines_of(err)
          assert.equal(1, #l, err)
          assert.matches("^commprefs: %-%-metrics%-file: .*" .. b[2] .. "[^;]*; see commprefs " .. c[1]:gsub("%-", "%%-") .. " %-%-help$", l[1])
        end
      end
      assert.same({}, sim.log())
      local groups = conn:command({ "XINFO", "GROUPS", stream })
      assert.same({}, groups)
      os.execute("rm -rf " .. dir); os.remove(input)
    end)
  end)

  ------------------------------------------------------------------ bulk logs

  describe("the bulk commands' log off a terminal", function()

    it("has a start line, a progress line every --log-interval and a stop line, timestamped; never the token", function()
      local input, journal = id_file(addresses(200, "lg")), tmpfile("journal")
      local code, out, err = run("unsubscribe-all --file " .. input .. " --journal " .. journal
        .. " --batch-size 10 --rate 5/1 --log-interval 1")
      assert.equal(0, code, err)
      assert.equal("", out)
      local l = lines_of(err)
      assert.matches("^" .. STAMP .. " commprefs unsubscribe%-all: started: unsubscribe%-all of 200 ids from "
        .. input:gsub("%p", "%%%0") .. " %(0 bad lines and 0 duplicates left out%); journal " .. journal:gsub("%p", "%%%0")
        .. " %(0 ids done already%); budget this process alone %(no %-%-budget%-key%), 5 requests per 1 s %(%-%-rate%);"
        .. " batches of 10$", l[1])
      local progress = count(err, STAMP .. " commprefs unsubscribe%-all: %d+/200 ids done %(%d+ changed, %d+ unchanged,"
        .. " %d+ failed%); [%d.]+ ids/s; %d+ 429s; ETA %d+[hms]")
      assert.is_true(progress >= 2, "progress lines: " .. progress .. "\n" .. err)
      assert.matches("\n200 done, 200 changed, 0 unchanged, 0 failed\n", err, 1, true)
      assert.matches("^" .. STAMP .. " commprefs unsubscribe%-all: finished, exit 0: 200 of 200 ids done %(200 changed,"
        .. " 0 unchanged, 0 failed%), 0 already in the journal, 0 not sent; [%d.]+ ids/s over [%d.]+ s; 0 429s; next: nothing$", l[#l])
      assert.is_nil(err:find("pacing holds", 1, true))
      assert.is_nil(err:find("\r", 1, true))
      assert.is_nil(err:find(TOKEN, 1, true))
      -- a rerun with the journal: the start line counts the ids done already
      code, _, err = run("unsubscribe-all --file " .. input .. " --journal " .. journal)
      assert.equal(0, code, err)
      assert.matches("%(200 ids done already%)", lines_of(err)[1])
      assert.matches("finished, exit 0: 0 of 0 ids done .-, 200 already in the journal, 0 not sent", err)
      os.remove(input); os.remove(journal)
    end)

    it("with --log-format json: every line on stderr is a JSON record, bad input lines and the summary too", function()
      local input = id_file({ "j1@example.com", "not-an-address", "j2@example.com", "J1@example.com" })
      local code, out, err = run("check --file " .. input .. " --log-format json --log-interval 1")
      assert.equal(1, code, err) -- a bad input line
      assert.equal("", out)
      local events = {}
      for _, line in ipairs(lines_of(err)) do
        local rec = cjson.decode(line)
        assert.matches("^" .. STAMP .. "$", rec.time)
        assert.equal("check", rec.command)
        assert.is_string(rec.level)
        assert.is_string(rec.message)
        events[#events + 1] = rec.event
        if rec.event == "start" then assert.equal(2, rec.ids); assert.equal(1, rec.bad_lines); assert.equal(1, rec.duplicates) end
        if rec.event == "stop" then
          assert.equal(2, rec.done); assert.equal(1, rec.exit); assert.equal("finished", rec.stopped)
          assert.equal(2, rec.outcomes.subscribed)
        end
      end
      assert.equal("input", events[1]) -- the bad line, read before anything is sent
      assert.equal("start", events[3])
      assert.equal("summary", events[#events - 1])
      assert.equal("stop", events[#events])
      assert.is_nil(err:find(TOKEN, 1, true))
      os.remove(input)
    end)

    it("on a terminal: the progress bar, no log lines", function()
      local input, out = id_file(addresses(100, "tty")), tmpfile("tty")
      local a, _, c = os.execute(string.format("env HUBSPOT_ACCESS_TOKEN=%s COMMPREFS_BUILD=%s script -qec '%s bin/commprefs"
        .. " unsubscribe-all --file %s --base-url %s --batch-size 10' %s >/dev/null 2>&1", TOKEN, BUILD, VM, input, sim.url, out))
      local text = proc.slurp(out)
      assert.equal(0, type(a) == "number" and math.floor(a / 256) or c, text)
      assert.matches("%] 100/100 ", text)
      assert.is_nil(text:find("started:", 1, true))
      assert.is_nil(text:find("finished, exit", 1, true))
      os.remove(input); os.remove(out)
    end)
  end)

  ------------------------------------------------------------------ pacing

  describe("a log line when pacing holds requests back more than 5 s", function()

    local PACED = "pacing holds requests back: %d requests? waited %d+%.%d s on average in the last %d+ s before"
      .. " they could start %(limit 1 per 11 s, %-%-rate%)"

    it("in a bulk job", function()
      local code, _, err = run("status p1@example.com p2@example.com --batch-size 1 --rate 1/11 --log-interval 1")
      assert.equal(0, code, err)
      assert.matches(STAMP .. " commprefs status: " .. PACED, err)
    end)

    it("in the worker", function()
      local stream = "op" .. math.random(1e6)
      conn:command({ "XADD", stream, "*", "id", "p1@example.com" })
      conn:command({ "XADD", stream, "*", "id", "p2@example.com" })
      local code, _, err = run(string.format("worker --redis %s --stream %s --group g --results %s-r --consumer pace"
        .. " --batch-size 1 --rate 1/11 --idle-exit 1 --log-interval 1", R.url, stream, stream))
      assert.equal(0, code, err)
      assert.matches(STAMP .. " commprefs worker pace: " .. PACED, err)
    end)
  end)
end)
