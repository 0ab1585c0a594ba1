-- renew.lua: extend the concurrency leases this process still holds. A lease that already expired
-- (or was released) is not brought back.
--
-- KEYS[1]  leases ZSET: lease id -> expiry (ms)
-- ARGV[1]  lease ttl (ms)
-- ARGV[2..] lease ids
-- Returns: the number of leases extended

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local expiry = now + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
