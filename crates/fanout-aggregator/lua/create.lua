-- Create a report: its record, every job's state and dependency counter, the dependents
-- index and the "report.created" event, after the idempotency check. One round trip.
--
-- KEYS[1..10]  the report keys (see lib.lua)
-- KEYS[11]     the tenant's report index `{ns}:reports:<tenant>` (ZSET id -> created ms)
-- KEYS[12]     the set of every tenant index `{ns}:report-indexes` (what aggregators sweep)
-- KEYS[13]     idempotency key `{ns}:idem:<tenant>:<key>` (present when ARGV[5] ~= "0")
--
-- ARGV[1..4]   ttl, events maxlen, notify maxlen, report id (see lib.lua)
-- ARGV[5]      the request's fingerprint when an idempotency key is given, else "0"
-- ARGV[6]      m, the number of record fields that follow
-- ARGV[7 .. 6+2m]  record field, value pairs (tenant, template, inputs, lane, layout, …)
-- then per job, 5 values: job id, JobNode JSON, number of dependencies,
--                         dependents JSON array ("" for none), flags ("", "s", "o", "so")
--
-- Returns: {"created", report id, JobNode JSON of each job with no dependencies …}
--      or  {"duplicate", existing report id} when the idempotency key (or the id) is known,
--          for the same request (the same fingerprint, or a key stored before fingerprints)
--      or  {"conflict", existing report id} when the key was used for another request.
-- Idempotent: a repeated call with the same key or id changes nothing.

if ARGV[5] ~= '0' then
  local existing = redis.call('GET', KEYS[13])
  if existing then
    -- "<report id> <fingerprint>" (or a bare id, written before fingerprints).
    local id, fingerprint = string.match(existing, '^(%S+) (%S+)$')
    if not id then
      return { 'duplicate', existing }
    end
    if fingerprint ~= ARGV[5] then
      return { 'conflict', id }
    end
    return { 'duplicate', id }
  end
end
if redis.call('EXISTS', KEYS[K_META]) == 1 then
  return { 'duplicate', REPORT_ID }
end

local now = now_ms()
local m = tonumber(ARGV[6])
local record = { 'id', REPORT_ID, 'status', 'running', 'created_at', now, 'terminal', 0 }
for i = 7, 6 + 2 * m do
  record[#record + 1] = ARGV[i]
end

local ready = { 'created', REPORT_ID }
local jobs = 0
local i = 7 + 2 * m
while i <= #ARGV do
  local id, node, deps, dependents_json, flags = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4]
  jobs = jobs + 1
  redis.call('HSET', KEYS[K_NODES], id, node)
  if deps == 0 then
    redis.call('HSET', KEYS[K_STATE], id, 'ready')
    ready[#ready + 1] = node
  else
    redis.call('HSET', KEYS[K_STATE], id, 'pending')
    redis.call('HSET', KEYS[K_REMAINING], id, deps)
  end
  if dependents_json ~= '' then
    redis.call('HSET', KEYS[K_DEPENDENTS], id, dependents_json)
  end
  if flags ~= '' then
    redis.call('HSET', KEYS[K_FLAGS], id, flags)
  end
  i = i + 5
end
record[#record + 1] = 'job_count'
record[#record + 1] = jobs
redis.call('HSET', KEYS[K_META], unpack(record))

-- Every hash exists from now on, so the TTL set below covers the keys written later too.
for _, k in ipairs({ K_REMAINING, K_DEPENDENTS, K_FLAGS, K_RESULTS, K_INFO }) do
  redis.call('HSET', KEYS[k], '_', '')
end
if ARGV[5] ~= '0' then
  redis.call('SET', KEYS[13], REPORT_ID .. ' ' .. ARGV[5], 'EX', TTL)
end
redis.call('ZADD', KEYS[11], now, REPORT_ID)
redis.call('SADD', KEYS[12], KEYS[11])
-- Entries far older than any report can live (running, then the TTL after finishing) go, so an
-- index nobody lists or sweeps does not grow without bound.
redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', now - (RUNNING_TTL + tonumber(TTL)) * 1000)
event('report.created', '', 'running', string.format('%d sections, %d ready', jobs, #ready - 2), now)
touch(RUNNING_TTL)
return ready
