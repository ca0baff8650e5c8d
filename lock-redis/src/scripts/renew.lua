#!lua flags=allow-cross-slot-keys,allow-oom
-- Extends the TTL of every lock whose token still holds it. Never recreates a missing key.
-- One call renews a whole chunk of a renewal batch, so the script's fixed cost is paid once per
-- chunk rather than once per lease.
--
-- ARGV[3i - 2]     a lock key                    <prefix>{<key>}
-- ARGV[3i - 1]     the holder's token for it
-- ARGV[3i]         the new TTL in milliseconds
-- KEYS             not read: declared by a caller that needs the call routed by its key (one
--                  lease through a Redis Cluster connection), empty otherwise
--
-- The lock keys travel as arguments, and the flag allow-cross-slot-keys lets one call touch
-- keys of many slots, so that on a Redis Cluster a call renews any leases its node serves, not
-- only those of one slot (about 6 per call for 100,000 leases over 16,384 slots). Redis still
-- refuses, key by key, a key the node does not serve: one in a slot of another node, or one
-- that is missing here while its slot migrates away. redis.pcall turns that refusal into this
-- key's error reply, and the caller asks again for that key alone, through the cluster's
-- routing (MOVED, ASK). A key present here is authoritative: MIGRATE moves a key whole.
-- allow-oom keeps renewals working on a full server, as before the flags: PEXPIRE adds nothing.
--
-- Returns one reply per lease, in order: 1 when the TTL was set, 0 when the token does not hold
-- the lock, or that key's own error (a wrong type, a key this node does not serve), which fails
-- only that lease's renewal.
local results = {}
for i = 1, #ARGV, 3 do
  local key = ARGV[i]
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    results[#results + 1] = value
  elseif value == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[i + 2])
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
end
return results
