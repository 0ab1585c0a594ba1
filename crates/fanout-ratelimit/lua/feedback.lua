-- feedback.lua: apply what the provider said about one (key, family) budget, for every process.
--
-- A pause (a 429's retry-after) sets the shared `paused` time that acquire.lua honours, and a 429
-- empties both buckets. A
-- `remaining` reading (as a fraction of the per-minute limit) lowers our availability when it is
-- well below our own view: the reading is as old as the call that carried it, so only a gap
-- larger than `tolerance` of the burst is taken as news (someone else is using the key); then the
-- TAT moves so that what we think is available matches the provider, and never further than the
-- provider's own reset time.
--
-- KEYS[1]  bucket HASH: rtat, ttat (ms), paused (ms)
-- ARGV[1]  pause (ms from now; 0 = none)
-- ARGV[2]  provider's remaining requests as a fraction of the limit (-1 = unknown)
-- ARGV[3]  provider's remaining tokens as a fraction of the limit (-1 = unknown)
-- ARGV[4]  provider's reset of requests (ms; -1 = unknown)
-- ARGV[5]  provider's reset of tokens (ms; -1 = unknown)
-- ARGV[6]  burst (ms)
-- ARGV[7]  tolerance (fraction of the burst)
-- ARGV[8]  1 if the provider refused a request (a 429): both buckets count as empty now, so the
--          end of the pause does not let out a whole burst the provider has not refilled yet
-- Returns: {paused (0/1), requests lowered (0/1), tokens lowered (0/1)}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local bucket = KEYS[1]
local pause = tonumber(ARGV[1])
local burst = tonumber(ARGV[6])
local tolerance = tonumber(ARGV[7]) * burst

local v = redis.call('HMGET', bucket, 'rtat', 'ttat', 'paused')
local state = {tonumber(v[1]) or 0, tonumber(v[2]) or 0}
local paused = tonumber(v[3]) or 0
local changed = {0, 0, 0}
local horizon = 0

if pause > 0 and now + pause > paused then
  paused = now + pause
  redis.call('HSET', bucket, 'paused', string.format('%.3f', paused))
  changed[1] = 1
end

local fields = {'rtat', 'ttat'}
if tonumber(ARGV[8]) == 1 then
  for d = 1, 2 do
    if state[d] < now + burst then
      state[d] = now + burst
      redis.call('HSET', bucket, fields[d], string.format('%.3f', state[d]))
      changed[1 + d] = 1
      horizon = math.max(horizon, burst)
    end
  end
end
for d = 1, 2 do
  local fraction = tonumber(ARGV[1 + d])
  if fraction >= 0 then
    local ours = burst - math.max(0, state[d] - now)
    local theirs = math.min(1, fraction) * burst
    if ours - theirs > tolerance then
      local ahead = burst - theirs
      local reset = tonumber(ARGV[3 + d])
      if reset >= 0 then
        ahead = math.min(ahead, reset)
      end
      local new_tat = now + ahead
      if new_tat > state[d] then
        redis.call('HSET', bucket, fields[d], string.format('%.3f', new_tat))
        changed[1 + d] = 1
        horizon = math.max(horizon, ahead)
      end
    end
  end
end

if changed[1] == 1 or changed[2] == 1 or changed[3] == 1 then
  local need = math.ceil(math.max(horizon, paused - now) + 60000)
  if redis.call('PTTL', bucket) < need then
    redis.call('PEXPIRE', bucket, need)
  end
end
return changed
