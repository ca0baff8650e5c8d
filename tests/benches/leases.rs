//! The benchmark suite: our public API against the raw redis client, on the same servers, in
//! the same run, printed as ratios.
//!
//! `cargo bench -p lock-tests --bench leases` runs every row; name rows to run some:
//! `cargo bench -p lock-tests --bench leases -- memory handoff`. Rows: `memory`, `uncontended`,
//! `saturated`, `renewal`, `handoff`, `redlock`. The suite starts its own redis-server
//! processes; see BENCHMARKS.md for the figures and what they mean.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed setup aborts the benchmark

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lock_core::{
    AcquireOutcome, BackendError, LeaseBackend, LeaseEvent, LeaseRequest, LockManager, Ownership,
    RetryPolicy,
};
use lock_memory::MemoryBackend;
use lock_redis::{r2d2, RedisBackend, RedlockBackend};
use lock_tests::RedisServer;
use parking_lot::Mutex;

const TTL: Duration = Duration::from_secs(30);

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let wanted = |row: &str| filters.is_empty() || filters.iter().any(|f| row.contains(f.as_str()));
    println!("{}", machine_line());
    let server = RedisServer::start();
    let url = server.url();
    println!(
        "redis-server {} on {url}; round trip (PING) p50 {:?}\n",
        server_version(&server),
        ping_p50(&server)
    );
    let mut redis_rate = None;
    if wanted("uncontended") {
        redis_rate = Some(uncontended(&server));
    }
    if wanted("memory") {
        memory(redis_rate);
    }
    if wanted("saturated") {
        saturated(&url);
    }
    if wanted("handoff") {
        handoff(&server);
    }
    if wanted("redlock") {
        redlock(&server);
    }
    if wanted("renewal") {
        renewal_at_scale(&url);
    }
}

fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_default();
    format!("machine: {cores} cores, {model}")
}

fn server_version(server: &RedisServer) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut server.connection())
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .to_owned()
}

fn ping_p50(server: &RedisServer) -> Duration {
    let mut connection = server.connection();
    let mut samples: Vec<Duration> = (0..2000)
        .map(|_| {
            let started = Instant::now();
            let _: String = redis::cmd("PING").query(&mut connection).unwrap();
            started.elapsed()
        })
        .collect();
    percentile(&mut samples, 0.5)
}

fn percentile(samples: &mut [Duration], quantile: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * quantile).round() as usize;
    samples.get(index).copied().unwrap_or_default()
}

/// Medians over paired rounds: each round measures every side once, back to back, and yields a
/// ratio to the first side (the baseline). The VM's speed drifts several-fold within minutes;
/// within one round it barely moves, so the median ratio is steady where best-of figures taken
/// minutes apart are not.
struct Paired {
    /// Median figure of each side, in the order given.
    medians: Vec<f64>,
    /// Median of each side's per-round ratio to the baseline (the baseline's is 1).
    ratios: Vec<f64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `rounds` rounds of `sides` (baseline first), alternating the order in which the sides
/// run from one round to the next.
fn paired(rounds: usize, sides: &mut [&mut dyn FnMut() -> f64]) -> Paired {
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for side in order {
            let figure = (sides[side])();
            figures[side].push(figure);
        }
    }
    let ratios = figures
        .iter()
        .map(|side| {
            median(
                side.iter()
                    .zip(&figures[0])
                    .map(|(figure, baseline)| figure / baseline)
                    .collect(),
            )
        })
        .collect();
    Paired {
        medians: figures.into_iter().map(median).collect(),
        ratios,
    }
}

/// Cycles per second over one run of `iterations` cycles.
fn rate(iterations: u64, mut cycle: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..iterations {
        cycle();
    }
    iterations as f64 / started.elapsed().as_secs_f64()
}

/// The raw client's lock: SET NX PX, then a compare-and-delete script.
struct RawLock {
    pool: r2d2::Pool<redis::Client>,
    unlock: redis::Script,
    /// Our acquire and release scripts, run by the raw client: what the server costs us.
    acquire: redis::Script,
    release: redis::Script,
}

impl RawLock {
    fn new(url: &str, connections: u32) -> RawLock {
        let pool = r2d2::Pool::builder()
            .max_size(connections)
            // No PING per checkout: the raw client gets the leanest pool.
            .test_on_check_out(false)
            .build(redis::Client::open(url).unwrap())
            .unwrap();
        let unlock = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        RawLock {
            pool,
            unlock,
            acquire: redis::Script::new(include_str!("../../lock-redis/src/scripts/acquire.lua")),
            release: redis::Script::new(include_str!("../../lock-redis/src/scripts/release.lua")),
        }
    }

    /// One cycle of our two scripts on the raw client (key prefix `raw:`, no subscriber).
    fn scripts_cycle(&self, key: &str) {
        let mut connection = self.pool.get().unwrap();
        let (lock, fence) = (format!("raw:{{{key}}}"), format!("raw:{{{key}}}:fence"));
        let acquired: Vec<i64> = self
            .acquire
            .key(&lock)
            .key(&fence)
            .arg("token")
            .arg(TTL.as_millis() as u64)
            .invoke(&mut *connection)
            .unwrap();
        assert_eq!(acquired.first(), Some(&1), "raw script lock was taken");
        let released: i64 = self
            .release
            .key(&lock)
            .arg("token")
            .arg("raw:released")
            .arg(key)
            .invoke(&mut *connection)
            .unwrap();
        assert_eq!(released, 1);
    }

    fn cycle(&self, key: &str, token: &str) {
        let mut connection = self.pool.get().unwrap();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query(&mut *connection)
            .unwrap();
        assert!(set.is_some(), "raw lock was taken");
        let deleted: i64 = self
            .unlock
            .key(key)
            .arg(token)
            .invoke(&mut *connection)
            .unwrap();
        assert_eq!(deleted, 1);
    }
}

fn ours(url: &str, connections: u32) -> LockManager {
    LockManager::new(
        RedisBackend::builder(url)
            .pool_size(connections)
            .build()
            .unwrap(),
    )
}

fn our_cycle(manager: &LockManager, key: &str) {
    let lease = manager
        .try_acquire(key, TTL)
        .unwrap()
        .expect("uncontended key");
    lease.release().unwrap();
}

/// The time the server spent executing the top-level `commands` (as `INFO commandstats` names
/// them) per cycle, over `cycles` cycles. Commands a script calls are inside its own time.
fn server_time_per_cycle(
    server: &RedisServer,
    commands: &[&str],
    cycles: u32,
    mut cycle: impl FnMut(),
) -> Duration {
    let mut connection = server.connection();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut connection)
        .unwrap();
    for _ in 0..cycles {
        cycle();
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut connection)
        .unwrap();
    let micros: u64 = stats
        .lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            if !commands.contains(&name) {
                return None;
            }
            fields
                .split(',')
                .find_map(|field| field.strip_prefix("usec="))?
                .parse::<u64>()
                .ok()
        })
        .sum();
    Duration::from_micros(micros) / cycles
}

fn uncontended(server: &RedisServer) -> f64 {
    let url = server.url();
    let url = url.as_str();
    let raw = RawLock::new(url, 1);
    let manager = ours(url, 1);
    let figures = paired(
        15,
        &mut [
            &mut || rate(300, || raw.cycle("raw:uncontended", "token")),
            &mut || rate(300, || our_cycle(&manager, "uncontended")),
            // Where the difference goes: the raw client running our two scripts (fence
            // counter, release announcement) instead of SET NX PX and compare-and-delete.
            &mut || rate(300, || raw.scripts_cycle("scripts")),
        ],
    );
    let (raw_rate, our_rate, scripts_rate) =
        (figures.medians[0], figures.medians[1], figures.medians[2]);
    let (ratio, scripts_ratio) = (figures.ratios[1], figures.ratios[2]);
    // The same split in the server's command time, which the VM's latency swings do not blur.
    const CYCLES: u32 = 3000;
    let raw_time = server_time_per_cycle(server, &["set", "evalsha"], CYCLES, || {
        raw.cycle("raw:uncontended", "token")
    });
    let our_time = server_time_per_cycle(server, &["evalsha", "eval"], CYCLES, || {
        our_cycle(&manager, "uncontended")
    });
    println!(
        "uncontended  acquire+release, 1 thread:   ours {our_rate:>8.0}/s  raw {raw_rate:>8.0}/s  ratio {ratio:.2} (target >= 0.95); raw client running our scripts {scripts_rate:>8.0}/s, ratio {scripts_ratio:.2}\n             server time in commands per cycle: ours {our_time:.1?}, raw {raw_time:.1?}"
    );
    our_rate
}

fn memory(redis_rate: Option<f64>) {
    let manager = LockManager::new(MemoryBackend::new());
    let rate = median(
        (0..5)
            .map(|_| rate(200_000, || our_cycle(&manager, "memory")))
            .collect(),
    );
    let versus = redis_rate.map_or(String::new(), |redis| {
        format!(", {:.0}x Redis", rate / redis)
    });
    println!("memory       acquire+release, 1 thread:   ours {rate:>8.0}/s{versus} (target >= 1,000,000/s and 50x)");
}

/// `threads` threads cycling over `keys` keys (each thread its own keys), for `duration`.
fn saturated_rate(threads: usize, duration: Duration, cycle: impl Fn(usize, u64) + Sync) -> f64 {
    let done = AtomicU64::new(0);
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (cycle, done, start) = (&cycle, &done, &start);
            scope.spawn(move || {
                start.wait();
                let started = Instant::now();
                let mut count = 0u64;
                while started.elapsed() < duration {
                    cycle(thread, count);
                    count += 1;
                }
                done.fetch_add(count, Ordering::Relaxed);
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

fn saturated(url: &str) {
    const THREADS: usize = 8;
    const KEYS: u64 = 64;
    let per_thread = KEYS / THREADS as u64;
    let raw = RawLock::new(url, THREADS as u32);
    let manager = ours(url, THREADS as u32);
    let duration = Duration::from_millis(500);
    let key = |thread: usize, n: u64| thread as u64 * per_thread + n % per_thread;
    let figures = paired(
        6,
        &mut [
            &mut || {
                saturated_rate(THREADS, duration, |thread, n| {
                    raw.cycle(&format!("raw:sat:{}", key(thread, n)), "token");
                })
            },
            &mut || {
                saturated_rate(THREADS, duration, |thread, n| {
                    our_cycle(&manager, &format!("sat:{}", key(thread, n)));
                })
            },
            &mut || {
                saturated_rate(THREADS, duration, |thread, n| {
                    raw.scripts_cycle(&format!("sat:{}", key(thread, n)));
                })
            },
        ],
    );
    let (raw_rate, our_rate, scripts_rate) =
        (figures.medians[0], figures.medians[1], figures.medians[2]);
    let (ratio, scripts_ratio) = (figures.ratios[1], figures.ratios[2]);
    println!(
        "saturated    8 threads, 64 keys, 8 conns:  ours {our_rate:>8.0}/s  raw {raw_rate:>8.0}/s  ratio {ratio:.2} (target >= 0.90); raw client running our scripts {scripts_rate:>8.0}/s, ratio {scripts_ratio:.2}"
    );
}

/// A backend that hides another's release notifications: the seed's retry-only waiting.
struct NoWakeups(RedisBackend);

impl LeaseBackend for NoWakeups {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        self.0.try_acquire(request, timeout)
    }
    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        self.0.renew_batch(requests, timeout)
    }
    fn release(
        &self,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        self.0.release(key, token, timeout)
    }
}

/// What a hand-off run measured.
struct Handoffs {
    /// From the start of each release to the next acquire, counting only releases that found a
    /// thread already waiting (the others measure the work outside, not the hand-off).
    gaps: Vec<Duration>,
    /// How long each release call took: one round trip, timed by the same threads at the same
    /// time as the gaps, which makes it the unit to count the gaps in (this VM's round trip
    /// drifts several-fold within minutes).
    releases: Vec<Duration>,
}

/// Threads looping on one key: acquire, hold 1 ms, release, 5 ms of work outside.
fn handoff_gaps(manager: &LockManager, threads: usize, rounds: usize, key: &str) -> Handoffs {
    let waiting = AtomicU64::new(0);
    let last_release: Mutex<Option<Instant>> = Mutex::new(None);
    let gaps: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    let releases: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..rounds {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let lease = manager
                        .acquire_timeout(key, TTL, Duration::from_secs(60))
                        .unwrap();
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    if let Some(released) = last_release.lock().take() {
                        gaps.lock().push(released.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    let started = Instant::now();
                    // A hand-off only if someone already waits as the release starts.
                    if waiting.load(Ordering::SeqCst) > 0 {
                        *last_release.lock() = Some(started);
                    }
                    lease.release().unwrap();
                    releases.lock().push(started.elapsed());
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
    });
    Handoffs {
        gaps: gaps.into_inner(),
        releases: releases.into_inner(),
    }
}

fn handoff(server: &RedisServer) {
    for threads in [4, 16] {
        let rounds = 1200 / threads;
        let ours = ours(&server.url(), threads as u32 + 2);
        let mut run = handoff_gaps(&ours, threads, rounds, &format!("handoff-{threads}"));
        let (p50, p99) = (
            percentile(&mut run.gaps, 0.5),
            percentile(&mut run.gaps, 0.99),
        );
        let rtt = percentile(&mut run.releases, 0.5);
        let seed = LockManager::builder(NoWakeups(
            RedisBackend::builder(&server.url())
                .pool_size(threads as u32 + 2)
                .build()
                .unwrap(),
        ))
        .retry(RetryPolicy::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .unwrap();
        let mut seed_run = handoff_gaps(
            &seed,
            threads,
            rounds.min(100),
            &format!("seed-handoff-{threads}"),
        );
        println!(
            "handoff      {threads:>2} threads, release->acquire: ours p50 {p50:>9.1?} ({:.1} round trips of {rtt:.1?}, a release's p50 in the same run) p99 {p99:>9.1?} | retry-every-10ms p50 {:>9.1?} p99 {:>9.1?} (target p50 < 3 RTT, p99 < 1 ms)",
            p50.as_secs_f64() / rtt.as_secs_f64(),
            percentile(&mut seed_run.gaps, 0.5),
            percentile(&mut seed_run.gaps, 0.99),
        );
    }
}

fn cycle_latencies(manager: &LockManager, key: &str, cycles: usize) -> Vec<Duration> {
    (0..cycles)
        .map(|_| {
            let started = Instant::now();
            our_cycle(manager, key);
            started.elapsed()
        })
        .collect()
}

fn redlock(single: &RedisServer) {
    let single_manager = ours(&single.url(), 1);
    for nodes in [3, 5] {
        let servers: Vec<RedisServer> = (0..nodes).map(|_| RedisServer::start()).collect();
        let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let manager = LockManager::new(RedlockBackend::connect(&urls).unwrap());
        let p50 = |manager: &LockManager, key: &str| {
            percentile(&mut cycle_latencies(manager, key, 200), 0.5).as_secs_f64()
        };
        let figures = paired(
            15,
            &mut [
                &mut || p50(&single_manager, "redlock-baseline"),
                &mut || p50(&manager, "redlock"),
            ],
        );
        let (single_p50, redlock_p50) = (figures.medians[0], figures.medians[1]);
        println!(
            "redlock      N={nodes} acquire+release p50:      {:>9.1?} vs one node {:>9.1?}  ratio {:.2} (target <= 1.5; {nodes} servers and the client share 2 cores)",
            Duration::from_secs_f64(redlock_p50),
            Duration::from_secs_f64(single_p50),
            figures.ratios[1],
        );
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Acquires `count` leases named `prefix:N` with 8 threads, each keeping its leases in a vector
/// sized up front (so that the memory measured is the leases', not vector growth); returns them
/// and how long it took.
fn acquire_many(
    manager: &LockManager,
    prefix: &str,
    count: usize,
) -> (Vec<Vec<lock_core::Lease>>, Duration) {
    const ACQUIRERS: usize = 8;
    let started = Instant::now();
    let leases = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ACQUIRERS)
            .map(|part| {
                scope.spawn(move || {
                    let mut leases = Vec::with_capacity(count / ACQUIRERS + 1);
                    for n in (part..count).step_by(ACQUIRERS) {
                        leases.push(
                            manager
                                .try_acquire(&format!("{prefix}:{n}"), TTL)
                                .unwrap()
                                .expect("free key"),
                        );
                    }
                    leases
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    });
    (leases, started.elapsed())
}

/// A manager whose hook records when each renewal completed.
fn recording_manager(url: &str, renew_fraction: f64) -> (LockManager, Arc<Mutex<Vec<Instant>>>) {
    let renewed_at: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let log = renewed_at.clone();
    let backend = RedisBackend::builder(url).pool_size(9).build().unwrap();
    let manager = LockManager::builder(backend)
        .renew_fraction(renew_fraction)
        .event_hook(move |event: &LeaseEvent<'_>| {
            if let LeaseEvent::Renewed { .. } = event {
                log.lock().push(Instant::now());
            }
        })
        .build()
        .unwrap();
    (manager, renewed_at)
}

fn renewal_at_scale(url: &str) {
    const LEASES: usize = 100_000;
    // 1. The default schedule: how late renewals run, and what a held lease costs.
    let (manager, renewed_at) = recording_manager(url, 1.0 / 3.0);
    let before = resident_bytes();
    let started = Instant::now();
    let (leases, acquired_in) = acquire_many(&manager, "scale", LEASES);
    let per_lease = resident_bytes().saturating_sub(before) as f64 / LEASES as f64;
    // Each lease is due a third of its validity after it was acquired; acquisitions were spread
    // evenly, so the i-th renewal is compared with the i-th due time.
    let validity = TTL - TTL / 100 - Duration::from_millis(2);
    let first_due = started + validity / 3;
    let deadline = first_due + acquired_in + Duration::from_secs(20);
    while renewed_at.lock().len() < LEASES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let renewals = renewed_at.lock().clone();
    let held = leases
        .iter()
        .flatten()
        .filter(|lease| lease.is_held())
        .count();
    let spread = acquired_in.as_secs_f64();
    let mut lateness: Vec<Duration> = renewals
        .iter()
        .enumerate()
        .map(|(i, at)| {
            let due = first_due + Duration::from_secs_f64(spread * i as f64 / LEASES as f64);
            at.saturating_duration_since(due)
        })
        .collect();
    let p50 = percentile(&mut lateness, 0.5);
    let p99 = percentile(&mut lateness, 0.99);
    drop(leases);
    drop(manager);

    // 2. Capacity: leases due every few milliseconds, far more often than any renewer can
    // serve; the renewer runs flat out, and the rate it sustains is its capacity.
    let (manager, renewed_at) = recording_manager(url, 0.0001);
    let (leases, _) = acquire_many(&manager, "capacity", LEASES);
    let window = Duration::from_secs(3);
    let counted_from = renewed_at.lock().len();
    std::thread::sleep(window);
    let capacity = (renewed_at.lock().len() - counted_from) as f64 / window.as_secs_f64();
    let still_held = leases
        .iter()
        .flatten()
        .filter(|lease| lease.is_held())
        .count();
    println!(
        "renewal      {LEASES} leases, TTL {TTL:?}: {} renewed on schedule, lateness p50 {p50:.1?} p99 {p99:.1?} (target p99 < {:?}), {held} held; renewer capacity {capacity:.0} renewals/s flat out, batches of 512 in one round trip each, 128 leases per script call (target >= 100,000/s), {still_held} held; {per_lease:.0} bytes per held lease (target < 300)",
        renewals.len(),
        TTL / 10,
    );
}
