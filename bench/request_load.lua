-- bench/request_load.lua: the request-path load of make bench part 8, run in
-- every nginx worker. init_worker_by_lua starts M.watch(client, dict): each
-- worker polls the lua_shared_dict `dict` for a new run ("go" = generation,
-- "params" = JSON {rate=, seconds=, prefix=, pool=, workers=}) and offers its
-- share (rate / workers) of open-loop callers of
-- client:is_unsubscribed_from_all on addresses drawn at random from `pool`
-- (a light thread each, started as due every millisecond whatever the
-- others are doing), then stores what they got under "result:<gen>:<worker>":
-- JSON {offered=, answered=, errors={kind=n}, hist={[ms]=n}} (hist: every
-- read, answered or not, by milliseconds from the call to its return).
local cjson = require "cjson"

local M = {}

local function run(client, p)
  local n = math.floor(p.rate / p.workers * p.seconds)
  local hist, kinds, answered, done = {}, {}, 0, 0
  local finished = require("ngx.semaphore").new(0)
  local function caller(id)
    ngx.update_time()
    local t = ngx.now()
    local ok, v, err = pcall(client.is_unsubscribed_from_all, client, id)
    if not ok then -- a raise is a defect: counted (and logged) as its own kind, never lost
      ngx.log(ngx.ERR, "bench: is_unsubscribed_from_all raised: ", tostring(v))
      v, err = nil, { kind = "raised" }
    end
    ngx.update_time()
    local ms = tostring(math.floor((ngx.now() - t) * 1000 + 0.5))
    hist[ms] = (hist[ms] or 0) + 1
    if v ~= nil then answered = answered + 1
    else
      local k = tostring(err and err.kind)
      kinds[k] = (kinds[k] or 0) + 1
    end
    done = done + 1
    if done == n then finished:post(1) end
  end
  local rate = p.rate / p.workers
  ngx.update_time()
  local t0, sent = ngx.now(), 0
  while sent < n do
    ngx.update_time()
    local due = math.min(n, math.floor((ngx.now() - t0) * rate) + 1)
    while sent < due do
      sent = sent + 1
      ngx.thread.spawn(caller, p.prefix .. math.random(p.pool) .. "@example.com")
    end
    ngx.sleep(0.001)
  end
  finished:wait(p.seconds + 30)
  return { offered = n, answered = answered, errors = kinds, hist = hist }
end

function M.watch(client, dict_name)
  local dict = ngx.shared[dict_name]
  local seen = dict:get("go") or 0
  local function poll(premature)
    while not premature and not ngx.worker.exiting() do
      local gen = dict:get("go") or 0
      if gen > seen then
        seen = gen
        math.randomseed(gen * 1000 + ngx.worker.id())
        local ok, res = pcall(run, client, cjson.decode(dict:get("params")))
        dict:set("result:" .. gen .. ":" .. ngx.worker.id(), ok and cjson.encode(res) or cjson.encode { failed = tostring(res) })
      end
      ngx.sleep(0.02)
    end
  end
  assert(ngx.timer.at(0, poll))
end

return M
