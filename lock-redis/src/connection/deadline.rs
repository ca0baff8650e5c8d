//! [`Deadline`]: when a call must be done by, so that every phase of it (a pool checkout,
//! opening a connection, asking the sentinels, the round trips) is bounded by what is left.

use std::time::{Duration, Instant};

use redis::RedisError;

use crate::errors::CallFailure;

/// When a call must be done by: the caller's timeout, narrowed per phase by the configured
/// checkout and command timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    started: Instant,
    /// `None`: the caller set no limit (`Duration::MAX`).
    at: Option<Instant>,
}

impl Deadline {
    /// A deadline `timeout` from now (none if that is beyond what `Instant` can hold).
    pub(crate) fn after(timeout: Duration) -> Deadline {
        let started = Instant::now();
        Deadline {
            started,
            at: started.checked_add(timeout),
        }
    }

    /// This deadline, or `limit` from now if that comes first.
    pub(crate) fn narrowed(&self, limit: Duration) -> Deadline {
        let limit_at = Instant::now().checked_add(limit);
        let at = match (self.at, limit_at) {
            (Some(at), Some(limit_at)) => Some(at.min(limit_at)),
            (at, None) => at,
            (None, limit_at) => limit_at,
        };
        Deadline {
            started: self.started,
            at,
        }
    }

    /// Time left, or `None` for no limit.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// How long the call has run.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The timeout failure for this call.
    pub(crate) fn timed_out(&self) -> CallFailure {
        CallFailure::Timeout {
            waited: self.elapsed(),
        }
    }

    /// Turns a `redis` error into a call failure, naming socket timeouts as such.
    pub(crate) fn failure(&self, error: RedisError) -> CallFailure {
        if error.is_timeout() {
            self.timed_out()
        } else {
            CallFailure::Redis(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_without_limit_never_overflows() {
        let deadline = Deadline::after(Duration::MAX);
        assert_eq!(deadline.remaining(), None);
        let narrowed = deadline.narrowed(Duration::from_secs(2));
        let left = narrowed.remaining().unwrap();
        assert!(left <= Duration::from_secs(2) && left > Duration::from_secs(1));
    }

    #[test]
    fn narrowing_keeps_the_earlier_deadline() {
        let deadline = Deadline::after(Duration::from_millis(50));
        assert!(
            deadline
                .narrowed(Duration::from_secs(5))
                .remaining()
                .unwrap()
                <= Duration::from_millis(50)
        );
    }

    #[test]
    fn an_expired_deadline_is_a_timeout_not_a_zero_socket_timeout() {
        let deadline = Deadline::after(Duration::ZERO);
        assert_eq!(deadline.remaining(), Some(Duration::ZERO));
        assert!(matches!(deadline.timed_out(), CallFailure::Timeout { .. }));
        let error = RedisError::from(std::io::Error::new(std::io::ErrorKind::WouldBlock, "slow"));
        assert!(matches!(
            deadline.failure(error),
            CallFailure::Timeout { .. }
        ));
    }
}
