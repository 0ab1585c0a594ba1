-- snapshot.lua: read the budget state for metrics, on the Redis clock. Read-only.
--
-- KEYS[1]  leases ZSET: lease id -> expiry (ms)
-- KEYS[2 .. 1+n]  bucket HASHes: rtat, ttat, paused
-- KEYS[2+n ..]    waiter expiry ZSETs, one per family
-- ARGV[1]  n, the number of bucket keys
-- Returns: {now ms (string), leases in use, n x {rtat, ttat, paused} (strings or false),
--           live waiters per family...}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = tonumber(ARGV[1])
local out = {string.format('%.3f', now), redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')}
for i = 2, 1 + n do
  table.insert(out, redis.call('HMGET', KEYS[i], 'rtat', 'ttat', 'paused'))
end
for i = 2 + n, #KEYS do
  table.insert(out, redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf'))
end
return out
