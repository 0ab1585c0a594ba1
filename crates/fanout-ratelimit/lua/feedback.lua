-- feedback.lua: apply what the provider said about one (key, family) budget, for every process.
-- Runs after the limits.lua prelude.
--
-- Learning: limits the provider advertised (`x-ratelimit-limit-*`) are kept in the limits HASH
-- for every process, with a TTL that each confirmation renews; an answer that advertises nothing
-- marks the provider as not advertising (until the TTL), and either ends the probe.
--
-- A pause (a 429's retry-after) sets the shared `paused` time that acquire.lua honours, and a 429
-- empties both buckets. A 429 for a request admitted after the last decrease of that dimension
-- (one the schedule did not expect) lowers the dimension's rate: the adaptive ceiling becomes
-- the effective limit × `decrease`; earlier admissions, already in flight at the decrease, do not
-- lower it again.
--
-- A `remaining` reading (as a fraction of the per-minute limit) lowers our availability when it is
-- well below our own view: the reading is as old as the call that carried it, so only a gap
-- larger than `tolerance` of the burst is taken as news (someone else is using the key); then the
-- TAT moves so that what we think is available matches the provider, and never further than the
-- provider's own reset time.
--
-- KEYS[1]  bucket HASH: rtat, ttat (ms), paused (ms)
-- KEYS[2]  limits HASH (see limits.lua)
-- ARGV[1]  pause (ms from now; 0 = none)
-- ARGV[2]  provider's remaining requests as a fraction of the limit (-1 = unknown)
-- ARGV[3]  provider's remaining tokens as a fraction of the limit (-1 = unknown)
-- ARGV[4]  provider's reset of requests (ms; -1 = unknown)
-- ARGV[5]  provider's reset of tokens (ms; -1 = unknown)
-- ARGV[6]  burst (ms)
-- ARGV[7]  tolerance (fraction of the burst)
-- ARGV[8]  1 if the provider refused a request for its rate (a 429): both buckets count as empty
--          now, so the end of the pause does not let out a whole burst it has not refilled yet
-- ARGV[9..12]  starting requests and tokens per minute, caps (0 = none), as in acquire.lua
-- ARGV[13] 1 to learn limits, 0 not
-- ARGV[14] adaptive quiet period (ms)
-- ARGV[15] adaptive recovery time (ms)
-- ARGV[16] advertised requests per minute (-1 = not advertised)
-- ARGV[17] advertised tokens per minute (-1 = not advertised)
-- ARGV[18] 1 if the provider answered at all (an HTTP status), 0 for a transport failure
-- ARGV[19] dimensions to lower on this 429: 0 none, 1 requests, 2 tokens, 3 both
-- ARGV[20] when the refused request was admitted (ms, Redis clock; -1 = unknown)
-- ARGV[21] adaptive decrease factor
-- ARGV[22] TTL of learnt state (ms)
-- Returns: {paused (0/1), requests lowered (0/1), tokens lowered (0/1), limits learnt or changed
--           (0/1), new requests ceiling or 0, new tokens ceiling or 0, effective rpm, effective tpm}
--           (numbers as strings where fractional)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local bucket, lkey = KEYS[1], KEYS[2]
local pause = tonumber(ARGV[1])
local burst = tonumber(ARGV[6])
local tolerance = tonumber(ARGV[7]) * burst
local learn = tonumber(ARGV[13])
local quiet, recovery = tonumber(ARGV[14]), tonumber(ARGV[15])
local advertised = {tonumber(ARGV[16]), tonumber(ARGV[17])}
local responded = tonumber(ARGV[18]) == 1
local lower = tonumber(ARGV[19])
local admitted_at = tonumber(ARGV[20])
local decrease = tonumber(ARGV[21])
local ttl = tonumber(ARGV[22])
local start_r, start_t = tonumber(ARGV[9]), tonumber(ARGV[10])
local cap_r, cap_t = tonumber(ARGV[11]), tonumber(ARGV[12])

local out = {0, 0, 0, 0, 0, 0}
local limits_touched = false

-- Learn what the provider advertised; any answer ends a probe.
local before = limits_of(lkey, now, start_r, start_t, cap_r, cap_t, learn, quiet, recovery)
if learn == 1 then
  local fields = {'lr', 'lt'}
  local before = redis.call('HMGET', lkey, 'lr', 'lt')
  local any = false
  for d = 1, 2 do
    if advertised[d] >= 1 then
      any = true
      if tonumber(before[d]) ~= advertised[d] then
        redis.call('HSET', lkey, fields[d], advertised[d])
        out[4] = 1
      end
    end
  end
  if any then
    redis.call('HDEL', lkey, 'noadv', 'probe', 'prober')
    limits_touched = true
  elseif responded and not before[1] and not before[2] then
    if redis.call('HSETNX', lkey, 'noadv', 1) == 1 then
      out[4] = 1
    end
    redis.call('HDEL', lkey, 'probe', 'prober')
    limits_touched = true
  elseif not responded then
    -- The probe never reached the provider: let the next call try.
    redis.call('HDEL', lkey, 'probe', 'prober')
  end
end

local s = limits_of(lkey, now, start_r, start_t, cap_r, cap_t, learn, quiet, recovery)

-- Lower the rate of the refused dimension(s), once per decrease.
if lower > 0 then
  local fields = {{'ar', 'dr'}, {'at', 'dt'}}
  for d = 1, 2 do
    local wanted = (d == 1 and (lower == 1 or lower == 3)) or (d == 2 and lower >= 2)
    if wanted and (admitted_at < 0 or admitted_at >= s.decreased[d]) then
      local floor = math.max(1, s.base[d] * 0.01)
      local ceiling = math.max(floor, s.eff[d] * decrease)
      redis.call('HSET', lkey, fields[d][1], string.format('%.3f', ceiling),
        fields[d][2], string.format('%.3f', now))
      s.eff[d] = ceiling
      out[4 + d] = string.format('%.3f', ceiling)
      limits_touched = true
    end
  end
end
if limits_touched then
  redis.call('PEXPIRE', lkey, ttl)
end

local v = redis.call('HMGET', bucket, 'rtat', 'ttat', 'paused')
local state = {tonumber(v[1]) or 0, tonumber(v[2]) or 0}
local paused = tonumber(v[3]) or 0
local horizon = 0
local bucket_changed = false

if pause > 0 and now + pause > paused then
  paused = now + pause
  redis.call('HSET', bucket, 'paused', string.format('%.3f', paused))
  out[1] = 1
  bucket_changed = true
end

local fields = {'rtat', 'ttat'}
if out[4] == 1 then
  -- New limits: what the bucket owes (in ms at the old rate) is the same budget at the new rate,
  -- so the probe admitted at the starting values does not hold the next calls back.
  for d = 1, 2 do
    if state[d] > now and before.eff[d] ~= s.eff[d] then
      state[d] = now + (state[d] - now) * before.eff[d] / s.eff[d]
      redis.call('HSET', bucket, fields[d], string.format('%.3f', state[d]))
      bucket_changed = true
      horizon = math.max(horizon, state[d] - now)
    end
  end
end
if tonumber(ARGV[8]) == 1 then
  for d = 1, 2 do
    if state[d] < now + burst then
      state[d] = now + burst
      redis.call('HSET', bucket, fields[d], string.format('%.3f', state[d]))
      bucket_changed = true
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
        out[1 + d] = 1
        bucket_changed = true
        horizon = math.max(horizon, ahead)
      end
    end
  end
end

if bucket_changed then
  local need = math.ceil(math.max(horizon, paused - now) + 60000)
  if redis.call('PTTL', bucket) < need then
    redis.call('PEXPIRE', bucket, need)
  end
end
table.insert(out, string.format('%.3f', s.eff[1]))
table.insert(out, string.format('%.3f', s.eff[2]))
return out
