-- Deletes a lock if the token holds it, and announces the release to waiters. Idempotent per
-- token: a retry of a release whose reply was lost finds the marker it left, and says so.
--
-- KEYS[1]  the lock key                  <prefix>{<key>}
-- KEYS[2]  the lock's release marker     <prefix>{<key>}:released
-- ARGV[1]  the holder's token
-- ARGV[2]  how long the marker lives, in milliseconds (longer than any call's retries)
-- ARGV[3]  the command that announces it: PUBLISH, or SPUBLISH on a Redis Cluster (heard on the
--          node that owns the key's slot only)
--
-- The release is announced on the key's own channel, named like the lock key: only processes
-- with a thread waiting for this key are subscribed to it, so when nobody waits, nobody hears.
--
-- Returns 1 when the lock was deleted (now, or by an earlier attempt with this token, if no one
-- has taken the lock since), 0 when the token does not hold it.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  -- The marker and the announcement are courtesies: once the key is deleted, neither a refused
  -- write (out of memory) nor a refused PUBLISH (a user without the channel) may turn the
  -- release into an error.
  redis.pcall('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.pcall(ARGV[3], KEYS[1], '')
  return 1
end
-- Gone, and our token's release is the last one: an earlier attempt of ours deleted it.
if not holder and redis.pcall('GET', KEYS[2]) == ARGV[1] then
  return 1
end
return 0
