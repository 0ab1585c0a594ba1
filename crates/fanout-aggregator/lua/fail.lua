-- Mark a job failed for good with a reason; dependents flagged "skip" are skipped
-- (transitively), the others lose one outstanding input and are released when ready.
--
-- KEYS[1..9]   the report keys (see lib.lua)
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      job id
-- ARGV[5]      reason
-- ARGV[6]      provider attempts of the last delivery (0: none beyond the starts)
--
-- Returns: {"ok", report status, JobNode JSON of each dependent that is ready now …}
--      or  {"missing"} (the report expired or never existed), {"unknown_job"}.
-- Idempotent like complete.lua: a terminal job is left as it is (a late failure never
-- overwrites a result) and the same ready dependents are returned.

local job = ARGV[4]
local st, err = job_state(job)
if not st then
  return err
end

local status
if TERMINAL[st] then
  status = redis.call('HGET', KEYS[K_META], 'status')
else
  local now = now_ms()
  redis.call('HSET', KEYS[K_STATE], job, 'failed')
  redis.call('HSET', KEYS[K_INFO], job .. '|error', ARGV[5], job .. '|finished', now,
    job .. '|tries', tonumber(ARGV[6]) or 0)
  redis.call('HINCRBY', KEYS[K_META], 'terminal', 1)
  event('section.failed', job, 'failed', ARGV[5], now)
  settle(job, 'failed', now)
  status = maybe_finish(now)
end

return ok_with_ready(status, job)
