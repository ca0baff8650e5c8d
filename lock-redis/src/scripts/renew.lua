-- Extends the TTL of every lock whose token still holds it. Never recreates a missing key.
-- One call renews a whole chunk of a renewal batch, so the script's fixed cost is paid once per
-- chunk rather than once per lease.
--
-- KEYS[i]          the lock keys                 <prefix>{<key>}
-- ARGV[2i - 1]     the holder's token for KEYS[i]
-- ARGV[2i]         the new TTL in milliseconds for KEYS[i]
--
-- Returns one reply per key, in order: 1 when the TTL was set, 0 when the token does not hold
-- the lock, or that key's own error (a wrong type, say), which fails only that key's renewal.
local results = {}
for i, key in ipairs(KEYS) do
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    results[i] = value
  elseif value == ARGV[2 * i - 1] then
    redis.call('PEXPIRE', key, ARGV[2 * i])
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
