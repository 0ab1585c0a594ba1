-- Claim up to `max` jobs for one consumer, in serving order (interactive before batch, higher
-- priority first, FIFO within a stream). Never returns more than `max` entries.
--
-- KEYS[1]  registry     ZSET  stream key -> serving order
-- KEYS[2]  ready        ZSET  streams that may hold undelivered entries
-- KEYS[3]  delayed      ZSET  interactive lane
-- KEYS[4]  delayed      ZSET  batch lane
-- KEYS[5]  delayed-jobs HASH
-- KEYS[6]  wake         STREAM
-- KEYS[7]  dead         STREAM interactive lane
-- KEYS[8]  dead         STREAM batch lane
-- KEYS[9]  workers      ZSET  consumer -> ms after which its worker counts as gone (beat.lua)
-- KEYS[10] worker-info  HASH  consumer -> JSON
-- KEYS[11] last-beat    STRING when any worker last beat (beat.lua)
-- Stream keys are read from the registry (they share the hash tag of KEYS[1]).
--
-- ARGV[1]  group            ARGV[2]  consumer        ARGV[3]  max (>= 1)
-- ARGV[4]  promote due delayed jobs first (0/1)
-- ARGV[5]  reclaim idle entries and remove dead consumers (0/1)
-- ARGV[6]  idle ms after which a pending entry is reclaimed (visibility timeout)
-- ARGV[7]  max deliveries   ARGV[8]  dead-letter MAXLEN
-- ARGV[9]  idle ms after which a consumer with nothing pending is removed
-- ARGV[10] when nothing was claimed, return the id to block on (0/1)
-- ARGV[11] with ARGV[5]: also remove dead consumers (0/1)
-- ARGV[12] take over the jobs of workers whose liveness beat lapsed (0/1)
--
-- Returns {entries, next_due, block, dead}:
--   entries  = { {stream, entry id, deliveries, {field, value, ...}}, ... }
--   next_due = earliest delayed due time in ms, -1 if none, -2 if not looked at
--   block    = {wake, last id} when entries is empty and ARGV[10] = 1: every call that makes a
--              job ready adds to the wake stream, so blocking there after this script misses
--              nothing
--   dead     = { {payload, reason, stream}, ... } of the entries dead-lettered for too many
--              deliveries, so the worker can record the failure where users see it

local group, consumer = ARGV[1], ARGV[2]
local remaining = tonumber(ARGV[3])
local min_idle = tonumber(ARGV[6])
local max_deliveries = tonumber(ARGV[7])
local dead_max = ARGV[8]
local dead_idle = tonumber(ARGV[9])

local now
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

local registry
local function streams()
  if not registry then registry = redis.call('ZRANGE', KEYS[1], 0, -1) end
  return registry
end

local function lane_of(stream)
  if string.find(stream, ':stream:batch:', 1, true) then return 2 end
  return 1
end

local function ensure_stream(stream, score)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  end
  redis.call('ZADD', KEYS[1], score, stream)
end

local function to_map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

local out = {}
local dead = {}
local next_due = -2
local promoted = 0

-- 1. Move due delayed jobs back to their streams.
if ARGV[4] == '1' then
  next_due = -1
  for lane = 1, 2 do
    local dk = KEYS[2 + lane]
    local head = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
    if head[1] and tonumber(head[2]) <= clock() then
      local due = redis.call('ZRANGEBYSCORE', dk, '-inf', clock(), 'LIMIT', 0, 200)
      local blobs = redis.call('HMGET', KEYS[5], unpack(due))
      for i = 1, #due do
        if blobs[i] then
          local j = cmsgpack.unpack(blobs[i])
          local stream, score = j[1], j[2]
          ensure_stream(stream, score)
          if j[7] ~= '' then
            redis.call('XADD', stream, '*', 'id', j[3], 'p', j[4], 'a', j[5], 't', j[6], 'e', j[7])
          else
            redis.call('XADD', stream, '*', 'id', j[3], 'p', j[4], 'a', j[5], 't', j[6])
          end
          redis.call('ZADD', KEYS[2], score, stream)
          promoted = promoted + 1
        end
      end
      redis.call('ZREM', dk, unpack(due))
      redis.call('HDEL', KEYS[5], unpack(due))
      head = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
    end
    if head[1] then
      local d = tonumber(head[2])
      if next_due < 0 or d < next_due then next_due = d end
    end
  end
end

-- An entry this consumer has just taken over from another: run it, or dead-letter it when it has
-- been delivered too often (its workers keep dying on it).
local function take_over(s, e)
  if not (e and e[2]) then return end -- deleted from the stream while pending
  local p = redis.call('XPENDING', s, group, e[1], e[1], 1)
  local n = 1
  if p[1] then n = tonumber(p[1][4]) end
  if n > max_deliveries then
    local f = to_map(e[2])
    local reason = 'delivery limit: worker died ' .. (n - 1) .. ' times'
    redis.call('XADD', KEYS[6 + lane_of(s)], 'MAXLEN', '~', dead_max, '*',
      'job', f['id'] or '', 'payload', f['p'] or '', 'attempts', f['a'] or '0',
      'error', f['e'] or '', 'reason', reason,
      'deliveries', n - 1, 'stream', s, 'entry', e[1], 'enqueued_at', f['t'] or '',
      'dead_at', clock())
    redis.call('XACK', s, group, e[1])
    redis.call('XDEL', s, e[1])
    dead[#dead + 1] = {f['p'] or '', reason, s}
  else
    out[#out + 1] = {s, e[1], n, e[2]}
    remaining = remaining - 1
  end
end

-- 2a. Workers that stopped beating (killed, or left with jobs unfinished): take over their jobs
-- now rather than after the visibility timeout, and forget them once they hold nothing.
-- A worker counts as gone only when another one has beaten since its deadline: that proves
-- the registry is being kept and it missed its beats. Right after Redis comes back (nobody has
-- beaten yet) nothing is taken over; the first beat then gives everyone a TTL (beat.lua).
local lapsed = {}
if ARGV[12] == '1' then
  local last_beat = tonumber(redis.call('GET', KEYS[11]) or '0')
  local cutoff = math.min(clock(), last_beat)
  lapsed = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', '(' .. cutoff, 'LIMIT', 0, 8)
end
for _, w in ipairs(lapsed) do
  if w ~= consumer then
    local holds = false
    for _, s in ipairs(streams()) do
      -- A job delivered max_deliveries times already goes to the dead letter now, slot or no
      -- slot; the others are taken while this consumer has room.
      local p = redis.pcall('XPENDING', s, group, '-', '+', 100, w)
      if type(p) == 'table' and not p.err and #p > 0 then
        if #p >= 100 then holds = true end
        local ids = {}
        for _, e in ipairs(p) do
          if tonumber(e[4]) >= max_deliveries or #ids < remaining then
            ids[#ids + 1] = e[1]
          else
            holds = true
          end
        end
        if #ids > 0 then
          for _, e in ipairs(redis.call('XCLAIM', s, group, consumer, 0, unpack(ids))) do
            take_over(s, e)
          end
        end
      end
    end
    if not holds then
      redis.call('ZREM', KEYS[9], w)
      redis.call('HDEL', KEYS[10], w)
      for _, s in ipairs(streams()) do
        redis.pcall('XGROUP', 'DELCONSUMER', s, group, w)
      end
    end
  end
end

-- 2b. Reclaim entries whose consumer stopped heartbeating; drop consumers that are gone.
if ARGV[5] == '1' then
  for _, s in ipairs(streams()) do
    if remaining > 0 then
      local r = redis.pcall('XAUTOCLAIM', s, group, consumer, min_idle, '0-0', 'COUNT', remaining)
      if type(r) == 'table' and not r.err then
        for _, e in ipairs(r[2]) do
          take_over(s, e)
        end
      end
    end
    local cs = false
    if ARGV[11] == '1' then cs = redis.pcall('XINFO', 'CONSUMERS', s, group) end
    if type(cs) == 'table' and not cs.err then
      for _, c in ipairs(cs) do
        local m = to_map(c)
        if m['name'] ~= consumer and tonumber(m['pending']) == 0 and tonumber(m['idle']) > dead_idle then
          redis.call('XGROUP', 'DELCONSUMER', s, group, m['name'])
        end
      end
    end
  end
end

-- 3. New entries, in serving order, only from streams that may hold some.
if remaining > 0 then
  local ready = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #ready, 2 do
    if remaining <= 0 then break end
    local s, score = ready[i], ready[i + 1]
    local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', s, '>')
    if type(r) == 'table' and r.err then
      if string.find(r.err, 'NOGROUP', 1, true) then
        -- The stream or its group vanished (Redis restarted, or someone deleted it).
        ensure_stream(s, score)
        redis.pcall('XGROUP', 'CREATE', s, group, '0', 'MKSTREAM')
        r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', s, '>')
      else
        return redis.error_reply(r.err)
      end
    end
    local got = 0
    if r and r[1] then
      for _, e in ipairs(r[1][2]) do
        out[#out + 1] = {s, e[1], 1, e[2]}
        got = got + 1
      end
    end
    if got < remaining then redis.call('ZREM', KEYS[2], s) end
    remaining = remaining - got
  end
end

-- 4. Promoted jobs this consumer had no room for: wake the others.
if promoted > 0 and remaining <= 0 then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '16', '*', 'ready', promoted)
end

-- 5. Nothing to do: tell the caller where to block.
local block = {}
if #out == 0 and ARGV[10] == '1' then
  local w = redis.call('XREVRANGE', KEYS[6], '+', '-', 'COUNT', 1)
  block = {KEYS[6], (w[1] and w[1][1]) or '0-0'}
end

return {out, next_due, block, dead}
