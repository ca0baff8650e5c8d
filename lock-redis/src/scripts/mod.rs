//! The Lua scripts that make each lease operation atomic, and the parsing of their replies.
//!
//! Each script lives next to this file, in `src/scripts/*.lua`; `keys` says what they store where. Calls send `EVALSHA`; when the server does not know
//! the script (`NOSCRIPT`, after a restart or `SCRIPT FLUSH`), the call falls back to `EVAL`,
//! which also caches the script for the next `EVALSHA`.

pub(crate) mod keys;
pub(crate) mod operator;

use std::time::Duration;

use lock_core::{AcquireOutcome, Ownership};
use redis::{Cmd, Value};

use crate::errors::CallFailure;

/// A Lua script, with its SHA1 computed once.
#[derive(Debug, Clone)]
pub(crate) struct LuaScript {
    source: &'static str,
    script: redis::Script,
}

impl LuaScript {
    fn new(source: &'static str) -> LuaScript {
        LuaScript {
            source,
            script: redis::Script::new(source),
        }
    }

    /// `EVALSHA <sha> <#keys> <keys…> <args…>`.
    pub(crate) fn evalsha(&self, keys: &[&str], args: &[&str]) -> Cmd {
        self.call(ScriptBy::Hash, keys, args, Room::default())
    }

    /// `EVAL <source> <#keys> <keys…> <args…>`: the fallback for `NOSCRIPT`.
    pub(crate) fn eval(&self, keys: &[&str], args: &[&str]) -> Cmd {
        self.call(ScriptBy::Source, keys, args, Room::default())
    }

    /// `EVALSHA` or `EVAL`, with room for `more` arguments still to come, so that the command
    /// is built in buffers allocated once (the `redis` crate grows them as arguments come
    /// otherwise: a third of the client's instructions in an acquire, measured with callgrind).
    pub(crate) fn call(&self, by: ScriptBy, keys: &[&str], args: &[&str], more: Room) -> Cmd {
        let (name, script): (&str, &str) = match by {
            ScriptBy::Hash => ("EVALSHA", self.script.get_hash()),
            ScriptBy::Source => ("EVAL", self.source),
        };
        let given = || keys.iter().chain(args);
        let arguments = 3 + keys.len() + args.len() + more.arguments;
        let bytes = name.len() + script.len() + 20 + given().map(|arg| arg.len()).sum::<usize>();
        let mut cmd = Cmd::with_capacity(arguments, bytes.saturating_add(more.bytes));
        cmd.arg(name).arg(script).arg(keys.len());
        for arg in given() {
            cmd.arg(*arg);
        }
        cmd
    }

    /// `SCRIPT LOAD <source>`.
    pub(crate) fn load(&self) -> Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.source);
        cmd
    }
}

/// Room to keep in a command for arguments added after it is made.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Room {
    /// How many.
    pub(crate) arguments: usize,
    /// Their bytes in all.
    pub(crate) bytes: usize,
}

/// How a call names its script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScriptBy {
    /// By its SHA1 (`EVALSHA`): the usual call.
    Hash,
    /// By its source (`EVAL`): for a server that does not have it cached (`NOSCRIPT`).
    Source,
}

/// The lease scripts.
#[derive(Debug, Clone)]
pub(crate) struct Scripts {
    /// `acquire.lua`: take a free lock and issue its fence.
    pub(crate) acquire: LuaScript,
    /// `renew.lua`: extend the TTL of each lock its token holds (many keys per call).
    pub(crate) renew: LuaScript,
    /// `release.lua`: delete the lock if the token holds it, and publish the release.
    pub(crate) release: LuaScript,
    /// `raise_fence.lua`: raise the fence counter to at least a given fence (Redlock).
    pub(crate) raise_fence: LuaScript,
    /// `inspect.lua`: read a lock's remaining TTL and fence counter at one instant.
    pub(crate) inspect: LuaScript,
    /// `force_release.lua`: delete a lock whatever its token, and publish the release.
    pub(crate) force_release: LuaScript,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            acquire: LuaScript::new(include_str!("acquire.lua")),
            renew: LuaScript::new(include_str!("renew.lua")),
            release: LuaScript::new(include_str!("release.lua")),
            raise_fence: LuaScript::new(include_str!("raise_fence.lua")),
            inspect: LuaScript::new(include_str!("inspect.lua")),
            force_release: LuaScript::new(include_str!("force_release.lua")),
        }
    }
}

/// Whether a reply is the server's `NOSCRIPT` error.
pub(crate) fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// `{1, fence}` or `{0, pttl}` from `acquire.lua`.
pub(crate) fn parse_acquire(value: Value) -> Result<AcquireOutcome, CallFailure> {
    let value = value.extract_error()?;
    if let Value::Array(items) = &value {
        if let [flag, number] = items.as_slice() {
            match (as_i64(flag), as_i64(number)) {
                (Some(1), Some(fence)) => {
                    if let Ok(fence) = u64::try_from(fence) {
                        return Ok(AcquireOutcome::Acquired { fence });
                    }
                }
                (Some(0), Some(pttl)) => {
                    let remaining = u64::try_from(pttl).ok().map(Duration::from_millis);
                    return Ok(AcquireOutcome::Held { remaining });
                }
                _ => {}
            }
        }
    }
    Err(unexpected(&value))
}

/// The reply of one `renew.lua` call over `count` keys: an ownership, or that key's own error,
/// per key. A failed call, or a reply of the wrong shape, fails every key of the call.
pub(crate) fn parse_renewals(
    reply: Result<Value, CallFailure>,
    count: usize,
) -> Vec<Result<Ownership, CallFailure>> {
    let failure = match reply {
        Ok(Value::Array(items)) if items.len() == count => {
            return items.into_iter().map(parse_ownership).collect();
        }
        Ok(value) => match value.extract_error() {
            Err(error) => CallFailure::from(error),
            Ok(value) => unexpected(&value),
        },
        Err(failure) => failure,
    };
    (0..count).map(|_| Err(failure.clone())).collect()
}

/// `1` or `0` from `release.lua`, and from `renew.lua` for each of its keys.
pub(crate) fn parse_ownership(value: Value) -> Result<Ownership, CallFailure> {
    let value = value.extract_error()?;
    match as_i64(&value) {
        Some(1) => Ok(Ownership::Owned),
        Some(0) => Ok(Ownership::NotOwned),
        _ => Err(unexpected(&value)),
    }
}

/// An integer reply, or a string holding one (Lua returns counters read with `GET` as strings).
fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Int(number) => Some(*number),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

fn unexpected(value: &Value) -> CallFailure {
    let mut text = format!("{value:?}");
    if text.len() > 120 {
        let mut cut = 120;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    CallFailure::UnexpectedReply(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn acquire_replies() {
        assert_eq!(
            parse_acquire(Value::Array(vec![
                Value::Int(1),
                Value::Int(1_700_000_000_000_001)
            ]))
            .unwrap(),
            AcquireOutcome::Acquired {
                fence: 1_700_000_000_000_001
            }
        );
        assert_eq!(
            parse_acquire(Value::Array(vec![Value::Int(1), bulk("42")])).unwrap(),
            AcquireOutcome::Acquired { fence: 42 }
        );
        assert_eq!(
            parse_acquire(Value::Array(vec![Value::Int(0), Value::Int(1500)])).unwrap(),
            AcquireOutcome::Held {
                remaining: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(
            parse_acquire(Value::Array(vec![Value::Int(0), Value::Int(-1)])).unwrap(),
            AcquireOutcome::Held { remaining: None }
        );
        for bad in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Int(1), Value::Int(-5)]),
            Value::Array(vec![Value::Int(2), Value::Int(5)]),
        ] {
            assert!(
                matches!(parse_acquire(bad), Err(CallFailure::UnexpectedReply(_))),
                "accepted a bad reply"
            );
        }
    }

    #[test]
    fn ownership_replies() {
        assert_eq!(parse_ownership(Value::Int(1)).unwrap(), Ownership::Owned);
        assert_eq!(parse_ownership(Value::Int(0)).unwrap(), Ownership::NotOwned);
        assert!(matches!(
            parse_ownership(Value::Okay),
            Err(CallFailure::UnexpectedReply(_))
        ));
        let error = redis::parse_redis_value(b"-WRONGTYPE wrong kind\r\n").unwrap();
        assert!(matches!(parse_ownership(error), Err(CallFailure::Redis(_))));
    }

    #[test]
    fn renewal_replies_go_to_their_own_keys() {
        let wrongtype = redis::parse_redis_value(b"-WRONGTYPE wrong kind\r\n").unwrap();
        let reply = Value::Array(vec![Value::Int(1), wrongtype, Value::Int(0)]);
        let results = parse_renewals(Ok(reply), 3);
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].as_ref().unwrap(), &Ownership::Owned);
        assert!(matches!(results[1], Err(CallFailure::Redis(_))));
        assert_eq!(results[2].as_ref().unwrap(), &Ownership::NotOwned);
        // A failed call, or one reply too few, fails every key of the call.
        let busy = redis::parse_redis_value(b"-BUSY script running\r\n").unwrap();
        for reply in [
            Ok(busy),
            Ok(Value::Array(vec![Value::Int(1)])),
            Err(CallFailure::UnexpectedReply("gone".into())),
        ] {
            let results = parse_renewals(reply, 2);
            assert_eq!(results.len(), 2);
            assert!(results.iter().all(Result::is_err), "{results:?}");
        }
    }

    #[test]
    fn noscript_is_recognised() {
        let reply = redis::parse_redis_value(b"-NOSCRIPT No matching script.\r\n").unwrap();
        assert!(is_noscript(&reply));
        assert!(!is_noscript(&Value::Int(1)));
    }

    #[test]
    fn commands_carry_keys_then_arguments() {
        let scripts = Scripts::new();
        let packed = scripts
            .renew
            .evalsha(&["lock:{k}"], &["token", "3000"])
            .get_packed_command();
        let text = String::from_utf8(packed).unwrap();
        assert!(text.contains("EVALSHA"));
        assert!(text.contains(scripts.renew.script.get_hash()));
        let order: Vec<usize> = ["\r\n1\r\n", "lock:{k}", "token", "3000"]
            .iter()
            .map(|part| text.find(part).unwrap())
            .collect();
        assert!(order.windows(2).all(|pair| pair[0] < pair[1]), "{text}");
        assert!(
            String::from_utf8(scripts.acquire.eval(&["a", "b"], &[]).get_packed_command())
                .unwrap()
                .contains("redis.pcall('TIME')")
        );
    }

    #[test]
    fn long_unexpected_replies_are_abbreviated() {
        let CallFailure::UnexpectedReply(text) = unexpected(&bulk(&"é".repeat(200))) else {
            panic!("not an unexpected reply");
        };
        assert!(text.chars().count() < 130);
    }
}
