//! The lock-core conformance suite's target for a [`RedisBackend`] on one real server, plain or
//! TLS: [`RedisTarget`].

use std::sync::Arc;
use std::time::Duration;

use lock_core::conformance::ConformanceTarget;
use lock_core::{LeaseBackend, LockManager, LockManagerBuilder};
use lock_redis::RedisBackend;
use redis::Commands;

use crate::RedisServer;

/// A [`RedisBackend`] on its own [`RedisServer`], in real time: keys expire by the server's
/// clock, and the server is made unreachable by pausing it (`SIGSTOP`).
///
/// ```no_run
/// use lock_redis::RedisBackend;
/// use lock_tests::conformance::RedisTarget;
/// use lock_tests::RedisServer;
///
/// fn real_redis() -> RedisTarget {
///     let server = RedisServer::start();
///     let backend = RedisBackend::connect(&server.url()).unwrap();
///     RedisTarget { server, backend }
/// }
///
/// lock_core::conformance_tests!(real_redis());
/// ```
#[derive(Debug)]
pub struct RedisTarget {
    /// The server, reached by the harness over its plain-text port.
    pub server: RedisServer,
    /// The backend under test.
    pub backend: RedisBackend,
}

impl ConformanceTarget for RedisTarget {
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
            .server
            .connection()
            .del(self.backend.lock_key(key))
            .unwrap();
        assert_eq!(deleted, 1, "{key} was not held");
    }

    fn set_unreachable(&self, unreachable: bool) {
        if unreachable {
            self.server.pause();
        } else {
            self.server.resume();
        }
    }
}
