-- Heartbeat: reset the idle time of entries this consumer still owns.
--
-- KEYS[i]    stream of entry i
-- ARGV[1]    group      ARGV[2] consumer
-- ARGV[2+i]  entry id of entry i
--
-- Returns one integer per entry: 1 extended, 0 no longer ours (reclaimed by another consumer,
-- settled, or removed). Idempotent.

local group, consumer = ARGV[1], ARGV[2]
local out = {}
for i, s in ipairs(KEYS) do
  local id = ARGV[2 + i]
  local p = redis.call('XPENDING', s, group, id, id, 1)
  if p[1] and p[1][2] == consumer then
    -- JUSTID: resets the idle time without counting a delivery.
    local c = redis.call('XCLAIM', s, group, consumer, 0, id, 'JUSTID')
    if c[1] then out[i] = 1 else out[i] = 0 end
  else
    out[i] = 0
  end
end
return out
