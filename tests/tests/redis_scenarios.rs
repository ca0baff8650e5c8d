//! The manager on Redis under real faults: paused and restarted servers, paused holder
//! processes, keys changed behind the holder's back, many processes, small pools, bad peers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is a failed test

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use lock_core::{LockManager, LostReason};
use lock_redis::RedisBackend;
use lock_tests::{fenced_write, CountingRun, RedisServer, ServerOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis::Commands;

const HOLDER: &str = env!("CARGO_BIN_EXE_lease-holder");

fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::builder(&server.url())
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// A `lease-holder hold` child process, driven line by line.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn spawn(url: &str, key: &str, ttl: Duration) -> (Holder, u64) {
        let mut child = Command::new(HOLDER)
            .args(["hold", url, url, key, &ttl.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lease-holder");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut holder = Holder {
            child,
            stdin,
            stdout,
        };
        let line = holder.read_line();
        let fence = line
            .strip_prefix("acquired ")
            .unwrap_or_else(|| panic!("holder said {line:?}"))
            .parse()
            .unwrap();
        (holder, fence)
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.read_line()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn processes_and_threads_lose_no_update_and_fences_follow_commit_order() {
    const PROCESSES: usize = 3;
    const THREADS: usize = 8;
    const ITERATIONS: usize = 60;
    let server = RedisServer::start();
    let url = server.url();
    let run = CountingRun {
        holder: HOLDER,
        locks: &url,
        data: &url,
        key: "shared-counter",
        threads: THREADS,
        iterations: ITERATIONS,
    };
    let children = run.spawn(PROCESSES);
    run.check(children, &mut server.connection());
}

#[test]
fn a_paused_server_makes_the_holder_report_loss_by_valid_until() {
    let mut server = RedisServer::start();
    let manager = LockManager::new(backend(&server));
    let ttl = Duration::from_secs(1);
    let lease = manager.acquire("job", ttl).unwrap();
    let first_fence = lease.fence();
    let lost = lease.lost();
    server.pause();
    let valid_until = lease.valid_until();
    let reason = lost
        .recv_deadline(valid_until + Duration::from_millis(100))
        .expect("no loss reported within valid_until + 100 ms");
    let reported_at = Instant::now();
    assert!(matches!(reason, LostReason::Expired), "{reason:?}");
    assert!(
        reported_at + Duration::from_millis(5) >= valid_until,
        "reported before valid_until"
    );
    assert!(!lease.is_held());
    server.resume();
    // Never held again, even once the server answers.
    for _ in 0..5 {
        assert!(!lease.is_held());
        std::thread::sleep(ttl / 5);
    }
    let other = LockManager::new(backend(&server));
    let next = other
        .acquire_timeout("job", ttl, Duration::from_secs(5))
        .unwrap();
    assert!(next.fence() > first_fence);
    assert!(lease.release().unwrap_err().is_lost());
    assert!(
        next.is_held(),
        "the stale release touched the new holder's key"
    );
    server.kill();
}

#[test]
fn a_paused_holder_process_loses_to_another_and_its_late_write_is_refused() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(800);
    let (mut holder, old_fence) = Holder::spawn(&server.url(), "invoice", ttl);
    assert_eq!(holder.ask("check"), "held");
    holder.signal(Signal::SIGSTOP);
    let manager = LockManager::new(backend(&server));
    let lease = manager
        .acquire_timeout("invoice", ttl, Duration::from_secs(10))
        .unwrap();
    assert!(lease.fence() > old_fence);
    let mut connection = server.connection();
    assert!(fenced_write(&mut connection, "ledger", lease.fence(), "new").unwrap());
    holder.signal(Signal::SIGCONT);
    assert_eq!(
        holder.ask("check"),
        "lost",
        "the resumed holder must know at once"
    );
    assert_eq!(holder.ask("write ledger stale"), "rejected");
    assert_eq!(holder.ask("release"), "release-error");
    let value: String = connection.hget("ledger", "value").unwrap();
    assert_eq!(value, "new");
    lease.ensure_held().unwrap();
}

#[test]
fn a_restarted_server_without_persistence_keeps_fences_growing() {
    let mut server = RedisServer::start();
    let manager = LockManager::new(backend(&server));
    let ttl = Duration::from_secs(1);
    let mut before = Vec::new();
    for _ in 0..3 {
        let lease = manager.acquire("restart", ttl).unwrap();
        before.push(lease.fence());
        lease.release().unwrap();
    }
    let held = manager.acquire("restart", ttl).unwrap();
    before.push(held.fence());
    let lost = held.lost();
    server.restart();
    // The key is gone with the old server: the holder learns it at its next renewal at most.
    let reason = lost.recv_timeout(ttl * 2).expect("loss after restart");
    assert!(
        matches!(reason, LostReason::TakenOver | LostReason::Expired),
        "{reason:?}"
    );
    // The same manager works again, and fences keep growing past every earlier one.
    let max_before = *before.iter().max().unwrap();
    for _ in 0..3 {
        let lease = manager
            .acquire_timeout("restart", ttl, Duration::from_secs(5))
            .unwrap();
        assert!(
            lease.fence() > max_before,
            "fence {} after {max_before}",
            lease.fence()
        );
        lease.release().unwrap();
    }
}

#[test]
fn a_key_deleted_or_overwritten_is_reported_lost_and_never_recreated() {
    let server = RedisServer::start();
    let backend = backend(&server);
    let manager = LockManager::new(backend.clone());
    let ttl = Duration::from_millis(600);
    let mut connection = server.connection();

    let deleted = manager.acquire("deleted", ttl).unwrap();
    let () = connection.del(backend.lock_key("deleted")).unwrap();
    let reason = deleted
        .lost()
        .recv_timeout(ttl)
        .expect("loss of a deleted key");
    assert!(matches!(reason, LostReason::TakenOver), "{reason:?}");

    let overwritten = manager.acquire("overwritten", ttl).unwrap();
    let () = connection
        .set(backend.lock_key("overwritten"), "someone-else")
        .unwrap();
    let reason = overwritten
        .lost()
        .recv_timeout(ttl)
        .expect("loss of an overwritten key");
    assert!(matches!(reason, LostReason::TakenOver), "{reason:?}");

    // Several renewal periods later: the deleted key was not recreated, the other not touched.
    std::thread::sleep(ttl);
    let exists: bool = connection.exists(backend.lock_key("deleted")).unwrap();
    assert!(!exists, "a renewal recreated a deleted key");
    let value: String = connection.get(backend.lock_key("overwritten")).unwrap();
    assert_eq!(value, "someone-else");
    assert!(overwritten.release().unwrap_err().is_lost());
    let value: String = connection.get(backend.lock_key("overwritten")).unwrap();
    assert_eq!(
        value, "someone-else",
        "a stale release deleted another holder's key"
    );
}

#[test]
fn no_zombie_renewals_after_many_releases() {
    const THREADS: usize = 8;
    const CYCLES: usize = 10_000 / THREADS;
    let server = RedisServer::start();
    let backend = backend(&server);
    let manager = LockManager::new(backend.clone());
    // Short leases, held for up to about a TTL, so renewals are often in flight at release.
    let ttl = Duration::from_millis(12);
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let manager = manager.clone();
            std::thread::spawn(move || {
                for cycle in 0..CYCLES {
                    let key = format!("zombie-{thread}-{}", cycle % 8);
                    let lease = manager.acquire(&key, ttl).unwrap();
                    if cycle % 4 == 0 {
                        std::thread::sleep(Duration::from_micros(fastrand_like(cycle) % 6_000));
                    }
                    // A lease may have been lost under load; either way the key must go.
                    let _ = lease.release();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    // A zombie renewal would keep a key alive past its TTL: look after several TTLs.
    std::thread::sleep(ttl * 10);
    let mut connection = server.connection();
    let keys: Vec<String> = connection.keys(backend.lock_key("zombie-*")).unwrap();
    let locks: Vec<&String> = keys.iter().filter(|key| !key.ends_with(":fence")).collect();
    assert!(locks.is_empty(), "lock keys left behind: {locks:?}");
}

/// A cheap deterministic spread of hold times.
fn fastrand_like(seed: usize) -> u64 {
    (seed as u64)
        .wrapping_mul(6_364_136_223_846_793_005)
        .rotate_left(17)
}

#[test]
fn waiters_beyond_the_pool_size_neither_starve_the_holder_nor_overstay() {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(&server.url())
        .pool_size(2)
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let manager = LockManager::new(backend);
    let ttl = Duration::from_millis(600);
    let lease = manager.acquire("busy", ttl).unwrap();
    let wait = Duration::from_secs(1);
    let waiters: Vec<_> = (0..16)
        .map(|_| {
            let manager = manager.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let result = manager.acquire_timeout("busy", ttl, wait);
                (result.map(|lease| lease.fence()), started.elapsed())
            })
        })
        .collect();
    for waiter in waiters {
        let (result, waited) = waiter.join().unwrap();
        let error = result.expect_err("a waiter acquired a held key");
        assert!(error.is_timeout(), "{error}");
        assert!(
            waited < wait + Duration::from_millis(500),
            "a waiter overstayed: {waited:?}"
        );
    }
    assert!(
        lease.is_held(),
        "the holder could not renew while waiters crowded the pool"
    );
    lease.release().unwrap();
}

#[test]
fn bad_urls_and_bad_peers_are_typed_errors_in_time() {
    let limit = Duration::from_secs(1);
    let in_time = |started: Instant| started.elapsed() < limit + Duration::from_secs(1);
    let quick = |url: &str| {
        RedisBackend::builder(url)
            .connect_timeout(limit)
            .command_timeout(limit)
            .checkout_timeout(limit)
            .build()
    };
    // Malformed URLs fail at construction.
    for url in ["", "http://127.0.0.1:6379", "redis://", "redis://[::1"] {
        assert!(quick(url).is_err(), "{url:?} was accepted");
    }

    // Nothing listens: connection refused, transient, within the limit.
    let free_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let manager = LockManager::new(quick(&format!("redis://127.0.0.1:{free_port}")).unwrap());
    let started = Instant::now();
    let error = manager
        .try_acquire("k", Duration::from_secs(1))
        .unwrap_err();
    assert!(
        error.is_transient() && in_time(started),
        "{error} after {:?}",
        started.elapsed()
    );

    // A peer that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let manager =
        LockManager::new(quick(&format!("redis://{}", silent.local_addr().unwrap())).unwrap());
    let started = Instant::now();
    let error = manager
        .try_acquire("k", Duration::from_secs(1))
        .unwrap_err();
    assert!(in_time(started), "{error} after {:?}", started.elapsed());

    // A peer that is not Redis.
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = http.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in http.incoming().take(8).flatten() {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let manager = LockManager::new(quick(&format!("redis://{http_addr}")).unwrap());
    let started = Instant::now();
    let error = manager
        .try_acquire("k", Duration::from_secs(1))
        .unwrap_err();
    assert!(in_time(started), "{error} after {:?}", started.elapsed());

    // A wrong password: permanent, and the password never shows.
    let server = RedisServer::start_with(ServerOptions {
        password: Some("s3cret-pw".into()),
        ..ServerOptions::default()
    });
    let url = format!("redis://:wrong-pw@127.0.0.1:{}", server.port());
    let guarded = quick(&url).unwrap();
    assert!(!format!("{guarded:?}").contains("wrong-pw"));
    let manager = LockManager::new(guarded);
    let started = Instant::now();
    let error = manager
        .acquire_timeout("k", Duration::from_secs(1), Duration::from_secs(5))
        .unwrap_err();
    assert!(
        !error.is_transient() && !error.is_timeout(),
        "auth failure must be permanent: {error}"
    );
    assert!(in_time(started));
    assert!(
        !format!("{error} {error:?}").contains("wrong-pw"),
        "the password leaked: {error:?}"
    );

    // A key of another type: permanent, typed.
    let server = RedisServer::start();
    let typed = backend(&server);
    let _: u64 = server
        .connection()
        .rpush(typed.lock_key("listy"), "x")
        .unwrap();
    let manager = LockManager::new(typed);
    let error = manager
        .acquire_timeout("listy", Duration::from_secs(1), Duration::from_secs(5))
        .unwrap_err();
    assert!(
        !error.is_transient() && !error.is_timeout(),
        "WRONGTYPE must be permanent: {error}"
    );
}
