-- Extends a lock's TTL if the token still holds it. Never recreates a missing key.
--
-- KEYS[1]  the lock key   <prefix>{<key>}
-- ARGV[1]  the holder's token
-- ARGV[2]  the new TTL in milliseconds
--
-- Returns 1 when the TTL was set, 0 when the token does not hold the lock.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
