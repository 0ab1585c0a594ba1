-- Waiting lines become one batch: each member still waiting ("p") moves into batch <id>.
--
-- KEYS[1] where   KEYS[2] pending   KEYS[3] open (ZSET batch id -> created ms)
-- KEYS[4] the batch (HASH)   KEYS[5] its members (STRING: a JSON array, in file order)
-- ARGV[1] batch id   ARGV[2] api key name   ARGV[3] model   ARGV[4] now (ms)
-- ARGV[5..] member, tokens, member, tokens, ...
--
-- Returns the members claimed (those another claim or a move took are left out). Nothing is
-- written when none is left.

local id = ARGV[1]
local claimed = {}
local tokens = 0
for i = 5, #ARGV, 2 do
  local m = ARGV[i]
  if redis.call('HGET', KEYS[1], m) == 'p' then
    redis.call('HSET', KEYS[1], m, 'b:' .. id)
    redis.call('ZREM', KEYS[2], m)
    claimed[#claimed + 1] = m
    tokens = tokens + tonumber(ARGV[i + 1])
  end
end
if #claimed == 0 then
  return claimed
end
redis.call('HSET', KEYS[4], 'key', ARGV[2], 'model', ARGV[3], 'tokens', tokens,
  'created_ms', ARGV[4], 'state', 'formed', 'count', #claimed)
redis.call('SET', KEYS[5], cjson.encode(claimed))
redis.call('ZADD', KEYS[3], ARGV[4], id)
return claimed
