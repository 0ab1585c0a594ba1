-- Read-only: what a terminal job released, for a worker that finds its job already done
-- (it crashed after complete/fail and before enqueueing the dependents).
--
-- KEYS[1..9]   the report keys (see lib.lua)
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      job id
--
-- Returns: {"ok", report status, JobNode JSON of each released dependent not yet started …}
--      or  {"missing"}, {"unknown_job"}, {"not_terminal", report status}.

local job = ARGV[4]
local status = redis.call('HGET', KEYS[K_META], 'status')
if not status then
  return { 'missing' }
end
local st = redis.call('HGET', KEYS[K_STATE], job)
if not st then
  return { 'unknown_job' }
end
if not TERMINAL[st] then
  return { 'not_terminal', status }
end
return ok_with_ready(status, job)
