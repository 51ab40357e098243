-- wrk script: POST a non-streamed /api/generate and, when done, print one machine-readable line.
--
-- Contract: every request is `POST <url path>` with a fixed JSON body (stream:false) and
-- Content-Type application/json. At the end wrk prints a line
--   WRK_JSON {"requests":..,"duration_us":..,"p50_us":..,"p99_us":..,"status_errors":..,
--             "connect_errors":..,"read_errors":..,"write_errors":..,"timeouts":..}
-- which bench/wrk.py parses; `status_errors` counts responses with status >= 400 (wrk's own rule).

wrk.method = "POST"
wrk.body = '{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,"status_errors":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50.0), latency:percentile(99.0),
    e.status, e.connect, e.read, e.write, e.timeout))
end
