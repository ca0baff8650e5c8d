//! One process of the Redis property run (`tests/tests/property.rs`): a few threads share one
//! lock manager and run a random sequence of acquires, critical sections with fenced writes,
//! checks, idle holds, releases and drops on a few keys with short TTLs, while the parent
//! pauses the server and deletes keys behind them.
//!
//! ```text
//! property-worker NAME LOCKS DATA KEY_PREFIX KEYS SEED OPS THREADS
//!     NAME        this process's name in reports (and the first part of its lease names)
//!     LOCKS       Redis URL of the lock server
//!     DATA        Redis URL of the server that keeps the fenced resources
//!     KEY_PREFIX  prefix of the lock keys; the keys are KEY_PREFIX0 .. KEY_PREFIX{KEYS-1}
//!     SEED        seeds the random sequence (each thread derives its own)
//!     OPS         operations in all, shared among the threads
//!     THREADS     threads sharing the manager
//! ```
//!
//! Once every thread is done and the manager is gone (so every event has been delivered), it
//! prints, one per line:
//!
//! - `section KEY LEASE FENCE ACQUIRING START END REJECTED`: each critical section
//!   ([`Section`]), for the parent to check mutual exclusion and fence order across processes;
//! - `lost<TAB>LEASE<TAB>LATENESS_US<TAB>STARVED_US<TAB>REASON`: each lost lease, with how
//!   late its loss was reported ([`LeaseFacts::lateness`]) and how long, meanwhile, the renewer
//!   thread could not get a core (see [`RenewerWatch`]);
//! - `violation<TAB>PROMISE<TAB>DETAIL`: each broken promise this process can see alone (loss
//!   and release accounting, unexpected errors);
//! - `stat NAME VALUE`: counters, summed by the parent;
//! - finally `summary NAME: ...`, one human-readable line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use lock_core::{Lease, LockManager, LostReason};
use lock_redis::RedisBackend;
use lock_tests::property::{
    accounting_violations, unix_micros, EventLedger, LeaseFacts, Section, CALL_RESULT, ENSURE_HELD,
};

type Result<T = (), E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// The TTLs a lease is taken with, in milliseconds: far apart, so that one manager renews
/// leases of very different lengths at once (a long lease's renewal stuck on a paused server
/// must not delay the report of a short lease's loss).
const TTLS_MS: [u64; 3] = [150, 400, 1_000];
/// The longest ordinary idle stretch of a holder, in milliseconds.
const MAX_IDLE_MS: u64 = 100;
/// How long a waiting acquire may wait at most, in milliseconds.
const MAX_WAIT_MS: u64 = 100;
/// The Redis backend's own timeouts: long enough to ride out the parent's longest pause.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> Result {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, locks, data, prefix, keys, seed, ops, threads] = args.as_slice() else {
        return Err(format!("usage: see the docs of property-worker; got {args:?}").into());
    };
    let keys: Vec<String> = (0..keys.parse::<usize>()?)
        .map(|index| format!("{prefix}{index}"))
        .collect();
    let (seed, ops, threads): (u64, usize, usize) = (seed.parse()?, ops.parse()?, threads.parse()?);

    let ledger = EventLedger::new(lock_core::Clock::System);
    let backend = RedisBackend::builder(locks)
        .checkout_timeout(BACKEND_TIMEOUT)
        .command_timeout(BACKEND_TIMEOUT)
        .build()?;
    let manager = LockManager::builder(backend)
        .event_hook(ledger.hook())
        .build()?;
    let data = redis::Client::open(data.as_str())?;
    let renewer_watch = RenewerWatch::start(lock_core::RENEWER_THREAD_NAME)?;
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let worker = Worker {
                name: format!("{name}/{thread}"),
                manager: manager.clone(),
                data: data.get_connection()?,
                keys: keys.clone(),
                rng: fastrand::Rng::with_seed(seed.wrapping_add(thread as u64)),
                ops: ops / threads + usize::from(thread < ops % threads),
                report: Report::default(),
            };
            Ok(std::thread::Builder::new()
                .name(worker.name.clone())
                .spawn(move || worker.run())?)
        })
        .collect::<Result<_>>()?;
    let mut reports = Vec::new();
    for worker in workers {
        reports.push(worker.join().map_err(|_| "a worker thread panicked")??);
    }
    // Dropping the last handle joins the renewer: every event has been delivered after this.
    drop(manager);
    let renewer_samples = renewer_watch.stop()?;

    let mut stats: BTreeMap<&str, u64> = BTreeMap::new();
    let mut violations = 0;
    let mut max_lateness = Duration::ZERO;
    for report in &reports {
        for section in &report.sections {
            println!("{}", section.to_line());
        }
        for (promise, detail) in &report.violations {
            violations += 1;
            println!("violation\t{promise}\t{detail}");
        }
        for (stat, value) in &report.stats {
            *stats.entry(stat).or_default() += value;
        }
        for ended in &report.ended {
            let mut facts = ended.facts.clone();
            let late_reasons: Vec<LostReason> = ended.lost.try_iter().collect();
            facts.lost_messages += late_reasons.len();
            let tally = ledger.tally(&ended.key, ended.fence);
            for (promise, detail) in accounting_violations(&facts, &tally) {
                violations += 1;
                println!("violation\t{promise}\t{}: {detail}", ended.lease);
            }
            if let Some(reported_at) = facts.reported_at(&tally) {
                let lateness = facts.lateness(&tally).unwrap_or_default();
                max_lateness = max_lateness.max(lateness);
                let (from, to) = (facts.valid_until, reported_at);
                let starved = RenewerWatch::starved(&renewer_samples, from, to);
                let renewer_was = if lateness.is_zero() {
                    String::new()
                } else {
                    format!(
                        "; renewer seen: {}",
                        RenewerWatch::doing(&renewer_samples, from, to)
                    )
                };
                let reason = match ended.reasons.iter().chain(&late_reasons).next() {
                    Some(reason) => format!("{reason:?}"),
                    None => "unknown".to_owned(),
                };
                let by = tally.lost_by.as_deref().unwrap_or("unknown");
                let reason = format!(
                    "{reason}, TTL {:?}, reported by {by}{renewer_was}",
                    ended.ttl
                );
                println!(
                    "lost\t{}\t{}\t{}\t{reason}",
                    ended.lease,
                    lateness.as_micros(),
                    starved.as_micros()
                );
                *stats.entry("lost").or_default() += 1;
            }
        }
    }
    for (stat, value) in &stats {
        println!("stat {stat} {value}");
    }
    let stat = |name: &str| stats.get(name).copied().unwrap_or(0);
    println!(
        "summary {name}: {} ops; granted {} by try_acquire, {} by acquire_timeout(0), {} by \
         acquire_timeout(wait); {} refused or timed out, {} transient errors; {} sections, {} \
         fenced writes ({} rejected); {} released, {} dropped, {} lost (max lateness {:?}); {} \
         violations",
        stat("ops"),
        stat("granted_try"),
        stat("granted_zero_wait"),
        stat("granted_wait"),
        stat("refused"),
        stat("transient"),
        stat("sections"),
        stat("writes"),
        stat("rejected"),
        stat("released"),
        stat("dropped"),
        stat("lost"),
        max_lateness,
        violations
    );
    Ok(())
}

/// Samples, every millisecond, how long the manager's renewer thread has waited for a core so
/// far (the time it was runnable but not running, from Linux's
/// `/proc/self/task/TID/schedstat`) and what it is doing (its state and kernel wait channel);
/// gaps between samples show when this process could not run at all. A loss reported late
/// while the renewer could not get a core is the loaded machine's doing; a loss reported late
/// while the renewer was not even runnable (blocked in a call, say) is the library's, and the
/// states say where it was blocked.
struct RenewerWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

/// One look at the renewer thread.
struct Sample {
    at: Instant,
    /// Nanoseconds spent waiting for a core so far.
    waited_ns: u64,
    /// Its state letter and kernel wait channel, e.g. `S do_epoll_wait`.
    doing: String,
}

impl RenewerWatch {
    /// Time between two samples.
    const INTERVAL: Duration = Duration::from_millis(1);
    /// How long after a report the wait is read: a thread's wait is accounted when it runs.
    const SETTLE: Duration = Duration::from_millis(20);

    /// Starts watching the thread named `name` (the manager's renewer: it exists once the
    /// manager is built).
    fn start(name: &str) -> Result<RenewerWatch> {
        let task = RenewerWatch::find_thread(name)?;
        let look = move || -> Result<Sample> {
            let at = Instant::now();
            let schedstat = std::fs::read_to_string(task.join("schedstat"))?;
            let waited_ns = schedstat
                .split_whitespace()
                .nth(1)
                .ok_or("schedstat has no wait time")?
                .parse()?;
            let stat = std::fs::read_to_string(task.join("stat"))?;
            // `PID (COMM) STATE ...`: the state follows the last parenthesis.
            let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
            let wchan = std::fs::read_to_string(task.join("wchan")).unwrap_or_default();
            let doing = format!("{} {}", state.unwrap_or('?'), wchan.trim());
            Ok(Sample {
                at,
                waited_ns,
                doing,
            })
        };
        look().map_err(|error| format!("cannot watch the renewer thread: {error}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("renewer-watch".into())
            .spawn(move || {
                let mut samples = Vec::new();
                // The renewer may be gone before the watch is stopped: keep what was seen.
                while let (false, Ok(sample)) = (stopped.load(Ordering::Relaxed), look()) {
                    samples.push(sample);
                    std::thread::sleep(RenewerWatch::INTERVAL);
                }
                samples
            })?;
        Ok(RenewerWatch { stop, thread })
    }

    /// The `/proc/self/task/TID` directory of the thread named `name`, waiting for the thread
    /// to name itself (it does so once it runs).
    fn find_thread(name: &str) -> Result<std::path::PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for task in std::fs::read_dir("/proc/self/task")?.flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                if comm.trim() == name {
                    return Ok(task.path());
                }
            }
            if Instant::now() >= deadline {
                return Err(
                    format!("no thread named {name:?} in /proc/self/task after 5 s").into(),
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops watching; returns the samples.
    fn stop(self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self
            .thread
            .join()
            .map_err(|_| "the renewer watch thread panicked")?)
    }

    /// How long the renewer waited for a core between `from` and `to` (at most: from the last
    /// sample before `from` to the first sample [`SETTLE`](Self::SETTLE) after `to`).
    fn waited(samples: &[Sample], from: Instant, to: Instant) -> Duration {
        let before = samples
            .iter()
            .rev()
            .find(|s| s.at <= from)
            .or(samples.first());
        let after = samples
            .iter()
            .find(|s| s.at >= to + RenewerWatch::SETTLE)
            .or(samples.last());
        match (before, after) {
            (Some(before), Some(after)) => {
                Duration::from_nanos(after.waited_ns.saturating_sub(before.waited_ns))
            }
            _ => Duration::ZERO,
        }
    }

    /// How long the renewer could not run between `from` and `to` for want of a core: the
    /// longer of its own wait in the run queue and the time the watch thread itself was overdue
    /// (which also covers the whole machine being stalled, as when a virtual machine's host
    /// does not schedule it: that is no run-queue wait inside it).
    fn starved(samples: &[Sample], from: Instant, to: Instant) -> Duration {
        let overdue: Duration = samples
            .windows(2)
            .map(|pair| {
                let due = (pair[0].at + RenewerWatch::INTERVAL).max(from);
                pair[1].at.min(to).saturating_duration_since(due)
            })
            .sum();
        overdue.max(RenewerWatch::waited(samples, from, to))
    }

    /// What the renewer was seen doing between `from` and `to`, most often first: e.g.
    /// `412× S do_epoll_wait, 3× R 0`.
    fn doing(samples: &[Sample], from: Instant, to: Instant) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for sample in samples.iter().filter(|s| s.at >= from && s.at <= to) {
            *counts.entry(&sample.doing).or_default() += 1;
        }
        let mut counts: Vec<(&str, usize)> = counts.into_iter().collect();
        counts.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        let seen: Vec<String> = counts
            .iter()
            .take(4)
            .map(|(doing, count)| format!("{count}× {doing}"))
            .collect();
        if seen.is_empty() {
            "not sampled".to_owned()
        } else {
            seen.join(", ")
        }
    }
}

/// A lease this thread is done with, to be checked once every event has been delivered.
struct Ended {
    lease: String,
    ttl: Duration,
    key: String,
    fence: u64,
    facts: LeaseFacts,
    lost: Receiver<LostReason>,
    /// Reasons already received on `lost` while the lease was held.
    reasons: Vec<LostReason>,
}

#[derive(Default)]
struct Report {
    sections: Vec<Section>,
    ended: Vec<Ended>,
    violations: Vec<(&'static str, String)>,
    stats: BTreeMap<&'static str, u64>,
}

impl Report {
    fn count(&mut self, stat: &'static str) {
        *self.stats.entry(stat).or_default() += 1;
    }
}

/// A lease being held, and what its holder learned about it.
struct Held {
    lease: Lease,
    name: String,
    acquiring_from_us: u64,
    lost: Receiver<LostReason>,
    reasons: Vec<LostReason>,
    known_lost: bool,
}

impl Held {
    /// `ensure_held()`, noting a loss; checks that `is_held()` agrees.
    fn check(&mut self, report: &mut Report) -> bool {
        let checked = self.lease.ensure_held();
        let held = self.lease.is_held();
        let agree = match &checked {
            Ok(()) => true, // `is_held` may turn false right after; only the converse is wrong
            Err(error) => error.is_lost() && !held,
        };
        if !agree {
            let detail = format!(
                "{}: ensure_held() = {checked:?}, then is_held() = {held}",
                self.name
            );
            report.violations.push((ENSURE_HELD, detail));
        }
        self.reasons.extend(self.lost.try_iter());
        if checked.is_err() {
            self.known_lost = true;
        }
        checked.is_ok()
    }
}

struct Worker {
    name: String,
    manager: LockManager,
    data: redis::Connection,
    keys: Vec<String>,
    rng: fastrand::Rng,
    /// Operations left.
    ops: usize,
    report: Report,
}

impl Worker {
    fn run(mut self) -> Result<Report> {
        let mut sequence = 0;
        while self.take_op() {
            let key = self.keys[self.rng.usize(..self.keys.len())].clone();
            let ttl = Duration::from_millis(TTLS_MS[self.rng.usize(..TTLS_MS.len())]);
            let acquiring_from_us = unix_micros();
            let (kind, outcome) = match self.rng.u32(..10) {
                0..=3 => ("granted_try", self.manager.try_acquire(&key, ttl)),
                4..=5 => (
                    "granted_zero_wait",
                    self.manager
                        .acquire_timeout(&key, ttl, Duration::ZERO)
                        .map(Some),
                ),
                _ => {
                    let wait = Duration::from_millis(self.rng.u64(10..=MAX_WAIT_MS));
                    (
                        "granted_wait",
                        self.manager.acquire_timeout(&key, ttl, wait).map(Some),
                    )
                }
            };
            match outcome {
                Ok(Some(lease)) => {
                    self.report.count(kind);
                    sequence += 1;
                    let lost = lease.lost();
                    let held = Held {
                        lease,
                        name: format!("{}/{sequence}", self.name),
                        acquiring_from_us,
                        lost,
                        reasons: Vec::new(),
                        known_lost: false,
                    };
                    self.hold(held, ttl)?;
                }
                Ok(None) => self.refused(),
                Err(error) if error.is_timeout() => self.refused(),
                Err(error) if error.is_transient() => {
                    self.report.count("transient");
                    self.pause_briefly();
                }
                Err(error) => self.unexpected(format!("acquiring {key}: {error}")),
            }
        }
        Ok(self.report)
    }

    fn take_op(&mut self) -> bool {
        if self.ops == 0 {
            return false;
        }
        self.ops -= 1;
        self.report.count("ops");
        true
    }

    fn refused(&mut self) {
        self.report.count("refused");
        self.pause_briefly();
    }

    /// A short random pause between two attempts (part of the workload).
    fn pause_briefly(&mut self) {
        std::thread::sleep(Duration::from_micros(self.rng.u64(0..5_000)));
    }

    fn unexpected(&mut self, detail: String) {
        self.report
            .violations
            .push((CALL_RESULT, format!("{}: {detail}", self.name)));
    }

    /// Holds a lease for a few random operations, then releases or drops it.
    fn hold(&mut self, mut held: Held, ttl: Duration) -> Result {
        let steps = self.rng.usize(0..=6);
        for _ in 0..steps {
            if held.known_lost || !self.take_op() {
                break;
            }
            match self.rng.u32(..10) {
                0..=4 => self.critical_section(&mut held)?,
                5..=6 => {
                    held.check(&mut self.report);
                }
                _ => {
                    // Idle while the renewer keeps the lease (only the renewer can notice a
                    // loss meanwhile); now and then for longer than the TTL itself.
                    let idle = if self.rng.u32(..50) == 0 {
                        ttl.mul_f64(1.0 + self.rng.f64() * 0.5)
                    } else {
                        Duration::from_millis(self.rng.u64(..MAX_IDLE_MS))
                    };
                    std::thread::sleep(idle);
                }
            }
        }
        self.end(held);
        Ok(())
    }

    /// Between two successful `ensure_held()`, does one or two fenced writes; records the
    /// section only if the second check succeeds too.
    fn critical_section(&mut self, held: &mut Held) -> Result {
        if !held.check(&mut self.report) {
            return Ok(());
        }
        let start_us = unix_micros();
        let key = held.lease.key().to_owned();
        let resource = format!("resource:{key}");
        let fence = held.lease.fence();
        let mut rejected_writes = 0;
        for _ in 0..self.rng.u32(1..=2) {
            self.report.count("writes");
            if !lock_tests::fenced_write(&mut self.data, &resource, fence, &held.name)? {
                rejected_writes += 1;
                self.report.count("rejected");
            }
            std::thread::sleep(Duration::from_micros(self.rng.u64(0..3_000)));
        }
        let end_us = unix_micros();
        if held.check(&mut self.report) {
            self.report.count("sections");
            self.report.sections.push(Section {
                key,
                lease: held.name.clone(),
                fence,
                acquiring_from_us: held.acquiring_from_us,
                start_us,
                end_us,
                rejected_writes,
            });
        }
        Ok(())
    }

    /// Releases (or drops) the lease and keeps what is needed to check its accounting.
    fn end(&mut self, held: Held) {
        let Held {
            lease,
            name,
            lost,
            mut reasons,
            mut known_lost,
            ..
        } = held;
        let (key, fence, lease_ttl) = (lease.key().to_owned(), lease.fence(), lease.ttl());
        let valid_until = lease.valid_until();
        let release_began = Instant::now();
        if self.rng.u32(..10) < 7 {
            self.report.count("released");
            match lease.release() {
                Ok(()) => {}
                Err(error) if error.is_lost() => known_lost = true,
                // The outcome is unknown (the server was paused): not a loss.
                Err(error) if error.is_transient() => self.report.count("transient"),
                Err(error) => self.unexpected(format!("releasing {name}: {error}")),
            }
        } else {
            self.report.count("dropped");
            drop(lease);
        }
        reasons.extend(lost.try_iter());
        let facts = LeaseFacts {
            known_lost,
            ended: true,
            lost_messages: reasons.len(),
            valid_until,
            release_began: Some(release_began),
        };
        self.report.ended.push(Ended {
            lease: name,
            ttl: lease_ttl,
            key,
            fence,
            facts,
            lost,
            reasons,
        });
    }
}
