-- wrk script for bench/run.py: prints one machine-readable JSON line from done().
--
-- Environment (read by every wrk thread):
--   WRK_BODY_FILE     POST this file's bytes as application/json (workload C)
--   WRK_COUNT_MARKER  count responses that carry the X-Rtserve-Fallback header; only then
--                     is response() defined, because a Lua response() makes wrk parse
--                     every header into a table and slows it down
--   WRK_DEADLINE_MS   report the share of responses faster than this (default 50)
--   WRK_BANDS         comma list of ms: also count the responses within each ("bands")

local body_file = os.getenv("WRK_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

local threads = {}

-- WRK_UNIQUE_ID: every request carries its own X-Request-Id, so no two heads are equal
-- (workload G). A Lua request() costs wrk time per request: compare servers within G only.
if os.getenv("WRK_UNIQUE_ID") == "1" then
  local counter = 0
  function request()
    counter = counter + 1
    local headers = {}
    for k, v in pairs(wrk.headers) do headers[k] = v end
    headers["X-Request-Id"] = tostring(counter)
    return wrk.format(nil, nil, headers)
  end
end

function setup(thread)
  table.insert(threads, thread)
end

fallbacks = 0
responses = 0

local marker = os.getenv("WRK_COUNT_MARKER")
if marker and marker ~= "" then
  function response(status, headers, body)
    responses = responses + 1
    if headers["X-Rtserve-Fallback"] or headers["x-rtserve-fallback"] then
      fallbacks = fallbacks + 1
    end
  end
end

-- Responses at most `limit_us` after they were sent: the largest rank whose latency is
-- <= limit, by binary search over latency:percentile() (wrk exposes no cumulative
-- histogram; percentile(p) returns the value at rank round(p/100*count + 0.5), 0 past the
-- end).
local function within_us(latency, n, limit_us)
  local lo, hi = 0, n
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    local v = latency:percentile((mid - 0.5) / n * 100.0)
    if v > 0 and v <= limit_us then lo = mid else hi = mid - 1 end
  end
  return lo
end

function done(summary, latency, requests)
  local deadline_us = tonumber(os.getenv("WRK_DEADLINE_MS") or "50") * 1000
  local n = summary.requests
  local within = within_us(latency, n, deadline_us)
  -- WRK_BANDS="45,48,50,52": also the responses within each of these many ms, for a
  -- histogram of the lateness around the deadline ("bands" in the JSON line).
  local bands = {}
  for ms in string.gmatch(os.getenv("WRK_BANDS") or "", "[^,]+") do
    table.insert(bands, string.format('"%s":%d', ms, within_us(latency, n, tonumber(ms) * 1000)))
  end
  local fb = 0
  for _, t in ipairs(threads) do
    fb = fb + (t:get("fallbacks") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,' ..
    '"p999":%d,"p9999":%d},"within_deadline":%d,"deadline_ms":%g,"fallbacks":%d,' ..
    '"bands":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency:percentile(99.99),
    within, deadline_us / 1000, fb, table.concat(bands, ",")))
end
