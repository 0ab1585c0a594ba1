-- Create a report: its record, every job's state and dependency counter, the dependents
-- index and the "report.created" event. One round trip, every key in the report's slot: the
-- tenant's index and idempotency key (another slot) were written by index.lua just before.
--
-- KEYS[1..9]   the report keys (see lib.lua)
--
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      created_at (ms): the score index.lua gave the report in the tenant's index
-- ARGV[5]      m, the number of record fields that follow
-- ARGV[6 .. 5+2m]  record field, value pairs (tenant, template, inputs, lane, layout, …)
-- then per job, 5 values: job id, JobNode JSON, number of dependencies,
--                         dependents JSON array ("" for none), flags ("", "s", "o", "so")
--
-- Returns: {"created", report id, JobNode JSON of each job with no dependencies …}
--      or  {"duplicate", report id} when the report exists already.
-- Idempotent: a repeated call with the same id changes nothing.

if redis.call('EXISTS', KEYS[K_META]) == 1 then
  return { 'duplicate', REPORT_ID }
end

-- The time index.lua listed it under (the tenant's index and `since` filters read that score),
-- so that the record and the index agree.
local now = tonumber(ARGV[4])
local m = tonumber(ARGV[5])
local record = { 'id', REPORT_ID, 'status', 'running', 'created_at', now, 'terminal', 0 }
for i = 6, 5 + 2 * m do
  record[#record + 1] = ARGV[i]
end

local ready = { 'created', REPORT_ID }
local jobs = 0
local i = 6 + 2 * m
while i <= #ARGV do
  local id, node, deps, dependents_json, flags = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4]
  jobs = jobs + 1
  redis.call('HSET', KEYS[K_NODES], id, node)
  if deps == 0 then
    redis.call('HSET', KEYS[K_STATE], id, 'ready')
    ready[#ready + 1] = node
  else
    redis.call('HSET', KEYS[K_STATE], id, 'pending')
    redis.call('HSET', KEYS[K_REMAINING], id, deps)
  end
  if dependents_json ~= '' then
    redis.call('HSET', KEYS[K_DEPENDENTS], id, dependents_json)
  end
  if flags ~= '' then
    redis.call('HSET', KEYS[K_FLAGS], id, flags)
  end
  i = i + 5
end
record[#record + 1] = 'job_count'
record[#record + 1] = jobs
redis.call('HSET', KEYS[K_META], unpack(record))

-- Every hash exists from now on, so the TTL set below covers the keys written later too.
for _, k in ipairs({ K_REMAINING, K_DEPENDENTS, K_FLAGS, K_RESULTS, K_INFO }) do
  redis.call('HSET', KEYS[k], '_', '')
end
event('report.created', '', 'running', string.format('%d sections, %d ready', jobs, #ready - 2), now)
touch(RUNNING_TTL)
return ready
