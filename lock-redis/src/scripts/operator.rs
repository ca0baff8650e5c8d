//! The replies of the operators' scripts: `inspect.lua` (who holds a lock) and
//! `force_release.lua` (delete it whatever its token).

use std::time::Duration;

use lock_core::{KeyState, Ownership};
use redis::Value;

use super::{as_i64, parse_ownership, unexpected};
use crate::errors::CallFailure;

/// `{pttl, counter}` from `inspect.lua`: free (`pttl` -2), held without TTL (-1), or held with
/// `pttl` milliseconds left; the counter is the last fence issued, or nil.
pub(crate) fn parse_inspect(value: Value) -> Result<KeyState, CallFailure> {
    let value = value.extract_error()?;
    if let Value::Array(items) = &value {
        if let [pttl, counter] = items.as_slice() {
            // Fences start above 0: a counter of 0 means none was issued.
            let fence = match counter {
                Value::Nil => Some(None),
                counter => as_i64(counter)
                    .and_then(|fence| u64::try_from(fence).ok())
                    .map(|fence| Some(fence).filter(|fence| *fence > 0)),
            };
            match (as_i64(pttl), fence) {
                (Some(-2), Some(fence)) => return Ok(KeyState::Free { last_fence: fence }),
                (Some(-1), Some(fence)) => {
                    return Ok(KeyState::Held {
                        remaining: None,
                        fence,
                    })
                }
                (Some(pttl), Some(fence)) if pttl >= 0 => {
                    let remaining = u64::try_from(pttl).ok().map(Duration::from_millis);
                    return Ok(KeyState::Held { remaining, fence });
                }
                _ => {}
            }
        }
    }
    Err(unexpected(&value))
}

/// `1` (the lock was held and is deleted) or `0` (it was free) from `force_release.lua`.
pub(crate) fn parse_force_release(value: Value) -> Result<bool, CallFailure> {
    parse_ownership(value).map(|ownership| ownership == Ownership::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(pttl: i64, counter: Value) -> Value {
        Value::Array(vec![Value::Int(pttl), counter])
    }

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn inspect_replies() {
        assert_eq!(
            parse_inspect(reply(-2, Value::Nil)).unwrap(),
            KeyState::Free { last_fence: None }
        );
        assert_eq!(
            parse_inspect(reply(-2, bulk("1700000000000001"))).unwrap(),
            KeyState::Free {
                last_fence: Some(1_700_000_000_000_001)
            }
        );
        assert_eq!(
            parse_inspect(reply(1500, bulk("42"))).unwrap(),
            KeyState::Held {
                remaining: Some(Duration::from_millis(1500)),
                fence: Some(42)
            }
        );
        assert_eq!(
            parse_inspect(reply(-1, bulk("0"))).unwrap(),
            KeyState::Held {
                remaining: None,
                fence: None
            }
        );
        for bad in [
            Value::Nil,
            reply(-3, Value::Nil),
            reply(10, bulk("not a number")),
            reply(10, bulk("-5")),
            Value::Array(vec![Value::Int(10)]),
        ] {
            assert!(
                matches!(parse_inspect(bad), Err(CallFailure::UnexpectedReply(_))),
                "accepted a bad reply"
            );
        }
        let wrongtype = redis::parse_redis_value(b"-WRONGTYPE wrong kind\r\n").unwrap();
        assert!(matches!(
            parse_inspect(wrongtype),
            Err(CallFailure::Redis(_))
        ));
    }

    #[test]
    fn force_release_replies() {
        assert!(parse_force_release(Value::Int(1)).unwrap());
        assert!(!parse_force_release(Value::Int(0)).unwrap());
        assert!(parse_force_release(Value::Okay).is_err());
    }
}
