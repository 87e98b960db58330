-- wrk script for bench/http.py: prints one JSON line when the run is done, after
-- wrk's own report: requests, duration, bytes, errors (non-2xx/3xx answers under
-- "status", socket errors under connect/read/write/timeout) and latency percentiles.
-- With WRK_VARY=1 in the environment each request asks another path (/k0 ... /k9999),
-- for `hash $request_uri` upstreams.

if os.getenv("WRK_VARY") == "1" then
   local n = 0
   request = function()
      n = (n + 1) % 10000
      return wrk.format(nil, "/k" .. n)
   end
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"p50_us":%d,"p99_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99)))
end
