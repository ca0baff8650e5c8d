//! Waiting on Redis: releases wake waiters through the shared subscriber, waiters fall back to
//! backoff when it is gone, and the renewer keeps thousands of short leases alive.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a failed test

use std::time::{Duration, Instant};

use lock_core::{LockManager, RetryPolicy};
use lock_redis::RedisBackend;
use lock_tests::{spawn_waiter, wait_until, RedisServer};

/// A backoff so long that only a wake-up explains a quick acquire.
const SLEEPY: RetryPolicy = RetryPolicy::new(Duration::from_secs(30), Duration::from_secs(30));
const TTL: Duration = Duration::from_secs(10);

#[test]
fn a_release_wakes_a_waiter_long_before_its_backoff() {
    let server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).unwrap();
    let manager = LockManager::builder(backend).retry(SLEEPY).build().unwrap();
    let lease = manager.acquire("handoff", TTL).unwrap();
    server.log_every_command(1_000);
    let waiting = spawn_waiter(&manager, "handoff", TTL);
    wait_until("the waiter subscribed", Duration::from_secs(10), || {
        server.subscribers("lock:{handoff}") == 1
    });
    // Its first attempt, the one right after it registered, and the one its subscription woke:
    // then it sleeps on its 30 s backoff.
    wait_until(
        "the waiter tried three times",
        Duration::from_secs(10),
        || server.acquire_attempts() >= 3,
    );
    let released = Instant::now();
    lease.release().unwrap();
    let acquired = waiting.join().unwrap();
    assert!(
        acquired - released < Duration::from_secs(2),
        "woken {:?} after the release: slept on its backoff",
        acquired - released
    );
}

#[test]
fn waiters_fall_back_to_backoff_without_the_subscriber_and_wakeups_resume() {
    let server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).unwrap();
    let quick = LockManager::builder(backend.clone())
        .retry(RetryPolicy::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .build()
        .unwrap();
    // Start the subscriber, then kill its connection.
    let lease = quick.acquire("k", TTL).unwrap();
    let first = spawn_waiter(&quick, "k", TTL);
    wait_until("the waiter subscribed", Duration::from_secs(10), || {
        server.subscribers("lock:{k}") == 1
    });
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut server.connection())
        .unwrap();
    lease.release().unwrap();
    // The release may have gone unheard: backoff alone must still get the waiter the lock.
    let _ = first.join().unwrap();

    // Wake-ups work again for the next waiter, on a new subscriber connection.
    let sleepy = LockManager::builder(backend).retry(SLEEPY).build().unwrap();
    let lease = sleepy.acquire("k", TTL).unwrap();
    let before = server.script_calls();
    let second = spawn_waiter(&sleepy, "k", TTL);
    wait_until("the waiter tried", Duration::from_secs(10), || {
        server.script_calls() > before
    });
    wait_until(
        "the subscriber reconnected for the waiter",
        Duration::from_secs(10),
        || server.subscribers("lock:{k}") == 1,
    );
    let released = Instant::now();
    lease.release().unwrap();
    let acquired = second.join().unwrap();
    assert!(
        acquired - released < Duration::from_secs(2),
        "no wake-up after the subscriber reconnected"
    );
}

#[test]
fn ten_thousand_short_leases_survive_several_renewal_periods() {
    const LEASES: usize = 10_000;
    let server = RedisServer::start();
    let backend = RedisBackend::builder(&server.url())
        .pool_size(8)
        .build()
        .unwrap();
    let manager = LockManager::new(backend);
    // Long enough that a debug build on a loaded 2-core machine renews 10,000 leases well
    // within a third of it; each lease is still renewed about nine times below.
    let ttl = Duration::from_secs(3);
    let leases: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|part| {
                let manager = &manager;
                scope.spawn(move || {
                    (part..LEASES)
                        .step_by(4)
                        .map(|n| {
                            manager
                                .try_acquire(&format!("many:{n}"), ttl)
                                .unwrap()
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let first_valid_until = leases
        .iter()
        .map(|lease| lease.valid_until())
        .min()
        .unwrap();
    // Three TTLs: every lease must have been renewed about nine times.
    let until = Instant::now() + ttl * 3;
    while Instant::now() < until {
        std::thread::sleep(ttl / 4);
        let lost = leases.iter().filter(|lease| !lease.is_held()).count();
        assert_eq!(lost, 0, "{lost} of {LEASES} leases lost");
    }
    assert!(leases
        .iter()
        .all(|lease| lease.valid_until() > first_valid_until + ttl * 2));
    assert!(leases.iter().all(|lease| lease.lost().try_recv().is_err()));
}
