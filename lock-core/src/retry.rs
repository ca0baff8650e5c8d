//! How waiters space their attempts: capped exponential backoff with full jitter.

use std::time::Duration;

/// The backoff between attempts of [`LockManager::acquire`](crate::LockManager::acquire) while
/// another holder has the key or the backend fails transiently.
///
/// The n-th sleep is drawn uniformly from `[0, min(max, initial * 2^n)]` ("full jitter", so
/// competing waiters spread out), then shortened so that it never runs past the holder's
/// remaining TTL when the backend reports it, nor past the caller's deadline. A backend that can
/// announce releases wakes waiters earlier still.
///
/// ```
/// use std::time::Duration;
/// use lock_core::RetryPolicy;
///
/// let policy = RetryPolicy::new(Duration::from_millis(2), Duration::from_millis(100));
/// assert_eq!(policy.initial(), Duration::from_millis(2));
/// assert_eq!(RetryPolicy::default().max(), Duration::from_millis(250));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    initial: Duration,
    max: Duration,
}

impl Default for RetryPolicy {
    /// 5 ms doubling up to 250 ms.
    fn default() -> RetryPolicy {
        RetryPolicy::new(Duration::from_millis(5), Duration::from_millis(250))
    }
}

impl RetryPolicy {
    /// Backoff starting at `initial` and doubling up to `max`. Checked when the manager is
    /// built: `initial` must be positive and not above `max`.
    pub const fn new(initial: Duration, max: Duration) -> RetryPolicy {
        RetryPolicy { initial, max }
    }

    /// The ceiling of the first sleep.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The largest ceiling any sleep can have.
    pub fn max(&self) -> Duration {
        self.max
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("retry policy: the initial backoff must be positive".into());
        }
        if self.initial > self.max {
            return Err(format!(
                "retry policy: the initial backoff {:?} exceeds the maximum {:?}",
                self.initial, self.max
            ));
        }
        Ok(())
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            ceiling: self.initial,
        }
    }
}

/// The state of one waiter's backoff.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: RetryPolicy,
    ceiling: Duration,
}

impl Backoff {
    /// The next sleep, given a uniform random `unit` in `[0, 1)` and the holder's remaining TTL
    /// if known.
    pub(crate) fn next_delay(&mut self, unit: f64, holder_remaining: Option<Duration>) -> Duration {
        let jittered = self.ceiling.mul_f64(unit.clamp(0.0, 1.0));
        self.ceiling = self.ceiling.saturating_mul(2).min(self.policy.max);
        match holder_remaining {
            Some(remaining) => jittered.min(remaining),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_up_to_max() {
        let mut backoff = RetryPolicy::new(10 * MS, 35 * MS).backoff();
        let delays: Vec<_> = (0..5)
            .map(|_| backoff.next_delay(0.999_999, None))
            .collect();
        let rounded: Vec<_> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(rounded, vec![9, 19, 34, 34, 34]);
    }

    #[test]
    fn jitter_scales_the_ceiling() {
        let mut backoff = RetryPolicy::new(100 * MS, 100 * MS).backoff();
        assert_eq!(backoff.next_delay(0.0, None), Duration::ZERO);
        assert_eq!(backoff.next_delay(0.5, None), 50 * MS);
    }

    #[test]
    fn never_sleeps_past_the_holders_ttl() {
        let mut backoff = RetryPolicy::new(100 * MS, 100 * MS).backoff();
        assert_eq!(backoff.next_delay(0.9, Some(3 * MS)), 3 * MS);
    }

    #[test]
    fn validation_rejects_bad_policies() {
        assert!(RetryPolicy::new(Duration::ZERO, MS).validate().is_err());
        assert!(RetryPolicy::new(2 * MS, MS).validate().is_err());
        assert!(RetryPolicy::default().validate().is_ok());
    }
}
