-- Cancel a running report: every job that is not terminal becomes cancelled, the report's
-- final status is "cancelled" (the caller notifies the aggregators).
--
-- KEYS[1..9]   the report keys (see lib.lua)
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      message for the event (who or why)
--
-- Returns: {"cancelled", JSON array of the job ids the queue may still hold (ready or
--           running when cancelled)}
--      or  {"finished", report status, the same JSON array ("[]" unless cancelled)} when
--           the report had already finished (a repeated cancel returns the same ids)
--      or  {"missing"}.

local status = redis.call('HGET', KEYS[K_META], 'status')
if not status then
  return { 'missing' }
end
if status ~= 'running' then
  return { 'finished', status, redis.call('HGET', KEYS[K_META], 'cancelled_jobs') or '[]' }
end

local now = now_ms()
local queued = {}
local states = redis.call('HGETALL', KEYS[K_STATE])
for i = 1, #states, 2 do
  local job, st = states[i], states[i + 1]
  if not TERMINAL[st] then
    if st == 'ready' or st == 'running' then
      queued[#queued + 1] = job
    end
    redis.call('HSET', KEYS[K_STATE], job, 'cancelled')
    redis.call('HSET', KEYS[K_INFO], job .. '|finished', now)
    redis.call('HINCRBY', KEYS[K_META], 'terminal', 1)
    event('section.cancelled', job, 'cancelled', '', now)
  end
end
-- cjson encodes an empty table as an object.
local ids = #queued == 0 and '[]' or cjson.encode(queued)
redis.call('HSET', KEYS[K_META], 'status', 'cancelled', 'finished_at', now, 'cancelled_jobs', ids)
event('report.finished', '', 'cancelled', ARGV[4], now)
touch(TTL)
return { 'cancelled', ids }
