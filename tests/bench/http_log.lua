-- wrk script for the HTTP benchmark (tests/bench/run.py, T6): every request logs a new,
-- verified action through POST /api/actions/log.
--   wrk -s http_log.lua URL -- NONCE USERS LBS [TOKEN]
-- Action ids are unique across threads and runs: NONCE (per run), the thread number and a
-- counter. Users are the benchmark's deterministic ids 00000000-0000-4000-8000-<n as 12 hex>.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("thread_no", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  nonce = tonumber(args[1])
  users = tonumber(args[2])
  lbs = args[3]
  math.randomseed(nonce * 1000 + thread_no)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[4] then
    wrk.headers["Authorization"] = "Bearer " .. args[4]
  end
end

function request()
  counter = counter + 1
  local action_id = string.format("%08x-%04x-4000-8000-%012x", nonce, thread_no, counter)
  local user_id = string.format("00000000-0000-4000-8000-%012x", math.random(1, users))
  local body = string.format(
    '{"action_id": "%s", "user_id": "%s", "lbs": "%s", "logged_at": "2025-01-01T00:00:00Z", "verified": true}',
    action_id, user_id, lbs)
  return wrk.format(nil, nil, nil, body)
end
