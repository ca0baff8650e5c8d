//! `RedisBackend`'s trait methods, called directly against real `redis-server` processes:
//! ownership semantics, fences, scripts after restarts, pipelined renewals, release
//! notifications, and typed, bounded failures for every kind of broken server or peer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::conformance::renew_one;
use lock_core::{AcquireOutcome, BackendError, LeaseBackend, LeaseRequest, Ownership};
use lock_redis::{RedisBackend, RedisBackendError, RedisOperation};
use lock_tests::direct::{
    acquire, backend_at, fence_of, redis_cause, request, wait_for_wakeup, CALL,
};
use lock_tests::{error_chain, wait_until, ProxyMode, RedisServer, ServerOptions, TcpProxy};
use parking_lot::Mutex;
use redis::Commands;

/// The timeout given to calls that are expected to fail for lack of an answer.
const SHORT: Duration = Duration::from_millis(300);
/// How much later than its timeout a failing call may return.
const SLACK: Duration = Duration::from_millis(500);
/// Deadline of `wait_until` and of waiting for a release notification.
const WAIT: Duration = Duration::from_secs(10);
/// The TTL of most leases in these tests.
const TTL: Duration = Duration::from_secs(30);

fn pttl(server: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(&mut server.connection())
        .unwrap()
}

/// Asserts a transient failure of `operation` on `key`, returned within `limit` + [`SLACK`].
fn assert_transient_in_time(
    result: Result<impl std::fmt::Debug, BackendError>,
    operation: RedisOperation,
    key: &str,
    started: Instant,
    limit: Duration,
) {
    let elapsed = started.elapsed();
    let error = result.expect_err("the call succeeded against a server that cannot answer");
    assert!(error.is_transient(), "not transient: {error}");
    assert!(
        elapsed < limit + SLACK,
        "took {elapsed:?} (limit {limit:?}): {error}"
    );
    let cause = redis_cause(&error);
    assert_eq!(cause.operation(), Some(operation), "{error}");
    assert_eq!(cause.key(), Some(key), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Ownership
// ---------------------------------------------------------------------------------------------

#[test]
fn acquire_grants_a_free_key_and_reports_the_holders_remaining_ttl() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let ttl = Duration::from_millis(20_000);

    fence_of(acquire(&backend, "report", "token-a", ttl));
    let value: String = server.connection().get(backend.lock_key("report")).unwrap();
    assert_eq!(value, "token-a");
    let left = pttl(&server, &backend.lock_key("report"));
    assert!((19_000..=20_000).contains(&left), "PTTL {left}");

    match acquire(&backend, "report", "token-b", ttl) {
        AcquireOutcome::Held {
            remaining: Some(remaining),
        } => {
            assert!(remaining <= ttl, "{remaining:?}");
            assert!(remaining > ttl - Duration::from_secs(1), "{remaining:?}");
        }
        other => panic!("another token got {other:?}"),
    }

    // A key set by someone else without a TTL: held, for an unknown time.
    let () = server
        .connection()
        .set(backend.lock_key("forever"), "x")
        .unwrap();
    assert_eq!(
        acquire(&backend, "forever", "token-a", ttl),
        AcquireOutcome::Held { remaining: None }
    );
}

#[test]
fn ttls_are_rounded_up_to_whole_milliseconds() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    fence_of(acquire(
        &backend,
        "k",
        "t",
        Duration::from_micros(5_000_001),
    ));
    let left = pttl(&server, &backend.lock_key("k"));
    assert!((4_900..=5_001).contains(&left), "PTTL {left}");
    assert_eq!(
        renew_one(
            &backend,
            &request("k", "t", Duration::from_nanos(9_000_000_001)),
            CALL
        )
        .unwrap(),
        Ownership::Owned
    );
    let left = pttl(&server, &backend.lock_key("k"));
    assert!((8_900..=9_001).contains(&left), "PTTL {left}");
}

#[test]
fn only_the_owner_renews_and_releases() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let lock = backend.lock_key("job");
    fence_of(acquire(&backend, "job", "owner", Duration::from_secs(5)));

    let long = Duration::from_secs(60);
    assert_eq!(
        renew_one(&backend, &request("job", "thief", long), CALL).unwrap(),
        Ownership::NotOwned
    );
    assert!(
        pttl(&server, &lock) <= 5_000,
        "a foreign renewal changed the TTL"
    );
    assert_eq!(
        backend.release("job", "thief", CALL).unwrap(),
        Ownership::NotOwned
    );
    let value: String = server.connection().get(&lock).unwrap();
    assert_eq!(value, "owner", "a foreign release changed the key");

    assert_eq!(
        renew_one(&backend, &request("job", "owner", long), CALL).unwrap(),
        Ownership::Owned
    );
    assert!(
        pttl(&server, &lock) > 55_000,
        "the owner's renewal did not set the TTL"
    );

    assert_eq!(
        backend.release("job", "owner", CALL).unwrap(),
        Ownership::Owned
    );
    let exists: bool = server.connection().exists(&lock).unwrap();
    assert!(!exists, "release left the key");
    // Idempotent: the marker tells a repeated release that its token deleted the key.
    assert_eq!(
        backend.release("job", "owner", CALL).unwrap(),
        Ownership::Owned
    );
    let exists: bool = server.connection().exists(&lock).unwrap();
    assert!(!exists, "a repeated release recreated the key");
    assert_eq!(
        renew_one(&backend, &request("job", "owner", long), CALL).unwrap(),
        Ownership::NotOwned
    );
}

#[test]
fn renew_never_recreates_a_deleted_or_expired_key() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let lock = backend.lock_key("gone");

    fence_of(acquire(&backend, "gone", "owner", TTL));
    let () = server.connection().del(&lock).unwrap();
    assert_eq!(
        renew_one(&backend, &request("gone", "owner", TTL), CALL).unwrap(),
        Ownership::NotOwned
    );
    let exists: bool = server.connection().exists(&lock).unwrap();
    assert!(!exists, "renew recreated a deleted key");

    fence_of(acquire(
        &backend,
        "gone",
        "short",
        Duration::from_millis(30),
    ));
    wait_until("the short lease expires on the server", WAIT, || {
        !server.connection().exists::<_, bool>(&lock).unwrap()
    });
    assert_eq!(
        renew_one(&backend, &request("gone", "short", TTL), CALL).unwrap(),
        Ownership::NotOwned
    );
    let exists: bool = server.connection().exists(&lock).unwrap();
    assert!(!exists, "renew recreated an expired key");
}

#[test]
fn an_acquire_retried_with_its_own_token_gets_its_own_fence_back() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let fence = fence_of(acquire(&backend, "k", "token", Duration::from_secs(5)));
    assert_eq!(
        acquire(&backend, "k", "token", TTL),
        AcquireOutcome::Acquired { fence }
    );
    assert!(
        pttl(&server, &backend.lock_key("k")) > 25_000,
        "the retry did not set the TTL"
    );
    assert!(matches!(
        acquire(&backend, "k", "other", TTL),
        AcquireOutcome::Held { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------------

#[test]
fn fences_start_at_the_server_time_and_increase_across_releases_and_expiries() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query(&mut server.connection()).unwrap();
    let before = seconds * 1_000_000 + micros;

    let mut last = fence_of(acquire(&backend, "f", "t0", TTL));
    assert!(
        last > before,
        "the first fence {last} is not seeded from TIME ({before})"
    );
    assert!(
        last < before + 60_000_000,
        "the first fence {last} is far from TIME ({before})"
    );
    assert_eq!(backend.release("f", "t0", CALL).unwrap(), Ownership::Owned);

    for round in 1..20 {
        let token = format!("t{round}");
        let fence = fence_of(acquire(&backend, "f", &token, TTL));
        assert!(fence > last, "fence {fence} after {last}");
        last = fence;
        assert_eq!(
            backend.release("f", &token, CALL).unwrap(),
            Ownership::Owned
        );
    }

    fence_of(acquire(
        &backend,
        "f",
        "expiring",
        Duration::from_millis(30),
    ));
    let lock = backend.lock_key("f");
    wait_until("the lease expires", WAIT, || {
        !server.connection().exists::<_, bool>(&lock).unwrap()
    });
    let after_expiry = fence_of(acquire(&backend, "f", "next", TTL));
    assert!(
        after_expiry > last + 1,
        "fence {after_expiry} after an expired {}",
        last + 1
    );

    // Fences are per key.
    let other = fence_of(acquire(&backend, "other", "t", TTL));
    assert!(other > before);
}

#[test]
fn fences_increase_across_a_restart_without_persistence() {
    let mut server = RedisServer::start();
    let backend = backend_at(&server.url());
    let mut last = 0;
    for round in 0..5 {
        let token = format!("before-{round}");
        last = fence_of(acquire(&backend, "f", &token, TTL));
        backend.release("f", &token, CALL).unwrap();
    }

    server.restart();
    let exists: bool = server.connection().exists(backend.fence_key("f")).unwrap();
    assert!(
        !exists,
        "the restarted server kept its data: the test proves nothing"
    );

    // The pooled connections died with the old process, and the new one has no scripts cached:
    // the very first call must still succeed.
    let after = fence_of(acquire(&backend, "f", "after", TTL));
    assert!(after > last, "fence {after} after a restart, {last} before");
}

// ---------------------------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------------------------

fn cached_scripts(server: &RedisServer) -> usize {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut server.connection())
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("number_of_cached_scripts:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("INFO memory reports number_of_cached_scripts")
}

fn flush_scripts(server: &RedisServer) {
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(cached_scripts(server), 0);
}

#[test]
fn every_operation_recovers_from_an_empty_script_cache() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());

    flush_scripts(&server);
    fence_of(acquire(&backend, "a", "t", TTL));
    fence_of(acquire(&backend, "b", "t", TTL));
    assert!(cached_scripts(&server) > 0, "EVAL did not cache the script");

    flush_scripts(&server);
    assert_eq!(
        renew_one(&backend, &request("a", "t", TTL), CALL).unwrap(),
        Ownership::Owned
    );

    flush_scripts(&server);
    let batch = [
        request("a", "t", TTL),
        request("b", "t", TTL),
        request("c", "t", TTL),
    ];
    let results: Vec<_> = backend
        .renew_batch(&batch, CALL)
        .into_iter()
        .map(|result| result.unwrap())
        .collect();
    assert_eq!(
        results,
        [Ownership::Owned, Ownership::Owned, Ownership::NotOwned]
    );

    flush_scripts(&server);
    assert_eq!(backend.release("a", "t", CALL).unwrap(), Ownership::Owned);
}

#[test]
fn scripts_survive_a_restart() {
    let mut server = RedisServer::start();
    let backend = backend_at(&server.url());
    fence_of(acquire(&backend, "a", "t", TTL));
    server.restart();
    assert_eq!(cached_scripts(&server), 0);
    fence_of(acquire(&backend, "a", "t2", TTL));
    fence_of(acquire(&backend, "b", "t2", TTL));
    server.restart();
    let batch = [request("a", "t2", TTL), request("b", "t2", TTL)];
    for result in backend.renew_batch(&batch, CALL) {
        assert_eq!(
            result.unwrap(),
            Ownership::NotOwned,
            "the restarted server is empty"
        );
    }
    server.restart();
    // The release goes out on the pooled connection the restart closed: the server had closed
    // it before the request was written (end of file, no reply), so the request did not run,
    // and the retry on a new connection, which finds the key gone, is the truth.
    assert_eq!(
        backend.release("a", "t2", CALL).unwrap(),
        Ownership::NotOwned
    );
}

// ---------------------------------------------------------------------------------------------
// Batch renewal
// ---------------------------------------------------------------------------------------------

#[test]
fn batch_renewal_answers_each_lease_in_one_round_trip() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = backend_at(&proxy.url());
    let direct = backend_at(&server.url());

    // Enough leases for several script calls (chunks of 128), with the odd ones on the chunk
    // boundaries: each result must still go to its own lease.
    let keys: Vec<String> = (0..300).map(|i| format!("batch-{i}")).collect();
    for key in &keys {
        fence_of(acquire(&direct, key, "mine", Duration::from_secs(5)));
    }
    fence_of(acquire(&direct, "theirs", "someone-else", TTL));
    let () = server
        .connection()
        .rpush(direct.lock_key("listy"), "x")
        .unwrap();

    let mut batch: Vec<LeaseRequest<'_>> =
        keys.iter().map(|key| request(key, "mine", TTL)).collect();
    let odd = [(127, "theirs"), (128, "missing"), (256, "listy")];
    for (index, key) in odd {
        batch.insert(index, request(key, "mine", TTL));
    }

    // Warm the pool, then make every round trip take at least 600 ms: one at a time, these
    // renewals would take minutes.
    assert_eq!(
        renew_one(&backend, &batch[0], CALL).unwrap(),
        Ownership::Owned
    );
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    let results = backend.renew_batch(&batch, CALL);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(2400),
        "{} renewals took {elapsed:?}: more than one round trip",
        batch.len()
    );

    assert_eq!(results.len(), batch.len());
    for (request, result) in batch.iter().zip(&results) {
        if odd.iter().any(|(_, key)| *key == request.key) {
            continue;
        }
        assert_eq!(
            result.as_ref().unwrap(),
            &Ownership::Owned,
            "{}",
            request.key
        );
        assert!(
            pttl(&server, &direct.lock_key(request.key)) > 25_000,
            "{} was not renewed",
            request.key
        );
    }
    assert_eq!(
        results[127].as_ref().unwrap(),
        &Ownership::NotOwned,
        "a foreign lease"
    );
    assert_eq!(
        results[128].as_ref().unwrap(),
        &Ownership::NotOwned,
        "a missing key"
    );
    let wrongtype = results[256].as_ref().unwrap_err();
    assert!(
        !wrongtype.is_transient(),
        "WRONGTYPE must be permanent: {wrongtype}"
    );
    assert_eq!(redis_cause(wrongtype).key(), Some("listy"));
    assert!(pttl(&server, &direct.lock_key("theirs")) > 25_000);
    let exists: bool = server
        .connection()
        .exists(direct.lock_key("missing"))
        .unwrap();
    assert!(!exists, "a batch renewal created a key");
}

// ---------------------------------------------------------------------------------------------
// Release notifications
// ---------------------------------------------------------------------------------------------

#[test]
fn a_backend_given_a_pool_works_without_release_notifications() {
    let server = RedisServer::start();
    let pool = lock_redis::r2d2::Pool::builder()
        .max_size(2)
        .build(server.client())
        .unwrap();
    let backend = RedisBackend::from_pool(pool);
    assert!(backend.watch_release("k").is_none());
    fence_of(acquire(&backend, "k", "t", TTL));
    assert_eq!(
        renew_one(&backend, &request("k", "t", TTL), CALL).unwrap(),
        Ownership::Owned
    );
    assert_eq!(backend.release("k", "t", CALL).unwrap(), Ownership::Owned);
}

// ---------------------------------------------------------------------------------------------
// Faults: every call is bounded and typed
// ---------------------------------------------------------------------------------------------

#[test]
fn a_paused_server_fails_every_call_in_time_and_is_used_again_after() {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(&server.url())
        .pool_size(1) // every call on the same connection, to catch stale replies
        .command_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    fence_of(acquire(&backend, "held", "owner", TTL));
    let long = Duration::from_secs(60);

    server.pause();
    let started = Instant::now();
    let result = backend.try_acquire(&request("new", "t", TTL), SHORT);
    assert_transient_in_time(result, RedisOperation::Acquire, "new", started, SHORT);

    let started = Instant::now();
    let result = renew_one(&backend, &request("held", "owner", long), SHORT);
    assert_transient_in_time(result, RedisOperation::Renew, "held", started, SHORT);

    let started = Instant::now();
    let batch = [
        request("held", "owner", long),
        request("held", "owner", long),
        request("x", "y", long),
    ];
    let results = backend.renew_batch(&batch, SHORT);
    let elapsed = started.elapsed();
    assert_eq!(results.len(), 3);
    for (request, result) in batch.iter().zip(results) {
        assert_transient_in_time(result, RedisOperation::Renew, request.key, started, SHORT);
    }
    assert!(elapsed < SHORT + SLACK);

    // No caller limit: the command timeout bounds the call.
    let started = Instant::now();
    let result = backend.release("other", "t", Duration::MAX);
    assert_transient_in_time(
        result,
        RedisOperation::Release,
        "other",
        started,
        Duration::from_millis(700),
    );
    assert!(
        redis_cause(&renew_one(&backend, &request("held", "owner", long), SHORT).unwrap_err())
            .is_timeout()
    );

    // A backend with no connection yet: connecting is bounded too.
    let fresh = RedisBackend::builder(&server.url())
        .checkout_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let started = Instant::now();
    let result = fresh.try_acquire(&request("k", "t", TTL), Duration::MAX);
    assert_transient_in_time(
        result,
        RedisOperation::Acquire,
        "k",
        started,
        Duration::from_millis(400),
    );

    server.resume();
    // The replies to the timed-out calls (renewals that say "owned") arrive now; none of them
    // may be taken for the answer to this question.
    assert_eq!(
        renew_one(&backend, &request("held", "not-the-owner", TTL), CALL).unwrap(),
        Ownership::NotOwned
    );
    assert_eq!(
        renew_one(&backend, &request("held", "owner", TTL), CALL).unwrap(),
        Ownership::Owned
    );
    let fence = fence_of(acquire(&backend, "after", "t", TTL));
    assert_eq!(
        acquire(&backend, "after", "t", TTL),
        AcquireOutcome::Acquired { fence }
    );
}

#[test]
fn a_blackholed_connection_times_out_and_recovers() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = backend_at(&proxy.url());
    fence_of(acquire(&backend, "k", "owner", TTL));

    proxy.set_mode(ProxyMode::Blackhole);
    let started = Instant::now();
    let result = renew_one(&backend, &request("k", "owner", TTL), SHORT);
    assert_transient_in_time(result, RedisOperation::Renew, "k", started, SHORT);
    let started = Instant::now();
    let result = backend.release("k", "owner", Duration::MAX);
    assert_transient_in_time(
        result,
        RedisOperation::Release,
        "k",
        started,
        Duration::from_secs(1),
    );

    proxy.set_mode(ProxyMode::Pass);
    // The renewal's late reply ("owned") must not be taken for the answer to this question.
    assert_eq!(
        renew_one(&backend, &request("k", "not-the-owner", TTL), CALL).unwrap(),
        Ownership::NotOwned
    );
    // The release never went out: its connection was still waiting for the renewal's reply,
    // and checking it timed out first. So the owner still holds the key.
    assert_eq!(
        renew_one(&backend, &request("k", "owner", TTL), CALL).unwrap(),
        Ownership::Owned
    );
}

#[test]
fn reset_connections_are_replaced_without_failing_the_next_call() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = backend_at(&proxy.url());
    // Open a few pooled connections.
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let backend = &backend;
            scope.spawn(move || {
                for round in 0..20 {
                    let key = format!("warm-{thread}-{round}");
                    fence_of(acquire(backend, &key, "t", TTL));
                }
            });
        }
    });
    fence_of(acquire(&backend, "k", "owner", TTL));

    proxy.set_mode(ProxyMode::Reset);
    let started = Instant::now();
    let result = renew_one(&backend, &request("k", "owner", TTL), SHORT);
    assert_transient_in_time(result, RedisOperation::Renew, "k", started, SHORT);
    wait_until("the proxy closed every connection", WAIT, || {
        proxy.connections() == 0
    });

    proxy.set_mode(ProxyMode::Pass);
    for round in 0..10 {
        assert_eq!(
            renew_one(&backend, &request("k", "owner", TTL), CALL).unwrap(),
            Ownership::Owned,
            "call {round} after the connections were reset"
        );
    }
}

#[test]
fn an_unreachable_port_is_a_transient_error_in_time() {
    // A socket bound but not listening: connections to its port are refused, and no server
    // started by a test running in parallel can take the port meanwhile.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = reserved.local_addr().unwrap().as_socket().unwrap().port();
    let backend = backend_at(&format!("redis://127.0.0.1:{port}"));
    for timeout in [SHORT, Duration::MAX] {
        let started = Instant::now();
        let result = backend.try_acquire(&request("k", "t", TTL), timeout);
        assert_transient_in_time(
            result,
            RedisOperation::Acquire,
            "k",
            started,
            Duration::from_secs(1).min(timeout),
        );
    }
    let started = Instant::now();
    let results = backend.renew_batch(&[request("a", "t", TTL), request("b", "t", TTL)], SHORT);
    assert_eq!(results.len(), 2);
    for (key, result) in ["a", "b"].into_iter().zip(results) {
        assert_transient_in_time(result, RedisOperation::Renew, key, started, SHORT);
    }
}

#[test]
fn a_peer_that_never_answers_is_a_transient_error_in_time() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = backend_at(&format!("redis://{}", silent.local_addr().unwrap()));
    for timeout in [SHORT, Duration::MAX] {
        let started = Instant::now();
        let result = backend.release("k", "t", timeout);
        assert_transient_in_time(
            result,
            RedisOperation::Release,
            "k",
            started,
            Duration::from_secs(1).min(timeout),
        );
    }
}

#[test]
fn a_peer_that_is_not_redis_is_a_typed_error_in_time() {
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = peer.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let answering = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            peer.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match peer.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let mut buffer = [0; 512];
                        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
                        let _ = stream.read(&mut buffer);
                        let _ = stream
                            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let backend = backend_at(&format!("redis://{addr}"));
    for _ in 0..3 {
        let started = Instant::now();
        let error = backend
            .try_acquire(&request("k", "t", TTL), Duration::MAX)
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1) + SLACK,
            "took {:?}",
            started.elapsed()
        );
        let cause = redis_cause(&error);
        assert_eq!(cause.key(), Some("k"), "{error}");
        assert!(
            matches!(cause, RedisBackendError::NoConnection { .. }),
            "{error:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    answering.join().unwrap();
}

#[test]
fn a_wrong_password_is_a_permanent_error_that_never_shows_the_password() {
    let server = RedisServer::start_with(ServerOptions {
        password: Some("right-password".into()),
        ..ServerOptions::default()
    });
    let url = format!("redis://:wrong-password@127.0.0.1:{}", server.port());
    let backend = backend_at(&url);
    assert!(!format!("{backend:?}").contains("wrong-password"));
    let started = Instant::now();
    let error = backend
        .try_acquire(&request("k", "t", TTL), Duration::MAX)
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1) + SLACK,
        "took {:?}",
        started.elapsed()
    );
    assert!(
        !error.is_transient(),
        "a wrong password must be permanent: {error}"
    );
    let shown = format!("{} {error:?}", error_chain(&error));
    assert!(
        !shown.contains("wrong-password") && !shown.contains("right-password"),
        "{shown}"
    );
    assert!(shown.contains("acquire of lock \"k\""), "{shown}");

    // No password at all: NOAUTH, permanent too.
    let backend = backend_at(&format!("redis://127.0.0.1:{}", server.port()));
    let error = backend.release("k", "t", CALL).unwrap_err();
    assert!(!error.is_transient(), "{error}");

    // The same through a pool given to `from_pool`.
    let client = lock_redis::redis::Client::open(url.as_str()).unwrap();
    let pool = lock_redis::r2d2::Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .build_unchecked(client);
    let backend = RedisBackend::from_pool(pool);
    let started = Instant::now();
    let error = renew_one(&backend, &request("k", "t", TTL), CALL).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(!error.is_transient(), "{error}");
    assert!(
        !format!("{error} {error:?}").contains("wrong-password"),
        "{error:?}"
    );

    // The right password works, and does not show either.
    let backend = backend_at(&server.url());
    assert!(!format!("{backend:?}").contains("right-password"));
    fence_of(acquire(&backend, "k", "t", TTL));
}

#[test]
fn a_lock_key_of_another_type_is_a_permanent_error_naming_the_operation_and_key() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let () = server
        .connection()
        .rpush(backend.lock_key("listy"), "x")
        .unwrap();

    let error = backend
        .try_acquire(&request("listy", "t", TTL), CALL)
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    let shown = error_chain(&error);
    assert!(shown.contains("acquire of lock \"listy\""), "{shown}");
    assert!(shown.contains("WRONGTYPE"), "{shown}");

    let error = renew_one(&backend, &request("listy", "t", TTL), CALL).unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert_eq!(redis_cause(&error).operation(), Some(RedisOperation::Renew));

    let error = backend.release("listy", "t", CALL).unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert_eq!(
        redis_cause(&error).operation(),
        Some(RedisOperation::Release)
    );

    // The connection is still good for other keys.
    fence_of(acquire(&backend, "fine", "t", TTL));
}

#[test]
fn bad_urls_are_typed_errors_at_construction() {
    for url in [
        "",
        "localhost:6379",
        "http://127.0.0.1:6379",
        "redis://",
        "redis://[::1",
        "redis://h/x",
    ] {
        let error = RedisBackend::connect(url).unwrap_err();
        assert!(
            matches!(error, RedisBackendError::InvalidUrl { .. }),
            "{url:?}: {error:?}"
        );
    }
    // TLS URLs are accepted (see redis_tls.rs); one the redis crate cannot read is not.
    let error = RedisBackend::connect("rediss://:top-secret@127.0.0.1:6380/#bogus").unwrap_err();
    assert!(
        matches!(error, RedisBackendError::InvalidUrl { .. }),
        "{error:?}"
    );
    assert!(!format!("{error} {error:?}").contains("top-secret"));
}

#[test]
fn unix_socket_urls_work() {
    let server = RedisServer::start_with(ServerOptions {
        unix_socket: true,
        password: Some("sock-pw".into()),
        ..ServerOptions::default()
    });
    assert!(server.url().starts_with("redis+unix://"));
    let backend = backend_at(&server.url());
    assert!(!format!("{backend:?}").contains("sock-pw"), "{backend:?}");
    let watch = backend.watch_release("k").unwrap();
    wait_for_wakeup(&watch, "the subscriber connected over the socket");
    fence_of(acquire(&backend, "k", "t", TTL));
    assert_eq!(backend.release("k", "t", CALL).unwrap(), Ownership::Owned);
    wait_for_wakeup(&watch, "the release");
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_acquirers_exclude_each_other_and_fences_follow_the_grants() {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(&server.url())
        .pool_size(4)
        .build()
        .unwrap();
    let inside = AtomicBool::new(false);
    let grants = AtomicUsize::new(0);
    let fences = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let (backend, inside, grants, fences) = (&backend, &inside, &grants, &fences);
            scope.spawn(move || {
                let mut mine = 0;
                let mut attempt = 0;
                while mine < 10 {
                    attempt += 1;
                    let token = format!("thread-{thread}-{attempt}");
                    match acquire(backend, "contended", &token, TTL) {
                        AcquireOutcome::Acquired { fence } => {
                            assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                            fences.lock().push(fence);
                            grants.fetch_add(1, Ordering::SeqCst);
                            inside.store(false, Ordering::SeqCst);
                            assert_eq!(
                                backend.release("contended", &token, CALL).unwrap(),
                                Ownership::Owned
                            );
                            mine += 1;
                        }
                        AcquireOutcome::Held { remaining } => {
                            assert!(remaining.is_some_and(|left| left <= TTL));
                        }
                    }
                }
            });
        }
    });
    assert_eq!(grants.load(Ordering::SeqCst), 80);
    let fences = fences.into_inner();
    assert!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "fences out of grant order: {fences:?}"
    );
}
