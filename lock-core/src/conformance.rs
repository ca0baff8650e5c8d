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

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::{
    AcquireOutcome, BackendError, Clock, DriftRule, KeyState, LeaseBackend, LeaseEvent,
    LeaseRequest, LockManager, LockManagerBuilder, LostReason, Ownership, ReleaseWatch,
    CLEANUP_TIMEOUT,
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

    /// The clock the target's managers use (the one [`builder`](Self::builder) sets). Checks
    /// that wrap the backend in fault injection build their managers on it.
    fn clock(&self) -> Clock {
        Clock::System
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
///
/// # Errors
///
/// The backend's error for the renewal.
///
/// # Panics
///
/// If the backend breaks its contract by returning no result for the batch.
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

/// Contract 1: while a lease is held and renewed, no other token can acquire the key; the
/// holder's own thread is told it holds it ([`Error::AlreadyHeld`](crate::Error::AlreadyHeld)).
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
    let again = first.try_acquire(&key, ttl);
    assert!(
        matches!(&again, Err(error) if error.is_already_held()),
        "the holder's thread acquired its key again, or was not told it holds it: {again:?}"
    );
    std::thread::scope(|scope| {
        let other_thread =
            scope.spawn(|| first.try_acquire(&key, ttl).map(|lease| lease.is_none()));
        assert!(
            other_thread.join().unwrap().unwrap(),
            "another thread of the same manager acquired a held key"
        );
    });
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
    // A second release by the same token changes nothing (a backend that remembers its
    // releases may answer `Owned` again: see contract point 12).
    let _ = backend.release(&key, "owner-token", NO_LIMIT).unwrap();
    assert!(
        matches!(
            backend.try_acquire(&foreign, NO_LIMIT).unwrap(),
            AcquireOutcome::Acquired { .. }
        ),
        "the key was not free after its release"
    );
    assert_eq!(
        backend.release(&key, "owner-token", NO_LIMIT).unwrap(),
        Ownership::NotOwned,
        "a stale token's release while another token holds the key"
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
        self::manager(target)
            .try_acquire(&key, ttl)
            .unwrap()
            .is_none(),
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

/// Events of one manager, counted by kind.
#[derive(Default)]
struct EventCounts {
    lost: AtomicUsize,
    released: AtomicUsize,
}

/// A manager from `builder` whose hook counts `Lost` and `Released` events.
fn counting(builder: LockManagerBuilder) -> (LockManager, Arc<EventCounts>) {
    let counts = Arc::new(EventCounts::default());
    let seen = counts.clone();
    let manager = builder
        .event_hook(move |event: &LeaseEvent<'_>| match event {
            LeaseEvent::Lost { .. } => {
                seen.lost.fetch_add(1, Ordering::SeqCst);
            }
            LeaseEvent::Released { .. } => {
                seen.released.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        })
        .build()
        .unwrap();
    (manager, counts)
}

impl EventCounts {
    fn get(&self) -> (usize, usize) {
        (
            self.lost.load(Ordering::SeqCst),
            self.released.load(Ordering::SeqCst),
        )
    }
}

/// Faults that checks inject around the backend under test, the same way on every backend.
#[derive(Default)]
struct Faults {
    /// `try_acquire` is applied, then its reply is lost (a transient error).
    lose_acquire_replies: bool,
    /// `release` is applied, then its reply is lost (a transient error).
    lose_release_replies: bool,
    /// `renew_batch` calls that include this key say so on the sender, then hang until the
    /// receiver's sender is dropped.
    hang_renewals_of: Option<(String, Receiver<()>, Sender<()>)>,
    /// `release` hangs for as long as its timeout allows (at most 10 s), then times out: a
    /// server that stopped answering.
    hang_releases: bool,
}

/// The backend under test, with [`Faults`] injected around it.
struct Faulty {
    inner: Arc<dyn LeaseBackend>,
    faults: Mutex<Faults>,
}

/// The error a lost reply or a hung call turns into.
#[derive(Debug)]
struct InjectedFault(&'static str);

impl std::fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InjectedFault {}

impl Faulty {
    fn wrap(target: &dyn ConformanceTarget, faults: Faults) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner: target.backend(),
            faults: Mutex::new(faults),
        })
    }

    fn manager(
        self: &Arc<Self>,
        target: &dyn ConformanceTarget,
    ) -> (LockManager, Arc<EventCounts>) {
        counting(LockManager::builder(self.clone()).clock(target.clock()))
    }
}

impl LeaseBackend for Faulty {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        let outcome = self.inner.try_acquire(request, timeout)?;
        if self.faults.lock().lose_acquire_replies {
            return Err(BackendError::transient(InjectedFault(
                "the acquire's reply was lost",
            )));
        }
        Ok(outcome)
    }

    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        let hang = match &self.faults.lock().hang_renewals_of {
            Some((key, gate, entered)) if requests.iter().any(|request| request.key == key) => {
                let _ = entered.send(());
                Some(gate.clone())
            }
            _ => None,
        };
        if let Some(gate) = hang {
            // Released by dropping the sender; a forgotten gate still ends the test.
            let _ = gate.recv_timeout(Duration::from_secs(30));
        }
        self.inner.renew_batch(requests, timeout)
    }

    fn release(
        &self,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        let (lose_reply, hang) = {
            let faults = self.faults.lock();
            (faults.lose_release_replies, faults.hang_releases)
        };
        if hang {
            std::thread::sleep(timeout.min(Duration::from_secs(10)));
            return Err(BackendError::transient(InjectedFault(
                "the server did not answer the release",
            )));
        }
        let outcome = self.inner.release(key, token, timeout)?;
        if lose_reply {
            return Err(BackendError::transient(InjectedFault(
                "the release's reply was lost",
            )));
        }
        Ok(outcome)
    }

    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        self.inner.watch_release(key)
    }

    fn drift(&self) -> DriftRule {
        self.inner.drift()
    }

    fn inspect(&self, key: &str, timeout: Duration) -> Result<KeyState, BackendError> {
        self.inner.inspect(key, timeout)
    }

    fn force_release(&self, key: &str, timeout: Duration) -> Result<bool, BackendError> {
        self.inner.force_release(key, timeout)
    }
}

/// Contract 9: the holder trusts its lease for what the backend's drift rule leaves of the TTL,
/// counted from before each acquire or renewal was sent.
pub fn validity_follows_the_backends_drift_rule(target: &dyn ConformanceTarget) {
    let key = target.key("validity_follows_the_backends_drift_rule");
    let ttl = target.ttl();
    let manager = manager(target);
    let validity = target
        .backend()
        .drift()
        .validity(ttl)
        .expect("the target's TTL leaves some validity");
    let clock = manager.clock().clone();
    let before = clock.now();
    let lease = manager.acquire(&key, ttl).unwrap();
    let after = clock.now();
    let valid_until = lease.valid_until();
    assert!(
        valid_until >= before + validity && valid_until <= after + validity,
        "valid_until is {:?} after the acquire began; the drift rule leaves {validity:?} of {ttl:?}",
        valid_until - before
    );
    // After renewals, the validity counts from the last renewal's send, by the same rule.
    for _ in 0..2 {
        step(target, &[&manager], ttl / 2);
    }
    let now = clock.now();
    let renewed = lease.valid_until();
    assert!(renewed > valid_until, "the lease was not renewed");
    assert!(
        renewed <= now + validity,
        "a renewal gave more validity than the drift rule leaves: {:?} > {validity:?}",
        renewed - now
    );
    lease.release().unwrap();
}

/// Contract 10: a lost lease produces exactly one `Lost` event and one `lost()` message, and no
/// `Released` event, whichever path finds the loss: the renewer, `ensure_held`, or `release`.
pub fn a_loss_is_reported_once_whichever_path_finds_it(target: &dyn ConformanceTarget) {
    let ttl = target.ttl();
    let (manager, counts) = counting(target.builder());

    // Found by the release: the key was deleted behind the holder's back, before any renewal.
    let key = target.key("loss_found_by_release");
    let lease = manager.acquire(&key, ttl).unwrap();
    let lost = lease.lost();
    target.delete_key(&key);
    let error = lease.release().expect_err("the key was gone");
    assert!(
        matches!(error.lost_reason(), Some(LostReason::TakenOver)),
        "{error}"
    );
    assert!(
        matches!(lost.try_recv(), Ok(LostReason::TakenOver)),
        "lost() did not hear of a loss found by release"
    );
    assert!(lost.try_recv().is_err(), "lost() heard twice");
    assert_eq!(
        counts.get(),
        (1, 0),
        "(Lost, Released) events after a loss found by release"
    );

    // Found by `ensure_held`: the backend stopped answering, and the holder looks first.
    let key = target.key("loss_found_by_ensure_held");
    let lease = manager.acquire(&key, ttl).unwrap();
    let lost = lease.lost();
    target.set_unreachable(true);
    target.advance(ttl + ttl / 10);
    let error = lease.ensure_held().expect_err("past its validity");
    assert!(error.is_lost(), "{error}");
    target.set_unreachable(false);
    step(target, &[&manager], ttl / 4);
    assert!(lost.try_recv().is_ok(), "lost() did not hear of an expiry");
    assert!(lost.try_recv().is_err(), "lost() heard twice");
    assert!(lease.release().unwrap_err().is_lost());
    assert_eq!(counts.get(), (2, 0), "(Lost, Released) events after expiry");

    // A normal release is a release, not a loss.
    let key = target.key("normal_release");
    let lease = manager.acquire(&key, ttl).unwrap();
    let lost = lease.lost();
    lease.release().unwrap();
    assert!(lost.try_recv().is_err(), "a release was reported as a loss");
    assert_eq!(
        counts.get(),
        (2, 1),
        "(Lost, Released) events after a release"
    );
}

/// Contract 11: a loss is reported no later than `valid_until` (plus the target's slack) even
/// while a renewal call hangs: here one lease's renewal never returns, and the lease behind it
/// in the renewer's queue cannot be renewed either. Both are reported lost on time.
pub fn loss_is_reported_on_time_while_another_renewal_hangs(target: &dyn ConformanceTarget) {
    let ttl = target.ttl();
    let slack = target.report_slack();
    let hung_key = target.key("hung_renewal");
    let key = target.key("queued_behind_it");
    let (gate, hang) = crossbeam_channel::bounded::<()>(0);
    let (entered, hanging) = crossbeam_channel::unbounded();
    let faulty = Faulty::wrap(
        target,
        Faults {
            hang_renewals_of: Some((hung_key.clone(), hang, entered)),
            ..Faults::default()
        },
    );
    let clock = target.clock();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let log = reports.clone();
    let event_clock = clock.clone();
    let manager = LockManager::builder(faulty)
        .clock(clock.clone())
        .event_hook(move |event: &LeaseEvent<'_>| {
            if let LeaseEvent::Lost { key, .. } = event {
                log.lock().push((key.to_string(), event_clock.now()));
            }
        })
        .build()
        .unwrap();
    // Declared after the manager, so dropped first even when a check fails: the hung call
    // returns before the manager's drop joins its threads.
    let gate = gate;
    let advance_to = |at: Instant| {
        let now = clock.now();
        if at > now {
            target.advance(at - now);
        }
    };
    let hung = manager.acquire(&hung_key, ttl).unwrap();
    let queued = manager.acquire(&key, ttl * 2).unwrap();
    // The first lease's renewal starts, and hangs.
    // Step towards its renewal time, but never near its validity's end: from there, wait.
    let step_limit = hung.valid_until() - ttl / 4;
    while hanging.recv_timeout(Duration::from_millis(10)).is_err() {
        if clock.now() + ttl / 50 < step_limit {
            target.advance(ttl / 50);
        } else {
            hanging
                .recv_timeout(Duration::from_secs(5))
                .expect("the first lease's renewal never started");
            break;
        }
    }
    // The second lease falls due (at a third of its validity) behind it.
    advance_to(hung.valid_until() - ttl / 10);
    for (key, lease) in [(&hung_key, &hung), (&key, &queued)] {
        let valid_until = lease.valid_until();
        advance_to(valid_until);
        let reason = lease
            .lost()
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{key}: no loss reported while a renewal hung"));
        assert!(matches!(reason, LostReason::Expired), "{key}: {reason:?}");
        let reported_at = reports
            .lock()
            .iter()
            .find(|(lost, _)| lost == key)
            .map(|(_, at)| *at)
            .expect("a Lost event");
        assert!(
            reported_at <= valid_until + slack,
            "{key}: reported {:?} after valid_until while a renewal hung",
            reported_at - valid_until
        );
        assert!(reported_at >= valid_until, "{key}: reported lost early");
    }
    drop(gate);
}

/// Contract 12: a release whose outcome is unknown (its reply was lost) is no loss.
pub fn a_release_with_an_unknown_outcome_is_no_loss(target: &dyn ConformanceTarget) {
    let key = target.key("release_unknown_outcome");
    let ttl = target.ttl();
    let faulty = Faulty::wrap(
        target,
        Faults {
            lose_release_replies: true,
            ..Faults::default()
        },
    );
    let (manager, counts) = faulty.manager(target);
    let value = manager.with_lease(&key, ttl, Duration::from_secs(1), |lease| {
        assert!(lease.is_held());
        42
    });
    assert_eq!(
        value.unwrap(),
        42,
        "with_lease must keep the value of work done under a lease held to the end"
    );
    let lease = manager.acquire(&key, ttl).unwrap();
    let lost = lease.lost();
    let error = lease.release().expect_err("the reply was lost");
    assert!(
        !error.is_lost(),
        "an unknown outcome was reported as a loss: {error}"
    );
    assert!(error.is_transient(), "{error}");
    assert!(lost.try_recv().is_err(), "lost() heard of a release");
    assert_eq!(counts.get().0, 0, "Lost events for releases");
    let free = manager.try_acquire(&key, ttl).unwrap();
    assert!(free.is_some(), "the applied release did not free the key");
}

/// Contract 13: a zero wait makes one real attempt (with the backend's own timeouts): a free key
/// is granted, a held one times out at once and says another holder has it.
pub fn a_zero_wait_makes_one_real_attempt(target: &dyn ConformanceTarget) {
    let key = target.key("zero_wait");
    let ttl = target.ttl();
    let manager = manager(target);
    let fence = manager
        .with_lease(&key, ttl, Duration::ZERO, |lease| lease.fence())
        .expect("a free key with a zero wait");
    assert!(fence > 0);
    let holder = self::manager(target)
        .acquire_timeout(&key, ttl, Duration::ZERO)
        .unwrap();
    let started = Instant::now();
    let error = manager
        .acquire_timeout(&key, ttl, Duration::ZERO)
        .expect_err("the key is held");
    assert!(error.is_timeout(), "{error}");
    assert!(
        error.to_string().contains("another holder has it"),
        "the timeout does not say why: {error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a zero wait waited {:?}",
        started.elapsed()
    );
    drop(holder);
}

/// Contract 14: an acquire that gives up after an attempt whose outcome is unknown leaves no
/// lock behind: it releases its token, best effort.
pub fn an_acquire_that_gives_up_leaves_no_lock(target: &dyn ConformanceTarget) {
    let ttl = target.ttl();
    let faulty = Faulty::wrap(
        target,
        Faults {
            lose_acquire_replies: true,
            ..Faults::default()
        },
    );
    let (manager, _) = faulty.manager(target);
    let backend = target.backend();
    let probe = |key: &str| {
        let outcome = backend
            .try_acquire(&request(key, "probe", ttl), NO_LIMIT)
            .unwrap();
        matches!(outcome, AcquireOutcome::Acquired { .. })
    };

    let key = target.key("orphan_try_acquire");
    let error = manager
        .try_acquire(&key, ttl)
        .expect_err("the reply was lost");
    assert!(error.is_transient(), "{error}");
    // The clean-up runs in the background: wait for it, without letting time pass.
    manager.settle();
    assert!(probe(&key), "try_acquire left an orphan lock");

    let key = target.key("orphan_acquire_timeout");
    let error = manager
        .acquire_timeout(&key, ttl, Duration::ZERO)
        .expect_err("every reply was lost");
    assert!(error.is_timeout(), "{error}");
    assert!(
        std::error::Error::source(&error).is_some(),
        "the timeout hides the last attempt's error: {error}"
    );
    manager.settle();
    assert!(probe(&key), "acquire_timeout left an orphan lock");
}

/// Contract 15: releasing (or dropping) a lease that is already lost is best effort and returns
/// within [`CLEANUP_TIMEOUT`] (plus the target's slack), even when the backend does not answer.
pub fn releasing_a_lost_lease_returns_promptly(target: &dyn ConformanceTarget) {
    let key = target.key("release_lost_promptly");
    let ttl = target.ttl();
    let faulty = Faulty::wrap(target, Faults::default());
    let (manager, _) = faulty.manager(target);
    let lease = manager.acquire(&key, ttl).unwrap();
    target.delete_key(&key);
    step(target, &[&manager], ttl / 2);
    assert!(!lease.is_held(), "the deleted key was not reported lost");
    faulty.faults.lock().hang_releases = true;
    let started = Instant::now();
    assert!(lease.release().unwrap_err().is_lost());
    let took = started.elapsed();
    assert!(
        took <= CLEANUP_TIMEOUT + target.report_slack() + Duration::from_millis(200),
        "releasing a lost lease took {took:?}"
    );
}

/// `Some(value)`, or `None` when the backend does not offer the operation: then its error must
/// be the permanent [`BackendError::unsupported`] one.
fn offered<T>(result: Result<T, BackendError>, operation: &str) -> Option<T> {
    match result {
        Err(error) if error.is_unsupported() => {
            assert!(
                !error.is_transient(),
                "{operation}: an unsupported operation is permanent"
            );
            None
        }
        result => Some(result.unwrap_or_else(|error| panic!("{operation} failed: {error:?}"))),
    }
}

/// Contract 16: `inspect` says who holds a key (its remaining TTL and fence) and when it is
/// free (with the last fence issued), and changes nothing. A backend without it passes by
/// returning the default's permanent `Unsupported` error.
pub fn inspect_reports_the_holder_and_its_fence(target: &dyn ConformanceTarget) {
    let key = target.key("inspect");
    let ttl = target.ttl();
    let backend = target.backend();
    let inspect = |key: &str| backend.inspect(key, NO_LIMIT);
    let Some(never_locked) = offered(inspect(&key), "inspect") else {
        return;
    };
    assert!(
        !never_locked.is_held(),
        "a key never locked: {never_locked:?}"
    );

    // Held by a token nobody renews: the remaining TTL shrinks with time.
    let AcquireOutcome::Acquired { fence } = backend
        .try_acquire(&request(&key, "inspected", ttl), NO_LIMIT)
        .unwrap()
    else {
        panic!("a free key was not granted");
    };
    let state = inspect(&key).unwrap();
    let KeyState::Held {
        remaining,
        fence: seen,
    } = state
    else {
        panic!("a held key was inspected as {state:?}");
    };
    assert!(
        seen >= Some(fence),
        "fence {seen:?} below the holder's {fence}"
    );
    assert!(
        remaining.is_some_and(|left| left <= ttl),
        "remaining {remaining:?} of {ttl:?}"
    );
    target.advance(ttl / 2);
    let later = inspect(&key).unwrap();
    assert!(
        later
            .remaining()
            .is_some_and(|left| left <= ttl - ttl / 2 + Duration::from_millis(1)),
        "after half the TTL: {later:?}"
    );
    // Inspecting changed nothing: the key is still the holder's.
    assert!(
        matches!(
            backend
                .try_acquire(&request(&key, "other", ttl), NO_LIMIT)
                .unwrap(),
            AcquireOutcome::Held { .. }
        ),
        "inspect freed the key"
    );
    assert_eq!(
        renew_one(&*backend, &request(&key, "inspected", ttl), NO_LIMIT).unwrap(),
        Ownership::Owned,
        "inspect took the key from its holder"
    );

    // Released: free, and the last fence is remembered.
    assert_eq!(
        backend.release(&key, "inspected", NO_LIMIT).unwrap(),
        Ownership::Owned
    );
    let state = inspect(&key).unwrap();
    assert!(!state.is_held(), "a released key: {state:?}");
    assert!(
        state.fence() >= Some(fence),
        "a released key's last fence: {state:?}"
    );

    // A lease of the manager, renewed: held, with the lease's fence.
    let manager = manager(target);
    let lease = manager.try_acquire(&key, ttl).unwrap().expect("free");
    step(target, &[&manager], ttl / 2);
    let state = manager.inspect(&key).unwrap();
    assert!(
        state.is_held() && state.fence() >= Some(lease.fence()),
        "{state:?}"
    );
    assert!(lease.is_held(), "inspect cost the lease");

    // Expired without renewal: free.
    let other = target.key("inspect_expired");
    assert!(matches!(
        backend
            .try_acquire(&request(&other, "silent", ttl), NO_LIMIT)
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    target.advance(ttl + ttl / 10);
    let state = inspect(&other).unwrap();
    assert!(!state.is_held(), "an expired key: {state:?}");
}

/// Contract 17: `force_release` deletes a key whatever token holds it; its holder finds the
/// lease lost at its next renewal, and the next holder gets a higher fence. A backend without
/// it passes by returning the default's permanent `Unsupported` error.
pub fn force_release_frees_the_key_and_fences_keep_growing(target: &dyn ConformanceTarget) {
    let key = target.key("force_release");
    let ttl = target.ttl();
    let backend = target.backend();
    let (manager, losses) = loss_counter(target.builder());
    let stuck = manager.try_acquire(&key, ttl).unwrap().expect("free");
    let Some(deleted) = offered(backend.force_release(&key, NO_LIMIT), "force_release") else {
        return;
    };
    assert!(deleted, "force_release of a held key says nothing was held");
    if let Some(state) = offered(backend.inspect(&key, NO_LIMIT), "inspect") {
        assert!(!state.is_held(), "a force-released key: {state:?}");
    }
    let AcquireOutcome::Acquired { fence } = backend
        .try_acquire(&request(&key, "next", ttl), NO_LIMIT)
        .unwrap()
    else {
        panic!("a force-released key was still held");
    };
    assert!(
        fence > stuck.fence(),
        "fence {fence} after a forced release of {}",
        stuck.fence()
    );
    step(target, &[&manager], ttl / 2);
    assert!(
        matches!(stuck.lost().try_recv(), Ok(LostReason::TakenOver)),
        "the holder of a force-released key did not find it lost at its next renewal"
    );
    assert_eq!(losses.load(Ordering::SeqCst), 1, "Lost events");
    assert_eq!(
        backend.release(&key, "next", NO_LIMIT).unwrap(),
        Ownership::Owned
    );
    // A key never locked (a released one may still be held by a Redlock node that released
    // late, and rightly be reported deleted).
    assert!(
        !backend
            .force_release(&target.key("force_release_free"), NO_LIMIT)
            .unwrap(),
        "force_release of a free key says it deleted something"
    );
}

/// Contract 18: a renewal sets the TTL it asks for, longer or shorter than the lease's, and
/// [`Lease::extend`](crate::Lease::extend) uses that: the lease is trusted for the drift rule's
/// validity of the new TTL from before the call, the key's TTL on the backend is the new one
/// (checked with `inspect` where the backend offers it), and background renewals go on with
/// it.
pub fn extend_replaces_the_ttl(target: &dyn ConformanceTarget) {
    let key = target.key("extend");
    let ttl = target.ttl();
    let manager = manager(target);
    let backend = target.backend();
    let drift = backend.drift();
    let lease = manager.acquire(&key, ttl).unwrap();
    for new_ttl in [ttl * 4, ttl / 2] {
        let validity = drift
            .validity(new_ttl)
            .expect("the check's TTLs leave validity");
        let before = manager.clock().now();
        lease.extend(new_ttl).unwrap();
        let after = manager.clock().now();
        assert_eq!(lease.ttl(), new_ttl);
        let valid_until = lease.valid_until();
        assert!(
            valid_until >= before + validity && valid_until <= after + validity,
            "extended to {new_ttl:?}: valid until {:?} after the call, not {validity:?}",
            valid_until.saturating_duration_since(after)
        );
        if let Some(state) = offered(backend.inspect(&key, NO_LIMIT), "inspect") {
            let remaining = state.remaining();
            assert!(
                remaining.is_some_and(|left| left <= new_ttl && left > new_ttl / 2),
                "extended to {new_ttl:?}, the key's TTL is {remaining:?}"
            );
        }
    }
    // Renewed in the background with the new (short) TTL, past the old one.
    let short = ttl / 2;
    for _ in 0..8 {
        step(target, &[&manager], short / 4);
        lease.ensure_held().unwrap();
    }
    assert_eq!(lease.ttl(), short);
    if let Some(state) = offered(backend.inspect(&key, NO_LIMIT), "inspect") {
        assert!(
            state.remaining().is_some_and(|left| left <= short),
            "renewals went back to the old TTL: {state:?}"
        );
    }
    lease.release().unwrap();
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
            validity_follows_the_backends_drift_rule,
            a_loss_is_reported_once_whichever_path_finds_it,
            loss_is_reported_on_time_while_another_renewal_hangs,
            a_release_with_an_unknown_outcome_is_no_loss,
            a_zero_wait_makes_one_real_attempt,
            an_acquire_that_gives_up_leaves_no_lock,
            releasing_a_lost_lease_returns_promptly,
            inspect_reports_the_holder_and_its_fence,
            force_release_frees_the_key_and_fences_keep_growing,
            extend_replaces_the_ttl,
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
