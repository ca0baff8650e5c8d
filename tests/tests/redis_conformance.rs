//! The lock-core conformance suite on `RedisBackend`, against a real redis-server per test.
#![allow(clippy::unwrap_used)] // test setup: a failure is a failed test

use std::time::Duration;

use lock_redis::RedisBackend;
use lock_tests::conformance::RedisTarget;
use lock_tests::RedisServer;

fn real_redis() -> RedisTarget<RedisServer> {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(&server.url())
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    RedisTarget {
        servers: server,
        backend,
    }
}

lock_core::conformance_tests!(real_redis());

/// The same suite as a Redis user that has exactly the documented ACL rules, logged in with the
/// builder's `credentials` rather than through the URL.
mod as_the_minimal_acl_user {
    use super::*;

    fn acl_redis() -> RedisTarget<RedisServer> {
        let server = RedisServer::start();
        server.add_acl_user("locker", "locker-pw", &lock_redis::acl_rules("lock:"));
        let backend = RedisBackend::builder(&server.url())
            .credentials("locker", "locker-pw")
            .command_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        RedisTarget {
            servers: server,
            backend,
        }
    }

    lock_core::conformance_tests!(acl_redis());
}
