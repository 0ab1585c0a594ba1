-- snapshot.lua: read the budget state for metrics, on the Redis clock. Runs after the limits.lua
-- prelude. Its one write: an adaptive ceiling that has climbed back to the limit is removed, and
-- reported (so exactly one process logs the recovery).
--
-- KEYS[1]  leases ZSET: lease id -> expiry (ms)
-- KEYS[2 .. 1+n]     bucket HASHes: rtat, ttat, paused
-- KEYS[2+n .. 1+2n]  limits HASHes (see limits.lua), one per bucket
-- KEYS[2+2n ..]      waiter expiry ZSETs, one per family
-- ARGV[1]  n, the number of bucket keys
-- ARGV[2]  1 to use learnt limits, 0 not
-- ARGV[3]  adaptive quiet period (ms)
-- ARGV[4]  adaptive recovery time (ms)
-- ARGV[5 ..] per bucket: starting rpm, starting tpm, cap rpm, cap tpm (0 = none)
-- Returns: {now ms (string), leases in use,
--           n x {rtat, ttat, paused, effective rpm, effective tpm, learnt rpm, learnt tpm,
--                recovered (0/1), requests and tokens admitted in the last 60 s}
--                (strings or false),
--           live waiters per family...}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = tonumber(ARGV[1])
local learn = tonumber(ARGV[2])
local quiet, recovery = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {string.format('%.3f', now), redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')}
for i = 1, n do
  local state = redis.call('HMGET', KEYS[1 + i], 'rtat', 'ttat', 'paused')
  local a = 4 + (i - 1) * 4
  local lkey = KEYS[1 + n + i]
  local s = limits_of(lkey, now, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), learn, quiet, recovery)
  local recovered = 0
  local fields = {'ar', 'at'}
  for d = 1, 2 do
    if s.ceiling[d] and s.eff[d] >= s.base[d] then
      redis.call('HDEL', lkey, fields[d])
      recovered = 1
    end
  end
  local learnt = {false, false}
  if learn == 1 then
    learnt = {s.learned[1] or false, s.learned[2] or false}
  end
  table.insert(state, string.format('%.3f', s.eff[1]))
  table.insert(state, string.format('%.3f', s.eff[2]))
  table.insert(state, learnt[1] and tostring(learnt[1]) or false)
  table.insert(state, learnt[2] and tostring(learnt[2]) or false)
  table.insert(state, recovered)
  -- Admitted in the last 60 s: this minute's count plus the part of the previous minute's that
  -- is still inside the window (acquire.lua keeps both).
  local u = redis.call('HMGET', KEYS[1 + i], 'um', 'ur', 'ut', 'pr', 'pt')
  local m, frac = math.floor(now / 60000), (now % 60000) / 60000
  local um = tonumber(u[1])
  local ur, ut, pr, pt = tonumber(u[2]) or 0, tonumber(u[3]) or 0, tonumber(u[4]) or 0, tonumber(u[5]) or 0
  local used_r, used_t = 0, 0
  if um == m then
    used_r, used_t = ur + pr * (1 - frac), ut + pt * (1 - frac)
  elseif um == m - 1 then
    used_r, used_t = ur * (1 - frac), ut * (1 - frac)
  end
  table.insert(state, string.format('%.1f', used_r))
  table.insert(state, string.format('%.1f', used_t))
  table.insert(out, state)
end
for i = 2 + 2 * n, #KEYS do
  table.insert(out, redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf'))
end
return out
