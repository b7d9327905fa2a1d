-- wrk script for benchmarks/http_encrypt.py: POST one fixed JSON body on every request.
--
-- Configured through the environment so the same file serves every target:
--   BENCH_BODY_FILE     path of the request body (JSON), required
--   BENCH_HEADER_NAME   optional extra header name  (e.g. Authorization, X-Vault-Token)
--   BENCH_HEADER_VALUE  its value
--
-- By hand:
--   BENCH_BODY_FILE=body.json BENCH_HEADER_NAME=X-Vault-Token BENCH_HEADER_VALUE=... \
--     wrk -t1 -c16 -d10s --latency -s benchmarks/post.lua http://127.0.0.1:8200/v1/transit/encrypt/bench

local path = os.getenv("BENCH_BODY_FILE")
if path == nil or path == "" then
  error("BENCH_BODY_FILE is not set")
end
local f = assert(io.open(path, "rb"))
wrk.body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local name = os.getenv("BENCH_HEADER_NAME")
if name ~= nil and name ~= "" then
  wrk.headers[name] = os.getenv("BENCH_HEADER_VALUE") or ""
end
