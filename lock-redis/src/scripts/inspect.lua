-- Says whether a lock is held, for how long, and its fence counter, changing nothing.
--
-- KEYS[1]  the lock key               <prefix>{<key>}
-- KEYS[2]  the lock's fence counter   <prefix>{<key>}:fence
--
-- Returns {pttl, counter}: pttl as PTTL says it (-2 when the lock is free, -1 when its key has
-- no TTL, else the milliseconds its holder has left), and the counter as stored (the last fence
-- issued), or nil when there is none. One script, so both are read at the same instant.
return {redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]) or false}
