-- leave.lua: take a waiter out of the waiting room (it gave up or was cancelled), and release a
-- lease of the same id if it holds one (an admission dropped without settle).
--
-- KEYS[1]  waiting room ZSET
-- KEYS[2]  waiter expiry ZSET
-- KEYS[3]  waiter cost HASH
-- KEYS[4]  leases ZSET
-- ARGV[1]  waiter (lease) id
-- Returns: the number of entries removed

local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return removed + redis.call('ZREM', KEYS[4], ARGV[1])
