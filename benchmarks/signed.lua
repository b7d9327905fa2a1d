-- wrk script for benchmarks/auth_overhead.py: POST one fixed JSON body, each request with its
-- own pre-computed RFC 9421 signature (a signature's nonce is single-use, so none repeats).
--
--   BENCH_BODY_FILE  the request body (JSON)
--   BENCH_SIG_FILE   one line per request: Signature-Input <TAB> Signature <TAB> Content-Digest
--
-- Use with -t1 (one Lua state): requests past the end of the file would replay signatures, which
-- the server refuses (non-2xx), and the benchmark reports them.

local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()

local lines = {}
for line in io.lines(os.getenv("BENCH_SIG_FILE")) do
  lines[#lines + 1] = line
end
local i = 0

request = function()
  i = i + 1
  local line = lines[i] or lines[1]
  local si, sig, digest = line:match("([^\t]*)\t([^\t]*)\t([^\t]*)")
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Signature-Input"] = si,
    ["Signature"] = sig,
    ["Content-Digest"] = digest,
  }, body)
end
