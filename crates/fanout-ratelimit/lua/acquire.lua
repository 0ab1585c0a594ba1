-- acquire.lua: admit one request and its estimated tokens on the (API key, model family) budget
-- that can take it soonest (most headroom on ties), in waiting-room order, together with a
-- cluster-wide concurrency lease; or say how long this waiter should sleep. Runs after the
-- limits.lua prelude.
--
-- Each budget is a GCRA pair (requests, tokens) kept as theoretical arrival times (TAT, ms on the
-- Redis clock), paced at the effective limit less `headroom`. Everything is in milliseconds of
-- budget: a cost of c units at r units/ms "weighs" c / r ms, and `burst` ms of budget may go out
-- at once. A cost is paid before it goes: it fits at time t when
--     tat + weight <= t + burst + late
-- and taking it sets tat = max(tat, t - max(weight - burst, 0) - late) + weight (an idle budget
-- credits a cost its own weight beyond the burst, never more). So a provider window of W seconds,
-- sliding or fixed, holds at most r × (W + burst + 2 × late) of ours plus the weight of the first
-- request in it, whose payment began before the window did (a big one waits for its own weight
-- first; the throughput is the same). That first request is bounded too: a token cost far above
-- the typical one (twice the running average of the budget's costs, or the headroom of a 2 s
-- window if more) pays the excess again after it goes, so nothing that follows can share a short
-- window with it; only outliers such as a panel's summary pay this. `late` lets
-- an admission run a few ms ahead of its schedule, so a waiter that wakes a little late loses
-- nothing; `headroom` covers it together with the jitter between our clock and the provider's.
--
-- A budget whose limits are not known yet (nothing learnt, the provider not heard from) lets one
-- call through first (the probe) and holds the rest until its answer says what the limits are.
--
-- Fairness: every caller enters the waiting room (score: priority, then enqueue time). A waiter
-- may take budget only if the budget fits every waiter ahead of it first (simulated in order on
-- the key each would get) and then itself, right now; and only if a lease is free for each waiter
-- ahead and for itself. Waiters whose expiry passed (dead processes) are purged. Only the first
-- `ahead limit` waiters ahead are played; further back, the rest are counted at the average cost
-- of those played, so the cost of a call stays bounded however long the line.
--
-- KEYS[1]  leases ZSET: lease id -> expiry (ms)
-- KEYS[2]  waiting room ZSET: waiter id -> order score (lowest first)
-- KEYS[3]  waiter expiry ZSET: waiter id -> expiry (ms)
-- KEYS[4]  waiter cost HASH: waiter id -> estimated tokens
-- KEYS[5 .. 4+n]     one bucket HASH per API key of the family: rtat, ttat (ms), paused (ms),
--                    tt (running average of the token costs admitted)
-- KEYS[5+n .. 4+2n]  one limits HASH per API key of the family (see limits.lua)
-- ARGV[1]  waiter id (the lease id once admitted)
-- ARGV[2]  order score
-- ARGV[3]  estimated tokens of this request
-- ARGV[4]  starting requests per minute (configured or the plan's)
-- ARGV[5]  starting tokens per minute
-- ARGV[6]  cap on requests per minute (0 = none)
-- ARGV[7]  cap on tokens per minute (0 = none)
-- ARGV[8]  burst (ms of budget that may go out at once)
-- ARGV[9]  headroom: share of the effective limit left unused
-- ARGV[10] max concurrent leases, cluster-wide
-- ARGV[11] lease ttl (ms)
-- ARGV[12] waiter grace (ms): how long past its wake-up time a waiter keeps its place
-- ARGV[13] concurrency poll base (ms)
-- ARGV[14] most waiters ahead to simulate
-- ARGV[15] 1 to use learnt limits (and probe for them), 0 not
-- ARGV[16] adaptive quiet period (ms)
-- ARGV[17] adaptive recovery time (ms)
-- ARGV[18] lateness allowance (ms): how far ahead of its schedule an admission may run
-- ARGV[19] how long a probe holds the others back at most (ms): a probe that has not answered
--          by then (a slow or hung call) lets another one go
-- Returns: {1, key index (1-based), now ms (string), probe (0/1), after-charge ms (string)} when
--          admitted, or
--          {0, wait ms, reason ("budget" | "paused" | "concurrency" | "learning"), now ms (string)},
--          or {2, tokens per minute (string)} when the request is larger than a minute of every
--          key's token limit

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local leases, room, wexp, wcost = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local me = ARGV[1]
local score = ARGV[2]
local my_tokens = tonumber(ARGV[3])
local start_r, start_t = tonumber(ARGV[4]), tonumber(ARGV[5])
local cap_r, cap_t = tonumber(ARGV[6]), tonumber(ARGV[7])
local burst = tonumber(ARGV[8])
local pace = 1 - tonumber(ARGV[9])
local max_leases = tonumber(ARGV[10])
local lease_ms = tonumber(ARGV[11])
local grace = tonumber(ARGV[12])
local poll = tonumber(ARGV[13])
local ahead_limit = tonumber(ARGV[14])
local learn = tonumber(ARGV[15])
local quiet = tonumber(ARGV[16])
local recovery = tonumber(ARGV[17])
local late = tonumber(ARGV[18])
local probe_ms = tonumber(ARGV[19])

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

local n = (#KEYS - 4) / 2
local rtat, ttat, paused, real_r, real_t, typical = {}, {}, {}, {}, {}, {}
local req_weight, tok_per_ms, probing, probe_busy, base_t = {}, {}, {}, {}, {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[4 + i], 'rtat', 'ttat', 'paused', 'tt')
  rtat[i] = tonumber(v[1]) or 0
  ttat[i] = tonumber(v[2]) or 0
  paused[i] = tonumber(v[3]) or 0
  typical[i] = tonumber(v[4])
  real_r[i], real_t[i] = rtat[i], ttat[i]
  local s = limits_of(KEYS[4 + n + i], now, start_r, start_t, cap_r, cap_t, learn, quiet, recovery)
  req_weight[i] = 60000 / (s.eff[1] * pace)
  tok_per_ms[i] = s.eff[2] * pace / 60000
  base_t[i] = s.base[2]
  probing[i] = s.needs_probe
  probe_busy[i] = s.needs_probe and s.probe > now and s.probe or nil
end

-- A request bigger than a whole minute of every key's token limit (learnt or configured, capped)
-- can never be served: the provider refuses it ("request too large"), and it would leave our
-- budget in debt for minutes. Say so instead of admitting it.
-- While a key's limits are not known, only an explicit cap can say so (the plan's starting
-- number is a guess).
local largest = 0
for i = 1, n do
  if not probing[i] then
    largest = math.max(largest, base_t[i])
  elseif cap_t > 0 then
    largest = math.max(largest, cap_t)
  else
    largest = math.huge
  end
end
if my_tokens > largest then
  if in_room then
    redis.call('ZREM', room, me)
    redis.call('ZREM', wexp, me)
    redis.call('HDEL', wcost, me)
  end
  return {2, string.format('%.0f', largest)}
end

local function earliest(tat, weight)
  return tat + weight - burst - late
end

-- The schedule after taking `weight` at time t: an idle budget credits the cost's own weight
-- (beyond the burst), never more.
local function charged(tat, t, weight)
  return math.max(tat, t - math.max(weight - burst, 0) - late) + weight
end

-- The same for a token cost on key k: an outlier also pays, after it, what it weighs beyond twice
-- the typical cost (or the headroom of a 2 s window, if more).
local outlier_floor = (1 - pace) * 2000
local function after_charge(k, weight)
  local usual = outlier_floor
  if typical[k] then
    usual = math.max(usual, 2 * typical[k] / tok_per_ms[k])
  end
  return math.max(0, weight - usual)
end

local function charged_tokens(k, tat, t, weight)
  return charged(tat, t, weight) + after_charge(k, weight)
end

-- Admitted on key k: charge its real state (not a simulated one), take a lease, leave the room.
local function admit(k, tok_weight, probe)
  local bucket = KEYS[4 + k]
  local new_r = charged(real_r[k], now, req_weight[k])
  local new_t = charged_tokens(k, real_t[k], now, tok_weight)
  local tokens = tok_weight * tok_per_ms[k]
  local tt = typical[k] and typical[k] + (tokens - typical[k]) * 0.05 or tokens
  -- What was admitted this clock minute and the one before (`fanout status` shows the last 60 s
  -- from them): um = minute, ur/ut = its requests/tokens, pr/pt = the previous minute's.
  local u = redis.call('HMGET', bucket, 'um', 'ur', 'ut', 'pr', 'pt')
  local m = math.floor(now / 60000)
  local um, ur, ut = tonumber(u[1]), tonumber(u[2]) or 0, tonumber(u[3]) or 0
  local pr, pt = tonumber(u[4]) or 0, tonumber(u[5]) or 0
  if um ~= m then
    if um == m - 1 then pr, pt = ur, ut else pr, pt = 0, 0 end
    ur, ut = 0, 0
  end
  redis.call('HSET', bucket, 'rtat', string.format('%.3f', new_r), 'ttat', string.format('%.3f', new_t),
    'tt', string.format('%.1f', tt), 'um', m, 'ur', ur + 1, 'ut', string.format('%.0f', ut + tokens),
    'pr', pr, 'pt', pt)
  local idle_after = math.max(new_r, new_t, paused[k]) - now
  redis.call('PEXPIRE', bucket, math.ceil(idle_after + 60000))
  redis.call('ZADD', leases, now + lease_ms, me)
  if in_room then
    redis.call('ZREM', room, me)
    redis.call('ZREM', wexp, me)
    redis.call('HDEL', wcost, me)
  end
  if probe then
    -- This call learns the limits; the others wait for its answer (or its lease's expiry).
    local lkey = KEYS[4 + n + k]
    redis.call('HSET', lkey, 'probe', string.format('%.3f', now + probe_ms), 'prober', me)
    if redis.call('PTTL', lkey) < lease_ms then
      redis.call('PEXPIRE', lkey, lease_ms)
    end
  end
  return {1, k, string.format('%.3f', now), probe and 1 or 0, string.format('%.3f', after_charge(k, tok_weight))}
end

-- Limits not known on some key: the first caller to come, whatever its place, is the probe.
-- While every key's probe is out, nobody else can be scheduled: look again soon.
local known, soonest_answer = false, nil
for i = 1, n do
  if probing[i] and not probe_busy[i] and paused[i] <= now then
    return admit(i, my_tokens / tok_per_ms[i], true)
  end
  if not probing[i] then
    known = true
  elseif probe_busy[i] then
    soonest_answer = math.min(soonest_answer or probe_busy[i], probe_busy[i])
  end
end
if not known and soonest_answer then
  return wait_reply(math.min(soonest_answer - now, 50 + 5 * rank, 1000), 'learning')
end

-- The key on which `tokens` fits soonest (most headroom on ties), when, and its weights.
local function pick(tokens)
  local best, best_t, best_room, best_tw = nil, nil, nil, nil
  for i = 1, n do
    local tok_weight = tokens / tok_per_ms[i]
    local at = math.max(now, paused[i], earliest(rtat[i], req_weight[i]), earliest(ttat[i], tok_weight))
    if probe_busy[i] then
      -- Its limits are being learnt: another key goes first.
      at = math.max(at, probe_busy[i])
    end
    local room_left = burst - math.max(0, math.max(rtat[i], ttat[i]) - now)
    if best == nil or at < best_t or (at == best_t and room_left > best_room) then
      best, best_t, best_room, best_tw = i, at, room_left, tok_weight
    end
  end
  return best, best_t, best_tw
end

-- Play the waiters ahead in order on a copy of the state.
local extra = 0
if rank > 0 then
  local ahead = redis.call('ZRANGE', room, 0, math.min(rank, ahead_limit) - 1)
  local costs = redis.call('HMGET', wcost, unpack(ahead))
  local wakes = redis.call('ZMSCORE', wexp, unpack(ahead))
  local played = 0
  for j = 1, #ahead do
    local cost = tonumber(costs[j]) or 1
    -- A waiter too large for any key will be turned away, not admitted: it holds up nobody.
    if cost <= largest then
      local k, at, tok_weight = pick(cost)
      -- A waiter asleep past the turn it would get cannot use it: the turn goes to whoever is
      -- awake behind it, and it takes the next one when it comes back (it keeps its rank).
      local wake = (tonumber(wakes[j]) or 0) - grace
      if wake <= math.max(at, now) + late then
        rtat[k] = charged(rtat[k], at, req_weight[k])
        ttat[k] = charged_tokens(k, ttat[k], at, tok_weight)
        played = played + math.max(req_weight[k], tok_weight)
      end
    end
  end
  if rank > #ahead then
    extra = (rank - #ahead) * played / #ahead / n
  end
end

local k, at, tok_weight = pick(my_tokens)
at = at + extra
if at > now then
  local reason = 'budget'
  if at == paused[k] then
    reason = 'paused'
  elseif probe_busy[k] and at == probe_busy[k] then
    reason = 'learning'
  end
  return wait_reply(at - now, reason)
end

return admit(k, tok_weight, false)
