-- Put dead letters back in their streams as new jobs with fresh attempts, or drop them. Each
-- entry is handled once: a second replay (or drop) of the same entry finds it gone and does
-- nothing, so replaying twice runs a job once more, not twice.
--
-- KEYS[1]  dead STREAM of the lane      KEYS[2]  registry ZSET     KEYS[3]  ready ZSET
-- KEYS[4]  wake STREAM
-- ARGV[1]  group        ARGV[2]  mode: 'replay' or 'drop'
-- ARGV[3..] triples: dead entry id, stream to replay into, its serving-order score
--
-- Returns one flag per triple: 1 done, 0 the entry was gone.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out, woke = {}, 0
for i = 3, #ARGV, 3 do
  local id, stream, score = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if not e[1] then
    out[#out + 1] = 0
  else
    if ARGV[2] == 'replay' then
      local f = {}
      local flat = e[1][2]
      for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
      if redis.call('EXISTS', stream) == 0 then
        redis.call('XGROUP', 'CREATE', stream, ARGV[1], '0', 'MKSTREAM')
      end
      redis.call('ZADD', KEYS[2], score, stream)
      redis.call('XADD', stream, '*', 'id', f['job'] or '', 'p', f['payload'] or '', 'a', 1, 't', now)
      redis.call('ZADD', KEYS[3], score, stream)
      woke = woke + 1
    end
    redis.call('XDEL', KEYS[1], id)
    out[#out + 1] = 1
  end
end
if woke > 0 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '16', '*', 'ready', woke)
end
return out
