-- wrk script for benchmarks/grants_bench.py: POST one fixed JSON body with several headers
-- (post.lua takes one; a grant-token request needs Authorization and Keygrants-Grant).
--
--   BENCH_BODY_FILE     path of the request body (JSON), required
--   BENCH_HEADERS_FILE  optional; one header a line, "Name: value" (kept in a file so that
--                       credentials stay out of the command line and the environment)
--
-- By hand:
--   printf 'Authorization: Bearer %s\nKeygrants-Grant: %s\n' "$KEY" "$TOKEN" > headers.txt
--   BENCH_BODY_FILE=body.json BENCH_HEADERS_FILE=headers.txt \
--     wrk -t1 -c16 -d5s --latency -s benchmarks/post_headers.lua \
--     http://127.0.0.1:8650/v1/keys/bench/encrypt

local path = os.getenv("BENCH_BODY_FILE")
if path == nil or path == "" then
  error("BENCH_BODY_FILE is not set")
end
local f = assert(io.open(path, "rb"))
wrk.body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local headers = os.getenv("BENCH_HEADERS_FILE")
if headers ~= nil and headers ~= "" then
  for line in io.lines(headers) do
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name ~= nil then
      wrk.headers[name] = value
    end
  end
end
