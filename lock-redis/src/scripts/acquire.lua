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

-- Issues the next fence. A counter that INCR creates (it answers 1) was missing: a seeded
-- counter is far above 1, so it is replaced by the server's clock in microseconds.
local function next_fence()
  local fence = redis.call('INCR', KEYS[2])
  if fence == 1 then
    local now = redis.call('TIME')
    fence = string.format('%s%06d', now[1], tonumber(now[2]))
    redis.call('SET', KEYS[2], fence)
  end
  return fence
end

-- The common case in one command: the lock is free.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, next_fence()}
end

if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- Our own token: a retry of an acquire whose reply was lost. Tokens are unique per
  -- acquisition, so the counter still holds the fence that acquire issued.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local fence = redis.call('GET', KEYS[2])
  if fence then
    return {1, fence}
  end
  return {1, next_fence()} -- the counter is gone: issue a fresh fence
end

return {0, redis.call('PTTL', KEYS[1])}
