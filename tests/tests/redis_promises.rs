//! The manager's promises about loss, held on a real redis-server under real faults: a loss is
//! reported once and on time whoever finds it, and a lost lease never holds its holder up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::{LeaseEvent, LockManager, LostReason, CLEANUP_TIMEOUT};
use lock_redis::RedisBackend;
use lock_tests::{error_chain, wait_until, ProxyMode, RedisServer, TcpProxy};
use parking_lot::Mutex;
use redis::Commands;

/// How long a test waits for a condition.
const WAIT: Duration = Duration::from_secs(10);

/// How late after `valid_until` a loss may be reported on a real clock: the renewer's wake-up
/// and the hook call.
const REPORT_SLACK: Duration = Duration::from_millis(200);

/// Every `Lost` event with the time it was reported, and the count of `Released` events.
#[derive(Default)]
struct Events {
    lost: Mutex<Vec<(String, Instant)>>,
    released: AtomicUsize,
}

fn manager(server: &RedisServer) -> (LockManager, Arc<Events>) {
    let backend = RedisBackend::builder(&server.url())
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let events = Arc::new(Events::default());
    let seen = events.clone();
    let manager = LockManager::builder(backend)
        .event_hook(move |event: &LeaseEvent<'_>| match event {
            LeaseEvent::Lost { key, .. } => {
                seen.lost.lock().push((key.to_string(), Instant::now()))
            }
            LeaseEvent::Released { .. } => {
                seen.released.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        })
        .build()
        .unwrap();
    (manager, events)
}

fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

#[test]
fn a_loss_is_reported_on_time_while_another_renewal_waits_on_a_paused_server() {
    let mut server = RedisServer::start();
    let (manager, events) = manager(&server);
    // A long lease whose first renewal, once the server stops, waits the whole command
    // timeout (2 s), and a short lease that falls due just after that renewal started and
    // whose validity ends while it still waits.
    let long = manager.acquire("long", Duration::from_secs(6)).unwrap();
    // The long lease is due a third of its validity (5.938 s) after it was acquired: 1.979 s.
    let acquired = long.valid_until() - Duration::from_millis(5_938);
    let at = |millis: u64| acquired + Duration::from_millis(millis);
    sleep_until(at(1_750));
    // Due at 1.750 + 0.296 = 2.046 s, valid until 1.750 + 0.889 = 2.639 s.
    let short = manager
        .acquire("short", Duration::from_millis(900))
        .unwrap();
    let short_lost = short.lost();
    sleep_until(at(1_850));
    server.pause();
    let reason = short_lost
        .recv_timeout(Duration::from_secs(10))
        .expect("the short lease was never reported lost");
    assert!(matches!(reason, LostReason::Expired), "{reason:?}");
    let valid_until = short.valid_until();
    let reported_at = events
        .lost
        .lock()
        .iter()
        .find(|(key, _)| key == "short")
        .map(|(_, at)| *at)
        .expect("a Lost event for the short lease");
    assert!(
        reported_at <= valid_until + REPORT_SLACK,
        "reported {:?} after valid_until while the long lease's renewal waited",
        reported_at - valid_until
    );
    assert!(
        long.is_held(),
        "the long lease is still within its validity"
    );
    server.resume();
    drop((long, short));
    server.kill();
}

#[test]
fn releasing_a_lost_lease_returns_promptly_while_the_server_is_paused() {
    let server = RedisServer::start();
    let (manager, _) = manager(&server);
    let lease = manager.acquire("k", Duration::from_millis(500)).unwrap();
    let lost = lease.lost();
    server.pause();
    lost.recv_timeout(Duration::from_secs(5))
        .expect("the lease was not reported lost");
    let started = Instant::now();
    let error = lease.release().expect_err("a lost lease");
    let took = started.elapsed();
    assert!(error.is_lost(), "{error}");
    assert!(
        took <= CLEANUP_TIMEOUT + REPORT_SLACK,
        "releasing a lost lease took {took:?} with the server paused"
    );
    // Dropping one is as prompt.
    server.resume();
    let lease = manager.acquire("k", Duration::from_millis(500)).unwrap();
    server.pause();
    lease.lost().recv_timeout(Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    drop(lease);
    assert!(started.elapsed() <= CLEANUP_TIMEOUT + REPORT_SLACK);
    server.resume();
}

#[test]
fn every_loss_after_a_restart_is_reported_once_whichever_path_finds_it() {
    let mut server = RedisServer::start();
    let (manager, events) = manager(&server);
    let ttl = Duration::from_secs(3);
    let leases: Vec<_> = (0..12)
        .map(|index| manager.acquire(&format!("job-{index}"), ttl).unwrap())
        .collect();
    let receivers: Vec<_> = leases.iter().map(|lease| lease.lost()).collect();
    // Without persistence the restarted server has none of the keys.
    server.kill();
    server.restart();
    let mut leases = leases.into_iter();
    // Half are found lost by their holders' release...
    for lease in leases.by_ref().take(6) {
        let error = lease.release().expect_err("the key is gone");
        assert!(
            matches!(error.lost_reason(), Some(LostReason::TakenOver)),
            "{}",
            error_chain(&error)
        );
    }
    // ...the other half by the renewer, at their next renewal.
    let rest: Vec<_> = leases.collect();
    for (index, receiver) in receivers.iter().enumerate() {
        receiver
            .recv_timeout(ttl)
            .unwrap_or_else(|_| panic!("job-{index}: no lost() message"));
        assert!(receiver.try_recv().is_err(), "job-{index}: two messages");
    }
    for lease in rest {
        assert!(lease.release().unwrap_err().is_lost());
    }
    // The thread that finds a loss sends the lost() message, then calls the hook: wait for the
    // last hook calls, then check that no lease was reported twice.
    wait_until("a Lost event for each of the 12 lost leases", WAIT, || {
        events.lost.lock().len() >= 12
    });
    let lost = events.lost.lock().len();
    assert_eq!(lost, 12, "Lost events for 12 lost leases");
    assert_eq!(
        events.released.load(Ordering::SeqCst),
        0,
        "a lost lease was also counted as released"
    );
}

#[test]
fn an_acquire_that_gives_up_on_a_slow_link_leaves_no_lock() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = RedisBackend::builder(&proxy.url())
        .command_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let lock_key = backend.lock_key("slow");
    let manager = LockManager::new(backend);
    // Load the scripts and open a connection while the link is fast.
    drop(manager.acquire("warm-up", Duration::from_secs(1)).unwrap());
    // A round trip now takes 300 ms, more than the command timeout: the attempt times out on
    // our side, but its request reaches the server and takes the key for its TTL.
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(150)));
    let error = manager
        .acquire_timeout("slow", Duration::from_secs(30), Duration::ZERO)
        .expect_err("the attempt times out");
    assert!(error.is_timeout(), "{}", error_chain(&error));
    assert!(
        std::error::Error::source(&error).is_some(),
        "the timeout hides why the attempt failed: {error}"
    );
    let held = || -> bool { server.connection().exists(&lock_key).unwrap() };
    wait_until("the late attempt took the key on the server", WAIT, held);
    // Still slow: the clean-up retries with the backend's own timeouts until it gets through.
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(60)));
    wait_until("the orphan lock is given back", WAIT, || !held());
}
