-- Take or keep the batch submitter's lease: one process at a time forms, submits and polls
-- batches.
--
-- KEYS[1] lock   ARGV[1] owner   ARGV[2] lease (ms)
-- Returns 1 when `owner` holds the lease (taken or renewed), 0 when another does.

local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
