//! A Redis Cluster on free ports: three masters and a replica of each, every node a
//! [`RedisServer`] started with `--cluster-enabled yes`, joined by `redis-cli --cluster create`,
//! with the faults a cluster test needs: kill a master and wait for its replica to take over,
//! fail a master over by hand (`CLUSTER FAILOVER`), move a slot to another master.
//!
//! ```no_run
//! use lock_tests::RedisCluster;
//!
//! let mut cluster = RedisCluster::start(); // 3 masters + 3 replicas, node timeout 1 s
//! let backend = lock_redis::RedisBackend::connect(&cluster.url()).expect("a valid URL");
//! let slot = cluster.slot_of("lock:{jobs:42}");
//! let old = cluster.master_of_slot(slot);
//! cluster.kill_master_of_slot(slot);
//! let new = cluster.wait_for_new_master_of_slot(slot, old);
//! assert_ne!(old, new);
//! ```

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::server::{find_binary, RedisServer, ServerOptions};
use crate::{poll_until, wait_until};

/// How long the cluster may take to form, or to settle after a failover or a slot move.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`RedisCluster::failover_slot`] gives one `CLUSTER FAILOVER` before asking again:
/// longer than Redis' own limit for a manual failover (5 s).
const FAILOVER_ATTEMPT: Duration = Duration::from_secs(8);

/// The shape of a [`RedisCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Masters (each with one replica).
    pub masters: usize,
    /// `cluster-node-timeout`: how long a silent master takes to be deemed failed.
    pub node_timeout: Duration,
}

impl Default for ClusterOptions {
    /// Three masters, three replicas, node timeout 1 s (a killed master's replica takes over
    /// 2 to 3 s later).
    fn default() -> ClusterOptions {
        ClusterOptions {
            masters: 3,
            node_timeout: Duration::from_secs(1),
        }
    }
}

/// A Redis Cluster of masters and one replica each on `127.0.0.1`; dropping it stops every
/// process.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    options: ClusterOptions,
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<u16> = self.nodes.iter().map(RedisServer::port).collect();
        f.debug_struct("RedisCluster")
            .field("ports", &ports)
            .field("options", &self.options)
            .finish()
    }
}

impl RedisCluster {
    /// A cluster with [`ClusterOptions::default`].
    ///
    /// # Panics
    ///
    /// As [`RedisCluster::start_with`].
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(ClusterOptions::default())
    }

    /// Starts `2 * masters` nodes, joins them with `redis-cli --cluster create ...
    /// --cluster-replicas 1`, and waits until every node says `cluster_state:ok` and knows
    /// every other.
    ///
    /// # Panics
    ///
    /// If `redis-server` or `redis-cli` is missing (the message says how to install them), or
    /// the cluster does not form within 30 seconds.
    pub fn start_with(options: ClusterOptions) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..options.masters * 2)
            .map(|_| {
                RedisServer::start_with(ServerOptions {
                    cluster_node_timeout: Some(options.node_timeout),
                    ..ServerOptions::default()
                })
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let output = Command::new(find_binary("redis-cli", "redis-tools"))
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, options };
        cluster.wait_settled();
        cluster
    }

    /// `redis+cluster://` with every node's address, for [`lock_redis::RedisBackend::connect`].
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Every node, running or killed.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The running nodes that are masters now.
    pub fn masters(&self) -> Vec<&RedisServer> {
        self.running()
            .filter(|node| cluster_info(node, "myself").contains("master"))
            .collect()
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|node| node.is_running())
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let node = self.running().next().expect("a running node");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut node.connection())
            .expect("CLUSTER KEYSLOT")
    }

    /// The slot of each of `keys`, in one pipeline.
    pub fn slots_of(&self, keys: &[String]) -> Vec<u16> {
        let node = self.running().next().expect("a running node");
        let mut pipeline = redis::pipe();
        for key in keys {
            pipeline.cmd("CLUSTER").arg("KEYSLOT").arg(key);
        }
        pipeline
            .query(&mut node.connection())
            .expect("CLUSTER KEYSLOT")
    }

    /// For each slot, the port of the running master that says it owns it (`None` for a slot
    /// no running master owns).
    pub fn slot_owners(&self) -> Vec<Option<u16>> {
        let mut owners = vec![None; 16384];
        for master in self.masters() {
            let line = cluster_info(master, "myself");
            for (slot, owner) in owners.iter_mut().enumerate() {
                if u16::try_from(slot).is_ok_and(|slot| owns(&line, slot)) {
                    *owner = Some(master.port());
                }
            }
        }
        owners
    }

    /// The port of the running master that says it owns `slot`.
    ///
    /// # Panics
    ///
    /// If no running master owns it.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.try_master_of_slot(slot)
            .unwrap_or_else(|| panic!("no running master owns slot {slot}"))
    }

    fn try_master_of_slot(&self, slot: u16) -> Option<u16> {
        self.running()
            .find(|node| {
                let line = cluster_info(node, "myself");
                line.contains("master") && owns(&line, slot)
            })
            .map(RedisServer::port)
    }

    /// The running node on `port`.
    ///
    /// # Panics
    ///
    /// If there is none.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.running()
            .find(|node| node.port() == port)
            .unwrap_or_else(|| panic!("no running node on port {port}"))
    }

    /// Kills (`SIGKILL`) the master that owns `slot`; returns its port.
    pub fn kill_master_of_slot(&mut self, slot: u16) -> u16 {
        let port = self.master_of_slot(slot);
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port() == port)
            .expect("the master is a node");
        node.kill();
        port
    }

    /// Waits until a running master other than `old` owns `slot` and every running node says
    /// `cluster_state:ok`; returns the new master's port.
    ///
    /// # Panics
    ///
    /// If that takes more than 30 seconds.
    pub fn wait_for_new_master_of_slot(&self, slot: u16, old: u16) -> u16 {
        let mut new = None;
        wait_until(
            &format!("a master other than {old} owns slot {slot}"),
            SETTLE_TIMEOUT,
            || {
                new = self.try_master_of_slot(slot).filter(|&port| port != old);
                new.is_some()
            },
        );
        self.wait_settled();
        new.expect("found above")
    }

    /// Fails the master of `slot` over to its replica by hand (`CLUSTER FAILOVER` on the
    /// replica), and waits until the replica owns the slot; returns the new master's port.
    ///
    /// A manual failover that does not complete within Redis' own limit (5 s: the master must
    /// pause its clients and the replica catch up, then win an election) is dropped without a
    /// word, which happens on a loaded machine. So it is asked for again after
    /// [`FAILOVER_ATTEMPT`], then with `FORCE` (no handshake with the master; the election
    /// still needs a majority of masters).
    ///
    /// # Panics
    ///
    /// If the slot has not moved after 30 seconds.
    pub fn failover_slot(&self, slot: u16) -> u16 {
        let old = self.master_of_slot(slot);
        let master_id = node_id(self.node(old));
        let replica = self
            .running()
            .find(|node| cluster_info(node, "myself").contains(&format!("slave {master_id}")))
            .expect("the master has a replica");
        let started = Instant::now();
        for attempt in 0.. {
            let mut failover = redis::cmd("CLUSTER");
            failover.arg("FAILOVER");
            if attempt > 0 {
                failover.arg("FORCE");
            }
            failover
                .exec(&mut replica.connection())
                .expect("CLUSTER FAILOVER");
            let moved = poll_until(FAILOVER_ATTEMPT, || {
                self.try_master_of_slot(slot)
                    .is_some_and(|port| port != old)
            });
            if moved || started.elapsed() >= SETTLE_TIMEOUT {
                break;
            }
        }
        self.wait_for_new_master_of_slot(slot, old)
    }

    /// Moves `slot` (and its keys) to the master on port `to`, as `redis-cli --cluster
    /// reshard` does: `SETSLOT IMPORTING` and `MIGRATING`, `MIGRATE` of every key, then
    /// `SETSLOT NODE` on both masters and every other master. `between_keys` runs after each
    /// key moved, while the slot is half-moved (keys on both masters, `ASK` redirections).
    pub fn move_slot(&self, slot: u16, to: u16, mut between_keys: impl FnMut()) {
        let from = self.master_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (source, target) = (self.node(from), self.node(to));
        let (source_id, target_id) = (node_id(source), node_id(target));
        let setslot = |node: &RedisServer, state: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .exec(&mut node.connection())
                .unwrap_or_else(|e| {
                    panic!("CLUSTER SETSLOT {slot} {state} on {}: {e}", node.port())
                });
        };
        setslot(target, "IMPORTING", &source_id);
        setslot(source, "MIGRATING", &target_id);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1)
                .query(&mut source.connection())
                .expect("CLUSTER GETKEYSINSLOT");
            let Some(key) = keys.first() else { break };
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg(key)
                .arg(0)
                .arg(5000)
                .exec(&mut source.connection())
                .unwrap_or_else(|e| panic!("MIGRATE {key} to {to}: {e}"));
            between_keys();
        }
        setslot(target, "NODE", &target_id);
        setslot(source, "NODE", &target_id);
        for node in self.masters() {
            if node.port() != from && node.port() != to {
                setslot(node, "NODE", &target_id);
            }
        }
        wait_until(
            &format!("slot {slot} is owned by {to}"),
            SETTLE_TIMEOUT,
            || self.try_master_of_slot(slot) == Some(to),
        );
    }

    /// Waits until every running node says `cluster_state:ok` and every slot has one running
    /// master that every running node agrees on.
    fn wait_settled(&self) {
        wait_until("the cluster is settled", SETTLE_TIMEOUT, || {
            self.running().all(|node| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut node.connection())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            }) && self.running().all(|node| self.agrees(node))
        });
    }

    /// Whether `node` knows each master that owns slots as the masters themselves say.
    fn agrees(&self, node: &RedisServer) -> bool {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut node.connection())
            .unwrap_or_default();
        let masters = self.masters();
        masters.len() == self.options.masters
            && masters.iter().all(|master| {
                let id = node_id(master);
                nodes.lines().any(|line| {
                    line.starts_with(&id) && line.contains("master") && !line.contains("fail")
                })
            })
    }
}

/// The `CLUSTER NODES` line of `node` whose flags contain `flag` (`myself`).
fn cluster_info(node: &RedisServer, flag: &str) -> String {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut node.connection())
        .unwrap_or_default();
    nodes
        .lines()
        .find(|line| {
            line.split(' ')
                .nth(2)
                .is_some_and(|flags| flags.contains(flag))
        })
        .unwrap_or_default()
        .to_owned()
}

/// `node`'s cluster id (`CLUSTER MYID`).
fn node_id(node: &RedisServer) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut node.connection())
        .expect("CLUSTER MYID")
}

/// Whether a `CLUSTER NODES` line's slot ranges (fields 9 on) contain `slot`.
fn owns(line: &str, slot: u16) -> bool {
    line.split(' ').skip(8).any(|range| {
        if range.starts_with('[') {
            return false; // a migration in progress
        }
        let (start, end) = range.split_once('-').unwrap_or((range, range));
        match (start.parse::<u16>(), end.parse::<u16>()) {
            (Ok(start), Ok(end)) => (start..=end).contains(&slot),
            _ => false,
        }
    })
}
