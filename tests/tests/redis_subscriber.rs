//! `RedisBackend`'s release subscriber against real `redis-server` processes: wake-ups per key,
//! reconnection, and its thread. In a binary of its own, its tests one at a time: they count this
//! process's threads and CPU time, which other tests would disturb when a runner (`cargo test`)
//! runs tests as threads of one process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::time::{Duration, Instant};

use lock_core::{LeaseBackend, LockManager, Ownership, RetryPolicy};
use lock_tests::direct::{acquire, backend_at, fence_of, wait_for_wakeup, CALL};
use lock_tests::{spawn_waiter, wait_until, ProxyMode, RedisServer, TcpProxy};
use parking_lot::{Mutex, MutexGuard};

/// Deadline of `wait_until` and of waiting for a release notification.
const WAIT: Duration = Duration::from_secs(10);
/// The TTL of the leases in these tests.
const TTL: Duration = Duration::from_secs(30);
/// A backoff so long that only a wake-up explains a quick acquire.
const SLEEPY: RetryPolicy = RetryPolicy::new(Duration::from_secs(30), Duration::from_secs(30));
/// Well under [`SLEEPY`]: a waiter that acquires within this after the release was woken.
const WOKEN: Duration = Duration::from_secs(3);

/// Runs this binary's tests one at a time, whatever the runner.
fn alone() -> MutexGuard<'static, ()> {
    static ALONE: Mutex<()> = Mutex::new(());
    ALONE.lock()
}

/// Threads of this process whose name starts with `prefix` (Linux truncates names to 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end().starts_with(prefix))
        .count()
}

/// How many clients of `server` are subscribed to a channel.
fn subscribed_clients(server: &RedisServer) -> usize {
    server.clients_where(|line| !line.contains(" sub=0 "))
}

/// User plus system CPU time of this process, from `/proc/self/stat`.
fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux that matters.
    Duration::from_millis(ticks * 10)
}

#[test]
fn a_release_wakes_the_watchers_of_that_key_only() {
    let _alone = alone();
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let other_process = backend_at(&server.url());

    let watched = backend
        .watch_release("watched")
        .expect("a built backend can watch");
    // Woken once its key's subscription takes effect (a release may have come before).
    wait_for_wakeup(&watched, "the subscription took effect");
    let unrelated = backend.watch_release("unrelated").unwrap();
    wait_for_wakeup(&unrelated, "the second key's subscription took effect");

    // A release by another backend on the same server wakes the watcher.
    fence_of(acquire(&other_process, "watched", "holder", TTL));
    assert_eq!(
        other_process.release("watched", "holder", CALL).unwrap(),
        Ownership::Owned
    );
    wait_for_wakeup(&watched, "the release of the watched key");
    assert!(
        unrelated.receiver().try_recv().is_err(),
        "an unrelated key was woken"
    );

    // A refused release publishes nothing: messages arrive in order, so once the next release
    // (of `unrelated`) has woken its watcher, a message for `watched` would have arrived too.
    fence_of(acquire(&other_process, "watched", "holder", TTL));
    fence_of(acquire(&other_process, "unrelated", "holder", TTL));
    assert_eq!(
        other_process.release("watched", "thief", CALL).unwrap(),
        Ownership::NotOwned
    );
    assert_eq!(
        other_process.release("unrelated", "holder", CALL).unwrap(),
        Ownership::Owned
    );
    wait_for_wakeup(&unrelated, "the release of the unrelated key");
    assert!(
        watched.receiver().try_recv().is_err(),
        "a refused release woke the watcher"
    );

    // One subscriber for all watches of a backend.
    assert_eq!(threads_named("lock-redis-subs"), 1);
    assert_eq!(subscribed_clients(&server), 1);
}

#[test]
fn a_dropped_watch_is_not_woken_and_other_watches_still_are() {
    let _alone = alone();
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let first = backend.watch_release("k").unwrap();
    wait_for_wakeup(&first, "the subscriber connected");
    let second = backend.watch_release("k").unwrap();
    let receiver = first.receiver().clone();
    drop(first);
    fence_of(acquire(&backend, "k", "t", TTL));
    backend.release("k", "t", CALL).unwrap();
    wait_for_wakeup(&second, "the release");
    assert!(receiver.try_recv().is_err(), "a dropped watch was woken");
}

#[test]
fn the_subscriber_reconnects_after_a_restart_and_wakes_every_watcher() {
    let _alone = alone();
    let mut server = RedisServer::start();
    let backend = backend_at(&server.url());
    let watch = backend.watch_release("k").unwrap();
    wait_for_wakeup(&watch, "the subscriber connected");

    server.restart();
    // Releases may have been missed while it was away: everyone is woken once it is back.
    wait_for_wakeup(&watch, "the subscriber reconnected");
    wait_until("the subscriber is subscribed again", WAIT, || {
        subscribed_clients(&server) == 1
    });

    fence_of(acquire(&backend, "k", "t", TTL));
    backend.release("k", "t", CALL).unwrap();
    wait_for_wakeup(&watch, "a release after the restart");
    assert_eq!(
        threads_named("lock-redis-subs"),
        1,
        "reconnecting started another thread"
    );
}

#[test]
fn the_subscriber_waits_for_a_server_that_is_down_without_spinning() {
    let _alone = alone();
    let server = RedisServer::start();
    // Refusing every connection through the proxy looks like a server that is down, without
    // giving its port away to servers started by tests running in parallel.
    let proxy = TcpProxy::start(server.addr());
    proxy.set_mode(ProxyMode::Reset);
    let backend = backend_at(&proxy.url());
    let watch = backend
        .watch_release("k")
        .expect("watching never needs the server");
    // Let it fail for a while: with backoff, that is a handful of attempts, not thousands.
    assert!(watch
        .receiver()
        .recv_timeout(Duration::from_secs(1))
        .is_err());
    let cpu = process_cpu_time();
    assert!(watch
        .receiver()
        .recv_timeout(Duration::from_secs(1))
        .is_err());
    let spent = process_cpu_time() - cpu;
    assert!(
        spent < Duration::from_millis(200),
        "the subscriber burned {spent:?} of CPU in 1 s"
    );

    proxy.set_mode(ProxyMode::Pass);
    wait_for_wakeup(
        &watch,
        "the subscriber connected once the server was reachable",
    );
    fence_of(acquire(&backend, "k", "t", TTL));
    backend.release("k", "t", CALL).unwrap();
    wait_for_wakeup(&watch, "the release");
}

#[test]
fn a_silent_subscriber_connection_is_noticed_and_replaced() {
    let _alone = alone();
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = backend_at(&proxy.url());
    let watch = backend.watch_release("k").unwrap();
    wait_for_wakeup(&watch, "the subscriber connected");
    assert_eq!(proxy.connections(), 1, "only the subscriber is connected");

    // The connection stays open but nothing gets through: only a health check can tell.
    proxy.set_mode(ProxyMode::Blackhole);
    wait_until(
        "the subscriber gives up its silent connection and connects again",
        WAIT + Duration::from_secs(5),
        || proxy.connections() >= 2,
    );
    proxy.set_mode(ProxyMode::Pass);
    wait_for_wakeup(&watch, "the subscriber reconnected");
    fence_of(acquire(&backend, "k", "t", TTL));
    backend.release("k", "t", CALL).unwrap();
    wait_for_wakeup(&watch, "a release after the reconnection");
}

#[test]
fn dropping_the_backend_stops_its_subscriber() {
    let _alone = alone();
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let clone = backend.clone();
    let watch = backend.watch_release("k").unwrap();
    wait_for_wakeup(&watch, "the subscriber connected");
    assert_eq!(threads_named("lock-redis-subs"), 1);

    drop(backend);
    assert_eq!(
        threads_named("lock-redis-subs"),
        1,
        "a clone still uses the subscriber"
    );
    drop(clone);
    wait_until("the subscriber thread ends", WAIT, || {
        threads_named("lock-redis-subs") == 0
    });
    wait_until("the subscription is closed", WAIT, || {
        subscribed_clients(&server) == 0
    });
    // The watch outlives the backend harmlessly.
    assert!(watch.receiver().try_recv().is_err());
    drop(watch);
}

/// A manager for `url` whose waiters sleep 30 s between attempts unless woken.
fn sleepy_manager(url: &str) -> LockManager {
    LockManager::builder(backend_at(url))
        .retry(SLEEPY)
        .build()
        .unwrap()
}

#[test]
fn an_uncontended_cycle_reaches_no_other_process_and_starts_no_subscriber() {
    let _alone = alone();
    let server = RedisServer::start();
    let holder = backend_at(&server.url());
    fence_of(acquire(&holder, "busy", "holder", TTL));

    // Another process waits for a different key (what a waiting manager registers); everything
    // it receives goes through the proxy, which counts the bytes.
    let proxy = TcpProxy::start(server.addr());
    let waiting_process = backend_at(&proxy.url());
    let waiting = waiting_process.watch_release("busy").unwrap();
    wait_for_wakeup(&waiting, "its key's subscription took effect");
    assert_eq!(server.subscribers("lock:{busy}"), 1);
    let received = proxy.reply_bytes();

    let releasing = LockManager::new(backend_at(&server.url()));
    for _ in 0..200 {
        let lease = releasing.try_acquire("free", TTL).unwrap().unwrap();
        lease.release().unwrap();
    }
    assert_eq!(
        proxy.reply_bytes(),
        received,
        "the waiting process received something while an unrelated key was released"
    );
    assert_eq!(server.subscribers("lock:{free}"), 0);
    assert_eq!(
        threads_named("lock-redis-subs"),
        1,
        "the releasing process started a subscriber (only the waiting one should run)"
    );
    assert!(waiting.receiver().try_recv().is_err());

    // The release it waits for does reach it, and wakes it.
    assert_eq!(
        holder.release("busy", "holder", CALL).unwrap(),
        Ownership::Owned
    );
    wait_for_wakeup(&waiting, "the release of its key");
    assert!(proxy.reply_bytes() > received);
}

#[test]
fn a_release_racing_a_new_subscription_still_wakes_the_waiter() {
    let _alone = alone();
    let server = RedisServer::start();
    let holder = backend_at(&server.url());
    let manager = sleepy_manager(&server.url());
    // Each round waits for a new key, so each one subscribes anew, and the release lands
    // before, during or after the subscription.
    for round in 0..50 {
        let key = format!("race-{round}");
        fence_of(acquire(&holder, &key, "holder", TTL));
        let waiting = spawn_waiter(&manager, &key, TTL);
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..3000)));
        let released = Instant::now();
        assert_eq!(
            holder.release(&key, "holder", CALL).unwrap(),
            Ownership::Owned
        );
        let acquired = waiting.join().unwrap();
        assert!(
            acquired.saturating_duration_since(released) < WOKEN,
            "round {round}: the waiter missed the release and slept on its backoff"
        );
    }
    wait_until("every key's channel is unsubscribed", WAIT, || {
        (0..50).all(|round| server.subscribers(&format!("lock:{{race-{round}}}")) == 0)
    });
}

#[test]
fn a_keys_channel_is_subscribed_while_it_has_waiters_only() {
    let _alone = alone();
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let first = backend.watch_release("k").unwrap();
    wait_for_wakeup(&first, "the subscription took effect");
    let second = backend.watch_release("k").unwrap();
    let other = backend.watch_release("other").unwrap();
    wait_for_wakeup(&other, "the second key's subscription took effect");
    assert_eq!(server.subscribers("lock:{k}"), 1);

    drop(first);
    drop(other);
    wait_until("the key without waiters is unsubscribed", WAIT, || {
        server.subscribers("lock:{other}") == 0
    });
    assert_eq!(server.subscribers("lock:{k}"), 1, "a waiter is left");
    drop(second);
    wait_until("the last waiter's key is unsubscribed", WAIT, || {
        server.subscribers("lock:{k}") == 0
    });
    // The connection stays for the next waiter, and the thread with it.
    assert_eq!(threads_named("lock-redis-subs"), 1);
    assert_eq!(subscribed_clients(&server), 0);
    let again = backend.watch_release("k").unwrap();
    wait_for_wakeup(&again, "the key subscribed again");
    fence_of(acquire(&backend, "k", "t", TTL));
    backend.release("k", "t", CALL).unwrap();
    wait_for_wakeup(&again, "the release");
}

#[test]
fn dropping_a_backend_does_not_wait_for_its_subscriber() {
    let _alone = alone();
    let server = RedisServer::start();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let backend = backend_at(&server.url());
        let watch = backend.watch_release("k").unwrap();
        wait_for_wakeup(&watch, "the subscription took effect");
        let started = Instant::now();
        drop(backend);
        slowest = slowest.max(started.elapsed());
        drop(watch);
    }
    // It used to wait for the subscriber's next read timeout: 200 ms each.
    assert!(
        slowest < Duration::from_millis(100),
        "dropping a backend took {slowest:?}"
    );
    wait_until("every subscriber thread ended", WAIT, || {
        threads_named("lock-redis-subs") == 0
    });
}
