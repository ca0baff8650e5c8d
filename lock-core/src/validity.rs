//! [`DriftRule`]: how much of a TTL a holder may trust, the one place that rule is written.

use std::time::Duration;

/// How much of a lease's TTL its holder trusts: `validity = ttl - (ttl * factor + fixed)`.
///
/// The store counts the TTL on its own clock, the holder on its own; the difference (clock rate
/// drift, plus the time a reply takes to travel) is subtracted so that the holder stops trusting
/// its lease *before* the store can give the key to someone else. Each backend states its rule
/// through [`LeaseBackend::drift`](crate::LeaseBackend::drift); the manager applies it to the
/// acquisition and to every renewal alike, and a backend that checks validity itself (Redlock)
/// uses the same value. The default, [`DriftRule::DEFAULT`], is the Redlock paper's
/// `1% + 2 ms`.
///
/// ```
/// use std::time::Duration;
/// use lock_core::DriftRule;
///
/// let rule = DriftRule::DEFAULT;
/// assert_eq!(rule.validity(Duration::from_secs(10)), Some(Duration::from_millis(9_898)));
/// assert_eq!(rule.validity(Duration::from_millis(2)), None); // nothing left to trust
///
/// let cautious = DriftRule::new(0.3, Duration::from_millis(2)).expect("a valid factor");
/// assert_eq!(cautious.validity(Duration::from_secs(10)), Some(Duration::from_millis(6_998)));
/// assert!(DriftRule::new(1.5, Duration::ZERO).is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftRule {
    factor: f64,
    fixed: Duration,
}

impl Default for DriftRule {
    fn default() -> DriftRule {
        DriftRule::DEFAULT
    }
}

impl DriftRule {
    /// `1% of the TTL + 2 ms`.
    pub const DEFAULT: DriftRule = DriftRule {
        factor: 0.01,
        fixed: Duration::from_millis(2),
    };

    /// A rule that subtracts `ttl * factor + fixed`; `None` unless `0 <= factor < 1`.
    pub fn new(factor: f64, fixed: Duration) -> Option<DriftRule> {
        ((0.0..1.0).contains(&factor)).then_some(DriftRule { factor, fixed })
    }

    /// The fraction of the TTL subtracted.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The fixed allowance subtracted.
    pub fn fixed(&self) -> Duration {
        self.fixed
    }

    /// The allowance subtracted from `ttl`: `ttl * factor + fixed`.
    pub fn drift(&self, ttl: Duration) -> Duration {
        ttl.mul_f64(self.factor).saturating_add(self.fixed)
    }

    /// How long a lease granted with `ttl` may be trusted, counted from the instant before its
    /// request was sent; `None` when the drift leaves nothing.
    pub fn validity(&self, ttl: Duration) -> Option<Duration> {
        ttl.checked_sub(self.drift(ttl))
            .filter(|left| !left.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_default_is_one_percent_and_two_milliseconds() {
        let rule = DriftRule::default();
        assert_eq!(
            rule.validity(Duration::from_secs(30)),
            Some(Duration::from_secs(30) - 302 * MS)
        );
        assert_eq!(rule.validity(2 * MS), None);
        assert!(rule.validity(3 * MS).is_some());
        assert_eq!(rule.validity(Duration::ZERO), None);
    }

    #[test]
    fn factors_outside_zero_to_one_are_refused() {
        for factor in [-0.1, 1.0, 2.0, f64::NAN, f64::INFINITY] {
            assert!(DriftRule::new(factor, MS).is_none(), "{factor}");
        }
        let rule = DriftRule::new(0.0, Duration::ZERO).unwrap();
        assert_eq!(rule.validity(5 * MS), Some(5 * MS));
    }

    #[test]
    fn huge_ttls_do_not_overflow() {
        let rule = DriftRule::new(0.5, Duration::MAX).unwrap();
        assert_eq!(rule.validity(Duration::MAX), None);
        assert!(DriftRule::DEFAULT.validity(Duration::MAX).is_some());
    }
}
