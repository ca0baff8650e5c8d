//! The ACL rules a Redis user needs to hold leases, and nothing more.

/// Every command the backend sends, directly or from its scripts:
///
/// - `EVALSHA`, `EVAL` (when the server's script cache is empty), `SCRIPT LOAD` (renewals);
/// - inside the scripts: `GET`, `SET`, `PEXPIRE`, `PTTL`, `DEL`, `PUBLISH`, `TIME`;
/// - `PING`: draining a connection after a timeout, and the subscriber's health check;
/// - `SUBSCRIBE`, `UNSUBSCRIBE` (release notifications, per key while a thread waits for it),
///   and `PUNSUBSCRIBE` (sent by the `redis` crate when the subscriber's connection is closed);
/// - `INFO` (`INFO memory`, the eviction policy check; without it the check is skipped).
const COMMANDS: &str = "+evalsha +eval +script|load +get +set +pexpire +pttl +del +publish +time \
                        +ping +subscribe +unsubscribe +punsubscribe +info";

/// The ACL rules of a Redis user that may use a backend whose key prefix is `key_prefix`, and
/// nothing else: its keys (`~<prefix>*`), its release channels (`&<prefix>*`, one per lock,
/// named like the lock key) and the commands it sends. Append them to `ACL SETUSER <name> on ><password>`, or to a `user` line
/// of an ACL file. See the [crate documentation](crate#acl) for what each rule is for.
///
/// Glob characters in the prefix (`*?[]\`) are escaped. The rules start with `resetkeys`,
/// `resetchannels` and `-@all`, so they replace whatever the user could do before.
///
/// ```
/// assert_eq!(
///     lock_redis::acl_rules("lock:"),
///     "resetkeys ~lock:* resetchannels &lock:* -@all +evalsha +eval +script|load \
///      +get +set +pexpire +pttl +del +publish +time +ping +subscribe +unsubscribe \
///      +punsubscribe +info"
/// );
/// assert!(lock_redis::acl_rules("jobs[1]:").starts_with(r"resetkeys ~jobs\[1\]:* "));
/// ```
pub fn acl_rules(key_prefix: &str) -> String {
    let prefix = escape_glob(key_prefix);
    format!("resetkeys ~{prefix}* resetchannels &{prefix}* -@all {COMMANDS}")
}

/// What a backend on a Redis Cluster sends besides [`COMMANDS`]: sharded pub/sub (`SPUBLISH`
/// in the release scripts, `SSUBSCRIBE` and `SUNSUBSCRIBE` for wake-ups), and the `redis`
/// crate's cluster client's handshake and layout (`READONLY`, `CLUSTER SLOTS`).
const CLUSTER_COMMANDS: &str = "+spublish +ssubscribe +sunsubscribe +readonly +cluster|slots";

/// The ACL rules of a Redis user that may use a backend on a Redis Cluster whose key prefix is
/// `key_prefix`, and nothing else: [`acl_rules`] and what a cluster needs besides (sharded
/// pub/sub, `READONLY` and `CLUSTER SLOTS`). Set them on every node, replicas included (a
/// promoted replica serves the same user).
///
/// ```
/// let rules = lock_redis::cluster_acl_rules("lock:");
/// assert!(rules.starts_with(&lock_redis::acl_rules("lock:")));
/// assert!(rules.ends_with("+spublish +ssubscribe +sunsubscribe +readonly +cluster|slots"));
/// ```
pub fn cluster_acl_rules(key_prefix: &str) -> String {
    format!("{} {CLUSTER_COMMANDS}", acl_rules(key_prefix))
}

/// `text` with the characters that Redis glob patterns treat specially escaped.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
        assert_eq!(escape_glob("lock:"), "lock:");
        let rules = acl_rules("");
        assert!(
            rules.starts_with("resetkeys ~* resetchannels &* -@all +evalsha"),
            "{rules}"
        );
    }
}
