//! How user keys become Redis keys, and TTLs become milliseconds.

use std::time::Duration;

/// The Redis key that holds the lock `key`: `<prefix>{<key>}`.
///
/// The `{…}` hash tag puts the lock key and its fence counter in one Redis Cluster slot, so a
/// script may touch both. Every key of a lock starts with the same `<prefix>{<key>}` and the
/// prefix has no braces, so Redis' hash tag (from the first `{` to the first `}` after it) is
/// the same for all of them whatever braces the user key holds; the one user key that would
/// leave the tag empty, hence no tag at all, starts with `}`, and is escaped (see `tagged`).
pub(crate) fn lock_key(prefix: &str, key: &str) -> String {
    let mut text = String::with_capacity(prefix.len() + key.len() + 3);
    push_lock_key(&mut text, prefix, key);
    text
}

/// Appends [`lock_key`]`(prefix, key)` to `text`, without a new allocation when `text` has room.
pub(crate) fn push_lock_key(text: &mut String, prefix: &str, key: &str) {
    text.push_str(prefix);
    text.push('{');
    text.push_str(&tagged(key));
    text.push('}');
}

/// The Redis key that counts the fences of the lock `key`: `<prefix>{<key>}:fence`.
pub(crate) fn fence_key(prefix: &str, key: &str) -> String {
    lock_key_and(prefix, key, ":fence")
}

/// `key` as written between the braces: itself, unless it starts with `}` (which would make the
/// hash tag empty, so that Redis Cluster would hash each key of the lock whole, into different
/// slots) or with a backslash, the escape; those get a backslash in front, which keeps the mapping
/// one-to-one and the tag non-empty.
fn tagged(key: &str) -> std::borrow::Cow<'_, str> {
    if key.starts_with(['}', '\\']) {
        format!("\\{key}").into()
    } else {
        key.into()
    }
}

/// The Redis key that remembers, for a short while, which token last released the lock `key`:
/// `<prefix>{<key>}:released`. It lets a release retried after a lost reply know that its
/// first attempt deleted the key.
pub(crate) fn release_marker_key(prefix: &str, key: &str) -> String {
    lock_key_and(prefix, key, ":released")
}

/// [`lock_key`]`(prefix, key)` followed by `suffix`, in one allocation.
fn lock_key_and(prefix: &str, key: &str, suffix: &str) -> String {
    let mut text = String::with_capacity(prefix.len() + key.len() + 3 + suffix.len());
    push_lock_key(&mut text, prefix, key);
    text.push_str(suffix);
    text
}

/// The pub/sub channel on which the releases of the lock `key` are announced: named like its
/// lock key, `<prefix>{<key>}` (channels and keys are separate namespaces). A process subscribes
/// to it only while one of its threads waits for the key, so a release nobody waits for reaches
/// nobody; the hash tag puts it in the key's Redis Cluster slot, for sharded pub/sub.
pub(crate) fn release_channel(prefix: &str, key: &str) -> String {
    lock_key(prefix, key)
}

/// `ttl` in whole milliseconds, rounded up so that Redis never keeps a key for less time than
/// asked, and at least 1 (`PX 0` is an error).
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    let millis = ttl.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        assert_eq!(lock_key("lock:", "jobs:42"), "lock:{jobs:42}");
        assert_eq!(fence_key("lock:", "jobs:42"), "lock:{jobs:42}:fence");
        assert_eq!(
            release_marker_key("lock:", "jobs:42"),
            "lock:{jobs:42}:released"
        );
        assert_eq!(lock_key("", "k"), "{k}");
        assert_eq!(release_channel("lock:", "jobs:42"), "lock:{jobs:42}");
    }

    /// The slot of a key is decided by the text between its first `{` and the first `}` after
    /// it; every key of a lock must have the same one, whatever the user key contains.
    #[test]
    fn keys_hash_to_the_same_slot_even_with_braces_in_the_user_key() {
        use redis::cluster_routing::Slot;
        for user_key in [
            "a", "a}b", "{a}", "}", "{", "a{b}c", "{}", "}x", "\\", "\\}", "}}{",
        ] {
            let lock = lock_key("p:", user_key);
            let slot = Slot::for_key(&lock);
            for other in [
                fence_key("p:", user_key),
                release_marker_key("p:", user_key),
                release_channel("p:", user_key),
            ] {
                assert_eq!(
                    Slot::for_key(&other),
                    slot,
                    "{user_key:?}: {lock} and {other}"
                );
            }
            // A non-empty tag: the lock's keys are not hashed whole.
            assert!(!lock.starts_with("p:{}"), "{lock}");
        }
        // Escaping keeps different user keys apart.
        assert_ne!(lock_key("p:", "}x"), lock_key("p:", "\\}x"));
        assert_eq!(lock_key("p:", "}x"), "p:{\\}x}");
        assert_eq!(lock_key("p:", "\\}x"), "p:{\\\\}x}");
    }

    #[test]
    fn ttl_rounds_up_to_whole_milliseconds() {
        assert_eq!(ttl_millis(Duration::from_millis(3)), 3);
        assert_eq!(ttl_millis(Duration::from_micros(3001)), 4);
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(
            ttl_millis(Duration::from_secs(365 * 24 * 3600)),
            31_536_000_000
        );
        assert_eq!(ttl_millis(Duration::MAX), u64::MAX);
    }
}
