//! `RedisBackend` on the master of a Sentinel group, against real `redis-server` processes (one
//! master, two replicas, three sentinels, down after 1 s): the conformance suite through
//! Sentinel; a lease and new acquires across a forced failover and across a killed master;
//! fenced counting by three processes through five failovers; a release that wakes a waiter
//! after a failover; and a master demoted behind the sentinels' back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use lock_core::{Lease, LeaseBackend, LockManager, RetryPolicy};
use lock_redis::{RedisBackend, RedisBackendError};
use lock_tests::conformance::RedisTarget;
use lock_tests::direct::{acquire, fence_of, redis_cause, request, CALL};
use lock_tests::{
    error_chain, spawn_waiter, wait_until, CountingRun, GroupOptions, RedisServer, SentinelGroup,
};
use redis::Commands;

const HOLDER: &str = env!("CARGO_BIN_EXE_lease-holder");
/// The TTL of the leases that live through a failover: its renewals (every TTL/3) must reach
/// the new master before the key it holds expires there, and following a forced failover takes
/// about 1.5 s (the promoted replica is named by the sentinels about a second after its
/// promotion, and the backend asks them every 250 ms).
const TTL: Duration = Duration::from_secs(6);
/// How late after its `valid_until` a loss may be reported.
const REPORT_SLACK: Duration = Duration::from_millis(200);
/// New acquires must succeed within the failover's own time plus this.
const ACQUIRE_SLACK: Duration = Duration::from_secs(2);
/// Deadline of `wait_until` for things that take a failover or two.
const WAIT: Duration = Duration::from_secs(20);
/// A backoff so long that only a wake-up explains a quick acquire.
const SLEEPY: RetryPolicy = RetryPolicy::new(Duration::from_secs(30), Duration::from_secs(30));

/// A group whose sentinels never fail over on their own during a test: one replica, one
/// sentinel, down after a minute.
fn quiet() -> GroupOptions {
    GroupOptions {
        replicas: 1,
        sentinels: 1,
        down_after: Duration::from_secs(60),
        failover_timeout: Duration::from_secs(60),
        ..GroupOptions::default()
    }
}

fn quiet_group() -> SentinelGroup {
    SentinelGroup::start_with(quiet())
}

// ---------------------------------------------------------------------------------------------
// The conformance suite, through Sentinel
// ---------------------------------------------------------------------------------------------

fn sentinel_redis() -> RedisTarget<SentinelGroup> {
    let group = quiet_group();
    let backend = RedisBackend::connect(&group.url()).unwrap();
    RedisTarget {
        servers: group,
        backend,
    }
}

mod conformance {
    lock_core::conformance_tests!(super::sentinel_redis());
}

// ---------------------------------------------------------------------------------------------
// Across one failover
// ---------------------------------------------------------------------------------------------

/// How the master goes.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `SENTINEL FAILOVER`: the old master keeps running, and taking writes, until Sentinel
    /// turns it into a replica about 10 s later.
    Forced,
    /// `SIGKILL`: the sentinels fail over once it has been down for a second and they agree.
    Killed,
}

/// What became of the lease held across the failover.
enum Outcome {
    /// Renewed on the new master.
    Renewed,
    /// Reported lost, this long before (or after) its `valid_until`.
    Lost {
        early_by: Duration,
        late_by: Duration,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Renewed => f.write_str("renewed on the new master"),
            Outcome::Lost { early_by, late_by } => write!(
                f,
                "reported lost {early_by:?} before its valid_until ({late_by:?} after)"
            ),
        }
    }
}

/// A lease held across a failover is renewed on the new master or reported lost on time,
/// never held while the new master does not hold it; new acquires succeed on the new master
/// within the failover's time + 2 s, with fences above every fence issued before.
fn across_a_failover(fault: Fault) {
    let mut group = SentinelGroup::start();
    let url = group.url();
    let backend = RedisBackend::connect(&url).unwrap();
    let manager = LockManager::new(backend.clone());
    let mut issued: Vec<u64> = (0..3)
        .map(|n| {
            let lease = manager.acquire(&format!("before:{n}"), TTL).unwrap();
            let fence = lease.fence();
            lease.release().unwrap();
            fence
        })
        .collect();
    let held = manager.acquire("held", TTL).unwrap();
    issued.push(held.fence());
    let held_key = backend.lock_key("held");
    let token: String = group.master().connection().get(&held_key).unwrap();
    // Replication is asynchronous: a lock acquired just before a failover can be lost with it.
    // This test is about one acquired before.
    group.wait_replicated();

    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Another client takes the held lock as soon as it can: it must never get it while
        // `held` says it holds it.
        let intruder = scope.spawn(|| intrude(&url, &held, &stop));
        let old = group.master_addr();
        let started = Instant::now();
        match fault {
            Fault::Forced => {
                group.force_failover();
            }
            Fault::Killed => {
                group.kill_master();
            }
        }
        let new = group.wait_for_new_master(old);
        let failover = started.elapsed();
        let new_master = group.server(new);

        let (fresh, acquired_after) = first_acquire_on(&manager, &backend, new_master, started);
        assert!(
            acquired_after <= failover + ACQUIRE_SLACK,
            "{fault:?}: the sentinels agreed after {failover:?}, but the first acquire on the \
             new master succeeded only after {acquired_after:?}"
        );
        let highest = issued.iter().copied().max().unwrap();
        assert!(
            fresh.fence() > highest,
            "{fault:?}: fence {} after the failover, {highest} before",
            fresh.fence()
        );

        let outcome = follow(&held, new_master, &held_key, &token, started + failover);
        stop.store(true, Ordering::Relaxed);
        let intrusion = intruder.join().unwrap();
        if let Some(fence) = intrusion {
            assert!(
                fence > held.fence(),
                "the intruder's fence {fence} is stale"
            );
        }
        eprintln!(
            "{fault:?}: the sentinels agreed on the new master {failover:?} after the fault; \
             the first acquire on it succeeded after {acquired_after:?}; the held lease was \
             {outcome}; the intruder got the lock: {}",
            intrusion.is_some()
        );
    });
}

/// The first lease granted by the new master (a grant by the old one, whose writes the new
/// master never sees, does not count), and how long after `started` it came.
fn first_acquire_on(
    manager: &LockManager,
    backend: &RedisBackend,
    new_master: &RedisServer,
    started: Instant,
) -> (Lease, Duration) {
    let mut connection = new_master.connection();
    for attempt in 0.. {
        let key = format!("after:{attempt}");
        match manager.try_acquire(&key, TTL) {
            Ok(Some(lease)) => {
                let on_new: Option<String> = connection.get(backend.lock_key(&key)).unwrap();
                if on_new.is_some() {
                    return (lease, started.elapsed());
                }
            }
            Ok(None) => panic!("{key} is held by another"),
            Err(error) if error.is_transient() => {}
            Err(error) => panic!("acquiring {key}: {}", error_chain(&error)),
        }
        assert!(
            started.elapsed() < WAIT,
            "no acquire on the new master within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unreachable!()
}

/// Follows `held` until it is renewed on the new master or reported lost, checking all along
/// that it never says it holds the lock while the new master does not hold its token.
fn follow(
    held: &Lease,
    new_master: &RedisServer,
    key: &str,
    token: &str,
    agreed: Instant,
) -> Outcome {
    let mut connection = new_master.connection();
    let lost = held.lost();
    let deadline = agreed + TTL * 2;
    loop {
        // Read the key first: a lease held after the read was held at it.
        let asked = Instant::now();
        let (value, pttl): (Option<String>, i64) = redis::pipe()
            .get(key)
            .pttl(key)
            .query(&mut connection)
            .unwrap();
        let on_new_master = value.as_deref() == Some(token);
        if held.is_held() {
            assert!(
                on_new_master,
                "the lease says it is held, but the new master holds {value:?}"
            );
        }
        // Only a renewal on the new master after the sentinels agreed makes its key live
        // beyond `agreed + TTL`.
        let expires = u64::try_from(pttl)
            .ok()
            .and_then(|pttl| asked.checked_add(Duration::from_millis(pttl)));
        if on_new_master && expires.is_some_and(|at| at > agreed + TTL) {
            assert!(held.is_held());
            return Outcome::Renewed;
        }
        match lost.recv_timeout(Duration::from_millis(10)) {
            Ok(_reason) => {
                let reported_at = Instant::now();
                let valid_until = held.valid_until();
                assert!(
                    reported_at <= valid_until + REPORT_SLACK,
                    "the loss was reported {:?} after valid_until",
                    reported_at - valid_until
                );
                return Outcome::Lost {
                    early_by: valid_until.saturating_duration_since(reported_at),
                    late_by: reported_at.saturating_duration_since(valid_until),
                };
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => panic!("the lost() channel closed"),
        }
        assert!(
            Instant::now() < deadline,
            "the lease was neither renewed on the new master nor reported lost"
        );
    }
}

/// Tries to take `held`'s lock through a backend of its own until `stop`, and checks, each
/// time it succeeds, that `held` no longer says it holds it; returns the fence it got.
fn intrude(url: &str, held: &Lease, stop: &AtomicBool) -> Option<u64> {
    let manager = LockManager::new(RedisBackend::connect(url).unwrap());
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(lease)) = manager.try_acquire(held.key(), Duration::from_secs(1)) {
            assert!(
                !held.is_held(),
                "another client got the lock while the lease still says it holds it"
            );
            return Some(lease.fence());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn a_lease_and_new_acquires_live_through_a_forced_failover() {
    across_a_failover(Fault::Forced);
}

#[test]
fn a_lease_and_new_acquires_live_through_a_killed_master() {
    across_a_failover(Fault::Killed);
}

// ---------------------------------------------------------------------------------------------
// Through five failovers
// ---------------------------------------------------------------------------------------------

#[test]
fn three_processes_lose_no_update_the_fences_accept_through_five_failovers() {
    const PROCESSES: usize = 3;
    const FAILOVERS: usize = 5;
    /// Increments to see between two failovers.
    const PROGRESS: u64 = 20;
    const COUNTER: &str = "fenced-counter";
    let group = SentinelGroup::start();
    let data = RedisServer::start();
    let (locks, data_url) = (group.url(), data.url());
    let run = CountingRun {
        holder: HOLDER,
        locks: &locks,
        data: &data_url,
        key: "counter",
        threads: 2,
        iterations: 0, // a fenced run counts until stopped
    };
    let fence_key = RedisBackend::connect(&locks).unwrap().fence_key("counter");
    let counters = run.spawn_fenced(PROCESSES, COUNTER);
    let mut store = data.connection();
    let mut counted = 0;
    let mut wait_for_progress = |what: &str| {
        let target = counted + PROGRESS;
        wait_until(what, WAIT, || {
            run.fenced_value(COUNTER, &mut store) >= target
        });
        counted = target;
    };
    wait_for_progress("the processes counted");
    for round in 1..=FAILOVERS {
        let old = group.force_failover();
        let new = group.wait_for_new_master(old);
        // The new master grants the lock: its fence counter rises past what it replicated.
        let mut new_master = group.server(new).connection();
        let replicated: u64 = new_master.get(&fence_key).unwrap();
        wait_until(
            &format!("the new master granted the lock (failover {round})"),
            WAIT,
            || new_master.get::<_, u64>(&fence_key).unwrap() > replicated,
        );
        wait_for_progress(&format!("the processes counted after failover {round}"));
        // What Sentinel does ~10 s later, so that the next failover can come sooner.
        group.demote(old);
    }
    let totals = run.stop_fenced_and_check(counters, COUNTER, &mut data.connection());
    eprintln!("through {FAILOVERS} failovers: {totals:?}");
}

// ---------------------------------------------------------------------------------------------
// Waiters
// ---------------------------------------------------------------------------------------------

#[test]
fn a_release_after_a_failover_wakes_a_waiter_through_the_new_master() {
    let group = SentinelGroup::start();
    let backend = RedisBackend::connect(&group.url()).unwrap();
    let channel = backend.lock_key("handoff");
    let holder = LockManager::new(backend.clone());
    let sleepy = LockManager::builder(backend).retry(SLEEPY).build().unwrap();
    let lease = holder.acquire("handoff", TTL).unwrap();
    let old = group.master_addr();
    let waiter = spawn_waiter(&sleepy, "handoff", TTL);
    wait_until("the waiter subscribed", WAIT, || {
        group.server(old).subscribers(&channel) == 1
    });
    group.force_failover();
    let new_master = group.server(group.wait_for_new_master(old));
    wait_until("the subscriber subscribed on the new master", WAIT, || {
        new_master.subscribers(&channel) == 1
    });
    // Woken by the new subscription, the waiter found the lock held on the new master (the
    // only script it has run is the waiter's), and sleeps on its 30 s backoff.
    wait_until("the waiter tried on the new master", WAIT, || {
        new_master.script_calls() >= 1
    });
    let released = Instant::now();
    lease.release().unwrap();
    let acquired = waiter.join().unwrap();
    assert!(
        acquired - released < Duration::from_secs(2),
        "woken {:?} after the release: slept on its backoff",
        acquired - released
    );
}

// ---------------------------------------------------------------------------------------------
// A master demoted behind the sentinels' back
// ---------------------------------------------------------------------------------------------

/// `READONLY` is transient, and its connection is dropped rather than pooled again; a new
/// connection to a server the sentinels name but whose `ROLE` is replica is refused, as
/// transient too.
#[test]
fn a_demoted_master_fails_calls_as_transient_and_loses_its_connections() {
    let group = quiet_group();
    let backend = RedisBackend::builder(&group.url())
        .pool_size(1)
        .checkout_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let (master, replica) = (group.master(), &group.servers()[1]);
    fence_of(acquire(&backend, "a", "token-a", TTL));
    // Not the harness's own connection, a sentinel's or a replication link.
    let ours = |line: &str| {
        ["cmd=client|list", " name=sentinel-", " flags=S", " flags=M"]
            .iter()
            .all(|theirs| !line.contains(theirs))
    };
    assert_eq!(master.clients_where(ours), 1, "the pool's one connection");

    // The sentinel keeps naming the old master: it notices a minute later at the earliest.
    replica.promote();
    master.replicate(replica.addr());
    let error = backend
        .try_acquire(&request("b", "token-b", TTL), CALL)
        .unwrap_err();
    assert!(error.is_transient(), "{}", error_chain(&error));
    let refused = match redis_cause(&error) {
        RedisBackendError::Command { source, .. } => source.kind(),
        other => panic!("not a refused command: {other:?}"),
    };
    assert_eq!(
        refused,
        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
    );
    wait_until("the refused connection is closed", WAIT, || {
        master.clients_where(ours) == 0
    });

    let error = backend
        .try_acquire(&request("b", "token-b", TTL), CALL)
        .unwrap_err();
    let chain = error_chain(&error);
    assert!(error.is_transient(), "{chain}");
    assert!(chain.contains("says ROLE replica"), "{chain}");
}

// ---------------------------------------------------------------------------------------------
// Passwords
// ---------------------------------------------------------------------------------------------

#[test]
fn the_master_and_the_sentinels_each_take_their_own_password() {
    const MASTER: &str = "master pw/1";
    const SENTINELS: &str = "sentinel:pw@2";
    let group = SentinelGroup::start_with(GroupOptions {
        password: Some(MASTER.to_owned()),
        sentinel_password: Some(SENTINELS.to_owned()),
        ..quiet()
    });
    // The URL: the master's password as its user information, the sentinels' as a parameter.
    let backend = RedisBackend::connect(&group.url()).unwrap();
    fence_of(acquire(&backend, "a", "token-a", TTL));

    let sentinels = group.sentinel_addrs();
    let sentinels: Vec<&str> = sentinels.iter().map(String::as_str).collect();
    let with = |master: &str, sentinel: &str| {
        RedisBackend::sentinel_builder(&sentinels, "mymaster")
            .master_auth(None, master)
            .sentinel_auth(None, sentinel)
            .build()
            .unwrap()
    };
    fence_of(acquire(&with(MASTER, SENTINELS), "b", "token-b", TTL));
    // A wrong password, of either, is a permanent error, reported without waiting out the
    // checkout timeout (2 s), and without the password.
    for (master, sentinel) in [("hunter2", SENTINELS), (MASTER, "hunter2")] {
        let started = Instant::now();
        let error = with(master, sentinel)
            .try_acquire(&request("c", "token-c", TTL), CALL)
            .unwrap_err();
        let chain = error_chain(&error);
        assert!(!error.is_transient(), "{chain}");
        assert!(started.elapsed() < Duration::from_secs(1), "{chain}");
        assert!(
            chain.contains("WRONGPASS") && !chain.contains("hunter2"),
            "{chain}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Silent sentinels
// ---------------------------------------------------------------------------------------------

/// Asking the sentinels is part of opening a connection, bounded by the connect timeout: a
/// silent sentinel costs its share of it, and silent sentinels fail the call as transient
/// within the checkout timeout, unless the backend knows a master to fall back on.
#[test]
fn silent_sentinels_cost_their_share_of_the_connect_timeout_and_no_more() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(500);
    let group = SentinelGroup::start_with(GroupOptions {
        replicas: 0,
        sentinels: 2,
        ..quiet()
    });
    let backend = || {
        RedisBackend::builder(&group.url())
            .pool_size(1)
            .connect_timeout(TIMEOUT)
            .checkout_timeout(TIMEOUT)
            .build()
            .unwrap()
    };
    let timed_acquire = |backend: &RedisBackend, key: &str| {
        let started = Instant::now();
        let outcome = backend.try_acquire(&request(key, "token", TTL), CALL);
        (outcome, started.elapsed())
    };
    // The first sentinel is asked first: silent, it gets half the connect timeout.
    group.sentinels()[0].pause();
    let knows_the_master = backend();
    let (outcome, took) = timed_acquire(&knows_the_master, "a");
    fence_of(outcome.unwrap_or_else(|e| panic!("{}", error_chain(&e))));
    assert!(
        took >= TIMEOUT / 2 && took < TIMEOUT + SLACK,
        "asked the silent sentinel for {took:?}"
    );

    // Both silent: a backend that knows no master fails, as transient, in time.
    group.sentinels()[1].pause();
    let (outcome, took) = timed_acquire(&backend(), "b");
    let error = outcome.unwrap_err();
    assert!(error.is_transient(), "{}", error_chain(&error));
    assert!(took < TIMEOUT + SLACK, "failed after {took:?}");

    // One that knows the master opens a new connection to it, after half the connect timeout
    // spent on the sentinels.
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut group.servers()[0].connection())
        .unwrap();
    let (outcome, took) = timed_acquire(&knows_the_master, "c");
    fence_of(outcome.unwrap_or_else(|e| panic!("{}", error_chain(&e))));
    assert!(took < TIMEOUT + SLACK, "took {took:?}");
    for sentinel in group.sentinels() {
        sentinel.resume();
    }
}

// ---------------------------------------------------------------------------------------------
// The README's example
// ---------------------------------------------------------------------------------------------

/// The example of the README's "### Sentinel", verbatim (the test below checks that it is),
/// run against a real group.
mod readme {
    // The README's example begins.
    use lock_core::LockManager;
    use lock_redis::RedisBackend;
    use std::time::Duration;

    /// Runs the daily report under a lock kept by the master of the Sentinel group `mymaster`;
    /// returns the fence the report was written with.
    fn daily_report(sentinels: &[&str]) -> Result<u64, Box<dyn std::error::Error>> {
        // Or RedisBackend::connect("redis+sentinel://:PASSWORD@host1:26379,host2:26379/mymaster")
        let backend = RedisBackend::sentinel_builder(sentinels, "mymaster")
            .command_timeout(Duration::from_millis(500))
            .build()?;
        let manager = LockManager::new(backend);
        let ttl = Duration::from_secs(10); // at least 5 s: see below
        let fence = manager.with_lease("reports:daily", ttl, Duration::from_secs(5), |lease| {
            // Hand the fence to the store with every write, and let it refuse lower ones: around
            // a failover, a lease granted by the demoted master can overlap the next holder's.
            lease.fence()
        })?;
        Ok(fence)
    }
    // The README's example ends.

    #[test]
    fn the_readme_example_is_this_one_and_runs_against_a_sentinel_group() {
        let this_file = include_str!("redis_sentinel.rs");
        let example: String = this_file
            .split("    // The README's example begins.\n")
            .nth(1)
            .and_then(|rest| rest.split("    // The README's example ends.\n").next())
            .unwrap()
            .lines()
            .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
            .collect();
        let readme = include_str!("../../README.md");
        let in_readme = readme
            .split("### Sentinel\n")
            .nth(1)
            .and_then(|section| section.split("```rust\n").nth(1))
            .and_then(|block| block.split("```\n").next())
            .unwrap();
        assert_eq!(
            in_readme, example,
            "the README's Sentinel example differs from this one"
        );

        let group = super::quiet_group();
        let sentinels = group.sentinel_addrs();
        let sentinels: Vec<&str> = sentinels.iter().map(String::as_str).collect();
        assert!(daily_report(&sentinels).unwrap() > 0);
    }
}
