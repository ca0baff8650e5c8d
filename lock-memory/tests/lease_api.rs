//! The manager's conveniences on the memory backend, in virtual time: defaults, outcomes that
//! keep the closure's value, loss callbacks, extending by hand, re-entrancy and statistics.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup is a failed test

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lock_core::{
    DriftRule, Lease, LeaseEvent, LockManager, LockManagerBuilder, LostReason, ManualClock,
    MAX_TTL, MIN_TTL, RENEWER_THREAD_NAME,
};
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
    let ttl = manager
        .with_lease_default("k", |lease| lease.ttl())
        .unwrap();
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

/// A loss callback that ran: its name, the reason it got, and its thread's name.
type Call = (&'static str, LostReason, Option<String>);

/// Records the loss callbacks that ran.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    fn callback(&self, name: &'static str) -> impl FnOnce(LostReason) + Send + 'static {
        let calls = self.0.clone();
        move |reason| {
            let thread = std::thread::current().name().map(str::to_owned);
            calls.lock().unwrap().push((name, reason, thread));
        }
    }

    fn names(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(name, _, _)| *name)
            .collect()
    }
}

#[test]
fn on_lost_runs_once_on_the_renewer_thread_in_the_order_registered() {
    let (manager, backend, clock) = virtual_manager();
    let calls = Calls::default();
    let lease = manager.acquire("k", TTL).unwrap();
    lease.on_lost(calls.callback("first"));
    lease.on_lost(calls.callback("second"));
    clock.advance(TTL / 4);
    manager.settle();
    assert!(calls.names().is_empty(), "renewed, not lost");
    backend.revoke("k");
    clock.advance(TTL / 2);
    manager.settle();
    assert_eq!(calls.names(), ["first", "second"]);
    for (_, reason, thread) in calls.0.lock().unwrap().iter() {
        assert!(matches!(reason, LostReason::TakenOver));
        assert_eq!(thread.as_deref(), Some(RENEWER_THREAD_NAME));
    }
    // Every other path that could find the loss finds it reported already.
    assert!(lease.ensure_held().unwrap_err().is_lost());
    assert!(lease.release().unwrap_err().is_lost());
    assert_eq!(calls.names().len(), 2);
}

#[test]
fn on_lost_registered_after_the_loss_runs_at_once_on_the_callers_thread() {
    let (manager, backend, clock) = virtual_manager();
    let lease = manager.acquire("k", TTL).unwrap();
    backend.set_unreachable(true);
    clock.advance(TTL * 2); // past the validity, renewals failing
    let calls = Calls::default();
    std::thread::Builder::new()
        .name("late-registration".into())
        .spawn({
            let calls = calls.clone();
            move || lease.on_lost(calls.callback("late"))
        })
        .unwrap()
        .join()
        .unwrap();
    let recorded = calls.0.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1);
    assert!(matches!(recorded[0].1, LostReason::Expired));
    assert_eq!(recorded[0].2.as_deref(), Some("late-registration"));
    manager.settle();
    assert_eq!(calls.names().len(), 1);
}

#[test]
fn on_lost_never_runs_after_a_release_and_its_callback_is_dropped() {
    let (manager, backend, clock) = virtual_manager();
    let calls = Calls::default();
    let lease = manager.acquire("k", TTL).unwrap();
    let token = Arc::new(());
    let held_by_callback = token.clone();
    let callback = calls.callback("released");
    lease.on_lost(move |reason| {
        let _keep = held_by_callback;
        callback(reason);
    });
    lease.release().unwrap();
    manager.settle(); // the renewer forgets the lease, if it had taken it
    assert_eq!(Arc::strong_count(&token), 1, "dropped with the lease");
    backend.revoke("k");
    clock.advance(TTL * 2);
    manager.settle();
    assert!(calls.names().is_empty());
}

#[test]
fn on_lost_runs_when_the_release_finds_the_loss() {
    let (manager, backend, _clock) = virtual_manager();
    let calls = Calls::default();
    let lease = manager.acquire("k", TTL).unwrap();
    lease.on_lost(calls.callback("found by release"));
    backend.revoke("k");
    assert!(lease.release().unwrap_err().is_lost());
    assert_eq!(calls.names(), ["found by release"]);
}

#[test]
fn a_panicking_on_lost_callback_stops_neither_the_others_nor_the_renewer() {
    let (manager, backend, clock) = virtual_manager();
    let calls = Calls::default();
    let lease = manager.acquire("k", TTL).unwrap();
    let other = manager.acquire("other", TTL).unwrap();
    lease.on_lost(|_| panic!("a careless callback"));
    lease.on_lost(calls.callback("after the panic"));
    backend.revoke("k");
    clock.advance(TTL / 2);
    manager.settle();
    assert_eq!(calls.names(), ["after the panic"]);
    for _ in 0..8 {
        clock.advance(TTL / 4);
        manager.settle();
    }
    assert!(other.is_held(), "the renewer still renews");
}

#[test]
fn stats_count_a_scripted_run() {
    let (manager, backend, clock) = virtual_manager();
    let step = |by: Duration| {
        clock.advance(by);
        manager.settle();
    };
    let a = manager.acquire("a", TTL).unwrap();
    let b = manager.acquire("b", TTL).unwrap();
    // Busy: another thread finds "a" held, once without waiting and once with a zero wait.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            assert!(manager.try_acquire("a", TTL).unwrap().is_none());
            assert!(manager
                .acquire_timeout("a", TTL, Duration::ZERO)
                .unwrap_err()
                .is_timeout());
        });
    });
    // Failed: bad input, and a backend that does not answer.
    assert!(manager.try_acquire("", TTL).is_err());
    backend.set_unreachable(true);
    assert!(manager.try_acquire("c", TTL).is_err());
    backend.set_unreachable(false);
    manager.settle();

    let stats = manager.stats();
    assert_eq!(
        (
            stats.acquires.granted,
            stats.acquires.busy,
            stats.acquires.failed
        ),
        (2, 2, 2)
    );
    assert_eq!(stats.leases_held, 2);
    assert_eq!(stats.renewals.batches, 0);

    step(TTL / 3); // both renewed, in one batch
    let stats = manager.stats();
    assert_eq!((stats.renewals.ok, stats.renewals.batches), (2, 1));

    backend.revoke("b");
    step(TTL / 3); // "a" renewed, "b" found taken over
    let stats = manager.stats();
    assert_eq!((stats.renewals.ok, stats.renewals.batches), (3, 2));
    assert_eq!(stats.losses.taken_over, 1);
    assert_eq!(stats.leases_held, 1);

    backend.set_unreachable(true);
    step(TTL / 3); // "a"'s renewal fails
    assert_eq!(manager.stats().renewals.failed, 1);
    step(TTL); // past its validity: lost, with no more calls
    backend.set_unreachable(false);
    let stats = manager.stats();
    assert_eq!(stats.losses.expired, 1);
    assert_eq!(stats.renewals.batches, 3);
    assert_eq!(stats.renewals.failed, 1);

    // Releasing lost leases counts no release; a normal release does.
    assert!(a.release().unwrap_err().is_lost());
    assert!(b.release().unwrap_err().is_lost());
    manager.acquire("d", TTL).unwrap().release().unwrap();
    let stats = manager.stats();
    assert_eq!(stats.releases, 1);
    assert_eq!(stats.acquires.granted, 3);
    assert_eq!(stats.losses.total(), 2);
    assert_eq!(stats.losses.rejected, 0);
    assert_eq!(stats.leases_held, 0);
    assert!(stats.renewals.max_batch_latency >= stats.renewals.last_batch_latency);
}

#[test]
fn a_threads_second_acquire_of_a_key_it_holds_fails_at_once() {
    let backend = MemoryBackend::new();
    let manager = LockManager::new(backend.clone());
    let lease = manager.acquire("k", TTL).unwrap();
    let started = Instant::now();
    let error = manager
        .acquire_timeout("k", TTL, Duration::from_secs(5))
        .unwrap_err();
    assert!(error.is_already_held(), "{error}");
    assert!(!error.is_timeout() && !error.is_lost() && !error.is_invalid_input());
    assert!(error.to_string().contains("not re-entrant"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert!(manager.try_acquire("k", TTL).unwrap_err().is_already_held());
    let nested = manager.with_lease("k", TTL, Duration::from_secs(5), |_| ());
    assert!(nested.unwrap_err().is_already_held());
    // The same thread through another manager is another holder: it is refused as usual.
    let other = LockManager::new(backend);
    assert!(other.try_acquire("k", TTL).unwrap().is_none());
    assert!(other
        .acquire_timeout("k", TTL, Duration::from_millis(20))
        .unwrap_err()
        .is_timeout());
    // Other threads sharing the manager wait for the holder, as ever.
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| manager.acquire_timeout("k", TTL, Duration::from_secs(5)));
        lease.release().unwrap();
        let waited = waiter.join().unwrap().unwrap();
        assert!(waited.is_held());
        // Held by the other thread now: this thread is one more waiter, not its holder.
        assert!(manager
            .acquire_timeout("k", TTL, Duration::from_millis(20))
            .unwrap_err()
            .is_timeout());
    });
    // Released: this thread gets the key again.
    let again = manager.try_acquire("k", TTL).unwrap();
    assert!(again.is_some());
}

#[test]
fn a_lost_lease_does_not_make_its_thread_refuse_itself() {
    let (manager, backend, clock) = virtual_manager();
    let lease = manager.acquire("k", TTL).unwrap();
    backend.revoke("k");
    let thief = LockManager::builder(backend.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    let theirs = thief.acquire("k", TTL).unwrap();
    clock.advance(TTL / 2);
    manager.settle();
    assert!(!lease.is_held());
    // The key is the thief's: this thread waits for it like any other, not AlreadyHeld.
    assert!(manager.try_acquire("k", TTL).unwrap().is_none());
    drop(theirs);
    assert!(manager.try_acquire("k", TTL).unwrap().is_some());
}

#[test]
fn many_acquires_and_releases_on_one_thread_keep_the_check_right() {
    let manager = LockManager::new(MemoryBackend::new());
    let held: Vec<_> = (0..50)
        .map(|i| manager.acquire(&format!("held-{i}"), TTL).unwrap())
        .collect();
    for round in 0..2_000 {
        let key = format!("cycled-{}", round % 7);
        manager.acquire(&key, TTL).unwrap().release().unwrap();
    }
    for i in [0, 25, 49] {
        let key = format!("held-{i}");
        assert!(manager
            .try_acquire(&key, TTL)
            .unwrap_err()
            .is_already_held());
    }
    drop(held);
    assert!(manager.try_acquire("held-0", TTL).unwrap().is_some());
}

#[test]
fn extend_replaces_the_ttl_and_the_renewer_follows_it() {
    let (manager, backend, clock) = virtual_manager();
    let lease = manager.acquire("k", TTL).unwrap();
    clock.advance(Duration::from_secs(5));
    let long = Duration::from_secs(600);
    let sent_at = clock.now();
    lease.extend(long).unwrap();
    assert_eq!(lease.ttl(), long);
    let validity = DriftRule::DEFAULT.validity(long).unwrap();
    assert_eq!(
        lease.valid_until(),
        sent_at + validity,
        "the drift rule of renewals"
    );
    assert_eq!(manager.inspect("k").unwrap().remaining(), Some(long));
    let renewed = manager.stats().renewals.ok;
    assert_eq!(renewed, 1, "an extend counts as a renewal");

    // Next renewal: a third of the new validity after the extend, not of the old one.
    clock.advance(validity / 3 - Duration::from_millis(1));
    manager.settle();
    assert_eq!(manager.stats().renewals.ok, renewed, "not due yet");
    assert_eq!(
        manager.inspect("k").unwrap().remaining(),
        Some(long - (validity / 3 - Duration::from_millis(1)))
    );
    clock.advance(Duration::from_millis(1));
    manager.settle();
    assert_eq!(manager.stats().renewals.ok, renewed + 1);
    assert_eq!(
        manager.inspect("k").unwrap().remaining(),
        Some(long),
        "renewed with the new TTL"
    );

    // Shorter: the validity shrinks at once, and the key frees itself after the new TTL.
    let short = Duration::from_secs(2);
    let sent_at = clock.now();
    lease.extend(short).unwrap();
    assert_eq!(
        lease.valid_until(),
        sent_at + DriftRule::DEFAULT.validity(short).unwrap()
    );
    backend.set_unreachable(true);
    clock.advance(short);
    manager.settle();
    assert!(!lease.is_held());
    backend.set_unreachable(false);
    assert!(!backend.is_locked("k"), "expired after the shorter TTL");
    assert!(matches!(lease.lost().try_recv(), Ok(LostReason::Expired)));
}

#[test]
fn extend_of_a_lease_that_is_gone_reports_the_loss_once() {
    let (manager, backend, _clock) = virtual_manager();
    let calls = Calls::default();
    let lease = manager.acquire("k", TTL).unwrap();
    lease.on_lost(calls.callback("lost"));
    backend.revoke("k");
    let error = lease.extend(TTL).unwrap_err();
    assert!(
        matches!(error.lost_reason(), Some(LostReason::TakenOver)),
        "{error}"
    );
    assert!(
        !backend.is_locked("k"),
        "the extend did not bring the key back"
    );
    assert_eq!(calls.names(), ["lost"]);
    assert!(lease.extend(TTL).unwrap_err().is_lost(), "lost for good");
    assert!(lease.release().unwrap_err().is_lost());
    let stats = manager.stats();
    assert_eq!(stats.losses.total(), 1);
    assert_eq!(stats.releases, 0);
    assert_eq!(calls.names().len(), 1);
}

#[test]
fn extend_refuses_bad_ttls_and_survives_an_unreachable_backend() {
    let (manager, backend, clock) = virtual_manager();
    let lease = manager.acquire("k", TTL).unwrap();
    let valid_until = lease.valid_until();
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(2),
        MAX_TTL + Duration::from_millis(1),
    ] {
        let error = lease.extend(ttl).unwrap_err();
        assert!(error.is_invalid_input(), "{ttl:?}: {error}");
    }
    lease.extend(MIN_TTL).unwrap();
    lease.extend(MAX_TTL).unwrap();
    lease.extend(TTL).unwrap();
    backend.set_unreachable(true);
    let error = lease.extend(Duration::from_secs(600)).unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(lease.is_held());
    assert_eq!(lease.ttl(), TTL, "a failed extend changes nothing");
    backend.set_unreachable(false);
    clock.advance(TTL / 3);
    manager.settle();
    assert!(
        lease.valid_until() > valid_until,
        "still renewed in the background"
    );
    // Past its validity, an extend sends nothing and says it is lost.
    backend.set_unreachable(true);
    clock.advance(TTL * 2);
    let error = lease.extend(TTL).unwrap_err();
    assert!(
        matches!(error.lost_reason(), Some(LostReason::Expired)),
        "{error}"
    );
}

#[test]
fn extend_on_the_renewer_thread_is_refused_instead_of_waiting_for_itself() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let shared: Arc<OnceLock<Lease>> = Arc::new(OnceLock::new());
    let errors = Arc::new(Mutex::new(Vec::new()));
    let manager = LockManager::builder(backend)
        .clock(clock.clone())
        .event_hook({
            let (shared, errors) = (shared.clone(), errors.clone());
            move |event: &LeaseEvent<'_>| {
                if let (LeaseEvent::Renewed { .. }, Some(lease)) = (event, shared.get()) {
                    let result = lease.extend(TTL);
                    // The error prints its kind; its source says why.
                    let cause = result.map_err(|error| {
                        let source = std::error::Error::source(&error).map(ToString::to_string);
                        (error.is_transient(), source.unwrap_or_default())
                    });
                    errors.lock().unwrap().push(cause);
                }
            }
        })
        .build()
        .unwrap();
    let lease = manager.acquire("k", TTL).unwrap();
    assert!(shared.set(lease).is_ok());
    clock.advance(TTL / 3);
    manager.settle(); // renewed: the hook runs on the renewer thread, and must not hang it
    let errors = errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1);
    let (transient, cause) = errors[0].as_ref().unwrap_err();
    assert!(!transient && cause.contains("renewer thread"), "{cause}");
    assert!(shared.get().unwrap().is_held());
}
