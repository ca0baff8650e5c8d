//! The manager's public API on the memory backend: bad input, waiting, release paths, loss,
//! panics, and the renewer thread's life.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup is a failed test

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lock_core::{
    Lease, LeaseEvent, LeaseStatus, LockManager, LostReason, ManualClock, RetryPolicy, MAX_TTL,
    MIN_TTL,
};
use lock_memory::MemoryBackend;

const TTL: Duration = Duration::from_secs(30);

fn virtual_manager() -> (LockManager, MemoryBackend, ManualClock) {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let manager = LockManager::builder(backend.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    (manager, backend, clock)
}

#[derive(Default)]
struct Counts {
    acquired: AtomicUsize,
    released: AtomicUsize,
    suspect: AtomicUsize,
    lost: AtomicUsize,
}

fn counting_manager(backend: &MemoryBackend, clock: &ManualClock) -> (LockManager, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let seen = counts.clone();
    let manager = LockManager::builder(backend.clone())
        .clock(clock.clone())
        .event_hook(move |event: &LeaseEvent<'_>| {
            let counter = match event {
                LeaseEvent::Acquired { .. } => &seen.acquired,
                LeaseEvent::Released { .. } => &seen.released,
                LeaseEvent::Suspect { .. } => &seen.suspect,
                LeaseEvent::Lost { .. } => &seen.lost,
                _ => return,
            };
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    (manager, counts)
}

#[test]
fn bad_keys_and_ttls_are_typed_errors() {
    let manager = LockManager::new(MemoryBackend::new());
    let empty = manager.try_acquire("", TTL).unwrap_err();
    assert!(
        empty.is_invalid_input() && empty.to_string().contains("empty"),
        "{empty}"
    );
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(2),
        MAX_TTL + Duration::from_millis(1),
        Duration::MAX,
    ] {
        let error = manager.try_acquire("k", ttl).unwrap_err();
        assert!(error.is_invalid_input(), "{ttl:?}: {error}");
        let error = manager
            .acquire_timeout("k", ttl, Duration::MAX)
            .unwrap_err();
        assert!(error.is_invalid_input(), "{ttl:?}: {error}");
        let error = manager
            .with_lease("k", ttl, Duration::ZERO, |_| ())
            .unwrap_err();
        assert!(error.is_invalid_input(), "{ttl:?}: {error}");
    }
    assert!(manager.try_acquire("k", MIN_TTL).unwrap().is_some());
    assert!(manager.try_acquire("long", MAX_TTL).unwrap().is_some());
}

#[test]
fn bad_builder_settings_are_typed_errors() {
    for fraction in [0.0, 1.0, -1.0, f64::NAN] {
        let error = LockManager::builder(MemoryBackend::new())
            .renew_fraction(fraction)
            .build()
            .unwrap_err();
        assert!(error.is_invalid_input(), "{fraction}: {error}");
    }
    let error = LockManager::builder(MemoryBackend::new())
        .retry(RetryPolicy::new(
            Duration::from_secs(2),
            Duration::from_secs(1),
        ))
        .build()
        .unwrap_err();
    assert!(error.is_invalid_input(), "{error}");
    let error = LockManager::builder(MemoryBackend::new())
        .batch_size(0)
        .build()
        .unwrap_err();
    assert!(error.is_invalid_input(), "{error}");
}

#[test]
fn wait_of_duration_max_means_no_deadline() {
    let backend = MemoryBackend::new();
    let manager = LockManager::builder(backend.clone())
        .default_wait(Duration::MAX)
        .build()
        .unwrap();
    let lease = manager.acquire("k", TTL).unwrap();
    let waiter = {
        let manager = manager.clone();
        std::thread::spawn(move || {
            manager
                .acquire_timeout("k", TTL, Duration::MAX)
                .map(|l| l.fence())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.waiting("k") == 0 {
        assert!(Instant::now() < deadline, "the waiter never registered");
        std::thread::yield_now();
    }
    let first = lease.fence();
    lease.release().unwrap();
    let second = waiter.join().unwrap().unwrap();
    assert!(second > first);
}

#[test]
fn acquire_times_out_on_a_held_key() {
    let backend = MemoryBackend::new();
    let manager = LockManager::new(backend.clone());
    // Another holder (this thread's own lease would be refused at once: not re-entrant).
    let _held = LockManager::new(backend).acquire("k", TTL).unwrap();
    let started = Instant::now();
    let error = manager
        .acquire_timeout("k", TTL, Duration::from_millis(50))
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(50));
    let error = manager
        .acquire_timeout("k", TTL, Duration::ZERO)
        .unwrap_err();
    assert!(error.is_timeout(), "one attempt, then a timeout: {error}");
}

#[test]
fn a_release_wakes_a_waiter_long_before_its_backoff() {
    let backend = MemoryBackend::new();
    // A backoff so long that only a wake-up can explain a quick acquire.
    let manager = LockManager::builder(backend)
        .retry(RetryPolicy::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
        .build()
        .unwrap();
    let lease = manager.acquire("k", TTL).unwrap();
    let ready = Arc::new(Barrier::new(2));
    let waiter = {
        let (manager, ready) = (manager.clone(), ready.clone());
        std::thread::spawn(move || {
            ready.wait();
            let lease = manager
                .acquire_timeout("k", TTL, Duration::from_secs(120))
                .unwrap();
            (Instant::now(), lease.fence())
        })
    };
    ready.wait();
    // Whether the waiter has tried yet or not, it cannot sleep 60 s past this release.
    let released_at = Instant::now();
    lease.release().unwrap();
    let (acquired_at, _) = waiter.join().unwrap();
    assert!(
        acquired_at - released_at < Duration::from_secs(5),
        "the waiter slept through the release"
    );
}

#[test]
fn waiting_never_sleeps_past_the_holders_ttl() {
    use lock_core::{LeaseBackend, LeaseRequest};
    let backend = MemoryBackend::new();
    // A backoff whose first sleep is 60 s but for the cap by the holder's remaining TTL.
    let manager = LockManager::builder(backend.clone())
        .retry(RetryPolicy::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ))
        .build()
        .unwrap();
    // A holder that never renews nor releases, so no wake-up comes: only the TTL frees the key.
    let ghost = LeaseRequest {
        key: "k",
        token: "ghost",
        ttl: Duration::from_millis(200),
    };
    backend.try_acquire(&ghost, Duration::MAX).unwrap();
    let started = Instant::now();
    let lease = manager
        .acquire_timeout("k", TTL, Duration::from_secs(120))
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slept {:?}, past the holder's 200 ms TTL",
        started.elapsed()
    );
    assert!(lease.is_held());
}

#[test]
fn release_paths_report_exactly_once() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let (manager, counts) = counting_manager(&backend, &clock);
    // Explicit release, then no second release from Drop.
    let lease = manager.acquire("a", TTL).unwrap();
    lease.release().unwrap();
    assert_eq!(counts.released.load(Ordering::SeqCst), 1);
    // Drop releases.
    drop(manager.acquire("a", TTL).unwrap());
    assert_eq!(counts.released.load(Ordering::SeqCst), 2);
    assert!(!backend.is_locked("a"));
    // Release after loss: a typed error, and one loss.
    let lease = manager.acquire("a", TTL).unwrap();
    backend.revoke("a");
    clock.advance(TTL / 2);
    manager.settle();
    let error = lease.release().unwrap_err();
    assert!(
        matches!(error.lost_reason(), Some(LostReason::TakenOver)),
        "{error}"
    );
    assert_eq!(counts.lost.load(Ordering::SeqCst), 1);
    assert_eq!(counts.acquired.load(Ordering::SeqCst), 3);
}

#[test]
fn expiry_noticed_by_the_holder_is_reported_once() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let (manager, counts) = counting_manager(&backend, &clock);
    let lease = manager.acquire("a", TTL).unwrap();
    // Jump past the validity without letting the renewer run first.
    clock.advance(TTL);
    assert!(!lease.is_held(), "is_held reads the clock");
    assert!(matches!(lease.lost().try_recv(), Ok(LostReason::Expired)));
    manager.settle();
    assert!(!lease.is_held());
    assert_eq!(counts.lost.load(Ordering::SeqCst), 1);
    assert!(lease.ensure_held().unwrap_err().is_lost());
}

#[test]
fn failing_renewals_make_a_lease_suspect_then_lost() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let (manager, counts) = counting_manager(&backend, &clock);
    let lease = manager.acquire("a", TTL).unwrap();
    backend.set_unreachable(true);
    clock.advance(TTL / 3);
    manager.settle();
    assert!(matches!(lease.status(), LeaseStatus::Suspect));
    assert!(lease.is_held(), "suspect is still held");
    for _ in 0..5 {
        clock.advance(Duration::from_secs(1));
        manager.settle();
    }
    assert_eq!(
        counts.suspect.load(Ordering::SeqCst),
        1,
        "one Suspect per run of failures"
    );
    backend.set_unreachable(false);
    clock.advance(Duration::from_secs(1));
    manager.settle();
    assert!(
        matches!(lease.status(), LeaseStatus::Held),
        "a successful retry restores it"
    );
    backend.set_unreachable(true);
    while clock.now() < lease.valid_until() {
        clock.advance(Duration::from_millis(300));
        manager.settle();
    }
    assert!(matches!(
        lease.status(),
        LeaseStatus::Lost(LostReason::Expired)
    ));
    assert_eq!(counts.suspect.load(Ordering::SeqCst), 2);
    assert_eq!(counts.lost.load(Ordering::SeqCst), 1);
}

#[test]
fn with_lease_reports_loss_during_the_closure() {
    let (manager, backend, clock) = virtual_manager();
    let result = manager.with_lease("a", TTL, Duration::ZERO, |_| {
        backend.revoke("a");
        clock.advance(TTL / 2);
        manager.settle();
        "work done"
    });
    assert!(result.unwrap_err().is_lost());
    assert!(!backend.is_locked("a"));
}

#[test]
fn a_panic_in_with_lease_releases_and_propagates() {
    let backend = MemoryBackend::new();
    let manager = LockManager::new(backend.clone());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        manager.with_lease("a", TTL, Duration::ZERO, |_| -> () { panic!("job failed") })
    }));
    let payload = outcome.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"job failed"));
    assert!(
        !backend.is_locked("a"),
        "the lease was released while unwinding"
    );
    let fence = manager.with_lease("a", TTL, Duration::ZERO, |lease| lease.fence());
    assert!(fence.is_ok(), "the manager is still usable");
}

#[test]
fn public_types_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    send_sync::<LockManager>();
    send_sync::<MemoryBackend>();
    send_sync::<lock_core::Lease>();
    error::<lock_core::Error>();
    error::<lock_core::BackendError>();
    let _object_safe: Arc<dyn lock_core::LeaseBackend> = Arc::new(MemoryBackend::new());
}

#[test]
fn a_panicking_hook_stops_neither_renewal_nor_loss_reports() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let manager = LockManager::builder(backend.clone())
        .clock(clock.clone())
        .event_hook(|event: &LeaseEvent<'_>| {
            if !matches!(event, LeaseEvent::Acquired { .. }) {
                panic!("a buggy hook");
            }
        })
        .build()
        .unwrap();
    let lease = manager.acquire("a", TTL).unwrap();
    for _ in 0..9 {
        clock.advance(TTL / 4);
        manager.settle();
    }
    assert!(
        lease.is_held(),
        "the renewer kept renewing through the hook's panics"
    );
    backend.revoke("a");
    clock.advance(TTL / 3);
    manager.settle();
    assert!(matches!(lease.lost().try_recv(), Ok(LostReason::TakenOver)));
    drop(lease); // the Released event panics in the hook: caught, not an abort
}

/// A manager in virtual time that sends the new end of validity of each renewal.
fn renewal_reporting_manager(
    clock: &ManualClock,
) -> (LockManager, std::sync::mpsc::Receiver<Instant>) {
    let backend = MemoryBackend::with_clock(clock.clone());
    let (renewed_tx, renewed) = std::sync::mpsc::channel();
    let manager = LockManager::builder(backend)
        .clock(clock.clone())
        .event_hook(move |event: &LeaseEvent<'_>| {
            if let LeaseEvent::Renewed { valid_until, .. } = event {
                let _ = renewed_tx.send(*valid_until);
            }
        })
        .build()
        .unwrap();
    (manager, renewed)
}

/// Acquires `key` for `ttl`, then moves the clock to half the TTL, past the first renewal's due
/// time (a third of the validity), with no `settle()`, which would wake the renewer itself: the
/// lease must be renewed all the same.
fn renewed_without_settling(key: &str, ttl: Duration) {
    let clock = ManualClock::new();
    let (manager, renewed) = renewal_reporting_manager(&clock);
    // Let the renewer fall asleep, planning to wake in a (virtual) second: a lease it took
    // before sleeping would not show whether the acquire rang.
    manager.settle();
    std::thread::sleep(Duration::from_millis(50));
    let lease = manager.acquire(key, ttl).unwrap();
    let acquired_until = lease.valid_until();
    clock.advance(ttl / 2);
    let renewed_until = renewed.recv_timeout(Duration::from_secs(10)).ok();
    assert!(
        renewed_until.is_some_and(|until| until > acquired_until),
        "the lease was never renewed"
    );
    assert!(lease.is_held());
}

#[test]
fn a_lease_that_does_not_wake_the_renewer_is_still_renewed() {
    // Acquiring rings the renewer only for a lease due before it plans to wake. With nothing
    // scheduled it still plans to wake within a second, so a lease due later is picked up then.
    renewed_without_settling("idle", TTL);
}

#[test]
fn a_lease_due_before_the_renewer_would_wake_wakes_it() {
    // Due after 100 ms, long before the idle renewer's next wake-up (a second away): the
    // acquire rings it, or the lease would be lost at 300 ms.
    renewed_without_settling("brief", Duration::from_millis(300));
}

#[test]
fn leases_released_before_the_renewer_takes_them_are_forgotten_and_held_ones_are_renewed() {
    // An acquire hands its lease to the renewer without a message, and a release takes it back
    // unless the renewer took it first. Race the two, waking the renewer all the time.
    const THREADS: usize = 4;
    const LEASES: usize = 500;
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let renewals = Arc::new(parking_lot::Mutex::new(HashMap::<String, usize>::new()));
    let counted = renewals.clone();
    let manager = LockManager::builder(backend.clone())
        .clock(clock.clone())
        .event_hook(move |event: &LeaseEvent<'_>| {
            if let LeaseEvent::Renewed { key, .. } = event {
                *counted.lock().entry((*key).to_owned()).or_default() += 1;
            }
        })
        .build()
        .unwrap();
    let done = AtomicBool::new(false);
    let start = Barrier::new(THREADS + 1);
    let held: Vec<Lease> = std::thread::scope(|scope| {
        let waker = scope.spawn(|| {
            start.wait();
            while !done.load(Ordering::SeqCst) {
                manager.settle();
            }
        });
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (manager, start) = (&manager, &start);
                scope.spawn(move || {
                    start.wait();
                    let mut held = Vec::new();
                    for n in 0..LEASES {
                        let key = format!("{thread}-{n}");
                        let lease = manager.try_acquire(&key, TTL).unwrap().unwrap();
                        if n % 2 == 0 {
                            held.push(lease);
                        } else {
                            lease.release().unwrap();
                        }
                    }
                    held
                })
            })
            .collect();
        // Every worker joined before the waker stops, and only then a failure unwrapped.
        let results: Vec<_> = workers.into_iter().map(|worker| worker.join()).collect();
        done.store(true, Ordering::SeqCst);
        waker.join().unwrap();
        results.into_iter().flat_map(|held| held.unwrap()).collect()
    });
    // A whole TTL, a third at a time: each held lease is renewed every time, and lives.
    for _ in 0..3 {
        clock.advance(TTL / 3);
        manager.settle();
    }
    let renewals = renewals.lock();
    assert_eq!(renewals.len(), held.len(), "only held leases were renewed");
    for lease in &held {
        assert!(lease.is_held(), "{} was lost", lease.key());
        assert_eq!(renewals.get(lease.key()), Some(&3), "{}", lease.key());
    }
    for thread in 0..THREADS {
        for n in (1..LEASES).step_by(2) {
            assert!(!backend.is_locked(&format!("{thread}-{n}")));
        }
    }
}
