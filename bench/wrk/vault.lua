-- wrk driver for a Vault/OpenBao-compatible transit endpoint.
--
-- Used unchanged against OpenBao and Embassy KMS, so both sides see the same
-- request bytes. Invoked by bench/run.py as:
--
--   BENCH_VAULT_TOKEN=<token> wrk ... -s bench/wrk/vault.lua <url> -- <body-file>
--
-- The token travels in the environment rather than argv so it stays out of
-- `ps`. The body is read from a file because batch bodies (100 items) are too
-- long to pass comfortably on a command line.
--
-- done() prints one line "BENCH_JSON {...}" for run.py to parse. Latencies
-- are in microseconds.
--
-- wrk's own errors.status counts only statuses > 399. With
-- BENCH_COUNT_NON2XX=1 a response() hook also counts every non-2xx status
-- ("non2xx"); it is off by default because a response hook makes wrk hand
-- every response to Lua, which costs ~5-10% throughput on a 2-core machine
-- where wrk shares the CPU with the server. Off, "non2xx" is -1.

-- With BENCH_LINES=<file>, every request differs: each line of the file is used
-- once, as the request's DPoP header (BENCH_LINE_AS=dpop; the token then goes
-- as "Authorization: DPoP") or as its whole body (BENCH_LINE_AS=body, for
-- logins with one-time assertions). Lines are dealt round-robin to the threads
-- and each request is formatted in init(), so the measured loop does no more
-- Lua work than returning a prepared string. A line used twice is a replay the
-- server refuses, so run.py writes more lines than a run can use.

local threads = {}
local lines_file = os.getenv("BENCH_LINES")
local line_as = os.getenv("BENCH_LINE_AS") or "dpop"
-- wrk runs each thread's init() before the next thread's setup(), so the number
-- of threads comes from run.py rather than from counting setup() calls.
local thread_total = tonumber(os.getenv("BENCH_THREADS") or "1")

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  if path == nil then
    error("vault.lua: body file path expected after --")
  end
  local f = assert(io.open(path, "rb"))
  local body = f:read("*a")
  f:close()
  local token = os.getenv("BENCH_VAULT_TOKEN")
  if token == nil or token == "" then
    error("vault.lua: BENCH_VAULT_TOKEN is not set")
  end
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  non2xx = 0
  if lines_file == nil then
    wrk.headers["X-Vault-Token"] = token
    return
  end
  prepared = {}
  local n = 0
  for line in io.lines(lines_file) do
    if n % thread_total == thread_index then
      if line_as == "body" then
        prepared[#prepared + 1] = wrk.format(nil, nil, nil, line)
      else
        local headers = {
          ["Authorization"] = "DPoP " .. token,
          ["DPoP"] = line,
          ["Content-Type"] = "application/json",
        }
        prepared[#prepared + 1] = wrk.format(nil, nil, headers, nil)
      end
    end
    n = n + 1
  end
  if #prepared == 0 then
    error("vault.lua: " .. lines_file .. " gave this thread no lines")
  end
  next_line = 0
end

if lines_file ~= nil then
  function request()
    next_line = next_line + 1
    if next_line > #prepared then
      next_line = 1 -- out of lines: replays follow, and are counted as errors
    end
    return prepared[next_line]
  end
end

local count_non2xx = os.getenv("BENCH_COUNT_NON2XX") == "1"

-- wrk decides once, when it loads the script, whether a response() global
-- exists, so the hook is defined only when asked for.
if count_non2xx then
  function response(status, headers, body)
    if status < 200 or status > 299 then
      non2xx = non2xx + 1
    end
  end
end

function done(summary, latency, requests)
  local non2xx_total = -1
  if count_non2xx then
    non2xx_total = 0
    for _, thread in ipairs(threads) do
      non2xx_total = non2xx_total + (thread:get("non2xx") or 0)
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"non2xx\":%d,\"err_connect\":%d,\"err_read\":%d,\"err_write\":%d," ..
    "\"err_status\":%d,\"err_timeout\":%d," ..
    "\"lat_mean_us\":%.1f,\"lat_p50_us\":%d,\"lat_p90_us\":%d," ..
    "\"lat_p99_us\":%d,\"lat_max_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes,
    non2xx_total, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
