//! The target of `lock_core`'s conformance suite on a [`RedisBackend`] against real servers:
//! real time, keys deleted and the server paused behind the backend's back.

use std::sync::Arc;
use std::time::Duration;

use lock_core::conformance::ConformanceTarget;
use lock_core::{LeaseBackend, LockManager, LockManagerBuilder};
use lock_redis::RedisBackend;
use redis::Commands;

use crate::{RedisServer, SentinelGroup};

/// Where a [`RedisTarget`]'s backend keeps its keys.
pub trait KeyServer {
    /// The server that holds the keys now.
    fn key_server(&self) -> &RedisServer;
}

impl KeyServer for RedisServer {
    fn key_server(&self) -> &RedisServer {
        self
    }
}

/// The master the sentinels name.
impl KeyServer for SentinelGroup {
    fn key_server(&self) -> &RedisServer {
        self.master()
    }
}

/// A Redis backend under the conformance suite, and the servers it talks to:
/// `lock_core::conformance_tests!(make_target())` with a `make_target` that returns one.
#[derive(Debug)]
pub struct RedisTarget<S> {
    /// One server, or a Sentinel group (whose sentinels must not fail over while the master is
    /// paused by [`ConformanceTarget::set_unreachable`]).
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
        let deleted: u64 = self
            .servers
            .key_server()
            .connection()
            .del(self.backend.lock_key(key))
            .unwrap();
        assert_eq!(deleted, 1, "{key} was not held");
    }

    fn set_unreachable(&self, unreachable: bool) {
        let server = self.servers.key_server();
        if unreachable {
            server.pause();
        } else {
            server.resume();
        }
    }
}
