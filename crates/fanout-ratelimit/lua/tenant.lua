-- tenant.lua: take one request and its estimated tokens from a tenant's share of the budget, or
-- say how long to wait. A tenant's share is a GCRA pair of its own (same units as acquire.lua:
-- theoretical arrival times in ms on the Redis clock, a cost of c at r per ms weighs c / r ms,
-- the bucket holds `burst` ms). It is taken before the shared waiting room, so a tenant over its
-- share waits outside it and never holds up other tenants' waiters.
--
-- KEYS[1]  the tenant's bucket HASH for one model family: rtat, ttat (ms)
-- ARGV[1]  estimated tokens
-- ARGV[2]  the tenant's requests per minute (share × every key's)
-- ARGV[3]  the tenant's tokens per minute
-- ARGV[4]  burst (ms of budget the bucket holds)
-- Returns: {1} when taken, or {0, wait ms}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local tokens = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])

local state = redis.call('HMGET', KEYS[1], 'rtat', 'ttat')
local rtat = tonumber(state[1]) or 0
local ttat = tonumber(state[2]) or 0
local rw = 60000 / rpm
local tw = tokens * 60000 / tpm

-- The earliest time each dimension takes its cost (a cost bigger than the bucket goes in once
-- the bucket is full, into debt).
local at = math.max(rtat - burst + math.min(rw, burst), ttat - burst + math.min(tw, burst))
if at > now then
  return { 0, math.ceil(at - now) }
end

rtat = math.max(rtat, now) + rw
ttat = math.max(ttat, now) + tw
redis.call('HSET', KEYS[1], 'rtat', rtat, 'ttat', ttat)
-- Idle buckets go: once both times have passed, the bucket is as good as new.
redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(rtat, ttat) - now) + 1000)
return { 1 }
