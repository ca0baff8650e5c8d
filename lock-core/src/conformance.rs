//! The conformance suite: one check per point of the [`LeaseBackend`] contract.
//!
//! Enabled by the `conformance` feature. A backend's tests implement [`ConformanceTarget`] and
//! stamp one `#[test]` per check with [`conformance_tests!`](crate::conformance_tests), so every
//! check passes or fails on its own:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use lock_core::conformance::ConformanceTarget;
//! use lock_core::{LeaseBackend, LockManager, LockManagerBuilder, ManualClock};
//! use lock_memory::MemoryBackend;
//!
//! struct Memory {
//!     clock: ManualClock,
//!     backend: MemoryBackend,
//! }
//!
//! impl ConformanceTarget for Memory {
//!     fn builder(&self) -> LockManagerBuilder {
//!         LockManager::builder(self.backend.clone()).clock(self.clock.clone())
//!     }
//!     fn backend(&self) -> Arc<dyn LeaseBackend> {
//!         Arc::new(self.backend.clone())
//!     }
//!     fn ttl(&self) -> Duration {
//!         Duration::from_secs(30)
//!     }
//!     fn advance(&self, by: Duration) {
//!         self.clock.advance(by);
//!     }
//!     fn delete_key(&self, key: &str) {
//!         self.backend.revoke(key);
//!     }
//!     fn set_unreachable(&self, unreachable: bool) {
//!         self.backend.set_unreachable(unreachable);
//!     }
//! }
//!
//! let clock = ManualClock::new();
//! let target = Memory { backend: MemoryBackend::with_clock(clock.clone()), clock };
//! lock_core::conformance::mutual_exclusion(&target);
//! lock_core::conformance::fences_strictly_increase(&target);
//! ```
//!
//! In a test file, `lock_core::conformance_tests!(make_target());` expands to one test per
//! check, each calling `make_target()` afresh.
//!
//! A failed check panics with a message that names what went wrong: these are test functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    AcquireOutcome, LeaseBackend, LeaseEvent, LeaseRequest, LockManager, LockManagerBuilder,
    LostReason, Ownership,
};

/// A backend under test, with the means to move its time and to break it.
pub trait ConformanceTarget {
    /// A builder for a manager over the backend under test, set to the target's clock. Checks
    /// may build several managers, which must share one store.
    fn builder(&self) -> LockManagerBuilder;

    /// The backend under test, for checks that drive tokens directly.
    fn backend(&self) -> Arc<dyn LeaseBackend>;

    /// The TTL the checks use. Virtual-time targets can afford long ones; real-time targets
    /// should keep it around a second.
    fn ttl(&self) -> Duration;

    /// Lets `by` pass: advances a manual clock, or sleeps on a real one.
    fn advance(&self, by: Duration);

    /// Deletes `key` behind its holder's back.
    fn delete_key(&self, key: &str);

    /// Makes every backend call fail (or time out), or work again.
    fn set_unreachable(&self, unreachable: bool);

    /// How late after `valid_until` a loss may be reported: scheduling and round-trip slack.
    fn report_slack(&self) -> Duration {
        Duration::from_millis(100)
    }

    /// A key no other check uses.
    fn key(&self, check: &str) -> String {
        format!("conformance:{check}:{:016x}", fastrand::u64(..))
    }
}

fn manager(target: &dyn ConformanceTarget) -> LockManager {
    target
        .builder()
        .build()
        .expect("the target's builder must build")
}

fn step(target: &dyn ConformanceTarget, managers: &[&LockManager], by: Duration) {
    target.advance(by);
    for manager in managers {
        manager.settle();
    }
}

fn request<'a>(key: &'a str, token: &'a str, ttl: Duration) -> LeaseRequest<'a> {
    LeaseRequest { key, token, ttl }
}

const NO_LIMIT: Duration = Duration::MAX;

/// Renews one lease through [`LeaseBackend::renew_batch`]: a batch of one.
pub fn renew_one(
    backend: &dyn LeaseBackend,
    request: &LeaseRequest<'_>,
    timeout: Duration,
) -> Result<Ownership, crate::BackendError> {
    backend
        .renew_batch(std::slice::from_ref(request), timeout)
        .pop()
        .unwrap_or_else(|| panic!("renew_batch returned no result for a batch of one"))
}

/// Contract 1: while a lease is held and renewed, no other token can acquire the key.
pub fn mutual_exclusion(target: &dyn ConformanceTarget) {
    let key = target.key("mutual_exclusion");
    let ttl = target.ttl();
    let (first, second) = (manager(target), manager(target));
    let lease = first
        .try_acquire(&key, ttl)
        .unwrap()
        .expect("a free key is granted");
    assert!(
        second.try_acquire(&key, ttl).unwrap().is_none(),
        "a second manager acquired a held key"
    );
    assert!(
        first.try_acquire(&key, ttl).unwrap().is_none(),
        "the same manager acquired a held key twice"
    );
    let outcome = target
        .backend()
        .try_acquire(&request(&key, "intruder", ttl), NO_LIMIT)
        .unwrap();
    match outcome {
        AcquireOutcome::Held { remaining } => {
            if let Some(remaining) = remaining {
                assert!(
                    remaining <= ttl,
                    "the holder's remaining TTL exceeds its TTL"
                );
            }
        }
        AcquireOutcome::Acquired { .. } => panic!("another token acquired a held key"),
    }
    // Held across several renewal periods.
    for _ in 0..6 {
        step(target, &[&first, &second], ttl / 4);
        assert!(lease.is_held(), "the renewed lease was lost");
        assert!(
            second.try_acquire(&key, ttl).unwrap().is_none(),
            "acquired a renewed key"
        );
    }
    lease.release().unwrap();
    let next = second.try_acquire(&key, ttl).unwrap();
    assert!(next.is_some(), "a released key could not be acquired");
}

/// Contract 2: only the owner's token renews or releases; a stale or foreign token changes
/// nothing.
pub fn only_owner_renews_or_releases(target: &dyn ConformanceTarget) {
    let key = target.key("only_owner_renews_or_releases");
    let ttl = target.ttl();
    let backend = target.backend();
    let owner = request(&key, "owner-token", ttl);
    let AcquireOutcome::Acquired { fence } = backend.try_acquire(&owner, NO_LIMIT).unwrap() else {
        panic!("a free key was not granted");
    };
    match backend.try_acquire(&owner, NO_LIMIT).unwrap() {
        AcquireOutcome::Acquired { fence: again } => assert!(
            again >= fence,
            "the holder's own token got a lower fence back: {again} < {fence}"
        ),
        AcquireOutcome::Held { .. } => panic!("the holder's own token must get its lease back"),
    }
    let foreign = request(&key, "foreign-token", ttl);
    assert_eq!(
        renew_one(&*backend, &foreign, NO_LIMIT).unwrap(),
        Ownership::NotOwned
    );
    assert_eq!(
        backend.release(&key, "foreign-token", NO_LIMIT).unwrap(),
        Ownership::NotOwned
    );
    assert!(
        matches!(
            backend.try_acquire(&foreign, NO_LIMIT).unwrap(),
            AcquireOutcome::Held { .. }
        ),
        "a foreign release freed the key"
    );
    let batch = backend.renew_batch(&[foreign, owner], NO_LIMIT);
    assert_eq!(batch.len(), 2, "renew_batch returns one result per request");
    assert_eq!(batch[0].as_ref().unwrap(), &Ownership::NotOwned);
    assert_eq!(batch[1].as_ref().unwrap(), &Ownership::Owned);
    assert_eq!(
        renew_one(&*backend, &owner, NO_LIMIT).unwrap(),
        Ownership::Owned
    );
    assert_eq!(
        backend.release(&key, "owner-token", NO_LIMIT).unwrap(),
        Ownership::Owned
    );
    assert_eq!(
        backend.release(&key, "owner-token", NO_LIMIT).unwrap(),
        Ownership::NotOwned,
        "a second release by the same token"
    );
}

/// Contract 3: fences strictly increase per key, across releases and expiries.
pub fn fences_strictly_increase(target: &dyn ConformanceTarget) {
    let key = target.key("fences_strictly_increase");
    let ttl = target.ttl();
    let manager = manager(target);
    let backend = target.backend();
    let mut fences = Vec::new();
    for _ in 0..5 {
        let lease = manager.try_acquire(&key, ttl).unwrap().expect("free");
        fences.push(lease.fence());
        lease.release().unwrap();
    }
    // A lease that expires instead of being released.
    match backend
        .try_acquire(&request(&key, "expiring", ttl), NO_LIMIT)
        .unwrap()
    {
        AcquireOutcome::Acquired { fence } => fences.push(fence),
        AcquireOutcome::Held { .. } => panic!("a released key was still held"),
    }
    step(target, &[&manager], ttl + ttl / 10);
    let lease = manager
        .try_acquire(&key, ttl)
        .unwrap()
        .expect("expired key is free");
    fences.push(lease.fence());
    // Another key's fences do not disturb this one's.
    let other = manager
        .try_acquire(&target.key("other"), ttl)
        .unwrap()
        .expect("free");
    drop(other);
    drop(lease);
    let last = manager.try_acquire(&key, ttl).unwrap().expect("free");
    fences.push(last.fence());
    assert!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "fences did not strictly increase: {fences:?}"
    );
}

/// Contract 4: an unrenewed lease frees the key after its TTL, not before.
pub fn unrenewed_lease_expires_after_ttl(target: &dyn ConformanceTarget) {
    let key = target.key("unrenewed_lease_expires_after_ttl");
    let ttl = target.ttl();
    let backend = target.backend();
    let started = Instant::now();
    assert!(matches!(
        backend
            .try_acquire(&request(&key, "silent", ttl), NO_LIMIT)
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    target.advance(ttl / 2);
    let probe = request(&key, "probe", ttl);
    let early = backend.try_acquire(&probe, NO_LIMIT).unwrap();
    if matches!(early, AcquireOutcome::Acquired { .. }) {
        panic!(
            "the key was free after half its TTL ({:?} real time)",
            started.elapsed()
        );
    }
    target.advance(ttl / 2 + ttl / 10);
    assert!(
        matches!(
            backend.try_acquire(&probe, NO_LIMIT).unwrap(),
            AcquireOutcome::Acquired { .. }
        ),
        "the key was still held after its TTL"
    );
}

/// Contract 5: a renewed lease outlives its TTL many times over.
pub fn renewal_extends_lease(target: &dyn ConformanceTarget) {
    let key = target.key("renewal_extends_lease");
    let ttl = target.ttl();
    let manager = manager(target);
    let lease = manager.acquire(&key, ttl).unwrap();
    let first_valid_until = lease.valid_until();
    for _ in 0..16 {
        step(target, &[&manager], ttl / 4);
        lease.ensure_held().unwrap();
    }
    assert!(
        lease.valid_until() > first_valid_until + 3 * ttl,
        "valid_until did not move forward with renewals"
    );
    assert!(
        lease.lost().try_recv().is_err(),
        "a renewed lease reported a loss"
    );
    let backend = target.backend();
    assert!(matches!(
        backend
            .try_acquire(&request(&key, "other", ttl), NO_LIMIT)
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
}

/// Counts `Lost` events.
fn loss_counter(builder: LockManagerBuilder) -> (LockManager, Arc<AtomicUsize>) {
    let losses = Arc::new(AtomicUsize::new(0));
    let counter = losses.clone();
    let manager = builder
        .event_hook(move |event: &LeaseEvent<'_>| {
            if let LeaseEvent::Lost { .. } = event {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    (manager, losses)
}

/// Contract 6: loss is reported exactly once, no later than `valid_until` (plus the target's
/// slack), whether the key was deleted, taken over, or the backend stopped answering.
pub fn loss_is_reported_once(target: &dyn ConformanceTarget) {
    let ttl = target.ttl();
    let slack = target.report_slack();

    // Deleted behind the holder's back: reported at the next renewal, as taken over.
    let (manager, losses) = loss_counter(target.builder());
    let key = target.key("loss_deleted");
    let lease = manager.acquire(&key, ttl).unwrap();
    target.delete_key(&key);
    step(target, &[&manager], ttl / 2);
    let reason = lease
        .lost()
        .try_recv()
        .expect("a deleted key was not reported lost");
    assert!(matches!(reason, LostReason::TakenOver), "reason {reason:?}");
    assert!(!lease.is_held());
    assert!(lease.ensure_held().unwrap_err().is_lost());

    // Taken over by another holder.
    let key = target.key("loss_taken_over");
    let taken = manager.acquire(&key, ttl).unwrap();
    target.delete_key(&key);
    let usurper = manager
        .try_acquire(&key, ttl)
        .unwrap()
        .expect("deleted key is free");
    step(target, &[&manager], ttl / 2);
    assert!(matches!(taken.lost().try_recv(), Ok(LostReason::TakenOver)));
    assert!(usurper.is_held());
    drop((lease, taken, usurper));

    // The backend stops answering: suspect first, lost at valid_until.
    let key = target.key("loss_unreachable");
    let lease = manager.acquire(&key, ttl).unwrap();
    let lost = lease.lost();
    target.set_unreachable(true);
    let tick = ttl / 20;
    let reported_at = loop {
        step(target, &[&manager], tick);
        let now = manager.clock().now();
        let valid_until = lease.valid_until();
        match lost.try_recv() {
            Ok(reason) => {
                assert!(matches!(reason, LostReason::Expired), "reason {reason:?}");
                assert!(now + slack >= valid_until, "lost long before valid_until");
                break now;
            }
            Err(_) => assert!(
                now <= valid_until + tick + slack,
                "no loss reported {:?} after valid_until",
                now - valid_until
            ),
        }
        if now < valid_until {
            assert!(lease.ensure_held().is_ok(), "lost before valid_until");
        }
    };
    assert!(!lease.is_held());
    target.set_unreachable(false);
    // No second report, from any path.
    step(target, &[&manager], ttl);
    assert!(!lease.is_held(), "a lost lease came back");
    assert!(lost.try_recv().is_err(), "the loss was reported twice");
    assert!(lease.release().unwrap_err().is_lost());
    assert_eq!(
        losses.load(Ordering::SeqCst),
        3,
        "three leases lost, three Lost events (last at {reported_at:?})"
    );
}

/// Contract 7: release after loss is a typed result, and never deletes the next holder's key.
pub fn release_after_loss_is_safe(target: &dyn ConformanceTarget) {
    let key = target.key("release_after_loss_is_safe");
    let ttl = target.ttl();
    let manager = manager(target);
    let stale = manager.acquire(&key, ttl).unwrap();
    target.delete_key(&key);
    let next = manager
        .try_acquire(&key, ttl)
        .unwrap()
        .expect("deleted key is free");
    let error = stale.release().expect_err("release of a lost lease");
    assert!(error.is_lost(), "{error}");
    assert!(next.is_held());
    assert!(
        manager.try_acquire(&key, ttl).unwrap().is_none(),
        "the stale release deleted the next holder's key"
    );
    step(target, &[&manager], ttl / 2);
    next.ensure_held().unwrap();
}

/// Contract 8: no renewal after release: a released key is never brought back.
pub fn no_renewal_after_release(target: &dyn ConformanceTarget) {
    let key = target.key("no_renewal_after_release");
    let ttl = target.ttl();
    let manager = manager(target);
    for _ in 0..20 {
        let lease = manager.acquire(&key, ttl).unwrap();
        lease.release().unwrap();
    }
    for _ in 0..4 {
        step(target, &[&manager], ttl / 2);
    }
    let backend = target.backend();
    assert_eq!(
        renew_one(&*backend, &request(&key, "stale", ttl), NO_LIMIT).unwrap(),
        Ownership::NotOwned
    );
    let fresh = manager.try_acquire(&key, ttl).unwrap();
    assert!(fresh.is_some(), "a released key was held again");
}

/// Stamps one `#[test]` per conformance check, each calling `$target` for a fresh
/// [`ConformanceTarget`].
///
/// ```text
/// mod conformance {
///     lock_core::conformance_tests!(crate::memory_target());
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($target:expr) => {
        $crate::conformance_tests!(@checks $target;
            mutual_exclusion,
            only_owner_renews_or_releases,
            fences_strictly_increase,
            unrenewed_lease_expires_after_ttl,
            renewal_extends_lease,
            loss_is_reported_once,
            release_after_loss_is_safe,
            no_renewal_after_release,
        );
    };
    (@checks $target:expr; $($check:ident,)*) => {
        $(
            #[test]
            fn $check() {
                let target = $target;
                $crate::conformance::$check(&target);
            }
        )*
    };
}
