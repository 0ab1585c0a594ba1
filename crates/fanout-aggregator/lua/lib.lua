-- Shared prelude of every report script (prepended by scripts.rs; not a script on its own).
--
-- Every report script gets the same KEYS layout (see Keys::report_script_keys):
-- KEYS[1]  meta        HASH   report record: tenant, template, inputs, lane, status, counters, …
-- KEYS[2]  nodes       HASH   job id -> JobNode JSON (what a released job is enqueued with)
-- KEYS[3]  state       HASH   job id -> pending|ready|running|done|failed|skipped|cancelled
-- KEYS[4]  remaining   HASH   job id -> dependencies not yet terminal
-- KEYS[5]  dependents  HASH   job id -> JSON array of the job ids that depend on it
-- KEYS[6]  flags       HASH   job id -> "s" (skip on dependency failure) and/or "o" (optional)
-- KEYS[7]  results     HASH   job id -> SectionResult JSON (written once)
-- KEYS[8]  info        HASH   "<job>|started", "<job>|finished", "<job>|attempts" (starts), "<job>|tries" (provider attempts of a failed job), "<job>|error"
-- KEYS[9]  events      STREAM the report's event log (kind, job_id, state, message, ts)
--
-- and the same leading ARGV:
-- ARGV[1]  TTL in seconds of every report key (set at create, set again when the report
--          finishes; every hash gets a "_" field at create so that all nine keys exist then)
-- ARGV[2]  MAXLEN (approximate) of the report's event stream
-- ARGV[3]  report id
-- Script-specific arguments start at ARGV[4].
--
-- Every key is in the report's hash slot (`{r:<id>}`), so the scripts run on a Redis Cluster.
-- The aggregators' notification stream is in another slot: a script that finishes the report
-- returns its final status and the caller appends the notification (see Store::notify_finished).

local K_META, K_NODES, K_STATE, K_REMAINING, K_DEPENDENTS = 1, 2, 3, 4, 5
local K_FLAGS, K_RESULTS, K_INFO, K_EVENTS = 6, 7, 8, 9
local REPORT_KEYS = 9
local TTL = ARGV[1]
local EVENTS_MAXLEN = ARGV[2]
local REPORT_ID = ARGV[3]

local TERMINAL = { done = true, failed = true, skipped = true, cancelled = true }

-- Redis time, so that every process stamps transitions with one clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function event(kind, job, state, message, ts)
  redis.call('XADD', KEYS[K_EVENTS], 'MAXLEN', '~', EVENTS_MAXLEN, '*',
    'kind', kind, 'job_id', job, 'state', state, 'message', message, 'ts', ts)
end

-- A report that is still running lives at least a week (RUNNING_TTL) after it was created or
-- reopened, however short the TTL: a backlog that outlasts the TTL must not delete the reports
-- it holds (the tenant index prunes on the same week). Once finished, it lives TTL seconds.
local RUNNING_TTL = math.max(tonumber(TTL), 7 * 86400)

-- Only create, finish, cancel and reopen call this: nine EXPIREs per transition would double
-- its cost.
local function touch(ttl)
  for i = 1, REPORT_KEYS do
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end

local function dependents(job)
  local raw = redis.call('HGET', KEYS[K_DEPENDENTS], job)
  if not raw then
    return {}
  end
  return cjson.decode(raw)
end

local function has_flag(job, flag)
  local v = redis.call('HGET', KEYS[K_FLAGS], job)
  return v and string.find(v, flag, 1, true) ~= nil
end

-- `job` has just become terminal with `outcome` (done, failed or skipped): each pending
-- dependent either is skipped (its own dependents follow, transitively) or loses one
-- outstanding input and becomes ready at zero. Runs once per job, guarded by the caller's
-- state transition, so counters are never decremented twice.
local function settle(job, outcome, now)
  local queue, head = { { job, outcome } }, 1
  while head <= #queue do
    local cur, how = queue[head][1], queue[head][2]
    head = head + 1
    for _, d in ipairs(dependents(cur)) do
      if redis.call('HGET', KEYS[K_STATE], d) == 'pending' then
        if how ~= 'done' and has_flag(d, 's') then
          local reason = 'dependency `' .. cur .. '` ' .. (how == 'failed' and 'failed' or 'was skipped')
          redis.call('HSET', KEYS[K_STATE], d, 'skipped')
          redis.call('HSET', KEYS[K_INFO], d .. '|error', reason, d .. '|finished', now)
          redis.call('HINCRBY', KEYS[K_META], 'terminal', 1)
          event('section.skipped', d, 'skipped', 'skipped: ' .. reason, now)
          queue[#queue + 1] = { d, 'skipped' }
        else
          local left = redis.call('HINCRBY', KEYS[K_REMAINING], d, -1)
          if left <= 0 then
            redis.call('HSET', KEYS[K_STATE], d, 'ready')
            event('section.ready', d, 'ready', '', now)
          end
        end
      end
    end
  end
end

-- The dependents released by `job` that no worker has started yet: its own dependents in
-- state ready, and those of the dependents it got skipped. Read-only, so a repeated call
-- returns the same set for the caller to enqueue (idempotently) again.
local function ready_after(job)
  local out, seen = {}, {}
  local queue, head = { job }, 1
  while head <= #queue do
    local cur = queue[head]
    head = head + 1
    for _, d in ipairs(dependents(cur)) do
      if not seen[d] then
        seen[d] = true
        local st = redis.call('HGET', KEYS[K_STATE], d)
        if st == 'ready' then
          out[#out + 1] = redis.call('HGET', KEYS[K_NODES], d) or '{}'
        elseif st == 'skipped' then
          queue[#queue + 1] = d
        end
      end
    end
  end
  return out
end

-- The job's state, or (nil, error reply) when the report is missing or the job unknown.
local function job_state(job)
  if redis.call('EXISTS', KEYS[K_META]) == 0 then
    return nil, { 'missing' }
  end
  local st = redis.call('HGET', KEYS[K_STATE], job)
  if not st then
    return nil, { 'unknown_job' }
  end
  return st
end

-- {"ok", status, JobNode JSON of each dependent `job` released that has not started yet}.
local function ok_with_ready(status, job)
  local out = { 'ok', status }
  for _, node in ipairs(ready_after(job)) do
    out[#out + 1] = node
  end
  return out
end

-- When every job is terminal: the final status, the report.finished event and the TTL.
-- Returns the report status (the caller notifies the aggregators when it is not running).
local function maybe_finish(now)
  local m = redis.call('HMGET', KEYS[K_META], 'status', 'terminal', 'job_count')
  if m[1] ~= 'running' or tonumber(m[2]) < tonumber(m[3]) then
    return m[1]
  end
  local counts = { done = 0, failed = 0, skipped = 0, cancelled = 0 }
  local required_failures = 0
  local states = redis.call('HGETALL', KEYS[K_STATE])
  for i = 1, #states, 2 do
    local s = states[i + 1]
    counts[s] = (counts[s] or 0) + 1
    if (s == 'failed' or s == 'skipped') and not has_flag(states[i], 'o') then
      required_failures = required_failures + 1
    end
  end
  local status
  if counts.done == 0 then
    status = 'failed'
  elseif required_failures > 0 then
    status = 'completed_with_failures'
  else
    status = 'completed'
  end
  redis.call('HSET', KEYS[K_META], 'status', status, 'finished_at', now)
  event('report.finished', '', status, string.format('%d done, %d failed, %d skipped',
    counts.done, counts.failed, counts.skipped), now)
  touch(TTL)
  return status
end

-- Script body follows.
