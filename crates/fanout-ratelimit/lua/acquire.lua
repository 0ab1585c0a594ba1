-- acquire.lua: admit one request and its estimated tokens on the (API key, model family) budget
-- that can take it soonest (most headroom on ties), in waiting-room order, together with a
-- cluster-wide concurrency lease; or say how long this waiter should sleep.
--
-- Each budget is a GCRA pair (requests, tokens) kept as theoretical arrival times (TAT, ms on the
-- Redis clock). Everything is in milliseconds of budget: a cost of c units at r units/ms "weighs"
-- c / r ms, and the bucket holds `burst` ms. A cost fits at time t when
--     t >= tat - burst + min(weight, burst) + skew
-- (a cost bigger than the bucket fits once the bucket is full, then leaves it in debt), and taking
-- it sets tat = max(tat, t) + weight. `skew` keeps our schedule a little inside the provider's so
-- that jitter between our admission and the provider seeing the request cannot earn a 429.
--
-- Fairness: every caller enters the waiting room (score: priority, then enqueue time). A waiter
-- may take budget only if the budget fits every waiter ahead of it first (simulated in order on
-- the key each would get) and then itself, right now; and only if a lease is free for each waiter
-- ahead and for itself. Waiters whose expiry passed (dead processes) are purged.
--
-- KEYS[1]  leases ZSET: lease id -> expiry (ms)
-- KEYS[2]  waiting room ZSET: waiter id -> order score (lowest first)
-- KEYS[3]  waiter expiry ZSET: waiter id -> expiry (ms)
-- KEYS[4]  waiter cost HASH: waiter id -> estimated tokens
-- KEYS[5..] one bucket HASH per API key of the family: rtat, ttat (ms), paused (ms)
-- ARGV[1]  waiter id (the lease id once admitted)
-- ARGV[2]  order score
-- ARGV[3]  estimated tokens of this request
-- ARGV[4]  requests per minute
-- ARGV[5]  tokens per minute
-- ARGV[6]  burst (ms of budget the bucket holds)
-- ARGV[7]  skew allowance (ms)
-- ARGV[8]  max concurrent leases, cluster-wide
-- ARGV[9]  lease ttl (ms)
-- ARGV[10] waiter grace (ms): how long past its wake-up time a waiter keeps its place
-- ARGV[11] concurrency poll base (ms)
-- ARGV[12] most waiters ahead to simulate
-- Returns: {1, key index (1-based), now ms (string)} when admitted, or
--          {0, wait ms, reason ("budget" | "paused" | "concurrency"), now ms (string)}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local leases, room, wexp, wcost = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local me = ARGV[1]
local score = ARGV[2]
local my_tokens = tonumber(ARGV[3])
local rpm = tonumber(ARGV[4])
local tpm = tonumber(ARGV[5])
local burst = tonumber(ARGV[6])
local skew = tonumber(ARGV[7])
local max_leases = tonumber(ARGV[8])
local lease_ms = tonumber(ARGV[9])
local grace = tonumber(ARGV[10])
local poll = tonumber(ARGV[11])
local ahead_limit = tonumber(ARGV[12])

local req_weight = 60000 / rpm
local tok_per_ms = tpm / 60000

-- Purge expired leases; with anyone waiting, purge dead waiters and take a place in line.
-- An empty room (the common case while the budget does not bind) needs no place: nobody is ahead.
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local rank = 0
local in_room = false
if redis.call('ZCARD', room) > 0 then
  local dead = redis.call('ZRANGEBYSCORE', wexp, '-inf', now, 'LIMIT', 0, 1000)
  if #dead > 0 then
    redis.call('ZREM', room, unpack(dead))
    redis.call('HDEL', wcost, unpack(dead))
    redis.call('ZREM', wexp, unpack(dead))
  end
  redis.call('ZADD', room, score, me)
  rank = redis.call('ZRANK', room, me)
  in_room = true
end

local function wait_reply(wait, reason)
  wait = math.max(1, math.ceil(wait))
  if not in_room then
    redis.call('ZADD', room, score, me)
  end
  redis.call('HSET', wcost, me, my_tokens)
  redis.call('ZADD', wexp, now + wait + grace, me)
  return {0, wait, reason, string.format('%.3f', now)}
end

local free = max_leases - redis.call('ZCARD', leases)
if rank >= free then
  -- Releases are not scheduled, so poll: the further back in line, the slower.
  local behind = rank - math.max(free, 0) + 1
  return wait_reply(math.min(poll * behind, 20 * poll), 'concurrency')
end

local n = #KEYS - 4
local rtat, ttat, paused, real_r, real_t = {}, {}, {}, {}, {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[4 + i], 'rtat', 'ttat', 'paused')
  rtat[i] = tonumber(v[1]) or 0
  ttat[i] = tonumber(v[2]) or 0
  paused[i] = tonumber(v[3]) or 0
  real_r[i], real_t[i] = rtat[i], ttat[i]
end

local function earliest(tat, weight)
  return tat - burst + math.min(weight, burst) + skew
end

-- The key on which `tokens` fits soonest (most headroom on ties), and when.
local function pick(tokens)
  local tok_weight = tokens / tok_per_ms
  local best, best_t, best_room = nil, nil, nil
  for i = 1, n do
    local at = math.max(now, paused[i], earliest(rtat[i], req_weight), earliest(ttat[i], tok_weight))
    local room_left = burst - math.max(0, math.max(rtat[i], ttat[i]) - now)
    if best == nil or at < best_t or (at == best_t and room_left > best_room) then
      best, best_t, best_room = i, at, room_left
    end
  end
  return best, best_t, tok_weight
end

-- Play the waiters ahead in order on a copy of the state.
if rank > 0 then
  local ahead = redis.call('ZRANGE', room, 0, math.min(rank, ahead_limit) - 1)
  local costs = redis.call('HMGET', wcost, unpack(ahead))
  for j = 1, #ahead do
    local k, at, tok_weight = pick(tonumber(costs[j]) or 1)
    rtat[k] = math.max(rtat[k], at) + req_weight
    ttat[k] = math.max(ttat[k], at) + tok_weight
  end
end

local k, at, tok_weight = pick(my_tokens)
if at > now then
  local reason = 'budget'
  if at == paused[k] then
    reason = 'paused'
  end
  return wait_reply(at - now, reason)
end

-- Admitted: charge the real state of key k (not the simulated one).
local bucket = KEYS[4 + k]
local new_r = math.max(real_r[k], now) + req_weight
local new_t = math.max(real_t[k], now) + tok_weight
redis.call('HSET', bucket, 'rtat', string.format('%.3f', new_r), 'ttat', string.format('%.3f', new_t))
local idle_after = math.max(new_r, new_t, paused[k]) - now
redis.call('PEXPIRE', bucket, math.ceil(idle_after + 60000))
redis.call('ZADD', leases, now + lease_ms, me)
if in_room then
  redis.call('ZREM', room, me)
  redis.call('ZREM', wexp, me)
  redis.call('HDEL', wcost, me)
end
return {1, k, string.format('%.3f', now)}
