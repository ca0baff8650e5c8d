//! Test harness for the lease workspace: real `redis-server` processes and fault injection.
//!
//! Integration tests in this crate (and the cross-backend scenarios) use these tools:
//!
//! - [`RedisServer`] starts a private `redis-server` on a free port of `127.0.0.1`, with its own
//!   temporary directory, waits until it answers, and can pause (`SIGSTOP`), resume (`SIGCONT`),
//!   kill (`SIGKILL`) and restart it on the same port. Dropping it kills the process and removes
//!   its directory.
//! - [`tls::TestPki`] generates the certificates of TLS tests (`rcgen`), and
//!   [`ServerOptions::tls`] makes a server listen with TLS.
//! - [`PostgresServer`] creates a throwaway PostgreSQL cluster (`initdb`, `pg_ctl`) on a free
//!   port, as an unprivileged user when the tests run as root, and stops it on `Drop`; the
//!   fenced-write tests run the `fenced_postgres` example's recipe against it.
//! - [`SentinelGroup`] starts a master, its replicas and three sentinels on free ports, and can
//!   kill the master, force a failover and wait until the sentinels agree on the new master.
//! - [`RedisCluster`] starts a Redis Cluster (three masters, a replica each) and can kill a
//!   master, fail one over and move a slot between masters.
//! - [`TcpProxy`] sits between a client and a server and can pass, delay, blackhole or reset the
//!   traffic ([`ProxyMode`]), for existing and new connections alike.
//! - [`cpu::pin_process`] pins a process (every thread) to one CPU, for benchmarks that choose
//!   where the client and the servers run.
//! - [`conformance::RedisTarget`] runs `lock_core`'s conformance suite on a Redis backend, on one
//!   server, through a Sentinel group or on a cluster.
//! - [`wait_until`] polls a condition with a deadline, so tests never rely on fixed sleeps.
//! - [`spawn_waiter`] starts a thread that waits for a lock, for tests of wake-ups, and
//!   [`assert_woken_by`] checks that a release woke it.
//! - [`captured_logs`] captures what the libraries log, for tests of their warnings.
//! - [`error_chain`] prints an error with all its sources, as a user's error reporter would.
//! - The `lease-holder` binary of this crate is a separate process that holds a lease (to be
//!   paused with `SIGSTOP` as a *holder*) or races on a counter; [`CountingRun`] starts and
//!   checks such races, and [`fenced_write`] is the fenced store they write to.
//! - [`property`] keeps the books of the property run, shared with its `property-worker` binary.
//!
//! A missing `redis-server` (or `initdb`) binary is a test failure with the command that
//! installs it, never a silent skip.
//!
//! ```no_run
//! use lock_tests::{ProxyMode, RedisServer, TcpProxy};
//!
//! let server = RedisServer::start();
//! let proxy = TcpProxy::start(server.addr());
//! let client = redis::Client::open(proxy.url()).expect("valid proxy URL");
//! proxy.set_mode(ProxyMode::Blackhole); // the server now looks silent to `client`
//! ```

// Test infrastructure: a failed setup step is a failed test, so panicking with a clear message is
// the intended way to report it.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod cluster;
pub mod conformance;
pub mod counting;
pub mod cpu;
pub mod direct;
pub mod fenced;
pub mod logs;
pub mod postgres_server;
pub mod property;
pub mod proxy;
pub mod sentinel;
pub mod server;
pub mod tls;

pub use cluster::{ClusterOptions, RedisCluster};
pub use counting::CountingRun;
pub use fenced::fenced_write;
pub use logs::{captured_logs, CapturedLogs};
pub use postgres_server::PostgresServer;
pub use proxy::{ProxyMode, TcpProxy};
pub use sentinel::{GroupOptions, SentinelGroup};
pub use server::{RedisServer, SentinelConfig, ServerOptions};

use std::error::Error;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lock_core::LockManager;

/// `error`'s message and those of its sources, joined by `": "`: what an error reporter
/// prints, for assertions on what a user would read (a message does not repeat its source, so
/// what Redis said is only in the chain).
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(source) = current {
        text.push_str(": ");
        text.push_str(&source.to_string());
        current = source.source();
    }
    text
}

/// Polls `condition` every millisecond until it returns `true`.
///
/// `what` describes the awaited state for the failure message, e.g. `"the proxy has 2
/// connections"`.
///
/// # Panics
///
/// Panics with `timed out after {timeout:?} waiting until {what}` if `condition` is still `false`
/// once `timeout` has elapsed. The condition is always checked at least once, and once more after
/// the deadline before giving up.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    if !poll_until(timeout, condition) {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}

/// Polls `condition` every millisecond until it returns `true` (then returns `true`), or until
/// `timeout` has elapsed (then `false`). The condition is always checked at least once, and
/// once more after the deadline.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `release`, then checks that `waiter` (from [`spawn_waiter`]) acquired the key within
/// `within` of it: woken by the release, not by its backoff.
///
/// # Panics
///
/// If the waiter took longer, or failed.
pub fn assert_woken_by(waiter: JoinHandle<Instant>, within: Duration, release: impl FnOnce()) {
    let released = Instant::now();
    release();
    let acquired = waiter.join().unwrap();
    assert!(
        acquired - released < within,
        "woken {:?} after the release: slept on its backoff",
        acquired - released
    );
}

/// Starts a thread that waits up to a minute for `key` through `manager` (and takes it with
/// `ttl`), releases it at once, and yields when it acquired it; returns once the thread runs.
///
/// # Panics
///
/// The thread panics if the acquire or the release fails.
pub fn spawn_waiter(manager: &LockManager, key: &str, ttl: Duration) -> JoinHandle<Instant> {
    let ready = Arc::new(Barrier::new(2));
    let handle = {
        let (manager, ready, key) = (manager.clone(), ready.clone(), key.to_owned());
        std::thread::spawn(move || {
            ready.wait();
            let lease = manager
                .acquire_timeout(&key, ttl, Duration::from_secs(60))
                .unwrap();
            let acquired = Instant::now();
            lease.release().unwrap();
            acquired
        })
    };
    ready.wait();
    handle
}
