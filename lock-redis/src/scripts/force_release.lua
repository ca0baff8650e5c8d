-- Deletes a lock whatever token holds it (an operator freeing a stuck lock), and announces the
-- release to waiters. The fence counter stays, so the next holder's fence is higher; the holder
-- finds its key gone at its next renewal.
--
-- KEYS[1]  the lock key               <prefix>{<key>}
-- ARGV[1]  the command that announces the release: PUBLISH, or SPUBLISH on a Redis Cluster
--
-- Returns 1 when the lock was held, 0 when it was free.
if redis.call('DEL', KEYS[1]) == 1 then
  -- A courtesy, as in release.lua: a refused PUBLISH does not undo the deletion.
  redis.pcall(ARGV[1], KEYS[1], '')
  return 1
end
return 0
