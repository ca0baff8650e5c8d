//! Faults that used to break a promise of `RedisBackend`, each against real `redis-server`
//! processes: fence counters that come back stale (a failover to a lagging replica, a restore
//! from an old snapshot) or corrupt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::time::Duration;

use lock_core::{LeaseBackend, Ownership};
use lock_redis::{RedisBackend, RedisBackendError, RedisOperation};
use lock_tests::direct::{acquire, backend_at, fence_of, redis_cause, request, CALL};
use lock_tests::{error_chain, fenced_write, ProxyMode, RedisServer, TcpProxy};
use redis::Commands;

/// The TTL of the leases in these tests.
const TTL: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------------

/// The lock the fence tests take, and the resource its holders write to.
const KEY: &str = "ledger";
const RESOURCE: &str = "ledger-store";

/// Grants and releases the lock to a new holder, who writes to the fenced store; returns the
/// fence.
fn grant_and_write(backend: &RedisBackend, store: &mut redis::Connection, holder: &str) -> u64 {
    let fence = fence_of(acquire(backend, KEY, holder, TTL));
    assert!(
        fenced_write(store, RESOURCE, fence, holder).unwrap(),
        "the store rejected {holder}, the current holder (fence {fence})"
    );
    assert_eq!(
        backend.release(KEY, holder, CALL).unwrap(),
        Ownership::Owned
    );
    fence
}

/// The first holder after a fault gets a fence above every fence issued before; its writes are
/// accepted and the last holder before the fault, still writing, is refused.
fn assert_fencing_survives(backend: &RedisBackend, store: &mut redis::Connection, issued: &[u64]) {
    let highest = *issued.iter().max().unwrap();
    let fence = fence_of(acquire(backend, KEY, "after-the-fault", TTL));
    assert!(
        fence > highest,
        "fence {fence} after the fault, but {highest} was issued before: {issued:?}"
    );
    assert!(
        fenced_write(store, RESOURCE, fence, "after-the-fault").unwrap(),
        "the store rejected the current holder"
    );
    assert!(
        !fenced_write(store, RESOURCE, highest, "stale").unwrap(),
        "the store accepted a write of the holder before the fault"
    );
}

#[test]
fn fences_keep_growing_after_failover_to_a_lagging_replica() {
    let master = RedisServer::start();
    let link = TcpProxy::start(master.addr());
    let replica = RedisServer::start();
    replica.replicate(link.addr());
    let data = RedisServer::start();
    let mut store = data.connection();
    let on_master = backend_at(&master.url());

    let mut issued: Vec<u64> = (0..3)
        .map(|round| grant_and_write(&on_master, &mut store, &format!("early-{round}")))
        .collect();
    replica.wait_caught_up_with(&master);

    // The replica is cut off, and misses the last grants.
    link.set_mode(ProxyMode::Blackhole);
    issued.extend(
        (0..3).map(|round| grant_and_write(&on_master, &mut store, &format!("late-{round}"))),
    );
    replica.promote();
    let counter: u64 = replica.connection().get(on_master.fence_key(KEY)).unwrap();
    assert_eq!(
        counter, issued[2],
        "the promoted replica is not behind: the test proves nothing"
    );

    assert_fencing_survives(&backend_at(&replica.url()), &mut store, &issued);
}

#[test]
fn fences_keep_growing_after_a_restore_from_an_old_snapshot() {
    let mut server = RedisServer::start();
    let data = RedisServer::start();
    let mut store = data.connection();
    let backend = backend_at(&server.url());

    let mut issued: Vec<u64> = (0..3)
        .map(|round| grant_and_write(&backend, &mut store, &format!("early-{round}")))
        .collect();
    server.save_snapshot();
    issued.extend(
        (0..3).map(|round| grant_and_write(&backend, &mut store, &format!("late-{round}"))),
    );
    server.restart();
    let counter: u64 = server.connection().get(backend.fence_key(KEY)).unwrap();
    assert_eq!(
        counter, issued[2],
        "the snapshot was not restored: the test proves nothing"
    );

    assert_fencing_survives(&backend, &mut store, &issued);
}

#[test]
fn a_corrupt_fence_counter_fails_the_acquire_and_leaves_no_lock() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let mut connection = server.connection();
    type Corrupt = fn(&mut redis::Connection, &str);
    let corruptions: [(&str, Corrupt); 6] = [
        ("a word", |c, key| c.set(key, "twelve").unwrap()),
        ("a fraction", |c, key| c.set(key, "12.5").unwrap()),
        ("a negative number", |c, key| c.set(key, "-12").unwrap()),
        (
            "2^53, the first number a double cannot follow exactly",
            |c, key| c.set(key, "9007199254740992").unwrap(),
        ),
        ("a number beyond 2^53", |c, key| {
            c.set(key, "9007199254740993").unwrap()
        }),
        ("a list", |c, key| c.rpush(key, "12").unwrap()),
    ];
    for (index, (what, corrupt)) in corruptions.iter().enumerate() {
        let key = format!("corrupt-{index}");
        let counter = backend.fence_key(&key);
        corrupt(&mut connection, &counter);

        let error = backend
            .try_acquire(&request(&key, "t", TTL), CALL)
            .expect_err(what);
        assert!(!error.is_transient(), "{what}: {error}");
        let cause = redis_cause(&error);
        assert!(
            matches!(
                cause,
                RedisBackendError::Command {
                    operation: RedisOperation::Acquire,
                    ..
                }
            ),
            "{what}: {cause:?}"
        );
        let text = error_chain(&error);
        assert!(
            text.contains(&counter),
            "{what}: the error does not name {counter}: {text}"
        );
        let held: bool = connection.exists(backend.lock_key(&key)).unwrap();
        assert!(!held, "{what}: the failed acquire left the lock key behind");
    }

    // The highest counter that can still be followed exactly is followed exactly.
    let () = connection
        .set(backend.fence_key("edge"), "9007199254740990")
        .unwrap();
    assert_eq!(
        fence_of(acquire(&backend, "edge", "t", TTL)),
        9_007_199_254_740_991
    );
}
