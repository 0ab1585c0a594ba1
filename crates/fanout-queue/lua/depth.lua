-- Queue depth per stream, read-only.
--
-- KEYS[1]  registry ZSET   KEYS[2] delayed interactive   KEYS[3] delayed batch
-- KEYS[4]  dead interactive   KEYS[5] dead batch
-- ARGV[1]  group
--
-- Returns {now ms, delayed interactive, delayed batch, dead interactive, dead batch,
--          {stream, length, pending, lag (-1 unknown), oldest ready entry id or ''}, ...}

local group = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
  redis.call('XLEN', KEYS[4]), redis.call('XLEN', KEYS[5])}
for _, s in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local len = redis.call('XLEN', s)
  local pending, lag, last = 0, len, '0-0'
  local groups = redis.pcall('XINFO', 'GROUPS', s)
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      local m = {}
      for i = 1, #g, 2 do m[g[i]] = g[i + 1] end
      if m['name'] == group then
        pending = tonumber(m['pending'])
        last = m['last-delivered-id']
        if m['lag'] then lag = tonumber(m['lag']) else lag = -1 end
      end
    end
  end
  local first = redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', 1)
  local oldest = ''
  if first[1] then oldest = first[1][1] end
  out[#out + 1] = {s, len, pending, lag, oldest}
end
return out
