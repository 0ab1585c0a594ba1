-- settle.lua: after the call, release its concurrency lease and settle its tokens to the real
-- usage. Idempotent: the token difference is applied only by the call that removes the lease, so
-- a retried settle (or one after the lease expired) changes nothing.
--
-- A refund of unused tokens moves the token TAT back by the refund's weight, never before now
-- (the bucket never holds more than its burst); an extra charge moves it forward by its weight
-- (debt that later requests wait out, as the provider will make them); a refused call gives back
-- all it took (an outlier's after-charge included).
--
-- KEYS[1]  leases ZSET: lease id -> expiry (ms)
-- KEYS[2]  bucket HASH of the (key, family) that admitted the request: rtat, ttat, paused
-- KEYS[3]  limits HASH of that (key, family): a probe this call was is over (see limits.lua)
-- ARGV[1]  lease id
-- ARGV[2]  token difference to apply: actual - estimate (negative = refund, 0 = none)
-- ARGV[3]  1 if the provider refused the call and counted nothing: the request goes back too
-- ARGV[4..7]  starting requests and tokens per minute, caps (0 = none), as in acquire.lua
-- ARGV[8]  1 to use learnt limits, 0 not
-- ARGV[9]  adaptive quiet period (ms)
-- ARGV[10] adaptive recovery time (ms)
-- ARGV[11] headroom
-- ARGV[12] a refused call's after-charge to give back (ms; acquire's reply), else 0
-- Weights are at the current effective limits (after the probe that was this call, they are
-- the learnt ones: the schedule was rescaled to them).
-- Returns: 1 if the lease was released by this call (and the difference applied), else 0

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[3], 'prober') == ARGV[1] then
  redis.call('HDEL', KEYS[3], 'probe', 'prober')
end
if removed == 0 then
  return 0
end

local s = limits_of(KEYS[3], now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]))
local pace = 1 - tonumber(ARGV[11])
local request_back = 60000 / (s.eff[1] * pace)
local tok_per_ms = s.eff[2] * pace / 60000

-- A refused call gives back exactly what it took, as if it had not been admitted (a schedule in
-- the past is an idle budget: admission credits it no more than a full bucket).
local refused = tonumber(ARGV[3]) == 1
if refused then
  local rtat = tonumber(redis.call('HGET', KEYS[2], 'rtat')) or 0
  redis.call('HSET', KEYS[2], 'rtat', string.format('%.3f', rtat - request_back))
end

local delta = tonumber(ARGV[2])
if delta ~= 0 then
  local weight = delta / tok_per_ms
  local ttat = tonumber(redis.call('HGET', KEYS[2], 'ttat')) or 0
  local new_t
  if weight > 0 then
    -- As if the call had weighed that much more when admitted: the schedule moves by it (an
    -- idle budget, its schedule in the past, has room for it already).
    new_t = ttat + weight
  elseif refused then
    -- Also what an outlier paid after it (see acquire.lua).
    new_t = ttat + weight - tonumber(ARGV[12])
  elseif ttat > now then
    new_t = math.max(ttat + weight, now)
  end
  if new_t then
    redis.call('HSET', KEYS[2], 'ttat', string.format('%.3f', new_t))
    local ttl = redis.call('PTTL', KEYS[2])
    local need = math.ceil(new_t - now + 60000)
    if ttl < need then
      redis.call('PEXPIRE', KEYS[2], need)
    end
  end
end
return 1
