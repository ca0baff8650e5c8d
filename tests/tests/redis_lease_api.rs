//! The manager's conveniences on a real Redis: extending by hand, loss callbacks, outcomes that
//! keep the closure's value, re-entrancy, defaults and statistics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::time::{Duration, Instant};

use lock_core::channel;
use lock_core::{LockManager, LostReason};
use lock_redis::RedisBackend;
use lock_tests::RedisServer;

/// The TTL of most leases in these tests.
const TTL: Duration = Duration::from_secs(30);
/// Deadline for what must happen within a renewal or two.
const WAIT: Duration = Duration::from_secs(10);

fn manager(server: &RedisServer) -> LockManager {
    LockManager::new(RedisBackend::connect(&server.url()).unwrap())
}

/// The Redis key that holds lock `key` under the default prefix.
fn redis_key(server: &RedisServer, key: &str) -> String {
    RedisBackend::connect(&server.url()).unwrap().lock_key(key)
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(redis_key(server, key))
        .query(&mut server.connection())
        .unwrap()
}

/// Deletes lock `key` behind its holder's back.
fn delete(server: &RedisServer, key: &str) {
    let deleted: u64 = redis::cmd("DEL")
        .arg(redis_key(server, key))
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(deleted, 1, "{key} was not held");
}

#[test]
fn extend_sets_the_keys_ttl_on_the_server_longer_or_shorter() {
    let server = RedisServer::start();
    let manager = manager(&server);
    let lease = manager.acquire("extend", TTL).unwrap();
    lease.extend(Duration::from_secs(600)).unwrap();
    assert!(
        pttl(&server, "extend") > 590_000,
        "{}",
        pttl(&server, "extend")
    );
    assert!(lease.valid_until() > Instant::now() + Duration::from_secs(590));
    lease.extend(Duration::from_secs(5)).unwrap();
    assert!(pttl(&server, "extend") <= 5_000);
    assert_eq!(lease.ttl(), Duration::from_secs(5));
    assert!(lease.valid_until() < Instant::now() + Duration::from_secs(5));
    assert_eq!(manager.stats().renewals.ok, 2);
    lease.release().unwrap();
    assert_eq!(pttl(&server, "extend"), -2, "released");
}

#[test]
fn extend_of_a_deleted_key_reports_the_loss_once_and_does_not_revive_it() {
    let server = RedisServer::start();
    let manager = manager(&server);
    let lease = manager.acquire("gone", TTL).unwrap();
    let (lost_tx, lost) = channel::unbounded();
    lease.on_lost(move |reason| {
        let _ = lost_tx.send(reason);
    });
    delete(&server, "gone");
    let error = lease.extend(TTL).unwrap_err();
    assert!(
        matches!(error.lost_reason(), Some(LostReason::TakenOver)),
        "{error}"
    );
    assert_eq!(pttl(&server, "gone"), -2, "the extend brought the key back");
    assert!(matches!(lost.try_recv(), Ok(LostReason::TakenOver)));
    assert!(lease.release().unwrap_err().is_lost());
    assert!(lost.try_recv().is_err(), "the callback ran once");
    let stats = manager.stats();
    assert_eq!((stats.losses.taken_over, stats.releases), (1, 0));
}

#[test]
fn on_lost_runs_on_the_renewer_thread_when_a_renewal_finds_the_key_gone() {
    let server = RedisServer::start();
    let manager = manager(&server);
    let lease = manager
        .acquire("watched", Duration::from_millis(600))
        .unwrap();
    let (lost_tx, lost) = channel::unbounded();
    lease.on_lost(move |reason| {
        let thread = std::thread::current().name().map(str::to_owned);
        let _ = lost_tx.send((reason, thread));
    });
    delete(&server, "watched");
    // The next renewal (within a third of the TTL) finds out; nobody here asks.
    let (reason, thread) = lost.recv_timeout(WAIT).unwrap();
    assert!(matches!(reason, LostReason::TakenOver));
    assert_eq!(thread.as_deref(), Some(lock_core::RENEWER_THREAD_NAME));
    // The callback ran and was dropped with its sender: nothing more can come.
    assert!(lost.recv().is_err(), "ran once");
}

#[test]
fn with_lease_outcome_keeps_the_value_when_the_key_was_deleted_meanwhile() {
    let server = RedisServer::start();
    let manager = manager(&server);
    let outcome = manager
        .with_lease_outcome("outcome", TTL, Duration::ZERO, |lease| {
            delete(&server, "outcome");
            lease.fence()
        })
        .unwrap();
    assert_eq!(outcome.value, outcome.fence);
    assert!(matches!(outcome.lost, Some(LostReason::TakenOver)));
}

#[test]
fn a_threads_second_acquire_fails_at_once_and_others_wait() {
    let server = RedisServer::start();
    let manager = LockManager::builder(RedisBackend::connect(&server.url()).unwrap())
        .default_ttl(Duration::from_secs(20))
        .default_wait(Duration::from_secs(20))
        .build()
        .unwrap();
    let lease = manager.acquire_default("reentrant").unwrap();
    assert_eq!(lease.ttl(), Duration::from_secs(20));
    let started = Instant::now();
    assert!(manager
        .acquire_default("reentrant")
        .unwrap_err()
        .is_already_held());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            manager
                .acquire_timeout("reentrant", TTL, Duration::from_millis(300))
                .unwrap_err()
        });
        assert!(other.join().unwrap().is_timeout(), "another thread waits");
    });
    lease.release().unwrap();
    let stats = manager.stats();
    assert_eq!(
        (
            stats.acquires.granted,
            stats.acquires.busy,
            stats.acquires.failed
        ),
        (1, 2, 0)
    );
    assert_eq!((stats.releases, stats.leases_held), (1, 0));
}

#[test]
fn stats_count_renewal_batches_against_a_real_server() {
    let server = RedisServer::start();
    let manager = manager(&server);
    let leases: Vec<_> = (0..3)
        .map(|i| {
            manager
                .acquire(&format!("stats-{i}"), Duration::from_millis(600))
                .unwrap()
        })
        .collect();
    lock_tests::wait_until("two rounds of renewals", WAIT, || {
        manager.stats().renewals.ok >= 6
    });
    let stats = manager.stats();
    assert!(stats.renewals.batches >= 2, "{stats:?}");
    assert!(
        stats.renewals.max_batch_latency > Duration::ZERO,
        "{stats:?}"
    );
    assert!(stats.renewals.max_batch_latency >= stats.renewals.last_batch_latency);
    assert_eq!(stats.renewals.failed, 0);
    assert_eq!(stats.leases_held, 3);
    drop(leases);
    let stats = manager.stats();
    assert_eq!(
        (stats.releases, stats.leases_held, stats.losses.total()),
        (3, 0, 0)
    );
}
