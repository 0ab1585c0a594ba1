-- Enqueue a batch of jobs in one round trip.
--
-- KEYS[1]  registry   ZSET  stream key -> serving order (lower first)
-- KEYS[2]  ready      ZSET  streams that may hold undelivered entries, same scores
-- KEYS[3]  delayed    ZSET  interactive lane: job id -> due ms
-- KEYS[4]  delayed    ZSET  batch lane: job id -> due ms
-- KEYS[5]  delayed-jobs HASH job id -> cmsgpack {stream, score, id, payload, attempt, enqueued_at, error}
-- KEYS[6]  wake       STREAM poked once per call that added a job (blocked claimers wait on it)
-- then per job i = 0..n-1:
-- KEYS[7+2i] idempotency key, KEYS[8+2i] stream key
--
-- ARGV[1]  idempotency TTL in seconds
-- ARGV[2]  consumer group name
-- per job i = 0..n-1, ARGV[3+5i ..]: job id, lane index (0 interactive, 1 batch), registry score,
--          payload (JSON text), not_before ms (0 = now)
--
-- Returns: one integer per job: 1 new (ready), 2 new (delayed), 0 duplicate.
-- Idempotent: a repeated call finds the idempotency keys and reports duplicates.

local ttl = ARGV[1]
local group = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local checked = {}
local function ensure_stream(stream, score)
  if checked[stream] then return end
  checked[stream] = true
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    redis.call('ZADD', KEYS[1], score, stream)
  end
end

local marked = {}
local ready, earliest_due = 0, nil
local out = {}
local n = (#KEYS - 6) / 2
for i = 0, n - 1 do
  local idem = KEYS[7 + 2 * i]
  local stream = KEYS[8 + 2 * i]
  local base = 3 + 5 * i
  local id, lane, score, payload = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3]
  local not_before = tonumber(ARGV[base + 4])
  if not redis.call('SET', idem, '1', 'NX', 'EX', ttl) then
    out[#out + 1] = 0
  elseif not_before > now then
    local blob = cmsgpack.pack({stream, score, id, payload, 1, now, ''})
    redis.call('HSET', KEYS[5], id, blob)
    redis.call('ZADD', KEYS[3 + lane], not_before, id)
    if not earliest_due or not_before < earliest_due then earliest_due = not_before end
    out[#out + 1] = 2
  else
    ensure_stream(stream, score)
    redis.call('XADD', stream, '*', 'id', id, 'p', payload, 'a', '1', 't', now)
    if not marked[stream] then
      redis.call('ZADD', KEYS[2], score, stream)
      marked[stream] = true
    end
    ready = ready + 1
    out[#out + 1] = 1
  end
end
-- One poke per call: 'due' makes claimers look at the delayed sets, 'ready' only at streams.
if earliest_due then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '16', '*', 'due', earliest_due)
elseif ready > 0 then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '16', '*', 'ready', ready)
end
return out
