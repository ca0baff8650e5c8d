//! A fenced store kept in Redis: the protected resource of the scenarios, which refuses a
//! write whose fence is lower than the highest it has accepted.

/// Writes `value` to `resource` if `fence` is at least the highest fence accepted for it.
/// Returns whether the write was accepted.
pub fn fenced_write(
    connection: &mut redis::Connection,
    resource: &str,
    fence: u64,
    value: &str,
) -> redis::RedisResult<bool> {
    let script = redis::Script::new(
        r"
        local highest = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
        if tonumber(ARGV[1]) < highest then return 0 end
        redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'value', ARGV[2])
        return 1
        ",
    );
    let accepted: i64 = script
        .key(resource)
        .arg(fence)
        .arg(value)
        .invoke(connection)?;
    Ok(accepted == 1)
}
