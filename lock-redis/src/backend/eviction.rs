//! The server's eviction policy: read once per backend, and a warning when it may evict held
//! locks.

use std::sync::atomic::{AtomicU8, Ordering};

use redis::Value;

use crate::connection::deadline::Deadline;
use crate::connection::pool::{round_trip, PooledConnection};
use crate::errors::CallFailure;

/// The one policy under which a server never evicts a key.
const NO_EVICTION: &str = "noeviction";

/// [`EvictionCheck`] states.
const UNCHECKED: u8 = 0;
const CHECKING: u8 = 1;
const CHECKED: u8 = 2;

/// Whether a backend has looked at its server's eviction policy: once, after its first
/// successful call, so that the warning comes once per backend.
#[derive(Debug)]
pub(crate) struct EvictionCheck {
    state: AtomicU8,
    /// The redacted URL, for the log.
    target: String,
}

impl EvictionCheck {
    pub(crate) fn new(target: String) -> EvictionCheck {
        EvictionCheck {
            state: AtomicU8::new(UNCHECKED),
            target,
        }
    }

    /// Reads the policy on `connection` if no call has yet; warns if it may evict locks. A
    /// failure to read it (no time left, a dropped connection) leaves it for a later call; a
    /// refusal (no permission) counts as read.
    pub(crate) fn check_once(&self, connection: &mut PooledConnection, deadline: &Deadline) {
        if !self.claim() {
            return;
        }
        match read_eviction_policy(connection, deadline) {
            Ok(policy) => self.finish(policy.as_deref()),
            Err(failure) => {
                tracing::debug!(redis = %self.target, error = ?failure, "could not read the Redis eviction policy; trying again on a later call");
                self.state.store(UNCHECKED, Ordering::Release);
            }
        }
    }

    /// Records a policy read by [`RedisBackend::eviction_policy`](crate::RedisBackend::eviction_policy),
    /// warning about it unless a call has already looked.
    pub(crate) fn record(&self, policy: Option<&str>) {
        if self.claim() {
            self.finish(policy);
        }
    }

    /// True for the one caller that gets to check.
    fn claim(&self) -> bool {
        self.state.load(Ordering::Acquire) == UNCHECKED
            && self
                .state
                .compare_exchange(UNCHECKED, CHECKING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn finish(&self, policy: Option<&str>) {
        match policy {
            Some(policy) if policy != NO_EVICTION => tracing::warn!(
                redis = %self.target,
                policy,
                "Redis maxmemory-policy is {policy}: once the server reaches maxmemory it may \
                 evict held lock keys (they have a TTL){}; set maxmemory-policy noeviction on \
                 lock servers",
                if policy.starts_with("allkeys") { " and fence counters" } else { "" }
            ),
            Some(_) => {}
            None => {
                tracing::debug!(redis = %self.target, "the Redis server does not tell its maxmemory-policy (INFO and CONFIG GET refused?); not checked")
            }
        }
        self.state.store(CHECKED, Ordering::Release);
    }
}

/// The server's `maxmemory-policy`: from `INFO memory` (which the minimal ACL rules allow and
/// which shows no secrets), else from `CONFIG GET maxmemory-policy`. `None` when both are
/// refused or say nothing about it.
pub(crate) fn read_eviction_policy(
    connection: &mut PooledConnection,
    deadline: &Deadline,
) -> Result<Option<String>, CallFailure> {
    let info = round_trip(connection, redis::cmd("INFO").arg("memory"), deadline)?;
    if let Some(policy) = policy_in_info(&info) {
        return Ok(Some(policy));
    }
    let config = round_trip(
        connection,
        redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
        deadline,
    )?;
    Ok(policy_in_config(config))
}

/// The `maxmemory_policy:` line of an `INFO memory` reply.
fn policy_in_info(reply: &Value) -> Option<String> {
    let text = match reply {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?,
        Value::VerbatimString { text, .. } => text,
        _ => return None,
    };
    text.lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(|policy| policy.trim().to_owned())
}

/// The value of a `CONFIG GET maxmemory-policy` reply (a two-item array, or a map in RESP3).
fn policy_in_config(reply: Value) -> Option<String> {
    let value = match reply {
        Value::Array(items) => items.into_iter().nth(1)?,
        Value::Map(pairs) => pairs.into_iter().next()?.1,
        _ => return None,
    };
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn the_policy_is_read_from_info_or_config_replies() {
        let info = bulk("# Memory\r\nused_memory:1\r\nmaxmemory_policy:volatile-lru\r\n");
        assert_eq!(policy_in_info(&info).as_deref(), Some("volatile-lru"));
        assert_eq!(policy_in_info(&bulk("# Memory\r\nused_memory:1\r\n")), None);
        let refused = redis::parse_redis_value(b"-NOPERM no permissions\r\n").unwrap();
        assert_eq!(policy_in_info(&refused), None);

        let config = Value::Array(vec![bulk("maxmemory-policy"), bulk("noeviction")]);
        assert_eq!(policy_in_config(config).as_deref(), Some("noeviction"));
        let map = Value::Map(vec![(bulk("maxmemory-policy"), bulk("allkeys-lru"))]);
        assert_eq!(policy_in_config(map).as_deref(), Some("allkeys-lru"));
        assert_eq!(policy_in_config(refused), None);
        assert_eq!(policy_in_config(Value::Array(vec![])), None);
    }

    #[test]
    fn only_one_caller_checks() {
        let check = EvictionCheck::new("redis://x".into());
        assert!(check.claim());
        assert!(
            !check.claim(),
            "a second caller checked while the first one was"
        );
        check.finish(Some("noeviction"));
        assert!(!check.claim(), "checked twice");
        check.record(Some("allkeys-lru")); // no second warning, and no panic
    }
}
