//! `min_replicas`: an acquire waits until replicas acknowledged it (`WAIT`), against a real
//! master and replica.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a failed test

use std::time::{Duration, Instant};

use lock_core::{LeaseBackend, LockManager};
use lock_redis::{RedisBackend, RedisBackendError};
use lock_tests::direct::{fence_of, redis_cause, request, CALL};
use lock_tests::{wait_until, RedisServer};
use redis::Commands;

const TTL: Duration = Duration::from_secs(30);
/// How long an acquire waits for its replica.
const WAIT_FOR_REPLICA: Duration = Duration::from_millis(200);

fn master_and_replica() -> (RedisServer, RedisServer) {
    let master = RedisServer::start();
    let replica = RedisServer::start();
    replica.replicate(master.addr());
    // The replica's link is up a moment before it acknowledges writes.
    let mut connection = master.connection();
    wait_until(
        "the replica acknowledges writes",
        Duration::from_secs(10),
        || {
            let () = connection.set("probe", 1).unwrap();
            let acknowledged: u32 = redis::cmd("WAIT")
                .arg(1)
                .arg(100)
                .query(&mut connection)
                .unwrap();
            acknowledged == 1
        },
    );
    (master, replica)
}

fn waiting_backend(master: &RedisServer) -> RedisBackend {
    RedisBackend::builder(&master.url())
        .min_replicas(1, WAIT_FOR_REPLICA)
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[test]
fn an_acquire_acknowledged_by_the_replica_is_granted_and_already_on_it() {
    let (master, replica) = master_and_replica();
    let backend = waiting_backend(&master);
    let fence = fence_of(backend.try_acquire(&request("k", "t", TTL), CALL).unwrap());
    // No waiting here: the grant returned only once the replica had it.
    let on_replica: Option<String> = replica.connection().get(backend.lock_key("k")).unwrap();
    assert_eq!(on_replica.as_deref(), Some("t"));
    let counter: u64 = replica.connection().get(backend.fence_key("k")).unwrap();
    assert_eq!(counter, fence);
}

#[test]
fn an_acquire_the_paused_replica_cannot_acknowledge_fails_in_time_and_gives_the_key_back() {
    let (master, replica) = master_and_replica();
    let manager = LockManager::new(waiting_backend(&master));
    replica.pause();

    let started = Instant::now();
    let error = manager.try_acquire("k", TTL).unwrap_err();
    let took = started.elapsed();
    assert!(error.is_transient(), "{error}");
    let lock_core::Error::Backend(backend_error) = &error else {
        panic!("not a backend error: {error:?}");
    };
    assert!(
        matches!(
            redis_cause(backend_error),
            RedisBackendError::NotReplicated {
                acknowledged: 0,
                wanted: 1,
                ..
            }
        ),
        "{backend_error:?}"
    );
    assert!(
        took >= WAIT_FOR_REPLICA && took < WAIT_FOR_REPLICA + Duration::from_secs(2),
        "the acquire took {took:?}"
    );
    // The manager gave the key back, best effort: it is free for the next holder.
    let backend = waiting_backend(&master);
    wait_until(
        "the unacknowledged lock is given back",
        Duration::from_secs(10),
        || {
            !master
                .connection()
                .exists::<_, bool>(backend.lock_key("k"))
                .unwrap()
        },
    );

    replica.resume();
    replica.wait_caught_up_with(&master);
    let lease = manager.try_acquire("k", TTL).unwrap().expect("a free key");
    lease.release().unwrap();
}
