-- Store a job's result (first result wins), mark it done, release its dependents and finish
-- the report when it was the last job.
--
-- KEYS[1..9]   the report keys (see lib.lua)
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      job id
-- ARGV[5]      SectionResult JSON
-- ARGV[6]      event message (model, tokens, latency)
--
-- Returns: {"ok", report status, JobNode JSON of each dependent that is ready now …}
--      or  {"missing"} (the report expired or never existed), {"unknown_job"}.
-- Idempotent: on a job that is already terminal nothing is written, and the same ready
-- dependents are returned (those released by this job that have not started yet).

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
  redis.call('HSET', KEYS[K_RESULTS], job, ARGV[5])
  redis.call('HSET', KEYS[K_STATE], job, 'done')
  redis.call('HSET', KEYS[K_INFO], job .. '|finished', now)
  redis.call('HINCRBY', KEYS[K_META], 'terminal', 1)
  event('section.completed', job, 'done', ARGV[6], now)
  settle(job, 'done', now)
  status = maybe_finish(now)
end

return ok_with_ready(status, job)
