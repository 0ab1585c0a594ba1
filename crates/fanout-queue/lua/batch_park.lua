-- A section ready to run through the provider's Batch API waits for its batch.
--
-- KEYS[1] lines (HASH member -> line)   KEYS[2] where (HASH member -> p | b:<id> | live)
-- KEYS[3] pending (ZSET member -> parked ms)   KEYS[4] deadlines (ZSET member -> deadline ms)
-- ARGV[1] member   ARGV[2] line   ARGV[3] now (ms)   ARGV[4] the report's deadline (ms; "" none)
--
-- Returns where the member is now: "p" (waiting; parked by this call or an earlier one),
-- "b:<id>" (already in a batch) or "live" (moved to a live call). Only "p" is written.

local w = redis.call('HGET', KEYS[2], ARGV[1])
if w and w ~= 'p' then
  return w
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], 'p')
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
end
return 'p'
