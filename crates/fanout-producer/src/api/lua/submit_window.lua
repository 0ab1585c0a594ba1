-- Count one submission of a tenant in a fixed window (one minute in production).
--
-- KEYS[1]  the tenant's window counter (STRING; expires with its window)
-- ARGV[1]  the limit: submissions allowed per window
-- ARGV[2]  the window length in milliseconds
--
-- Returns {allowed, count, reset_ms}: allowed is 1 or 0, count the submissions seen in this
-- window (this one included), reset_ms the milliseconds until the window ends.
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if count == 1 or ttl < 0 then
  -- A new window (or a counter that lost its expiry): start the clock.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
if count > tonumber(ARGV[1]) then
  return {0, count, ttl}
end
return {1, count, ttl}
