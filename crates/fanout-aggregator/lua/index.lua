-- First step of creating a report, in the namespace's slot: check and take the tenant's
-- idempotency key, and list the report in the tenant's index. create.lua (the report's slot)
-- follows. A crash between the two leaves a key or an index entry naming a report that does
-- not exist: the client's retry with the same key gets the same id back and creates it then,
-- and the index sweep forgets an id without a report.
--
-- KEYS[1]  the tenant's report index `{ns}:reports:<tenant>` (ZSET id -> created ms)
-- KEYS[2]  the set of every tenant index `{ns}:report-indexes` (what aggregators sweep)
-- KEYS[3]  idempotency key `{ns}:idem:<tenant>:<key>` (present when ARGV[2] ~= "0")
--
-- ARGV[1]  the new report's id
-- ARGV[2]  the request's fingerprint when an idempotency key is given, else "0"
-- ARGV[3]  TTL in seconds of the idempotency key (the report TTL)
-- ARGV[4]  how long in seconds an index entry may be kept (a running report's life plus the TTL)
--
-- Returns: {"new", id, created ms}
--      or  {"duplicate", existing id, created ms} when the key is known for the same request
--          (the same fingerprint, or a key stored before fingerprints)
--      or  {"conflict", existing id} when the key was used for another request.
-- "created ms" is the report's score in the tenant's index: create.lua stores it as created_at.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
if ARGV[2] ~= '0' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    -- "<report id> <fingerprint>" (or a bare id, written before fingerprints).
    local known, fingerprint = string.match(existing, '^(%S+) (%S+)$')
    if not known then
      known = existing
    elseif fingerprint ~= ARGV[2] then
      return { 'conflict', known }
    end
    -- The retry may be about to create the report (the first try stopped between the steps,
    -- and a sweep may have forgotten its entry since): list it again, keeping its first time.
    redis.call('ZADD', KEYS[1], 'NX', now, known)
    redis.call('SADD', KEYS[2], KEYS[1])
    return { 'duplicate', known, redis.call('ZSCORE', KEYS[1], known) }
  end
  redis.call('SET', KEYS[3], id .. ' ' .. ARGV[2], 'EX', ARGV[3])
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('SADD', KEYS[2], KEYS[1])
-- Entries far older than any report can live go, so an index nobody lists or sweeps does not
-- grow without bound.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]) * 1000)
return { 'new', id, tostring(now) }
