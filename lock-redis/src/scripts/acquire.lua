-- Takes a free lock and issues its fence, atomically.
--
-- KEYS[1]  the lock key               <prefix>{<key>}
-- KEYS[2]  the lock's fence counter   <prefix>{<key>}:fence
-- ARGV[1]  the new holder's token
-- ARGV[2]  the TTL in milliseconds
-- ARGV[3]  optional: a fence to issue at least, a whole number below 2^53 in canonical form
--          (Redlock proposes one ahead of its nodes' clocks, so that the nodes of a majority
--          issue the same fence and none needs raising afterwards)
--
-- Returns {1, fence} when the lock is ours, {0, pttl} when another token holds it (pttl is the
-- holder's remaining TTL in milliseconds, or -1 if its key has no TTL). When the fence counter
-- is not a whole number below 2^53 (or not a string at all), returns an error naming it, and
-- leaves both keys as they were.
--
-- Needs Redis 7.0 or later (SET with both NX and GET).
--
-- Every grant issues max(counter + 1, server TIME in microseconds, ARGV[3]) and stores it in the
-- counter, so fences keep growing when the counter comes back missing or stale: a restart without
-- persistence, a restore from an older snapshot, a failover to a replica that missed the last
-- grants (as long as the server's clock does not step back, and fewer than one lock per
-- microsecond is taken on average). Scripts are replicated by their effects (always, since Redis
-- 7.0), which makes TIME safe here.
--
-- Each redis.call costs the server more than the command itself (about 2 us here), so the common
-- cases make as few as they can: a free lock takes three (SET NX, TIME, SET GET), a held one two
-- (SET NX GET, PTTL).

-- Why the counter's reply (from GET, or SET ... GET) cannot be used, as the error to return; nil
-- when it can: absent, or a whole number below 2^53 (where Lua's doubles are exact) in canonical
-- form. String tests only: formatting a number (sprintf) costs more than the rest of the script.
local function unusable(counter)
  if type(counter) == 'table' then -- a refusal
    if string.sub(counter.err, 1, 9) == 'WRONGTYPE' then
      return redis.error_reply('WRONGTYPE fence counter ' .. KEYS[2] ..
        ' is not a string; nothing was written')
    end
    return counter -- another refusal (a missing permission, say): passed on as it is
  end
  if not counter or counter == '0' then
    return nil
  end
  local digits = #counter
  if string.find(counter, '^[1-9]%d*$') and
      (digits < 16 or (digits == 16 and counter < '9007199254740992')) then
    return nil
  end
  return redis.error_reply('ERR fence counter ' .. KEYS[2] ..
    ' does not hold a whole number below 2^53; nothing was written')
end

-- Issues the next fence for a lock this call has just taken: above the last one, and at least
-- the server's clock in microseconds and the proposed fence, if any. Reads and writes the
-- counter in one command; when the counter turns out to be unusable, puts it back and gives the
-- lock up, so nothing changed.
local function grant()
  local now = redis.pcall('TIME') -- seconds and microseconds, as text
  if now.err then -- refused (a user without TIME): give the lock up, or it would stay behind
    redis.call('DEL', KEYS[1])
    return now
  end
  local text = now[1] .. string.rep('0', 6 - #now[2]) .. now[2]
  local proposed = ARGV[3]
  if proposed and (#proposed > #text or (#proposed == #text and proposed > text)) then
    text = proposed
  end
  local previous = redis.pcall('SET', KEYS[2], text, 'KEEPTTL', 'GET')
  local error = unusable(previous)
  if error then
    if type(previous) == 'string' then
      redis.call('SET', KEYS[2], previous, 'KEEPTTL')
    end -- else refused: the counter was not written
    redis.call('DEL', KEYS[1])
    return error
  end
  if previous and tonumber(previous) >= tonumber(text) then
    -- The clock is behind the counter: count on from it.
    text = string.format('%.0f', tonumber(previous) + 1)
    redis.call('SET', KEYS[2], text, 'KEEPTTL')
  end
  return {1, text}
end

-- The common case in one command: the lock is free (nil), or who holds it.
local holder = redis.pcall('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'PX', ARGV[2])
if type(holder) == 'table' then
  if string.find(holder.err, 'syntax error', 1, true) then
    return redis.error_reply('ERR this lock needs Redis 7.0 or later (SET with both NX and GET)')
  end
  return holder -- a lock key of the wrong type, a missing permission: passed on as it is
end
if not holder then
  return grant()
end

if holder == ARGV[1] then
  -- Our own token: a retry of an acquire whose reply was lost. Tokens are unique per
  -- acquisition, so the counter still holds the fence that acquire issued (or a higher one
  -- written back by Redlock). It is checked before anything is written.
  local counter = redis.pcall('GET', KEYS[2])
  local error = unusable(counter)
  if error then
    return error
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if counter then
    return {1, counter}
  end
  -- The counter is gone: issue a fresh fence. The lock is ours either way, so a refusal now
  -- gives it up, as a failed first attempt would have.
  return grant()
end

return {0, redis.call('PTTL', KEYS[1])}
