//! `RedlockBackend` against 3 and 5 real redis-server masters: the conformance suite, quorum
//! under every combination of dead or paused nodes, a slow node, and processes racing on 5
//! nodes while one dies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::conformance::ConformanceTarget;
use lock_core::{AcquireOutcome, LeaseBackend, LeaseRequest, LockManager, LockManagerBuilder};
use lock_redis::RedlockBackend;
use lock_tests::{wait_until, CountingRun, ProxyMode, RedisServer, TcpProxy};
use redis::Commands;

const HOLDER: &str = env!("CARGO_BIN_EXE_lease-holder");
const NODE_TIMEOUT: Duration = Duration::from_millis(150);

struct Cluster {
    servers: Vec<RedisServer>,
    redlock: RedlockBackend,
}

fn cluster(nodes: usize) -> Cluster {
    let servers: Vec<RedisServer> = (0..nodes).map(|_| RedisServer::start()).collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let redlock = RedlockBackend::builder(&urls)
        .node_timeout(NODE_TIMEOUT)
        .build()
        .unwrap();
    Cluster { servers, redlock }
}

impl Cluster {
    /// Which nodes hold `key` for `token`, by asking each server directly.
    fn holders(&self, key: &str, token: &str) -> Vec<usize> {
        let lock_key = self.redlock.nodes().next().unwrap().lock_key(key);
        self.servers
            .iter()
            .enumerate()
            .filter(|(_, server)| {
                let value: Option<String> = server.connection().get(&lock_key).unwrap();
                value.as_deref() == Some(token)
            })
            .map(|(index, _)| index)
            .collect()
    }
}

impl ConformanceTarget for Cluster {
    fn builder(&self) -> LockManagerBuilder {
        LockManager::builder(self.redlock.clone())
    }

    fn backend(&self) -> Arc<dyn LeaseBackend> {
        Arc::new(self.redlock.clone())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(900)
    }

    fn advance(&self, by: Duration) {
        std::thread::sleep(by);
    }

    fn delete_key(&self, key: &str) {
        for (server, node) in self.servers.iter().zip(self.redlock.nodes()) {
            let _: u64 = server.connection().del(node.lock_key(key)).unwrap();
        }
    }

    fn set_unreachable(&self, unreachable: bool) {
        for server in &self.servers {
            if unreachable {
                server.pause();
            } else {
                server.resume();
            }
        }
    }

    fn report_slack(&self) -> Duration {
        // The last renewal attempt may end up to a node timeout's reply grace late.
        Duration::from_millis(150)
    }
}

mod three_nodes {
    lock_core::conformance_tests!(super::cluster(3));
}

mod five_nodes {
    lock_core::conformance_tests!(super::cluster(5));
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Pause,
}

/// For every subset of nodes broken by `fault`: acquire succeeds exactly when the live nodes
/// form a majority, and a failed acquire leaves our token on no node.
fn quorum_follows_live_nodes(nodes: usize, fault: Fault) {
    let mut cluster = cluster(nodes);
    let ttl = Duration::from_secs(60); // long: expiry must not explain a vanished token
    for broken_mask in 0u32..(1 << nodes) {
        let broken: Vec<usize> = (0..nodes).filter(|n| broken_mask & (1 << n) != 0).collect();
        for &node in &broken {
            match fault {
                Fault::Kill => cluster.servers[node].kill(),
                Fault::Pause => cluster.servers[node].pause(),
            }
        }
        let key = format!("quorum-{broken_mask}");
        let token = format!("token-{broken_mask}");
        let request = LeaseRequest {
            key: &key,
            token: &token,
            ttl,
        };
        let outcome = cluster.redlock.try_acquire(&request, Duration::MAX);
        let live = nodes - broken.len();
        let majority = live > nodes / 2;
        for &node in &broken {
            match fault {
                Fault::Kill => cluster.servers[node].restart(),
                Fault::Pause => cluster.servers[node].resume(),
            }
        }
        // A restarted node's pool reconnects with a backoff of its own; this test is about
        // quorum, not about how soon a node is used again, so wait until every node answers.
        wait_until("every node answers again", Duration::from_secs(10), || {
            cluster.redlock.nodes().all(|node| {
                let probe = LeaseRequest {
                    key: "probe",
                    token: "probe",
                    ttl,
                };
                let answered = node.try_acquire(&probe, NODE_TIMEOUT).is_ok();
                answered && node.release("probe", "probe", NODE_TIMEOUT).is_ok()
            })
        });
        match (majority, &outcome) {
            (true, Ok(AcquireOutcome::Acquired { .. })) => {
                let holders = cluster.holders(&key, &token);
                assert!(
                    holders.len() > nodes / 2,
                    "granted but held on {holders:?} only"
                );
            }
            (false, Err(error)) => {
                assert!(error.is_transient(), "{error}");
                // Paused nodes may apply our buffered acquire on resume; the cleanup must undo it.
                wait_until(
                    "no node holds the failed acquire's token",
                    Duration::from_secs(5),
                    || cluster.holders(&key, &token).is_empty(),
                );
            }
            _ => panic!("{nodes} nodes, broken {broken:?} ({fault:?}): got {outcome:?}"),
        }
    }
}

#[test]
fn quorum_with_killed_nodes_of_3() {
    quorum_follows_live_nodes(3, Fault::Kill);
}

#[test]
fn quorum_with_paused_nodes_of_3() {
    quorum_follows_live_nodes(3, Fault::Pause);
}

#[test]
fn quorum_with_killed_nodes_of_5() {
    quorum_follows_live_nodes(5, Fault::Kill);
}

#[test]
fn quorum_with_paused_nodes_of_5() {
    quorum_follows_live_nodes(5, Fault::Pause);
}

#[test]
fn a_holder_survives_a_minority_and_loses_with_the_majority() {
    let mut cluster = cluster(5);
    let manager = LockManager::new(cluster.redlock.clone());
    let ttl = Duration::from_millis(900);
    let lease = manager.acquire("survivor", ttl).unwrap();
    let lost = lease.lost();
    cluster.servers[0].kill();
    cluster.servers[1].kill();
    // Several renewal periods on the surviving majority.
    let until = Instant::now() + ttl * 3;
    while Instant::now() < until {
        lease.ensure_held().unwrap();
        std::thread::sleep(ttl / 10);
    }
    assert!(lost.try_recv().is_err());
    cluster.servers[2].kill();
    // A renewal in flight during the kill may still extend the lease once: wait up to a TTL.
    let reason = lost
        .recv_timeout(ttl + Duration::from_millis(200))
        .expect("loss reported once the majority is gone");
    let reported = Instant::now();
    assert!(
        reported <= lease.valid_until() + Duration::from_millis(200),
        "loss reported {:?} after valid_until",
        reported - lease.valid_until()
    );
    assert!(!lease.is_held(), "{reason:?}");
}

#[test]
fn a_blackholed_node_adds_at_most_the_node_timeout() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let proxy = TcpProxy::start(servers[2].addr());
    let urls = [servers[0].url(), servers[1].url(), proxy.url()];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let redlock = RedlockBackend::builder(&urls)
        .node_timeout(NODE_TIMEOUT)
        .build()
        .unwrap();
    let manager = LockManager::new(redlock);
    let ttl = Duration::from_secs(5);
    let cycle = |name: &str| {
        let started = Instant::now();
        let lease = manager.acquire(name, ttl).unwrap();
        let acquired = started.elapsed();
        lease.release().unwrap();
        (acquired, started.elapsed())
    };
    let healthy: Vec<_> = (0..20).map(|i| cycle(&format!("healthy-{i}"))).collect();
    proxy.set_mode(ProxyMode::Blackhole);
    let slow: Vec<_> = (0..20).map(|i| cycle(&format!("slow-{i}"))).collect();
    let worst_healthy = healthy.iter().map(|(_, total)| *total).max().unwrap();
    for (acquired, total) in slow {
        assert!(
            acquired <= worst_healthy + Duration::from_millis(50),
            "acquire waited on the dead node: {acquired:?}"
        );
        assert!(
            total <= worst_healthy + NODE_TIMEOUT + Duration::from_millis(100),
            "acquire+release took {total:?}, more than the node timeout over {worst_healthy:?}"
        );
    }
}

#[test]
fn processes_on_five_nodes_lose_no_update_while_one_node_dies() {
    const PROCESSES: usize = 3;
    const THREADS: usize = 4;
    const ITERATIONS: usize = 25;
    let mut cluster = cluster(5);
    let data = RedisServer::start();
    let locks: Vec<String> = cluster.servers.iter().map(RedisServer::url).collect();
    let locks = locks.join(",");
    let data_url = data.url();
    let run = CountingRun {
        holder: HOLDER,
        locks: &locks,
        data: &data_url,
        key: "shared",
        threads: THREADS,
        iterations: ITERATIONS,
    };
    let children = run.spawn(PROCESSES);
    let total = (PROCESSES * THREADS * ITERATIONS) as u64;
    wait_until("a third of the increments", Duration::from_secs(60), || {
        let done: Option<u64> = data.connection().get("counter").unwrap();
        done.unwrap_or(0) >= total / 3
    });
    cluster.servers[3].kill();
    run.check(children, &mut data.connection());
}

/// While the nodes' counters agree and their clocks are not ahead of this machine's (the
/// steady state), every node of the majority issues the fence the acquire proposed, so no
/// node needs its counter raised afterwards: no node runs the write-back script, and the fences
/// still strictly increase.
#[test]
fn a_steady_acquire_needs_no_fence_write_back() {
    let raise_fence =
        redis::Script::new(include_str!("../../lock-redis/src/scripts/raise_fence.lua"));
    let cluster = cluster(3);
    // Every command each node runs from here on, in its slow log.
    for server in &cluster.servers {
        server.log_every_command(10_000);
    }
    let ttl = Duration::from_secs(10);
    let mut last = 0;
    for round in 0..20 {
        let token = format!("steady-{round}");
        let request = LeaseRequest {
            key: "steady",
            token: &token,
            ttl,
        };
        let outcome = cluster.redlock.try_acquire(&request, Duration::MAX);
        let Ok(AcquireOutcome::Acquired { fence }) = outcome else {
            panic!("a free key on three healthy nodes is granted: {outcome:?}");
        };
        assert!(fence > last, "fence went from {last} to {fence}");
        last = fence;
        cluster
            .redlock
            .release("steady", &token, Duration::MAX)
            .unwrap();
    }
    for (node, server) in cluster.servers.iter().enumerate() {
        let attempts = server.acquire_attempts();
        assert!(
            attempts >= 20,
            "node {node} ran acquire.lua {attempts} times"
        );
        let raises = server.script_runs(raise_fence.get_hash());
        assert_eq!(
            raises, 0,
            "node {node} had its fence counter raised {raises} times"
        );
    }
}
