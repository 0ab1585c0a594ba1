-- A worker is about to run a job: mark it running, keep the first start time, count the start.
--
-- KEYS[1..10]  the report keys (see lib.lua)
-- ARGV[1..4]   ttl, events maxlen, notify maxlen, report id (see lib.lua)
-- ARGV[5]      job id
-- ARGV[6]      the queue's attempt number (shown in the event)
--
-- Returns: "run", "already_done" (the job is terminal), "cancelled" (the report or the job
-- was cancelled) or "missing" (unknown job, or the report expired or never existed).

local job = ARGV[5]
local status = redis.call('HGET', KEYS[K_META], 'status')
if not status then
  return 'missing'
end
local st = redis.call('HGET', KEYS[K_STATE], job)
if not st then
  return 'missing'
end
if st == 'cancelled' or status == 'cancelled' then
  return 'cancelled'
end
if TERMINAL[st] then
  return 'already_done'
end

local now = now_ms()
redis.call('HSET', KEYS[K_STATE], job, 'running')
redis.call('HSETNX', KEYS[K_INFO], job .. '|started', now)
redis.call('HINCRBY', KEYS[K_INFO], job .. '|attempts', 1)
event('section.started', job, 'running', 'attempt ' .. ARGV[6], now)
return 'run'
