-- Take or keep the batch submitter's lease: one process at a time forms, submits and polls
-- batches.
--
-- KEYS[1] lock   ARGV[1] owner   ARGV[2] lease (ms)   ARGV[3] "exact" (optional)
-- Returns 1 when `owner` holds the lease (taken, or renewed: to ARGV[2] from now, or what it
-- had left if that is longer, so that a lease extended over a long provider request is not
-- cut short by the regular renewal; with "exact", to ARGV[2] from now), 0 when another does.

local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  if ARGV[3] == 'exact' or redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
