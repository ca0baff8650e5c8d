-- Raises a lock's fence counter to at least a given fence (Redlock's write-back).
--
-- KEYS[1]  the lock's fence counter   <prefix>{<key>}:fence
-- ARGV[1]  the fence
--
-- Returns 1 if the counter was raised, 0 if it was already at least that high.
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
