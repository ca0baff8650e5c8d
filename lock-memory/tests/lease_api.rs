//! The manager's conveniences on the memory backend, in virtual time: defaults, outcomes that
//! keep the closure's value, loss callbacks, extending by hand, re-entrancy and statistics.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup is a failed test

use std::time::Duration;

use lock_core::{LockManager, LockManagerBuilder, LostReason, ManualClock, MAX_TTL};
use lock_memory::MemoryBackend;

const TTL: Duration = Duration::from_secs(30);

fn virtual_builder() -> (LockManagerBuilder, MemoryBackend, ManualClock) {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let builder = LockManager::builder(backend.clone()).clock(clock.clone());
    (builder, backend, clock)
}

fn virtual_manager() -> (LockManager, MemoryBackend, ManualClock) {
    let (builder, backend, clock) = virtual_builder();
    (builder.build().unwrap(), backend, clock)
}

#[test]
fn default_calls_use_the_builders_ttl_and_wait() {
    let (builder, backend, clock) = virtual_builder();
    let manager = builder
        .default_ttl(Duration::from_secs(7))
        .default_wait(Duration::ZERO)
        .build()
        .unwrap();
    let lease = manager.acquire_default("k").unwrap();
    assert_eq!(lease.ttl(), Duration::from_secs(7));
    // The default wait of zero: one attempt, then a timeout.
    let other = LockManager::builder(backend.clone())
        .clock(clock.clone())
        .default_wait(Duration::ZERO)
        .build()
        .unwrap();
    assert!(other.acquire_default("k").unwrap_err().is_timeout());
    assert!(other.try_acquire_default("k").unwrap().is_none());
    drop(lease);
    let lease = other.try_acquire_default("k").unwrap().unwrap();
    assert_eq!(lease.ttl(), TTL, "the default TTL is 30 seconds");
    drop(lease);
    let ttl = manager.with_lease_default("k", |lease| lease.ttl()).unwrap();
    assert_eq!(ttl, Duration::from_secs(7));
}

#[test]
fn a_default_ttl_out_of_range_is_refused_by_build() {
    for ttl in [Duration::ZERO, Duration::from_millis(2), MAX_TTL * 2] {
        let error = LockManager::builder(MemoryBackend::new())
            .default_ttl(ttl)
            .build()
            .unwrap_err();
        assert!(error.is_invalid_input(), "{ttl:?}: {error}");
    }
}

#[test]
fn with_lease_outcome_keeps_the_value_of_a_closure_whose_lease_was_lost() {
    let (manager, backend, clock) = virtual_manager();
    let outcome = manager
        .with_lease_outcome("a", TTL, Duration::ZERO, |lease| {
            backend.revoke("a");
            clock.advance(TTL / 2);
            manager.settle();
            lease.fence() * 2
        })
        .unwrap();
    assert!(outcome.is_lost());
    assert!(matches!(outcome.lost, Some(LostReason::TakenOver)));
    assert_eq!(outcome.value, outcome.fence * 2);

    let outcome = manager
        .with_lease_outcome("a", TTL, Duration::ZERO, |_| "kept")
        .unwrap();
    assert!(!outcome.is_lost());
    assert_eq!(outcome.value, "kept");
    assert!(!backend.is_locked("a"), "released after the closure");
}

#[test]
fn with_lease_outcome_reports_a_loss_found_by_the_release() {
    let (manager, backend, _clock) = virtual_manager();
    // Revoked, and no renewal has run: only the release finds out.
    let outcome = manager
        .with_lease_outcome("a", TTL, Duration::ZERO, |_| backend.revoke("a"))
        .unwrap();
    assert!(matches!(outcome.lost, Some(LostReason::TakenOver)));
    let error = manager
        .with_lease("a", TTL, Duration::ZERO, |_| backend.revoke("a"))
        .unwrap_err();
    assert!(error.is_lost());
}
