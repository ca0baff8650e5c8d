//! The target of `lock_core`'s conformance suite on a [`RedisBackend`] against real servers:
//! real time, keys deleted and the server paused behind the backend's back.

use std::sync::Arc;
use std::time::Duration;

use lock_core::conformance::ConformanceTarget;
use lock_core::{LeaseBackend, LockManager, LockManagerBuilder};
use lock_redis::RedisBackend;
use redis::Commands;

use crate::{RedisCluster, RedisServer, SentinelGroup};

/// Where a [`RedisTarget`]'s backend keeps its keys.
pub trait KeyServer {
    /// Deletes the Redis key `key` where it is kept; how many keys were deleted.
    fn delete_key(&self, key: &str) -> u64;

    /// Pauses (`SIGSTOP`) or resumes the servers that keep the keys.
    fn set_paused(&self, paused: bool);
}

impl KeyServer for RedisServer {
    fn delete_key(&self, key: &str) -> u64 {
        self.connection().del(key).unwrap()
    }

    fn set_paused(&self, paused: bool) {
        if paused {
            self.pause();
        } else {
            self.resume();
        }
    }
}

/// The master the sentinels name.
impl KeyServer for SentinelGroup {
    fn delete_key(&self, key: &str) -> u64 {
        self.master().delete_key(key)
    }

    fn set_paused(&self, paused: bool) {
        self.master().set_paused(paused);
    }
}

/// The master of the key's slot; pausing pauses every node, replicas included, so that no
/// failover starts (with a node timeout longer than the pause).
impl KeyServer for RedisCluster {
    fn delete_key(&self, key: &str) -> u64 {
        self.node(self.master_of_slot(self.slot_of(key)))
            .delete_key(key)
    }

    fn set_paused(&self, paused: bool) {
        for node in self.nodes().iter().filter(|node| node.is_running()) {
            node.set_paused(paused);
        }
    }
}

/// A Redis backend under the conformance suite, and the servers it talks to:
/// `lock_core::conformance_tests!(make_target())` with a `make_target` that returns one.
#[derive(Debug)]
pub struct RedisTarget<S> {
    /// One server, a Sentinel group (whose sentinels must not fail over while the master is
    /// paused by [`ConformanceTarget::set_unreachable`]), or a cluster (whose node timeout must
    /// be longer than such a pause).
    pub servers: S,
    /// The backend under test.
    pub backend: RedisBackend,
}

impl<S: KeyServer> ConformanceTarget for RedisTarget<S> {
    fn builder(&self) -> LockManagerBuilder {
        LockManager::builder(self.backend.clone())
    }

    fn backend(&self) -> Arc<dyn LeaseBackend> {
        Arc::new(self.backend.clone())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(800)
    }

    fn advance(&self, by: Duration) {
        // Real time: the server expires keys by its own clock.
        std::thread::sleep(by);
    }

    fn delete_key(&self, key: &str) {
        let deleted = self.servers.delete_key(&self.backend.lock_key(key));
        assert_eq!(deleted, 1, "{key} was not held");
    }

    fn set_unreachable(&self, unreachable: bool) {
        self.servers.set_paused(unreachable);
    }
}
