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
