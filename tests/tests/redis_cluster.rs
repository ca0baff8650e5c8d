//! `RedisBackend` on a Redis Cluster (`redis+cluster://`): the conformance suite, renewals
//! batched per master, and keys whose braces cannot split a lease over two slots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test setup

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lock_core::{AcquireOutcome, LeaseBackend, LeaseRequest, LockManager, Ownership, RetryPolicy};
use lock_redis::RedisBackend;
use lock_tests::conformance::RedisTarget;
use lock_tests::{assert_woken_by, spawn_waiter, wait_until, ClusterOptions, RedisCluster};

/// A backoff so long that only a wake-up explains a quick acquire.
const SLEEPY: RetryPolicy = RetryPolicy::new(Duration::from_secs(30), Duration::from_secs(30));

/// A cluster for one test that does not break it: a long node timeout, so that the
/// conformance suite's pauses (about a TTL) never start a failover.
fn quiet_cluster() -> RedisCluster {
    RedisCluster::start_with(ClusterOptions {
        node_timeout: Duration::from_secs(5),
        ..ClusterOptions::default()
    })
}

fn cluster_target() -> RedisTarget<RedisCluster> {
    let cluster = quiet_cluster();
    let backend = RedisBackend::builder(&cluster.url())
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    RedisTarget {
        servers: cluster,
        backend,
    }
}

mod conformance {
    use super::*;

    lock_core::conformance_tests!(cluster_target());
}

/// Every kind of call on keys of every master, with braces in the user keys: each lease's keys
/// share one slot, so no call fails with `CROSSSLOT`; the eviction policy of every master.
#[test]
fn leases_on_every_master_with_braces_in_their_keys() {
    let cluster = quiet_cluster();
    let backend = RedisBackend::connect(&cluster.url()).unwrap();
    let manager = LockManager::new(backend.clone());
    let keys: Vec<String> = ["}x", "a}b", "{a}", "{", "a{b}c", "{}", "\\}", "plain"]
        .iter()
        .map(|key| (*key).to_owned())
        .chain((0..30).map(|index| format!("job:{index}")))
        .collect();
    let mut masters = HashMap::new();
    for key in &keys {
        let lease = manager
            .try_acquire(key, Duration::from_secs(5))
            .unwrap()
            .unwrap_or_else(|| panic!("{key} was free"));
        let slot = cluster.slot_of(&backend.lock_key(key));
        assert_eq!(cluster.slot_of(&backend.fence_key(key)), slot, "{key}");
        *masters.entry(cluster.master_of_slot(slot)).or_insert(0) += 1;
        let state = manager.inspect(key).unwrap();
        assert!(state.is_held(), "{key}: {state:?}");
        // Held by this thread: not re-entrant, refused at once.
        assert!(manager
            .try_acquire(key, Duration::from_secs(5))
            .unwrap_err()
            .is_already_held());
        lease.release().unwrap();
        assert!(!manager.inspect(key).unwrap().is_held(), "{key}");
    }
    assert_eq!(masters.len(), 3, "keys on every master: {masters:?}");
    // Every master's policy is read: the test servers' default.
    assert_eq!(
        backend.eviction_policy().unwrap().as_deref(),
        Some("noeviction")
    );
}

/// 10,000 leases over all slots, held by a manager for three renewal periods: none is lost.
#[test]
fn ten_thousand_leases_over_all_slots_are_held_without_loss() {
    let cluster = quiet_cluster();
    let backend = RedisBackend::builder(&cluster.url())
        .command_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let manager = LockManager::new(backend);
    // Long enough for a renewer that falls behind on a loaded 2-core machine (10,000 leases
    // in a debug build, while other tests run).
    let ttl = Duration::from_secs(9);
    let leases: Vec<_> = (0..10_000)
        .map(|index| {
            manager
                .try_acquire(&format!("many:{index}"), ttl)
                .unwrap()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    // Three renewal periods (the renewer renews at a third of the TTL).
    while started.elapsed() < ttl {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            leases.iter().all(|lease| lease.is_held()),
            "a lease was lost"
        );
    }
    for lease in leases {
        lease.release().unwrap();
    }
}

/// One renewal batch of 10,000 leases over all slots costs each master one script call per 128
/// of its leases, whatever their slots (about 3,300 leases over 5,461 slots per master: one
/// call per slot would be about 2,500 calls).
#[test]
fn a_renewal_batch_costs_each_master_one_call_per_128_of_its_leases() {
    let cluster = quiet_cluster();
    let backend = RedisBackend::builder(&cluster.url())
        .command_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let ttl = Duration::from_secs(60);
    let keys: Vec<String> = (0..10_000).map(|index| format!("batch:{index}")).collect();
    let requests: Vec<LeaseRequest<'_>> = keys
        .iter()
        .map(|key| LeaseRequest {
            key,
            token: "batch-token",
            ttl,
        })
        .collect();
    for request in &requests {
        let outcome = backend
            .try_acquire(request, Duration::from_secs(5))
            .unwrap();
        assert!(matches!(outcome, AcquireOutcome::Acquired { .. }));
    }
    let lock_keys: Vec<String> = keys.iter().map(|key| backend.lock_key(key)).collect();
    let owners = cluster.slot_owners();
    let mut leases_per_master: HashMap<u16, u64> = HashMap::new();
    for slot in cluster.slots_of(&lock_keys) {
        let owner = owners[usize::from(slot)].expect("every slot has a master");
        *leases_per_master.entry(owner).or_default() += 1;
    }
    assert_eq!(leases_per_master.len(), 3, "leases on every master");
    // The first batch also loads the renewal script into each master (NOSCRIPT, then the
    // missing calls again, in a second pipeline): measure the next one.
    let results = backend.renew_batch(&requests, Duration::from_secs(10));
    assert!(results
        .iter()
        .all(|result| matches!(result, Ok(Ownership::Owned))));
    let before: HashMap<u16, u64> = leases_per_master
        .keys()
        .map(|&port| (port, cluster.node(port).script_calls()))
        .collect();
    let results = backend.renew_batch(&requests, Duration::from_secs(10));
    assert!(results
        .iter()
        .all(|result| matches!(result, Ok(Ownership::Owned))));
    for (port, leases) in &leases_per_master {
        let calls = cluster.node(*port).script_calls() - before[port];
        eprintln!("master {port}: {calls} script calls for {leases} leases");
        assert_eq!(
            calls,
            leases.div_ceil(128),
            "master {port}: one script call per 128 leases"
        );
    }
}

/// A release wakes a waiter at once through sharded pub/sub: the waiter's process subscribes
/// (`SSUBSCRIBE`) on the master of the key's slot only, and the release's `SPUBLISH` reaches
/// it there, long before its 30 s backoff would have it try again.
#[test]
fn a_release_wakes_a_waiter_through_sharded_pub_sub_on_the_keys_master() {
    let cluster = quiet_cluster();
    let backend = RedisBackend::connect(&cluster.url()).unwrap();
    let channel = backend.lock_key("handoff");
    let holder = LockManager::new(backend.clone());
    let sleepy = LockManager::builder(backend).retry(SLEEPY).build().unwrap();
    let ttl = Duration::from_secs(30);
    let lease = holder.acquire("handoff", ttl).unwrap();
    let master = cluster.master_of_slot(cluster.slot_of(&channel));
    cluster.node(master).log_every_command(1_000);
    let waiter = spawn_waiter(&sleepy, "handoff", ttl);
    wait_until(
        "the waiter subscribed on the key's master",
        Duration::from_secs(10),
        || cluster.node(master).shard_subscribers(&channel) == 1,
    );
    for other in cluster.masters() {
        if other.port() != master {
            assert_eq!(other.subscribers(&channel), 0);
        }
    }
    // Woken by its subscription, the waiter found the lock held (its third attempt) and
    // sleeps on its backoff.
    wait_until(
        "the waiter tried three times",
        Duration::from_secs(10),
        || cluster.node(master).acquire_attempts() >= 3,
    );
    assert_woken_by(waiter, Duration::from_secs(2), || lease.release().unwrap());
}

/// The suite's main paths as a user with exactly `cluster_acl_rules`, set on every node:
/// acquire, renew, inspect, release, and a wake-up over sharded pub/sub.
#[test]
fn a_user_with_the_cluster_acl_rules_holds_renews_and_wakes() {
    let cluster = quiet_cluster();
    for node in cluster.nodes() {
        node.add_acl_user(
            "locker",
            "locker-pw",
            &lock_redis::cluster_acl_rules("lock:"),
        );
    }
    let backend = RedisBackend::builder(&cluster.url())
        .credentials("locker", "locker-pw")
        .build()
        .unwrap();
    let holder = LockManager::new(backend.clone());
    let sleepy = LockManager::builder(backend).retry(SLEEPY).build().unwrap();
    let ttl = Duration::from_secs(1);
    let leases: Vec<_> = (0..20)
        .map(|index| {
            holder
                .try_acquire(&format!("acl:{index}"), ttl)
                .unwrap()
                .unwrap()
        })
        .collect();
    // Renewed past their TTL.
    std::thread::sleep(ttl * 2);
    assert!(leases.iter().all(|lease| lease.is_held()));
    assert!(holder.inspect("acl:0").unwrap().is_held());
    let channel = lock_redis::RedisBackend::connect(&cluster.url())
        .unwrap()
        .lock_key("acl:0");
    let master = cluster.master_of_slot(cluster.slot_of(&channel));
    cluster.node(master).log_every_command(1_000);
    let waiter = spawn_waiter(&sleepy, "acl:0", ttl);
    wait_until("the waiter subscribed", Duration::from_secs(10), || {
        cluster.node(master).shard_subscribers(&channel) == 1
    });
    wait_until(
        "the waiter tried three times",
        Duration::from_secs(10),
        || cluster.node(master).acquire_attempts() >= 3,
    );
    let mut leases = leases.into_iter();
    let first = leases.next().unwrap();
    assert_woken_by(waiter, Duration::from_secs(2), || first.release().unwrap());
    for lease in leases {
        lease.release().unwrap();
    }
}
