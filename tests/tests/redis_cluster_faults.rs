//! `RedisBackend` on a Redis Cluster whose layout changes under held leases: a master killed
//! (its replica takes over), a slot moved to another master, and guarded counters through a
//! failover. Each test starts a cluster of its own (node timeout 1 s), as it breaks it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test setup

use std::time::{Duration, Instant};

use lock_core::{
    AcquireOutcome, Lease, LeaseBackend, LeaseRequest, LockManager, Ownership, RetryPolicy,
};
use lock_redis::RedisBackend;
use lock_tests::{
    assert_woken_by, spawn_waiter, wait_until, CountingRun, RedisCluster, RedisServer,
};

const HOLDER: &str = env!("CARGO_BIN_EXE_lease-holder");

/// Leases long enough to outlive a failover (2 to 3 s with a 1 s node timeout) between two
/// renewals (at a third of the TTL).
const TTL: Duration = Duration::from_secs(6);

/// How late after `valid_until` a loss may be reported.
const REPORT_SLACK: Duration = Duration::from_millis(300);

/// How long after the promotion a new acquire on the failed master's slots may take.
const ACQUIRE_SLACK: Duration = Duration::from_secs(2);

/// How long a test waits for a condition that should come within seconds.
const WAIT: Duration = Duration::from_secs(30);

/// A backend with short timeouts, so a dead master costs each call little.
fn backend(cluster: &RedisCluster) -> RedisBackend {
    RedisBackend::builder(&cluster.url())
        .connect_timeout(Duration::from_millis(300))
        .checkout_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

/// The first key `prefix:N` whose lock key the master on `port` owns.
fn key_on(cluster: &RedisCluster, backend: &RedisBackend, prefix: &str, port: u16) -> String {
    let owners = cluster.slot_owners();
    let candidates: Vec<String> = (0..200).map(|index| format!("{prefix}:{index}")).collect();
    let lock_keys: Vec<String> = candidates.iter().map(|key| backend.lock_key(key)).collect();
    cluster
        .slots_of(&lock_keys)
        .into_iter()
        .zip(candidates)
        .find(|(slot, _)| owners[usize::from(*slot)] == Some(port))
        .map(|(_, key)| key)
        .unwrap_or_else(|| panic!("no {prefix} key on master {port}"))
}

/// The port of a master other than the master of `slot`: where the slot can move.
fn another_master(cluster: &RedisCluster, slot: u16) -> u16 {
    let from = cluster.master_of_slot(slot);
    cluster
        .masters()
        .iter()
        .map(|master| master.port())
        .find(|&port| port != from)
        .expect("a cluster of more than one master")
}

/// Checks a lease that may have been lost: either it is still held, and the cluster holds its
/// key with its fence (looked at when `inspect`), or its loss was reported no later than its
/// `valid_until` plus the slack (the report is consumed: check a lost lease once).
fn held_or_reported(manager: &LockManager, lease: &Lease, inspect: bool) -> bool {
    if lease.is_held() {
        if !inspect {
            return true;
        }
        let started = Instant::now();
        let state = loop {
            match manager.inspect(lease.key()) {
                Ok(state) => break state,
                Err(error) if started.elapsed() < WAIT => {
                    eprintln!("inspect of {}: {error}; again", lease.key());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => panic!("inspect of {}: {error}", lease.key()),
            }
        };
        assert!(
            state.is_held() && state.fence() >= Some(lease.fence()),
            "{} is held by its lease, not in the cluster: {state:?}",
            lease.key()
        );
        return true;
    }
    let reported_by = lease.valid_until() + REPORT_SLACK;
    assert!(
        lease.lost().recv_deadline(reported_by).is_ok(),
        "the loss of {} was not reported by valid_until + {REPORT_SLACK:?}",
        lease.key()
    );
    false
}

/// A master killed: leases on the other masters are untouched; its own are held through the
/// replica the cluster promotes (2 to 3 s later) or reported lost on time; a new acquire on its
/// slots succeeds within 2 s of the promotion, with a higher fence than any before.
#[test]
fn a_killed_master_costs_only_its_own_leases_and_its_slots_come_back() {
    let mut cluster = RedisCluster::start();
    let backend = backend(&cluster);
    let manager = LockManager::new(backend.clone());
    let owners = cluster.slot_owners();
    let keys: Vec<String> = (0..30).map(|index| format!("held:{index}")).collect();
    let lock_keys: Vec<String> = keys.iter().map(|key| backend.lock_key(key)).collect();
    let slots = cluster.slots_of(&lock_keys);
    let leases: Vec<Lease> = keys
        .iter()
        .map(|key| manager.try_acquire(key, TTL).unwrap().unwrap())
        .collect();
    let victim_slot = slots[0];
    let victim = owners[usize::from(victim_slot)].unwrap();
    let on_victim: Vec<bool> = slots
        .iter()
        .map(|slot| owners[usize::from(*slot)] == Some(victim))
        .collect();
    assert!(on_victim.iter().any(|on| !on), "every key on one master");
    // A key released before the failover: its next fence must still be higher.
    let probe = key_on(&cluster, &backend, "probe", victim);
    let first = manager.try_acquire(&probe, TTL).unwrap().unwrap();
    let old_fence = first.fence();
    first.release().unwrap();

    let killed_at = Instant::now();
    cluster.kill_master_of_slot(victim_slot);
    let new = cluster.wait_for_new_master_of_slot(victim_slot, victim);
    let promoted_at = Instant::now();
    eprintln!(
        "master {victim} killed; {new} took over {:?} later",
        promoted_at - killed_at
    );
    let fresh = loop {
        match manager.try_acquire(&probe, TTL) {
            Ok(Some(lease)) => break lease,
            Ok(None) => panic!("{probe} is held by nobody"),
            Err(error) => {
                assert!(
                    promoted_at.elapsed() < ACQUIRE_SLACK,
                    "no acquire on the new master {:?} after its promotion: {error}",
                    promoted_at.elapsed()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    eprintln!(
        "first acquire on the new master {:?} after its promotion",
        promoted_at.elapsed()
    );
    assert!(
        fresh.fence() > old_fence,
        "fence went back: {} after {old_fence}",
        fresh.fence()
    );
    // Two TTLs after the kill: leases elsewhere were held all along; the victim's are held on
    // the new master or were reported lost on time.
    while killed_at.elapsed() < TTL * 2 {
        for (lease, on_victim) in leases.iter().zip(&on_victim) {
            if !on_victim {
                assert!(lease.is_held(), "{} lost on a live master", lease.key());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let survivors = leases
        .iter()
        .zip(&on_victim)
        .filter(|(_, on_victim)| **on_victim)
        .filter(|(lease, _)| held_or_reported(&manager, lease, true))
        .count();
    eprintln!(
        "{survivors} of {} leases on the killed master survived",
        on_victim.iter().filter(|on| **on).count()
    );
    fresh.release().unwrap();
}

/// Leases in a slot that moves to another master (keys migrated one by one, `ASK` and
/// `TRYAGAIN` meanwhile, then `MOVED`) stay held and renewed, or are reported lost on time:
/// never held by their holder alone.
#[test]
fn leases_in_a_slot_that_moves_stay_held_or_are_reported_lost() {
    let cluster = RedisCluster::start();
    let backend = backend(&cluster);
    let manager = LockManager::new(backend.clone());
    let ttl = Duration::from_secs(3);
    // Ten leases in one slot (one hash tag), and a probe acquired and released meanwhile.
    let keys: Vec<String> = (0..10).map(|index| format!("moving}}:{index}")).collect();
    let leases: Vec<Lease> = keys
        .iter()
        .map(|key| manager.try_acquire(key, ttl).unwrap().unwrap())
        .collect();
    let slot = cluster.slot_of(&backend.lock_key(&keys[0]));
    let to = another_master(&cluster, slot);
    let mut last_fence = 0;
    // The leases found lost (on time), not checked again.
    let mut lost = std::collections::HashSet::new();
    let mut check = |lease: &Lease, inspect: bool| {
        if !lost.contains(lease.key()) && !held_or_reported(&manager, lease, inspect) {
            lost.insert(lease.key().to_owned());
        }
    };
    // Half-moved for about a renewal period: the renewals meet ASK and TRYAGAIN.
    cluster.move_slot(slot, to, || {
        std::thread::sleep(ttl / 30);
        // Not inspected: a lease's keys may be on two masters now, and its inspection would
        // get TRYAGAIN until the move goes on.
        for lease in &leases {
            check(lease, false);
        }
        // A new lease whose keys are split between the masters cannot be taken until the move
        // goes on (TRYAGAIN): a transient error, never a wrong grant.
        match manager.try_acquire("moving}:probe", ttl) {
            Ok(Some(lease)) => {
                assert!(lease.fence() > last_fence, "the probe's fence went back");
                last_fence = lease.fence();
                lease.release().unwrap();
            }
            Ok(None) => panic!("the probe is held by nobody"),
            Err(error) => assert!(error.is_transient(), "{error:?}"),
        }
    });
    // Two more renewal periods on the new master.
    let moved_at = Instant::now();
    while moved_at.elapsed() < ttl * 2 / 3 {
        for lease in &leases {
            check(lease, true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let probe = manager.try_acquire("moving}:probe", ttl).unwrap().unwrap();
    assert!(probe.fence() > last_fence, "the probe's fence went back");
    probe.release().unwrap();
    // The survivors are held on the new master.
    let mut on_new_master = cluster.node(to).connection();
    let held: Vec<&Lease> = leases.iter().filter(|lease| lease.is_held()).collect();
    for lease in &held {
        let ttl_left: i64 = redis::cmd("PTTL")
            .arg(backend.lock_key(lease.key()))
            .query(&mut on_new_master)
            .unwrap();
        assert!(ttl_left > 0, "{} not on the new master", lease.key());
    }
    eprintln!(
        "{} of {} leases held through the move",
        held.len(),
        leases.len()
    );
    // A lease lost (and reported) meanwhile says so at its release too.
    for lease in leases {
        if let Err(error) = lease.release() {
            assert!(error.is_lost(), "{error}");
        }
    }
}

/// One renewal call renews leases of many slots on its master; a key that master does not serve
/// (moved away while its slot migrates, or after the move) is refused alone, and renewed where
/// it lives, through `ASK` or `MOVED`. Checked with a batch sent after each key of a slot moves:
/// every lease is renewed, on whichever master holds its key.
#[test]
fn a_renewal_batch_renews_every_lease_of_a_slot_that_moves() {
    let cluster = RedisCluster::start();
    let backend = backend(&cluster);
    let timeout = Duration::from_secs(5);
    // Six keys in one slot (one hash tag), and forty spread over the cluster.
    let keys: Vec<String> = (0..6)
        .map(|index| format!("moving}}:{index}"))
        .chain((0..40).map(|index| format!("spread:{index}")))
        .collect();
    fn acquired(key: &str) -> LeaseRequest<'_> {
        LeaseRequest {
            key,
            token: "holder",
            ttl: Duration::from_secs(60),
        }
    }
    for key in &keys {
        let outcome = backend.try_acquire(&acquired(key), timeout).unwrap();
        assert!(matches!(outcome, AcquireOutcome::Acquired { .. }), "{key}");
    }
    // Renewed to two minutes: a key whose TTL is above one minute was renewed.
    let renewals: Vec<LeaseRequest<'_>> = keys
        .iter()
        .map(|key| LeaseRequest {
            ttl: Duration::from_secs(120),
            ..acquired(key)
        })
        .collect();
    let slot = cluster.slot_of(&backend.lock_key(&keys[0]));
    let to = another_master(&cluster, slot);
    // The longest TTL any master holds for `key` (its key lives on one of them; the others
    // answer MOVED or ASK, or -2). ASKING lets the importing master answer for its keys.
    let ttl_left = |key: &str| -> i64 {
        cluster
            .masters()
            .iter()
            .map(|master| {
                redis::pipe()
                    .cmd("ASKING")
                    .ignore()
                    .cmd("PTTL")
                    .arg(backend.lock_key(key))
                    .query::<(i64,)>(&mut master.connection())
                    .map_or(-2, |(ttl,)| ttl)
            })
            .max()
            .unwrap()
    };
    let renew_all = |when: &str| {
        for (key, result) in keys.iter().zip(backend.renew_batch(&renewals, timeout)) {
            assert!(
                matches!(result, Ok(Ownership::Owned)),
                "{key} {when}: {result:?}"
            );
            assert!(ttl_left(key) > 60_000, "{key} {when}: not renewed");
        }
    };
    renew_all("before the move");
    let mut moved = 0;
    cluster.move_slot(slot, to, || {
        moved += 1;
        renew_all(&format!("with {moved} keys moved"));
    });
    assert_eq!(
        moved, 12,
        "six locks and their fence counters, moved one by one"
    );
    renew_all("after the move");
    // Nothing was renewed for anyone else: a token that does not hold its lock is refused.
    let stranger = LeaseRequest {
        token: "stranger",
        ..renewals[0]
    };
    assert!(matches!(
        backend.renew_batch(&[stranger], timeout)[0],
        Ok(Ownership::NotOwned)
    ));
}

/// Three processes of four threads per key, one key on each master, count in a fenced store
/// while a master is killed: no update is lost that the fences accepted.
#[test]
fn three_processes_on_keys_of_every_master_lose_no_update_through_a_failover() {
    const PROCESSES: usize = 3;
    const PROGRESS: u64 = 20;
    let mut cluster = RedisCluster::start();
    let data = RedisServer::start();
    let backend = backend(&cluster);
    let (locks, data_url) = (cluster.url(), data.url());
    let ports: Vec<u16> = cluster
        .masters()
        .iter()
        .map(|master| master.port())
        .collect();
    let keys: Vec<String> = ports
        .iter()
        .map(|&port| key_on(&cluster, &backend, "counter", port))
        .collect();
    let runs: Vec<CountingRun<'_>> = keys
        .iter()
        .map(|key| CountingRun {
            holder: HOLDER,
            locks: &locks,
            data: &data_url,
            key,
            threads: 4,
            iterations: 0,
        })
        .collect();
    let resources: Vec<String> = keys.iter().map(|key| format!("fenced:{key}")).collect();
    // Three processes per key, each key on its own master.
    let counters: Vec<_> = runs
        .iter()
        .zip(&resources)
        .map(|(run, resource)| run.spawn_fenced(PROCESSES, resource))
        .collect();
    let mut store = data.connection();
    let progress = |store: &mut redis::Connection, at_least: &[u64]| {
        wait_until("every key's processes counted", WAIT, || {
            runs.iter()
                .zip(&resources)
                .zip(at_least)
                .all(|((run, resource), &target)| run.fenced_value(resource, store) >= target)
        });
    };
    progress(&mut store, &[PROGRESS; 3]);
    let slot = cluster.slot_of(&backend.lock_key(&keys[0]));
    let old = cluster.kill_master_of_slot(slot);
    cluster.wait_for_new_master_of_slot(slot, old);
    let counted: Vec<u64> = runs
        .iter()
        .zip(&resources)
        .map(|(run, resource)| run.fenced_value(resource, &mut store))
        .collect();
    let targets: Vec<u64> = counted.iter().map(|count| count + PROGRESS).collect();
    progress(&mut store, &targets);
    for ((run, counters), resource) in runs.iter().zip(counters).zip(&resources) {
        let totals = run.stop_fenced_and_check(counters, resource, &mut data.connection());
        eprintln!("{}: {totals:?}", run.key);
    }
}

/// After a failover of the key's slot, the subscriber subscribes on the new master, and a
/// release there wakes the waiter at once, not after its 30 s backoff.
#[test]
fn a_release_after_a_failover_wakes_a_waiter_through_the_new_master() {
    let cluster = RedisCluster::start();
    let backend = backend(&cluster);
    let channel = backend.lock_key("handoff");
    let holder = LockManager::new(backend.clone());
    let sleepy = LockManager::builder(backend)
        .retry(RetryPolicy::new(
            Duration::from_secs(30),
            Duration::from_secs(30),
        ))
        .build()
        .unwrap();
    let lease = holder.acquire("handoff", TTL).unwrap();
    let slot = cluster.slot_of(&channel);
    let old = cluster.master_of_slot(slot);
    // Every node, the replica that takes over included.
    for node in cluster.nodes() {
        node.log_every_command(1_000);
    }
    let waiter = spawn_waiter(&sleepy, "handoff", TTL);
    wait_until("the waiter subscribed", WAIT, || {
        cluster.node(old).shard_subscribers(&channel) == 1
    });
    let new = cluster.failover_slot(slot);
    wait_until("the subscriber subscribed on the new master", WAIT, || {
        cluster.node(new).shard_subscribers(&channel) == 1
    });
    // Woken by the new subscription, the waiter tries on the new master (the lock is still
    // held) and sleeps.
    wait_until("the waiter tried on the new master", WAIT, || {
        cluster.node(new).acquire_attempts() >= 1
    });
    assert_woken_by(waiter, Duration::from_secs(2), || lease.release().unwrap());
}
