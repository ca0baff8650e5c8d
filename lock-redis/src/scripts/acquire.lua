-- Takes a free lock and issues its fence, atomically.
--
-- KEYS[1]  the lock key               <prefix>{<key>}
-- KEYS[2]  the lock's fence counter   <prefix>{<key>}:fence
-- ARGV[1]  the new holder's token
-- ARGV[2]  the TTL in milliseconds
--
-- Returns {1, fence} when the lock is ours, {0, pttl} when another token holds it (pttl is the
-- holder's remaining TTL in milliseconds, or -1 if its key has no TTL).
--
-- The fence counter is seeded from the server's TIME in microseconds when it is missing, so
-- fences keep growing even when a server without persistence restarts (as long as its clock
-- does not step back). Scripts are replicated by their effects, which makes TIME safe here.
if redis.replicate_commands then
  redis.replicate_commands()
end

local holder = redis.call('GET', KEYS[1])

if holder == ARGV[1] then
  -- Our own token: a retry of an acquire whose reply was lost. Tokens are unique per
  -- acquisition, so the counter still holds the fence that acquire issued.
  local fence = redis.call('GET', KEYS[2])
  if fence then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, fence}
  end
  holder = false -- the counter is gone: issue a fresh fence below
end

if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if redis.call('EXISTS', KEYS[2]) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', KEYS[2], string.format('%s%06d', now[1], tonumber(now[2])))
  end
  return {1, redis.call('INCR', KEYS[2])}
end

return {0, redis.call('PTTL', KEYS[1])}
