-- A line's outcome, applied once: only while the member is where the caller found it.
--
-- KEYS[1] lines   KEYS[2] where   KEYS[3] pending   KEYS[4] deadlines
-- ARGV[1] member   ARGV[2] where it must be (p, b:<id> or live)   ARGV[3] action
-- ARGV[4] the new line (retry)   ARGV[5] now (ms)
--
-- Actions: "done" forgets the line (its section is complete, failed or cancelled);
-- "retry" makes it wait for the next batch again, as ARGV[4]; "live" marks it moved to a
-- live call (the line stays until that call forgets it).
-- Returns 1 when applied, 0 when the member was elsewhere (someone else settled it).

local m = ARGV[1]
if redis.call('HGET', KEYS[2], m) ~= ARGV[2] then
  return 0
end
local action = ARGV[3]
if action == 'done' then
  redis.call('HDEL', KEYS[1], m)
  redis.call('HDEL', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
  redis.call('ZREM', KEYS[4], m)
elseif action == 'retry' then
  redis.call('HSET', KEYS[1], m, ARGV[4])
  redis.call('HSET', KEYS[2], m, 'p')
  redis.call('ZADD', KEYS[3], ARGV[5], m)
elseif action == 'live' then
  redis.call('HSET', KEYS[2], m, 'live')
  redis.call('ZREM', KEYS[3], m)
  redis.call('ZREM', KEYS[4], m)
else
  return redis.error_reply('unknown action ' .. action)
end
return 1
