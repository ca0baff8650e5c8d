//! A fenced store kept in Redis: the protected resource of the scenarios, which refuses a
//! write (and, for read-modify-write clients, a read) whose fence is lower than the highest it
//! has accepted.

/// The check every fenced operation starts with, on the hash `KEYS[1]` with the fence
/// `ARGV[1]`: a lower fence than the highest accepted is refused (the script returns `false`,
/// a nil reply); any other becomes the highest.
const CHECK_FENCE: &str = r"
    local highest = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
    if tonumber(ARGV[1]) < highest then return false end
    redis.call('HSET', KEYS[1], 'fence', ARGV[1])
";

/// Writes `value` to `resource` if `fence` is at least the highest fence accepted for it.
/// Returns whether the write was accepted.
pub fn fenced_write(
    connection: &mut redis::Connection,
    resource: &str,
    fence: u64,
    value: &str,
) -> redis::RedisResult<bool> {
    let script = redis::Script::new(&format!(
        "{CHECK_FENCE} redis.call('HSET', KEYS[1], 'value', ARGV[2]) return 1"
    ));
    let accepted: Option<i64> = script
        .key(resource)
        .arg(fence)
        .arg(value)
        .invoke(connection)?;
    Ok(accepted.is_some())
}

/// Reads the value of `resource` (`""` if it has none) if `fence` is at least the highest fence
/// accepted for it, and makes `fence` the highest: a holder that read with a fence loses its
/// next write to any holder with a higher fence that touched the resource since. `None` if the
/// read was refused.
///
/// With reads fenced too, a read-modify-write loses no update the fences do not refuse: of two
/// holders, the lower fence's operations are all accepted before the higher fence's first one,
/// or refused.
pub fn fenced_read(
    connection: &mut redis::Connection,
    resource: &str,
    fence: u64,
) -> redis::RedisResult<Option<String>> {
    let script = redis::Script::new(&format!(
        "{CHECK_FENCE} return redis.call('HGET', KEYS[1], 'value') or ''"
    ));
    script.key(resource).arg(fence).invoke(connection)
}
