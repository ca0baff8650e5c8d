//! The lock-core conformance suite on `RedisBackend`, against a real redis-server per test.
#![allow(clippy::unwrap_used)] // test setup: a failure is a failed test

use std::sync::Arc;
use std::time::Duration;

use lock_core::conformance::ConformanceTarget;
use lock_core::{LeaseBackend, LockManager, LockManagerBuilder};
use lock_redis::RedisBackend;
use lock_tests::RedisServer;
use redis::Commands;

struct RealRedis {
    server: RedisServer,
    backend: RedisBackend,
}

impl ConformanceTarget for RealRedis {
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

fn real_redis() -> RealRedis {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(&server.url())
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    RealRedis { server, backend }
}

lock_core::conformance_tests!(real_redis());

/// The same suite as a Redis user that has exactly the documented ACL rules, logged in with the
/// builder's `credentials` rather than through the URL.
mod as_the_minimal_acl_user {
    use super::*;

    fn acl_redis() -> RealRedis {
        let server = RedisServer::start();
        server.add_acl_user("locker", "locker-pw", &lock_redis::acl_rules("lock:"));
        let backend = RedisBackend::builder(&server.url())
            .credentials("locker", "locker-pw")
            .command_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        RealRedis { server, backend }
    }

    lock_core::conformance_tests!(acl_redis());
}
