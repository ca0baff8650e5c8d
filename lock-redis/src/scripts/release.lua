-- Deletes a lock if the token holds it, and announces the release to waiters.
--
-- KEYS[1]  the lock key   <prefix>{<key>}
-- ARGV[1]  the holder's token
-- ARGV[2]  the release channel   <prefix>released
-- ARGV[3]  the user's key, published on the channel
--
-- Returns 1 when the lock was deleted, 0 when the token does not hold it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  -- Waking waiters early is a courtesy: once the key is deleted, a failed PUBLISH (a user
  -- without permission on the channel) must not turn the release into an error.
  redis.pcall('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
