-- Settle a delivery other than by ack: schedule it again (retry or release) or dead-letter it.
-- Only the consumer that owns the entry may settle it.
--
-- KEYS[1]  stream       KEYS[2]  delayed ZSET of the lane    KEYS[3]  delayed-jobs HASH
-- KEYS[4]  dead STREAM of the lane                          KEYS[5]  wake STREAM
-- ARGV[1]  group        ARGV[2]  consumer        ARGV[3]  entry id
-- ARGV[4]  mode: 'later' (retry or release) or 'dead'
-- ARGV[5]  later: delay ms; dead: dead-letter MAXLEN
-- ARGV[6]  later: attempt number the job will carry; dead: attempts made
-- ARGV[7]  last error ('' keeps the entry's own)
-- ARGV[8]  dead: reason
-- ARGV[9]  registry score of the stream     ARGV[10] deliveries (for the dead letter)
--
-- Returns {status, due ms}: status 'ok', 'lost' (another consumer owns it) or 'gone'
-- (already settled, or removed from the stream; it is acked and nothing else happens).

local s, group, consumer, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local p = redis.call('XPENDING', s, group, id, id, 1)
if not p[1] then return {'gone', 0} end
if p[1][2] ~= consumer then return {'lost', 0} end
local e = redis.call('XRANGE', s, id, id)
if not e[1] then
  redis.call('XACK', s, group, id)
  return {'gone', 0}
end
local flat = e[1][2]
local f = {}
for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
local err = ARGV[7]
if err == '' then err = f['e'] or '' end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = 0
if ARGV[4] == 'dead' then
  local entry = {'job', f['id'] or '', 'payload', f['p'] or '', 'attempts', ARGV[6], 'error', err,
    'reason', ARGV[8], 'deliveries', ARGV[10], 'stream', s, 'entry', id,
    'enqueued_at', f['t'] or '', 'dead_at', now}
  -- Keep whatever else the entry carried (a malformed entry keeps its raw fields).
  for i = 1, #flat, 2 do
    local k = flat[i]
    if k ~= 'id' and k ~= 'p' and k ~= 'a' and k ~= 't' and k ~= 'e' then
      entry[#entry + 1] = 'x:' .. k
      entry[#entry + 1] = flat[i + 1]
    end
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', unpack(entry))
else
  due = now + tonumber(ARGV[5])
  local blob = cmsgpack.pack({s, ARGV[9], f['id'], f['p'], tonumber(ARGV[6]), tonumber(f['t']) or now, err})
  redis.call('HSET', KEYS[3], f['id'], blob)
  redis.call('ZADD', KEYS[2], due, f['id'])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '16', '*', 'due', due)
end
redis.call('XACK', s, group, id)
redis.call('XDEL', s, id)
return {'ok', due}
