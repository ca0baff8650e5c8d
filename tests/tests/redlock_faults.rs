//! `RedlockBackend` when every node is up but not every node behaves: a slow or failing fence
//! write-back, contention on a few keys, nodes that refuse calls for good (`WRONGTYPE`,
//! `NOAUTH`), the drift rule and unbounded timeouts. Each test is named after the promise it
//! checks, against three real redis-server masters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lock_core::conformance::renew_one;
use lock_core::{
    AcquireOutcome, BackendError, LeaseBackend, LeaseRequest, LockManager, LostReason, Ownership,
};
use lock_redis::RedlockBackend;
use lock_tests::{wait_until, ProxyMode, RedisServer, ServerOptions, TcpProxy};
use parking_lot::Mutex;

/// Long enough for a round trip through a proxy that delays each direction by [`SLOW`], with
/// room for a loaded machine.
const NODE_TIMEOUT: Duration = Duration::from_millis(600);
/// The delay a slowed node's proxy adds in each direction: well below [`NODE_TIMEOUT`].
const SLOW: Duration = Duration::from_millis(100);
/// Long enough that no lease of these tests expires by accident.
const TTL: Duration = Duration::from_secs(10);
/// Deadline of the `wait_until` calls.
const WAIT: Duration = Duration::from_secs(5);
/// Fence counters set by hand: above any server clock in microseconds (about 1.7e15 in 2025;
/// 4e15 is the year 2096), so that every grant issues `counter + 1` whatever the fence formula,
/// and below 2^53, where Lua's numbers are still exact.
const LOW_COUNTER: u64 = 4_000_000_000_000_000;
const HIGH_COUNTER: u64 = 5_000_000_000_000_000;

fn start_servers(count: usize) -> Vec<RedisServer> {
    (0..count).map(|_| RedisServer::start()).collect()
}

fn urls(servers: &[RedisServer]) -> Vec<String> {
    servers.iter().map(RedisServer::url).collect()
}

fn redlock(urls: &[String]) -> RedlockBackend {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    RedlockBackend::builder(&urls)
        .node_timeout(NODE_TIMEOUT)
        .build()
        .unwrap()
}

fn request<'a>(key: &'a str, token: &'a str) -> LeaseRequest<'a> {
    LeaseRequest {
        key,
        token,
        ttl: TTL,
    }
}

fn fence_of(outcome: Result<AcquireOutcome, BackendError>) -> u64 {
    match outcome {
        Ok(AcquireOutcome::Acquired { fence }) => fence,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Runs one raw command on `server`, over a connection of its own.
fn run(server: &RedisServer, command: &[&str]) {
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd.query(&mut server.connection()).unwrap();
}

/// Replaces `key` on `server` by a list, in one step (an acquire still in flight cannot turn it
/// back into a string): every script reading it as a string then fails with `WRONGTYPE`.
fn make_list(server: &RedisServer, key: &str) {
    run(
        server,
        &[
            "EVAL",
            "redis.call('DEL', KEYS[1]); return redis.call('RPUSH', KEYS[1], 'x')",
            "1",
            key,
        ],
    );
}

/// The value of `key` on `server`, if it is a string.
fn get(server: &RedisServer, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut server.connection())
        .unwrap()
}

/// Whether `lock_key` on `server` holds a token (a string), rather than nothing or a list.
fn holds_a_lock(server: &RedisServer, lock_key: &str) -> bool {
    let kind: String = redis::cmd("TYPE")
        .arg(lock_key)
        .query(&mut server.connection())
        .unwrap();
    kind == "string"
}

/// Which of `servers` hold the lock `key` for `token`.
fn holders(
    redlock: &RedlockBackend,
    servers: &[RedisServer],
    key: &str,
    token: &str,
) -> Vec<usize> {
    let lock_key = redlock.nodes().next().unwrap().lock_key(key);
    (0..servers.len())
        .filter(|&index| get(&servers[index], &lock_key).as_deref() == Some(token))
        .collect()
}

/// Sets the fence counters of `key` so that node 0 is behind and node 1 ahead, and lets
/// another client hold node 2: the next majority is nodes 0 and 1, with node 1's fence, and
/// node 0 must be raised to it.
fn make_node_0_lag(servers: &[RedisServer], redlock: &RedlockBackend, key: &str) {
    let node = redlock.nodes().next().unwrap();
    let (lock_key, fence_key) = (node.lock_key(key), node.fence_key(key));
    run(&servers[0], &["SET", &fence_key, &LOW_COUNTER.to_string()]);
    run(&servers[1], &["SET", &fence_key, &HIGH_COUNTER.to_string()]);
    run(&servers[2], &["SET", &lock_key, "other", "PX", "60000"]);
}

/// One acquire (with a write-back to node 0) and release through `redlock`, so that its pools
/// hold open connections and node 0 has the write-back script cached before a proxy slows or
/// silences them.
fn warm_up(servers: &[RedisServer], redlock: &RedlockBackend) {
    make_node_0_lag(servers, redlock, "warm-up");
    fence_of(redlock.try_acquire(&request("warm-up", "warm-up"), Duration::MAX));
    redlock
        .release("warm-up", "warm-up", Duration::MAX)
        .unwrap();
}

/// Node 0's counter is behind, node 1's is ahead, and a majority is granted on those two: the
/// write-back of node 1's fence to node 0 crosses a proxy that delays it 100 ms each way. The
/// release reaches node 0 first over a connection of its own (as releases do under contention,
/// where they overtake the write-back); the next holder is then granted on node 0 and on node 2,
/// which never saw the high fence. Its fence must still be higher.
#[test]
fn fences_strictly_increase_when_a_write_back_is_slow() {
    let servers = start_servers(3);
    let proxy = TcpProxy::start(servers[0].addr());
    let through_proxy = redlock(&[proxy.url(), servers[1].url(), servers[2].url()]);
    let direct = redlock(&urls(&servers));
    warm_up(&servers, &through_proxy);
    warm_up(&servers, &direct);
    let key = "slow-write-back";
    make_node_0_lag(&servers, &direct, key);
    proxy.set_mode(ProxyMode::Delay(SLOW));

    let first = fence_of(through_proxy.try_acquire(&request(key, "first"), Duration::MAX));
    assert!(first > HIGH_COUNTER, "the fence is the majority's highest");
    assert_eq!(
        direct.release(key, "first", Duration::MAX).unwrap(),
        Ownership::Owned
    );
    // The other client moves from node 2 to node 1: the next majority is nodes 0 and 2.
    let lock_key = direct.nodes().next().unwrap().lock_key(key);
    run(&servers[2], &["DEL", &lock_key]);
    run(&servers[1], &["SET", &lock_key, "other", "PX", "60000"]);
    let second = fence_of(direct.try_acquire(&request(key, "second"), Duration::MAX));
    assert!(
        second > first,
        "fence went from {first} to {second}: node 0 was granted before its counter was raised"
    );
}

/// When the write-back to a node of the majority times out, that node is not counted: with two
/// of three nodes left, and one of them gone silent, the acquire fails like a lost majority and
/// leaves its token on no node.
#[test]
fn an_acquire_whose_write_back_times_out_fails_and_leaves_no_token() {
    let servers = start_servers(3);
    let fast = TcpProxy::start(servers[0].addr());
    let slow = TcpProxy::start(servers[1].addr());
    let redlock = redlock(&[fast.url(), slow.url(), servers[2].url()]);
    warm_up(&servers, &redlock);
    let key = "failed-write-back";
    let lock_key = redlock.nodes().next().unwrap().lock_key(key);
    make_node_0_lag(&servers, &redlock, key);
    slow.set_mode(ProxyMode::Delay(SLOW));

    let outcome = thread::scope(|scope| {
        let acquire = scope.spawn(|| redlock.try_acquire(&request(key, "token"), Duration::MAX));
        // Node 0 grants at once; node 1 grants 100 ms later, and its answer, which completes
        // the majority and is why node 0 must be raised, comes 100 ms after that. Silence
        // node 0 in between: its own answer is long through.
        wait_until("node 1 grants the key", WAIT, || {
            get(&servers[1], &lock_key).as_deref() == Some("token")
        });
        fast.set_mode(ProxyMode::Blackhole);
        acquire.join().unwrap()
    });
    let error = outcome.expect_err("node 0 never acknowledged the fence: no majority is left");
    assert!(error.is_transient(), "{error}");
    fast.set_mode(ProxyMode::Pass);
    slow.set_mode(ProxyMode::Pass);
    wait_until("no node holds the failed acquire's token", WAIT, || {
        holders(&redlock, &servers, key, "token").is_empty()
    });
}

/// Many threads race for a few keys on three healthy masters; each holder appends its fence to
/// its key's log while it holds the lease. Every log must strictly increase.
///
/// The nodes' counters drift apart in real use (grants that came too late to count, a node's
/// clock ahead of the fence an acquire proposes), and only then does an acquire need a
/// write-back: a thread here raises one node's counter now and then past the proposals (by more
/// than their one-second lead), so that many grants do.
#[test]
fn fences_strictly_increase_under_contention() {
    const GRANTS: usize = 20_000;
    const THREADS: usize = 8;
    const KEYS: usize = 3;
    // Short, so that a release a loaded node misses frees its key soon.
    let ttl = Duration::from_secs(2);
    let servers = start_servers(3);
    let redlock = redlock(&urls(&servers));
    let fence_keys: Vec<String> = (0..KEYS)
        .map(|index| {
            let node = redlock.nodes().next().unwrap();
            node.fence_key(&format!("contended-{index}"))
        })
        .collect();
    let manager = LockManager::new(redlock);
    let logs: Vec<Mutex<Vec<u64>>> = (0..KEYS).map(|_| Mutex::new(Vec::new())).collect();
    let granted = AtomicUsize::new(0);
    let started = Instant::now();
    thread::scope(|scope| {
        let (servers, fence_keys, granted) = (&servers, &fence_keys, &granted);
        scope.spawn(move || {
            let mut connections: Vec<redis::Connection> =
                servers.iter().map(RedisServer::connection).collect();
            let mut bump = 0;
            while granted.load(Ordering::Relaxed) < GRANTS {
                bump += 1;
                let node = bump % connections.len();
                let _: u64 = redis::cmd("INCRBY")
                    .arg(&fence_keys[bump % KEYS])
                    .arg(2_000_000 + bump % 5)
                    .query(&mut connections[node])
                    .unwrap();
                thread::sleep(Duration::from_millis(1));
            }
        });
        for thread in 0..THREADS {
            let (manager, logs) = (&manager, &logs);
            scope.spawn(move || {
                let mut attempt = thread;
                while granted.load(Ordering::Relaxed) < GRANTS {
                    attempt += 1;
                    let index = attempt % KEYS;
                    let key = format!("contended-{index}");
                    // On a loaded machine a node may miss its timeout: that costs an attempt,
                    // or a key held until its TTL, never the order of fences.
                    let lease = match manager.try_acquire(&key, ttl) {
                        Ok(Some(lease)) => lease,
                        Ok(None) => continue,
                        Err(error) if error.is_transient() => continue,
                        Err(error) => panic!("{error}"),
                    };
                    logs[index].lock().push(lease.fence());
                    granted.fetch_add(1, Ordering::Relaxed);
                    if let Err(error) = lease.release() {
                        assert!(error.is_transient(), "{error}");
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let total: usize = logs.iter().map(|log| log.lock().len()).sum();
    eprintln!("{total} grants in {elapsed:?}");
    for (index, log) in logs.iter().enumerate() {
        let log = log.lock();
        if let Some(at) = log.windows(2).position(|pair| pair[0] >= pair[1]) {
            panic!(
                "key {index}: fence {} followed by {} (grant {at} of {})",
                log[at],
                log[at + 1],
                log.len()
            );
        }
    }
}

/// How one node of three misbehaves for good.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// The lock key is a list: every script on it fails with `WRONGTYPE`.
    WrongTypeLockKey,
    /// The fence counter is a list: acquire fails with `WRONGTYPE` (after setting the lock key).
    WrongTypeFenceKey,
    /// The node requires a password the URL lacks: every call fails with `NOAUTH`.
    NoAuth,
}

/// Three nodes, node 0 refusing calls on `key` as `refusal` says; the backend has node 0 first.
struct Refusing {
    servers: Vec<RedisServer>,
    redlock: RedlockBackend,
}

fn refusing(refusals: &[Refusal], key: &str) -> Refusing {
    let servers: Vec<RedisServer> = (0..3)
        .map(|index| match refusals.get(index) {
            Some(Refusal::NoAuth) => RedisServer::start_with(ServerOptions {
                password: Some("secret".to_owned()),
                ..ServerOptions::default()
            }),
            _ => RedisServer::start(),
        })
        .collect();
    // A URL without the password: the server answers every command with NOAUTH.
    let urls: Vec<String> = servers
        .iter()
        .map(|server| format!("redis://{}", server.addr()))
        .collect();
    let redlock = redlock(&urls);
    let node = redlock.nodes().next().unwrap();
    for (server, refusal) in servers.iter().zip(refusals) {
        match refusal {
            Refusal::WrongTypeLockKey => make_list(server, &node.lock_key(key)),
            Refusal::WrongTypeFenceKey => make_list(server, &node.fence_key(key)),
            Refusal::NoAuth => {}
        }
    }
    Refusing { servers, redlock }
}

/// One node of three refuses every call on the key for good: acquires, renewals and releases
/// must go on as with a dead node (the other two are a majority).
fn a_refusing_minority_costs_what_a_dead_node_costs(refusal: Refusal) {
    const CYCLES: usize = 100;
    let key = "refused";
    let cluster = refusing(&[refusal], key);
    let manager = LockManager::new(cluster.redlock.clone());
    // A release returns once a majority released, and node 0 may be one of them (it holds the
    // key when only its fence counter is broken): the next acquire may then find the last
    // node's release still in flight, and wait for it.
    for cycle in 0..CYCLES {
        let lease = manager
            .acquire_timeout(key, TTL, WAIT)
            .unwrap_or_else(|error| panic!("cycle {cycle}: {error}"));
        lease.release().unwrap();
    }
    // Renewals over several TTLs: the two healthy nodes keep the lease.
    let ttl = Duration::from_millis(600);
    let lease = manager.acquire_timeout(key, ttl, WAIT).unwrap();
    let acquired = lease.valid_until();
    wait_until("the lease is renewed past three TTLs", WAIT, || {
        lease.ensure_held().unwrap();
        lease.valid_until() > acquired + ttl * 3
    });
    assert!(lease.lost().try_recv().is_err());
    lease.release().unwrap();
    // The release returns once a majority released; the other node's release may be in flight.
    let lock_key = cluster.redlock.nodes().next().unwrap().lock_key(key);
    wait_until("no healthy node holds the key", WAIT, || {
        cluster.servers[1..]
            .iter()
            .all(|server| !holds_a_lock(server, &lock_key))
    });
}

#[test]
fn a_wrongtype_lock_key_on_one_node_costs_what_a_dead_node_costs() {
    a_refusing_minority_costs_what_a_dead_node_costs(Refusal::WrongTypeLockKey);
}

#[test]
fn a_wrongtype_fence_key_on_one_node_costs_what_a_dead_node_costs() {
    a_refusing_minority_costs_what_a_dead_node_costs(Refusal::WrongTypeFenceKey);
}

#[test]
fn a_node_refusing_authentication_costs_what_a_dead_node_costs() {
    a_refusing_minority_costs_what_a_dead_node_costs(Refusal::NoAuth);
}

/// Two nodes of three refuse for good: no majority can ever form, so the acquire fails at once
/// with a permanent error instead of retrying until the caller's wait runs out, and leaves its
/// token on the healthy node.
#[test]
fn a_refusing_majority_fails_the_acquire_at_once_with_a_permanent_error() {
    let key = "refused-by-most";
    let cluster = refusing(&[Refusal::WrongTypeLockKey, Refusal::NoAuth], key);
    let manager = LockManager::new(cluster.redlock.clone());
    let started = Instant::now();
    let error = manager
        .acquire_timeout(key, TTL, Duration::from_secs(5))
        .expect_err("no majority can form");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(!error.is_timeout() && !error.is_transient(), "{error}");
    let lock_key = cluster.redlock.nodes().next().unwrap().lock_key(key);
    wait_until("the healthy node holds no token", WAIT, || {
        !holds_a_lock(&cluster.servers[2], &lock_key)
    });
}

/// A lease held on three nodes, two of which then refuse its renewal for good: the lease is lost
/// as rejected at its next renewal, not left to expire.
#[test]
fn a_renewal_refused_by_a_majority_loses_the_lease_as_rejected() {
    let servers = start_servers(3);
    let redlock = redlock(&urls(&servers));
    let manager = LockManager::new(redlock.clone());
    let key = "renewal-refused";
    let ttl = Duration::from_secs(3);
    let lease = manager.try_acquire(key, ttl).unwrap().unwrap();
    let lock_key = redlock.nodes().next().unwrap().lock_key(key);
    for server in &servers[..2] {
        make_list(server, &lock_key);
    }
    let reason = lease
        .lost()
        .recv_timeout(ttl)
        .expect("the lease is lost at its first renewal, before its validity ends");
    assert!(matches!(reason, LostReason::Rejected(_)), "{reason:?}");
}

/// Renewals and releases of a lease on nodes where a minority refuses for good are decided by
/// the majority; with a refusing majority they fail permanently.
#[test]
fn renewals_and_releases_follow_the_majority_when_nodes_refuse() {
    let key = "tally";
    let cluster = refusing(&[Refusal::WrongTypeLockKey], key);
    let backend: &dyn LeaseBackend = &cluster.redlock;
    fence_of(backend.try_acquire(&request(key, "token"), Duration::MAX));
    assert_eq!(
        renew_one(backend, &request(key, "token"), Duration::MAX).unwrap(),
        Ownership::Owned
    );
    let lock_key = cluster.redlock.nodes().next().unwrap().lock_key(key);
    make_list(&cluster.servers[1], &lock_key);
    let error = renew_one(backend, &request(key, "token"), Duration::MAX).unwrap_err();
    assert!(!error.is_transient(), "{error}");
    // Node 2 still held the token: the lease was ours to the end.
    assert_eq!(
        backend.release(key, "token", Duration::MAX).unwrap(),
        Ownership::Owned
    );
    // A token that never held it: node 2 says so, the refusing majority cannot be outvoted.
    let error = backend.release(key, "stranger", Duration::MAX).unwrap_err();
    assert!(!error.is_transient(), "{error}");
}

/// A Redlock with `drift_factor` 0.3 grants a 10 s TTL for 7 s (less 2 ms) counted from before
/// the request, on acquisition and after every renewal alike.
#[test]
fn drift_factor_bounds_the_validity_of_acquisitions_and_renewals() {
    const SLACK: Duration = Duration::from_millis(100);
    let servers = start_servers(3);
    let urls = urls(&servers);
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let redlock = RedlockBackend::builder(&urls)
        .node_timeout(NODE_TIMEOUT)
        .drift_factor(0.3)
        .build()
        .unwrap();
    let manager = LockManager::builder(redlock)
        .renew_fraction(0.05)
        .build()
        .unwrap();
    let (expected, ttl) = (Duration::from_millis(6_998), Duration::from_secs(10));
    let before = Instant::now();
    let lease = manager.acquire("drift", ttl).unwrap();
    // The request was sent after `before`, and at most the acquire's duration after it.
    let validity = lease.valid_until() - before;
    assert!(
        validity >= expected && validity <= expected + SLACK,
        "acquired for {validity:?}, not {expected:?}"
    );
    let acquired = lease.valid_until();
    wait_until("the lease is renewed", WAIT, || {
        lease.valid_until() != acquired
    });
    // The renewal was sent before now, and at most a round trip and a poll before.
    let validity = lease.valid_until() - Instant::now();
    assert!(
        validity <= expected && validity + SLACK >= expected,
        "renewed for {validity:?}, not {expected:?}"
    );
}

/// An acquire with no wait at all still makes one real attempt on every node.
#[test]
fn a_zero_wait_still_makes_one_real_attempt() {
    let servers = start_servers(3);
    let manager = LockManager::new(redlock(&urls(&servers)));
    let lease = manager
        .acquire_timeout("no-wait", TTL, Duration::ZERO)
        .unwrap();
    lease.release().unwrap();
}

/// `Duration::MAX` means "no limit of the caller's": every node call still ends within the node
/// timeout, so calls with two silent nodes of three return within a few node timeouts.
#[test]
fn a_timeout_of_duration_max_means_the_node_timeout_per_node() {
    let servers = start_servers(3);
    let proxies: Vec<TcpProxy> = servers[..2]
        .iter()
        .map(|server| TcpProxy::start(server.addr()))
        .collect();
    let redlock = redlock(&[proxies[0].url(), proxies[1].url(), servers[2].url()]);
    warm_up(&servers, &redlock);
    for proxy in &proxies {
        proxy.set_mode(ProxyMode::Blackhole);
    }
    let bound = (NODE_TIMEOUT + Duration::from_millis(100)) * 3;
    let started = Instant::now();
    let error = redlock
        .try_acquire(&request("silent", "token"), Duration::MAX)
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(
        started.elapsed() < bound,
        "acquire took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert!(renew_one(&redlock, &request("silent", "token"), Duration::MAX).is_err());
    assert!(
        started.elapsed() < bound,
        "renewal took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    // Node 2 answers (it released this token's key when the acquire failed), the others time out.
    let _ = redlock.release("silent", "token", Duration::MAX);
    assert!(
        started.elapsed() < bound,
        "release took {:?}",
        started.elapsed()
    );
}
