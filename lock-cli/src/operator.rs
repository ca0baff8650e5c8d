//! The operators' subcommands: `lockctl status` and `lockctl release --force`.

use lock_core::KeyState;

use crate::cli::{ReleaseArgs, ServerArgs, StatusArgs};
use crate::connect::connect;
use crate::report::{human, Failure};

/// `lockctl status`: one line, or one JSON object with `--json`, on stdout.
pub(crate) fn status(args: &StatusArgs, server: &ServerArgs) -> Result<u8, Failure> {
    let connection = connect(server)?;
    let state = connection
        .manager
        .inspect(&args.key)
        .map_err(|error| connection.failure("cannot read lock", &args.key, &error))?;
    if args.json {
        println!("{}", as_json(&args.key, &state));
    } else {
        println!("{}", describe(&args.key, &state));
    }
    Ok(0)
}

/// `lockctl release --force`: deletes the key whatever holds it, and says so on stderr.
pub(crate) fn force_release(args: &ReleaseArgs, server: &ServerArgs) -> Result<u8, Failure> {
    let key = args.key.as_str();
    let connection = connect(server)?;
    let manager = &connection.manager;
    let before = manager
        .inspect(key)
        .map_err(|error| connection.failure("cannot read lock", key, &error))?;
    let deleted = manager
        .force_release(key)
        .map_err(|error| connection.failure("cannot force-release lock", key, &error))?;
    if deleted {
        // Taken between the two calls, if `before` says free.
        let holder = if before.is_held() {
            format!(" (it was held: {})", held_details(&before))
        } else {
            String::new()
        };
        eprintln!(
            "lockctl: FORCE-RELEASED lock {key:?}{holder}: its holder finds the lease lost at \
             its next renewal and may write unprotected until then; the next holder gets a \
             higher fence"
        );
    } else {
        eprintln!("lockctl: lock {key:?} was not held: nothing was deleted");
    }
    Ok(0)
}

/// `lock "KEY" is held: 12.3s of its TTL left, fence 42`, or `lock "KEY" is free (...)`.
fn describe(key: &str, state: &KeyState) -> String {
    if state.is_held() {
        format!("lock {key:?} is held: {}", held_details(state))
    } else {
        let last = state.fence().map_or_else(
            || "never locked".to_owned(),
            |fence| format!("last fence {fence}"),
        );
        format!("lock {key:?} is free ({last})")
    }
}

/// `12.3s of its TTL left, fence 42`: what is known of a holder.
fn held_details(state: &KeyState) -> String {
    let left = state.remaining().map_or_else(
        || "no TTL".to_owned(),
        |left| format!("{} of its TTL left", human(left)),
    );
    let fence = state.fence().map_or_else(
        || "no fence issued".to_owned(),
        |fence| format!("fence {fence}"),
    );
    format!("{left}, {fence}")
}

/// `{"key": ..., "held": ..., "remaining_ms": ..., "fence": ...}`; `null` for what is unknown.
fn as_json(key: &str, state: &KeyState) -> serde_json::Value {
    let remaining_ms = state
        .remaining()
        .map(|left| u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
    serde_json::json!({
        "key": key,
        "held": state.is_held(),
        "remaining_ms": remaining_ms,
        "fence": state.fence(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn states_read_well() {
        let held = KeyState::Held {
            remaining: Some(Duration::from_millis(12_340)),
            fence: Some(42),
        };
        assert_eq!(
            describe("k", &held),
            "lock \"k\" is held: 12.3s of its TTL left, fence 42"
        );
        let free = KeyState::Free { last_fence: None };
        assert_eq!(describe("k", &free), "lock \"k\" is free (never locked)");
        let json = as_json("a \"quoted\" key", &held);
        let parsed: serde_json::Value = serde_json::from_str(&json.to_string()).unwrap();
        assert_eq!(parsed["key"], "a \"quoted\" key");
        assert_eq!(parsed["remaining_ms"], 12_340);
        assert_eq!(as_json("k", &free)["fence"], serde_json::Value::Null);
    }
}
