-- Takes a free lock and issues its fence, atomically.
--
-- KEYS[1]  the lock key               <prefix>{<key>}
-- KEYS[2]  the lock's fence counter   <prefix>{<key>}:fence
-- ARGV[1]  the new holder's token
-- ARGV[2]  the TTL in milliseconds
--
-- Returns {1, fence} when the lock is ours, {0, pttl} when another token holds it (pttl is the
-- holder's remaining TTL in milliseconds, or -1 if its key has no TTL). When the fence counter
-- is not a whole number below 2^53 (or not a string at all), returns an error naming it, and
-- writes nothing.
--
-- Every grant issues max(counter + 1, server TIME in microseconds) and stores it in the counter,
-- so fences keep growing when the counter comes back missing or stale: a restart without
-- persistence, a restore from an older snapshot, a failover to a replica that missed the last
-- grants (as long as the server's clock does not step back, and fewer than one lock per
-- microsecond is taken on average). Scripts are replicated by their effects, which makes TIME
-- safe here.
if redis.replicate_commands then
  redis.replicate_commands()
end

-- Lua numbers are doubles: whole numbers are exact below 2^53.
local EXACT_LIMIT = 9007199254740992

-- The counter is checked before anything is written, so a corrupt one leaves no lock behind.
local counter = redis.pcall('GET', KEYS[2])
if type(counter) == 'table' then
  if string.sub(counter.err, 1, 9) == 'WRONGTYPE' then
    return redis.error_reply('WRONGTYPE fence counter ' .. KEYS[2] ..
      ' is not a string; nothing was written')
  end
  return counter -- another refusal (a missing permission, say): passed on as it is
end
local last = 0
if counter then
  last = tonumber(counter)
  if not string.match(counter, '^%d+$') or last >= EXACT_LIMIT
      or string.format('%.0f', last) ~= counter then
    return redis.error_reply('ERR fence counter ' .. KEYS[2] ..
      ' does not hold a whole number below 2^53; nothing was written')
  end
end

-- Issues the next fence: above the last one, and at least the server's clock in microseconds.
local function grant()
  local now = redis.call('TIME')
  local fence = math.max(last + 1, tonumber(now[1]) * 1000000 + tonumber(now[2]))
  local text = string.format('%.0f', fence)
  redis.call('SET', KEYS[2], text)
  return {1, text}
end

-- The common case in one command: the lock is free.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return grant()
end

if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- Our own token: a retry of an acquire whose reply was lost. Tokens are unique per
  -- acquisition, so the counter still holds the fence that acquire issued (or a higher one
  -- written back by Redlock).
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if counter then
    return {1, counter}
  end
  return grant() -- the counter is gone: issue a fresh fence
end

return {0, redis.call('PTTL', KEYS[1])}
