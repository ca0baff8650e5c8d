//! Faults that used to break a promise of `RedisBackend`, each against real `redis-server`
//! processes: fence counters that come back stale (a failover to a lagging replica, a restore
//! from an old snapshot) or corrupt, ACL users, eviction policies, a latency spike, reads
//! interrupted by `SIGSTOP`/`SIGCONT`, and a release whose reply is lost with its connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crossbeam_channel::Receiver;
use lock_core::conformance::renew_one;
use lock_core::{LeaseBackend, Ownership};
use lock_redis::{acl_rules, RedisBackend, RedisBackendError, RedisOperation};
use lock_tests::direct::{
    acquire, backend_at, fence_of, redis_cause, request, wait_for_wakeup, CALL,
};
use lock_tests::{
    captured_logs, error_chain, fenced_write, wait_until, ProxyMode, RedisServer, TcpProxy,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis::{Commands, Value};

const HOLDER: &str = env!("CARGO_BIN_EXE_lease-holder");
/// The TTL of the leases in these tests.
const TTL: Duration = Duration::from_secs(30);
/// Deadline of `wait_until`, and of waiting for a child process to make progress.
const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches for something that must not happen (a wake-up, a reconnection).
const QUIET: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------------

/// The lock the fence tests take, and the resource its holders write to.
const KEY: &str = "ledger";
const RESOURCE: &str = "ledger-store";

/// Grants and releases the lock to a new holder, who writes to the fenced store; returns the
/// fence.
fn grant_and_write(backend: &RedisBackend, store: &mut redis::Connection, holder: &str) -> u64 {
    let fence = fence_of(acquire(backend, KEY, holder, TTL));
    assert!(
        fenced_write(store, RESOURCE, fence, holder).unwrap(),
        "the store rejected {holder}, the current holder (fence {fence})"
    );
    assert_eq!(
        backend.release(KEY, holder, CALL).unwrap(),
        Ownership::Owned
    );
    fence
}

/// The first holder after a fault gets a fence above every fence issued before; its writes are
/// accepted and the last holder before the fault, still writing, is refused.
fn assert_fencing_survives(backend: &RedisBackend, store: &mut redis::Connection, issued: &[u64]) {
    let highest = *issued.iter().max().unwrap();
    let fence = fence_of(acquire(backend, KEY, "after-the-fault", TTL));
    assert!(
        fence > highest,
        "fence {fence} after the fault, but {highest} was issued before: {issued:?}"
    );
    assert!(
        fenced_write(store, RESOURCE, fence, "after-the-fault").unwrap(),
        "the store rejected the current holder"
    );
    assert!(
        !fenced_write(store, RESOURCE, highest, "stale").unwrap(),
        "the store accepted a write of the holder before the fault"
    );
}

#[test]
fn fences_keep_growing_after_failover_to_a_lagging_replica() {
    let master = RedisServer::start();
    let link = TcpProxy::start(master.addr());
    let replica = RedisServer::start();
    replica.replicate(link.addr());
    let data = RedisServer::start();
    let mut store = data.connection();
    let on_master = backend_at(&master.url());

    let mut issued: Vec<u64> = (0..3)
        .map(|round| grant_and_write(&on_master, &mut store, &format!("early-{round}")))
        .collect();
    replica.wait_caught_up_with(&master);

    // The replica is cut off, and misses the last grants.
    link.set_mode(ProxyMode::Blackhole);
    issued.extend(
        (0..3).map(|round| grant_and_write(&on_master, &mut store, &format!("late-{round}"))),
    );
    replica.promote();
    let counter: u64 = replica.connection().get(on_master.fence_key(KEY)).unwrap();
    assert_eq!(
        counter, issued[2],
        "the promoted replica is not behind: the test proves nothing"
    );

    assert_fencing_survives(&backend_at(&replica.url()), &mut store, &issued);
}

#[test]
fn fences_keep_growing_after_a_restore_from_an_old_snapshot() {
    let mut server = RedisServer::start();
    let data = RedisServer::start();
    let mut store = data.connection();
    let backend = backend_at(&server.url());

    let mut issued: Vec<u64> = (0..3)
        .map(|round| grant_and_write(&backend, &mut store, &format!("early-{round}")))
        .collect();
    server.save_snapshot();
    issued.extend(
        (0..3).map(|round| grant_and_write(&backend, &mut store, &format!("late-{round}"))),
    );
    server.restart();
    let counter: u64 = server.connection().get(backend.fence_key(KEY)).unwrap();
    assert_eq!(
        counter, issued[2],
        "the snapshot was not restored: the test proves nothing"
    );

    assert_fencing_survives(&backend, &mut store, &issued);
}

#[test]
fn a_corrupt_fence_counter_fails_the_acquire_and_leaves_no_lock() {
    let server = RedisServer::start();
    let backend = backend_at(&server.url());
    let mut connection = server.connection();
    type Corrupt = fn(&mut redis::Connection, &str);
    let corruptions: [(&str, Corrupt); 8] = [
        ("a word", |c, key| c.set(key, "twelve").unwrap()),
        ("a leading zero", |c, key| c.set(key, "012").unwrap()),
        ("a number followed by text, with a TTL", |c, key| {
            c.set_ex(key, "12abc", 600).unwrap()
        }),
        ("a fraction", |c, key| c.set(key, "12.5").unwrap()),
        ("a negative number", |c, key| c.set(key, "-12").unwrap()),
        (
            "2^53, the first number a double cannot follow exactly",
            |c, key| c.set(key, "9007199254740992").unwrap(),
        ),
        ("a number beyond 2^53", |c, key| {
            c.set(key, "9007199254740993").unwrap()
        }),
        ("a list", |c, key| c.rpush(key, "12").unwrap()),
    ];
    for (index, (what, corrupt)) in corruptions.iter().enumerate() {
        let key = format!("corrupt-{index}");
        let counter = backend.fence_key(&key);
        corrupt(&mut connection, &counter);
        let dump = |connection: &mut redis::Connection| -> (Option<Vec<u8>>, i64) {
            let value: Option<Vec<u8>> =
                redis::cmd("DUMP").arg(&counter).query(connection).unwrap();
            let ttl: i64 = connection.ttl(&counter).unwrap();
            (value, ttl)
        };
        let before = dump(&mut connection);

        let error = backend
            .try_acquire(&request(&key, "t", TTL), CALL)
            .expect_err(what);
        assert!(!error.is_transient(), "{what}: {error}");
        let cause = redis_cause(&error);
        assert!(
            matches!(
                cause,
                RedisBackendError::Command {
                    operation: RedisOperation::Acquire,
                    ..
                }
            ),
            "{what}: {cause:?}"
        );
        let text = error_chain(&error);
        assert!(
            text.contains(&counter),
            "{what}: the error does not name {counter}: {text}"
        );
        let held: bool = connection.exists(backend.lock_key(&key)).unwrap();
        assert!(!held, "{what}: the failed acquire left the lock key behind");
        let after = dump(&mut connection);
        assert_eq!(after.0, before.0, "{what}: the counter's value changed");
        assert!(
            (after.1 - before.1).abs() <= 1,
            "{what}: the counter's TTL changed from {} to {}",
            before.1,
            after.1
        );
    }

    // The highest counter that can still be followed exactly is followed exactly.
    let () = connection
        .set(backend.fence_key("edge"), "9007199254740990")
        .unwrap();
    assert_eq!(
        fence_of(acquire(&backend, "edge", "t", TTL)),
        9_007_199_254_740_991
    );
}

// ---------------------------------------------------------------------------------------------
// ACL users
// ---------------------------------------------------------------------------------------------

/// `ACL LOG` entries of `user`: (reason, context, object, count), newest first. The context is
/// `toplevel` for a command the client sent, `lua` for one a script ran.
fn acl_denials(server: &RedisServer, user: &str) -> Vec<(String, String, String, i64)> {
    let entries: Vec<Value> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut server.connection())
        .unwrap();
    entries
        .into_iter()
        .filter_map(|entry| {
            let fields: Vec<(String, Value)> = redis::from_redis_value(entry).ok()?;
            let text = |name: &str| {
                fields
                    .iter()
                    .find(|(field, _)| field == name)
                    .and_then(|(_, value)| redis::from_redis_value::<String>(value.clone()).ok())
            };
            let count = fields
                .iter()
                .find(|(field, _)| field == "count")
                .and_then(|(_, value)| redis::from_redis_value::<i64>(value.clone()).ok())?;
            if text("username")? != user {
                return None;
            }
            Some((text("reason")?, text("context")?, text("object")?, count))
        })
        .collect()
}

/// How many connections of `user` the server has.
fn connections_of(server: &RedisServer, user: &str) -> usize {
    let user = format!(" user={user} ");
    server.clients_where(|line| line.contains(&user))
}

#[test]
fn a_user_with_the_documented_acl_rules_can_do_everything_and_is_refused_nothing() {
    let server = RedisServer::start();
    let url = server.add_acl_user("locker", "locker-pw", &acl_rules("lock:"));
    let backend = backend_at(&url);

    let watch = backend.watch_release("k").unwrap();
    wait_for_wakeup(&watch, "the subscriber subscribed");
    fence_of(acquire(&backend, "k", "t", TTL));
    assert_eq!(
        renew_one(&backend, &request("k", "t", TTL), CALL).unwrap(),
        Ownership::Owned
    );
    assert_eq!(backend.release("k", "t", CALL).unwrap(), Ownership::Owned);
    wait_for_wakeup(&watch, "the release");
    assert_eq!(
        backend.eviction_policy().unwrap().as_deref(),
        Some("noeviction")
    );

    // Closing every connection (the subscriber unsubscribes first) is refused nothing either.
    drop((backend, watch));
    wait_until("the user's connections are closed", WAIT, || {
        connections_of(&server, "locker") == 0
    });
    assert_eq!(acl_denials(&server, "locker"), Vec::new());
}

#[test]
fn credentials_given_to_the_builder_log_in_as_that_user_and_stay_secret() {
    let server = RedisServer::start();
    server.add_acl_user("locker", "locker-pw", &acl_rules("lock:"));
    let with = |password: &str| {
        RedisBackend::builder(&server.url())
            .credentials("locker", password)
            .connect_timeout(CALL)
            .build()
            .unwrap()
    };

    let backend = with("locker-pw");
    fence_of(acquire(&backend, "k", "t", TTL));
    assert_eq!(
        connections_of(&server, "locker"),
        1,
        "not logged in as the user"
    );
    assert_eq!(backend.release("k", "t", CALL).unwrap(), Ownership::Owned);

    let error = with("wrong-pw")
        .try_acquire(&request("k", "t", TTL), CALL)
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    let text = format!("{} {error:?}", error_chain(&error));
    assert!(text.contains("Password authentication failed"), "{text}");
    assert!(!text.contains("wrong-pw"), "the password leaked: {text}");
}

#[test]
fn a_user_without_the_channel_right_releases_and_is_not_woken_by_a_retry_loop() {
    let logs = captured_logs();
    let server = RedisServer::start();
    let rules = acl_rules("lock:").replace(" &lock:*", "");
    let url = server.add_acl_user("no-channel", "pw", &rules);
    let backend = backend_at(&url);

    let watch = backend.watch_release("k").unwrap();
    wait_until("the subscriber is refused its channel", WAIT, || {
        !acl_denials(&server, "no-channel").is_empty()
    });
    fence_of(acquire(&backend, "k", "t", TTL));
    assert_eq!(
        backend.release("k", "t", CALL).unwrap(),
        Ownership::Owned,
        "the release deleted the key, then failed on PUBLISH"
    );
    let held: bool = server.connection().exists(backend.lock_key("k")).unwrap();
    assert!(!held);

    // No wake-up: neither a (failed) subscription nor the release announces anything, and the
    // subscriber does not try again at once.
    assert!(
        watch.receiver().recv_timeout(QUIET).is_err(),
        "a watch was woken without a subscription"
    );
    let denial = |context: &str| {
        (
            "channel".to_owned(),
            context.to_owned(),
            "lock:{k}".to_owned(),
            1,
        )
    };
    assert_eq!(
        acl_denials(&server, "no-channel"),
        [denial("lua"), denial("toplevel")],
        "one refused PUBLISH (the release), one refused SUBSCRIBE (not retried at once)"
    );
    let warnings: Vec<String> = logs
        .lines_containing(&format!(":{}", server.port()))
        .into_iter()
        .filter(|line| line.contains("WARN") && line.contains("refuses the lock-redis subscriber"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
}

#[test]
fn a_user_without_a_key_or_command_right_gets_a_permanent_error_naming_it() {
    let server = RedisServer::start();
    let rules = acl_rules("lock:");
    let cases = [
        (
            "keys outside its pattern",
            rules.replace("~lock:*", "~other:*"),
            "no permissions to access one of the keys",
        ),
        (
            "no EVALSHA",
            rules.replace(" +evalsha", ""),
            "no permissions to run the 'evalsha' command",
        ),
        (
            "no PEXPIRE, which the scripts run",
            rules.replace(" +pexpire", ""),
            "can't run this command or subcommand",
        ),
    ];
    for (index, (what, rules, said)) in cases.iter().enumerate() {
        let url = server.add_acl_user(&format!("user-{index}"), "pw", rules);
        let backend = backend_at(&url);
        // Acquiring needs no PEXPIRE; renewing does.
        let error = match backend.try_acquire(&request("k", "t", TTL), CALL) {
            Ok(_) => renew_one(&backend, &request("k", "t", TTL), CALL).unwrap_err(),
            Err(error) => error,
        };
        assert!(!error.is_transient(), "{what}: {error}");
        let text = error_chain(&error);
        assert!(text.contains(said), "{what}: {text}");
    }
}

#[test]
fn each_right_missing_in_turn_fails_clearly_and_leaves_no_lock_behind() {
    let server = RedisServer::start();
    let rules = acl_rules("lock:");
    // Without these, leases cannot be held at all; the others only cost wake-ups (pub/sub),
    // the eviction check (`INFO`) or connection draining (`PING`).
    let required = [
        "+evalsha",
        "+eval",
        "+script|load",
        "+get",
        "+set",
        "+time",
        "+pexpire",
        "+del",
    ];
    let rights: Vec<&str> = rules
        .split(' ')
        .filter(|rule| rule.starts_with('+'))
        .collect();
    assert!(
        required.iter().all(|right| rights.contains(right)),
        "{rules}"
    );
    for (index, right) in rights.iter().enumerate() {
        let without: Vec<&str> = rules.split(' ').filter(|rule| rule != right).collect();
        let without = without.join(" ");
        let url = server.add_acl_user(&format!("without-{index}"), "pw", &without);
        let backend = backend_at(&url);
        let key = format!("k{index}");
        let mut failures = Vec::new();
        match backend.try_acquire(&request(&key, "t", TTL), CALL) {
            Err(error) => {
                let held: bool = server.connection().exists(backend.lock_key(&key)).unwrap();
                assert!(
                    !held,
                    "without {right}: a failed acquire left its lock behind"
                );
                failures.push(error);
            }
            Ok(outcome) => {
                fence_of(outcome);
                let calls = [
                    renew_one(&backend, &request(&key, "t", TTL), CALL),
                    backend.release(&key, "t", CALL),
                ];
                failures.extend(calls.into_iter().filter_map(Result::err));
            }
        }
        for error in &failures {
            assert!(
                !error.is_transient(),
                "without {right}: {}",
                error_chain(error)
            );
            let text = error_chain(error);
            assert!(
                ["no permissions", "can't run this command"]
                    .iter()
                    .any(|said| text.contains(said)),
                "without {right}, the error does not say a right is missing: {text}"
            );
        }
        assert_eq!(
            !failures.is_empty(),
            required.contains(right),
            "without {right}: {failures:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Eviction
// ---------------------------------------------------------------------------------------------

/// The warnings about `server`'s eviction policy logged so far.
fn eviction_warnings(server: &RedisServer) -> usize {
    captured_logs()
        .lines_containing(&format!(":{}", server.port()))
        .iter()
        .filter(|line| line.contains("WARN") && line.contains("maxmemory-policy is"))
        .count()
}

/// A few calls of every kind, through `backend` and a clone of it.
fn use_backend(backend: &RedisBackend) {
    for (round, backend) in [backend.clone(), backend.clone()].iter().enumerate() {
        let (key, token) = (format!("k{round}"), format!("t{round}"));
        fence_of(acquire(backend, &key, &token, TTL));
        renew_one(backend, &request(&key, &token, TTL), CALL).unwrap();
        backend.release(&key, &token, CALL).unwrap();
    }
}

#[test]
fn a_server_that_may_evict_held_locks_is_warned_about_once_per_backend() {
    captured_logs();
    let evicting = RedisServer::start();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query(&mut evicting.connection())
        .unwrap();
    let backend = backend_at(&evicting.url());
    use_backend(&backend);
    assert_eq!(eviction_warnings(&evicting), 1);
    assert_eq!(
        backend.eviction_policy().unwrap().as_deref(),
        Some("volatile-lru")
    );
    use_backend(&backend_at(&evicting.url()));
    assert_eq!(eviction_warnings(&evicting), 2, "one warning per backend");

    let safe = RedisServer::start();
    let backend = backend_at(&safe.url());
    use_backend(&backend);
    assert_eq!(
        backend.eviction_policy().unwrap().as_deref(),
        Some("noeviction")
    );
    assert_eq!(eviction_warnings(&safe), 0);

    // A user who may read neither INFO nor CONFIG: no policy, no warning, no failed call.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query(&mut safe.connection())
        .unwrap();
    let url = safe.add_acl_user("no-info", "pw", &acl_rules("lock:").replace(" +info", ""));
    let backend = backend_at(&url);
    use_backend(&backend);
    assert_eq!(backend.eviction_policy().unwrap(), None);
    assert_eq!(eviction_warnings(&safe), 0);
}

// ---------------------------------------------------------------------------------------------
// Latency, interruptions, lost replies
// ---------------------------------------------------------------------------------------------

/// After a call times out, its connection must be drained (a late reply, then a `PING`) before
/// the next command; charged to that command's timeout, the drain made every call fail for as
/// long as the round trip stayed between half the command timeout and the command timeout.
#[test]
fn a_latency_spike_leaves_no_connection_failing_at_a_latency_it_can_serve() {
    let timeout = Duration::from_millis(500);
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = RedisBackend::builder(&proxy.url())
        .pool_size(1) // every call on the connection the spike hit
        .connect_timeout(Duration::from_secs(2))
        .checkout_timeout(Duration::from_secs(2))
        .command_timeout(timeout)
        .build()
        .unwrap();
    // Loads the scripts (the first call of each costs another round trip) and checks the
    // eviction policy, so that every call below is one round trip.
    fence_of(acquire(&backend, "k", "t", TTL));
    renew_one(&backend, &request("k", "t", TTL), CALL).unwrap();

    // A spike: the round trip takes 1.5 times the command timeout.
    proxy.set_mode(ProxyMode::Delay(timeout * 3 / 4));
    let error = renew_one(&backend, &request("k", "t", TTL), CALL).unwrap_err();
    assert!(redis_cause(&error).is_timeout(), "{error}");

    // Back to a round trip of 0.6 times the command timeout: slow, but served. (Any round trip
    // above half the command timeout showed the bug; 0.6 leaves room for a busy machine.)
    proxy.set_mode(ProxyMode::Delay(timeout * 3 / 10));
    for call in 0..10 {
        let answer = renew_one(&backend, &request("k", "t", TTL), CALL);
        assert_eq!(
            answer.unwrap_or_else(|e| panic!("call {call} after the spike: {}", error_chain(&e))),
            Ownership::Owned
        );
    }
}

/// A `lease-holder calls` child process, killed on drop.
struct Caller {
    child: Child,
    lines: Receiver<String>,
}

impl Caller {
    fn spawn(url: &str) -> Caller {
        let mut child = Command::new(HOLDER)
            .args(["calls", url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lease-holder");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Caller { child, lines }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// Waits for the child's next finished round.
    fn next_round(&self) {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) if line == "ok" => {}
            Ok(line) => panic!("the calling process failed: {line}"),
            Err(e) => panic!("the calling process made no progress within {WAIT:?}: {e}"),
        }
    }

    /// Whether the process is stopped (`T` in `/proc/PID/stat`).
    fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        stat.rsplit_once(')')
            .is_some_and(|(_, fields)| fields.trim_start().starts_with('T'))
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Linux fails a blocking `recv` on a socket with a timeout with `EINTR` when the process is
/// stopped and continued, even without a signal handler: the child is stopped and continued
/// while it waits for replies (the proxy makes every round trip slow), and must see no error.
#[test]
fn a_read_interrupted_by_stop_and_continue_is_retried_within_the_call() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(20)));
    let caller = Caller::spawn(&proxy.url());
    for _ in 0..20 {
        caller.next_round();
        kill(caller.pid(), Signal::SIGSTOP).unwrap();
        wait_until("the calling process is stopped", WAIT, || {
            caller.is_stopped()
        });
        kill(caller.pid(), Signal::SIGCONT).unwrap();
        wait_until("the calling process runs again", WAIT, || {
            !caller.is_stopped()
        });
    }
    caller.next_round();
}

#[test]
fn a_release_whose_reply_is_lost_is_not_reported_as_a_loss() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let backend = backend_at(&proxy.url());
    // Loads the release script, so that the release below runs on the first attempt.
    fence_of(acquire(&backend, "warm-up", "t", TTL));
    backend.release("warm-up", "t", CALL).unwrap();
    fence_of(acquire(&backend, "k", "owner", TTL));

    // The release runs on the server, and its connection is closed before the reply: the
    // retry finds the key gone, as it would had the lease been lost before, and the marker the
    // first attempt left, which says the release was this token's.
    proxy.set_mode(ProxyMode::ResetOnNextReply);
    assert_eq!(
        backend.release("k", "owner", CALL).unwrap(),
        Ownership::Owned
    );
    let held: bool = server.connection().exists(backend.lock_key("k")).unwrap();
    assert!(!held, "the release did not run: the test proves nothing");

    // Another token's release is refused, and the marker answers only for its own token.
    assert_eq!(
        backend.release("k", "thief", CALL).unwrap(),
        Ownership::NotOwned
    );
}

/// A full server (used memory over `maxmemory`, policy `noeviction`) refuses new locks, but still
/// renews and releases the leases held: a renewal only moves a TTL. (The renewal script is
/// flagged `allow-oom` for that; without the flag, Redis would refuse every call of it.)
#[test]
fn a_full_server_refuses_new_locks_but_renews_and_releases_held_ones() {
    let server = RedisServer::start();
    let backend = RedisBackend::connect(&server.url()).unwrap();
    let held = lock_core::LeaseRequest {
        key: "full",
        token: "holder",
        ttl: Duration::from_secs(5),
    };
    let outcome = backend.try_acquire(&held, WAIT).unwrap();
    assert!(matches!(
        outcome,
        lock_core::AcquireOutcome::Acquired { .. }
    ));
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query(&mut server.connection())
        .unwrap();
    let other = lock_core::LeaseRequest {
        key: "other",
        ..held
    };
    let refused = backend.try_acquire(&other, WAIT).unwrap_err();
    assert!(format!("{refused:?}").contains("OOM"), "{refused:?}");
    let renewal = lock_core::LeaseRequest {
        ttl: Duration::from_secs(60),
        ..held
    };
    assert!(matches!(
        backend.renew_batch(&[renewal], WAIT)[0],
        Ok(Ownership::Owned)
    ));
    let ttl_left: i64 = server.connection().pttl(backend.lock_key("full")).unwrap();
    assert!(ttl_left > 5_000, "renewed to a minute: {ttl_left} ms left");
    assert_eq!(
        backend.release("full", "holder", WAIT).unwrap(),
        Ownership::Owned
    );
}
