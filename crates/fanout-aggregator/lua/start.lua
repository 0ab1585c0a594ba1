-- A worker is about to run a job: mark it running, keep the first start time, count the start.
--
-- KEYS[1..9]   the report keys (see lib.lua)
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      job id
-- ARGV[5]      the queue's attempt number (shown in the event)
-- ARGV[6..]    optional: report fields to return with "run" (the job's context)
--
-- Returns: "run", "already_done" (the job is terminal), "cancelled" (the report or the job
-- was cancelled) or "missing" (unknown job, or the report expired or never existed). With
-- ARGV[6..], each is the first element of an array, and "run" is followed by the job's node
-- and the named report fields.

local job = ARGV[4]
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local function reply(r)
  if #fields == 0 then
    return r
  end
  return { r }
end

local status = redis.call('HGET', KEYS[K_META], 'status')
if not status then
  return reply('missing')
end
local st = redis.call('HGET', KEYS[K_STATE], job)
if not st then
  return reply('missing')
end
if st == 'cancelled' or status == 'cancelled' then
  return reply('cancelled')
end
if TERMINAL[st] then
  return reply('already_done')
end

local now = now_ms()
redis.call('HSET', KEYS[K_STATE], job, 'running')
redis.call('HSETNX', KEYS[K_INFO], job .. '|started', now)
redis.call('HINCRBY', KEYS[K_INFO], job .. '|attempts', 1)
event('section.started', job, 'running', 'attempt ' .. ARGV[5], now)
if #fields == 0 then
  return 'run'
end
local out = { 'run', redis.call('HGET', KEYS[K_NODES], job) or false }
local values = redis.call('HMGET', KEYS[K_META], unpack(fields))
for i = 1, #fields do
  out[#out + 1] = values[i]
end
return out
