-- Reopen a failed job so that it runs again (an operator replays its dead letter). The job
-- goes back to ready with fresh attempts; the dependents that were skipped because of it
-- (transitively) go back to pending unless another failed or skipped dependency still keeps
-- them skipped; a report that had finished runs again, without its documents, assembly
-- marker and webhook status, so that its next finish is assembled, and its webhook sent,
-- again.
--
-- KEYS[1..9]   the report keys (see lib.lua)
-- KEYS[10]     assembled  STRING  the aggregator's lease, then `done` (same slot)
-- KEYS[11]     doc:md     STRING  the assembled Markdown (same slot)
-- KEYS[12]     doc:json   STRING  the assembled JSON (same slot)
-- ARGV[1..3]   ttl, events maxlen, report id (see lib.lua)
-- ARGV[4]      job id
-- ARGV[5]      message for the events (who or why)
--
-- Returns: {"reopened", new state of the job, "1" if the report had finished else "0",
--           the job's JobNode JSON}
--      or  {"not_failed", job state}   nothing written: the job is not failed (a repeated
--                                      reopen, or a job that never failed)
--      or  {"cancelled"}               nothing written: the report (or the job) was cancelled,
--                                      which is final
--      or  {"missing"}, {"unknown_job"}.
-- Idempotent: only a failed job changes, so a repeat finds it ready (or further) and changes
-- nothing; the section runs once more, not once per call.
--
-- What changes:
-- - The job: failed -> ready, or pending (remaining = its dependencies not terminal) when one
--   of them was reopened too and has not finished: that dependency releases it then, like any
--   pending job. Its `|error`, `|finished` and `|tries` go, and so do `|started` and
--   `|attempts`: the section's times and attempts describe the run that gives it its result
--   (fresh attempts); the failed run stays in the event stream.
-- - Each dependent skipped because of it, transitively: pending again (remaining = its
--   dependencies not terminal, at least the one reopened) when none of its dependencies is
--   failed or skipped any more; otherwise it stays skipped, its reason naming a dependency
--   that still keeps it so.
-- - Each pending dependent (on_dependency_failure = continue) of a job that became
--   non-terminal here gets its `remaining` back (recounted: the job is outstanding again).
-- - Dependents that had already left pending (ready: released by the failure and queued;
--   running; done; failed) are left as they are: they ran, or will run, without this job's
--   output. A failed one can be reopened on its own.
-- - `terminal` drops by one per job that is no longer terminal; one `section.reopened`
--   event per such job.
-- - A finished report (failed, completed_with_failures, completed): status running,
--   `finished_at` and the webhook fields of the record removed, documents and assembly marker
--   deleted, `report.reopened`. The report's webhook outbox entry (another slot) is the
--   caller's to clear. A cancelled report is final: nothing is reopened.

local K_ASSEMBLED, K_DOC_MD, K_DOC_JSON = 10, 11, 12

local job = ARGV[4]
local message = ARGV[5]
local st, err = job_state(job)
if not st then
  return err
end
local status = redis.call('HGET', KEYS[K_META], 'status')
if status == 'cancelled' or st == 'cancelled' then
  return { 'cancelled' }
end
if st ~= 'failed' then
  return { 'not_failed', st }
end

local now = now_ms()

local function depends_on(id)
  local raw = redis.call('HGET', KEYS[K_NODES], id)
  if not raw then
    return {}
  end
  return cjson.decode(raw).depends_on or {}
end

-- The dependencies of `id` that are not terminal (each counted once), and the first one that
-- failed or was skipped with how, if any.
local function dependency_states(id)
  local open, seen = 0, {}
  local blocker, how
  for _, dep in ipairs(depends_on(id)) do
    if not seen[dep] then
      seen[dep] = true
      local s = redis.call('HGET', KEYS[K_STATE], dep)
      if not TERMINAL[s] then
        open = open + 1
      elseif (s == 'failed' or s == 'skipped') and not blocker then
        blocker, how = dep, s
      end
    end
  end
  return open, blocker, how
end

local finished = status ~= 'running'
if finished then
  redis.call('HSET', KEYS[K_META], 'status', 'running')
  redis.call('HDEL', KEYS[K_META], 'finished_at', 'webhook_state', 'webhook_attempts',
    'webhook_next_at', 'webhook_error')
  redis.call('DEL', KEYS[K_ASSEMBLED], KEYS[K_DOC_MD], KEYS[K_DOC_JSON])
  event('report.reopened', '', 'running', 'section `' .. job .. '`: ' .. message, now)
end

-- The job itself. Its dependencies are terminal (it ran), unless one was reopened too.
local open = dependency_states(job)
local state = open > 0 and 'pending' or 'ready'
redis.call('HSET', KEYS[K_STATE], job, state)
if open > 0 then
  redis.call('HSET', KEYS[K_REMAINING], job, open)
end
redis.call('HDEL', KEYS[K_INFO], job .. '|error', job .. '|finished', job .. '|tries',
  job .. '|started', job .. '|attempts')
redis.call('HINCRBY', KEYS[K_META], 'terminal', -1)
event('section.reopened', job, state, message, now)

-- Its dependents, breadth first from each job that is no longer terminal. A skipped dependent
-- may be met again once another of its dependencies is un-skipped; it changes state once.
local queue, head = { job }, 1
while head <= #queue do
  local cur = queue[head]
  head = head + 1
  for _, d in ipairs(dependents(cur)) do
    local s = redis.call('HGET', KEYS[K_STATE], d)
    if s == 'pending' then
      redis.call('HSET', KEYS[K_REMAINING], d, (dependency_states(d)))
    elseif s == 'skipped' then
      local left, blocker, how = dependency_states(d)
      if blocker then
        local reason = 'dependency `' .. blocker .. '` ' .. (how == 'failed' and 'failed' or 'was skipped')
        redis.call('HSET', KEYS[K_INFO], d .. '|error', reason)
      else
        -- `cur` is one of its dependencies and is not terminal, so `left` is at least 1.
        redis.call('HSET', KEYS[K_STATE], d, 'pending')
        redis.call('HSET', KEYS[K_REMAINING], d, left)
        redis.call('HDEL', KEYS[K_INFO], d .. '|error', d .. '|finished')
        redis.call('HINCRBY', KEYS[K_META], 'terminal', -1)
        event('section.reopened', d, 'pending', 'dependency `' .. cur .. '` was reopened', now)
        queue[#queue + 1] = d
      end
    end
  end
end

-- Running again: it lives as long as after it was created.
touch(RUNNING_TTL)
return { 'reopened', state, finished and '1' or '0', redis.call('HGET', KEYS[K_NODES], job) or '{}' }
