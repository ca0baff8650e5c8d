//! `RedisBackend` on a Redis Cluster (`redis+cluster://`): the conformance suite, renewals
//! batched per master, and keys whose braces cannot split a lease over two slots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test setup

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lock_core::{LockManager, RetryPolicy};
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
        assert!(manager
            .try_acquire(key, Duration::from_secs(5))
            .unwrap()
            .is_none());
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

/// `INFO stats`' `total_reads_processed` of `node`: how many times it read from its clients'
/// sockets. A pipeline of many commands written at once is read in one go (or a few, past
/// 16 KiB), where the same commands sent one by one need a read each.
fn reads_processed(node: &lock_tests::RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut node.connection())
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_reads_processed:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("total_reads_processed in INFO stats")
}

/// 10,000 leases over all slots, held for three renewal periods: none is lost; every master
/// renews its leases (one script call per slot of a batch), and gets each batch's calls as one
/// pipeline: it reads its sockets fewer times than it runs scripts (at least one read per call
/// if they came one by one).
#[test]
fn ten_thousand_leases_are_renewed_per_master_without_loss() {
    let cluster = quiet_cluster();
    let backend = RedisBackend::builder(&cluster.url())
        .command_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let manager = LockManager::builder(backend.clone()).build().unwrap();
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
    let lock_keys: Vec<String> = leases
        .iter()
        .map(|lease| backend.lock_key(lease.key()))
        .collect();
    let owners = cluster.slot_owners();
    let mut slots_per_master: HashMap<u16, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for slot in cluster.slots_of(&lock_keys) {
        if seen.insert(slot) {
            let owner = owners[usize::from(slot)].expect("every slot has a master");
            *slots_per_master.entry(owner).or_insert(0) += 1;
        }
    }
    assert_eq!(slots_per_master.len(), 3, "{slots_per_master:?}");
    let counters = |port: u16| {
        let node = cluster.node(port);
        (node.script_calls(), reads_processed(node))
    };
    let before: HashMap<u16, (u64, u64)> = slots_per_master
        .keys()
        .map(|&port| (port, counters(port)))
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
    for (port, slots) in &slots_per_master {
        let (calls, reads) = counters(*port);
        let (calls, reads) = (calls - before[port].0, reads - before[port].1);
        assert!(
            calls >= *slots as u64 * 2,
            "master {port}: {calls} script calls for {slots} slots in three periods"
        );
        // Sent one by one, each call would need a read of its own; a pipeline of about 170
        // calls (17 KiB) is read in a few (16 KiB per read, more when the machine is loaded).
        assert!(
            reads * 2 < calls,
            "master {port}: {reads} socket reads for {calls} script calls: not pipelined"
        );
    }
    for lease in leases {
        lease.release().unwrap();
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
    // Woken by its subscription, the waiter found the lock held and sleeps on its backoff.
    std::thread::sleep(Duration::from_millis(200));
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
    let waiter = spawn_waiter(&sleepy, "acl:0", ttl);
    let channel = lock_redis::RedisBackend::connect(&cluster.url())
        .unwrap()
        .lock_key("acl:0");
    let master = cluster.master_of_slot(cluster.slot_of(&channel));
    wait_until("the waiter subscribed", Duration::from_secs(10), || {
        cluster.node(master).shard_subscribers(&channel) == 1
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut leases = leases.into_iter();
    let first = leases.next().unwrap();
    assert_woken_by(waiter, Duration::from_secs(2), || first.release().unwrap());
    for lease in leases {
        lease.release().unwrap();
    }
}
