-- A worker process says it is alive (or, with a TTL of 0, that it is leaving), and learns
-- whether another one has gone silent.
--
-- KEYS[1]  workers      ZSET  consumer -> ms (Redis clock) after which it counts as gone
-- KEYS[2]  worker-info  HASH  consumer -> what the worker says about itself (JSON)
-- KEYS[3]  wake         STREAM
-- KEYS[4]  last-beat    STRING when any worker last beat (ms, Redis clock)
-- ARGV[1]  consumer     ARGV[2]  TTL ms (0: leaving; jobs it still holds are reclaimed now)
-- ARGV[3]  info JSON
--
-- Returns the number of other workers that have gone silent. When there are some, an entry on
-- the wake stream makes idle claimers run the claim script, which takes over their jobs at
-- once and forgets them (claim.lua, step 2).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  -- Nobody beat for longer than a TTL: Redis was away (an outage, a restart from its
  -- append-only file) rather than every worker at once. Every registered worker gets one TTL
  -- to beat again before its jobs are taken over.
  local last = tonumber(redis.call('GET', KEYS[4]) or '0')
  if last > 0 and now - last > ttl then
    local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '(0', '(' .. (now + ttl))
    for _, w in ipairs(stale) do
      redis.call('ZADD', KEYS[1], now + ttl, w)
    end
  end
  redis.call('SET', KEYS[4], now, 'PX', 86400000)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
else
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
end
local lapsed = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. now)
if lapsed > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '16', '*', 'lapsed', lapsed)
end
return lapsed
