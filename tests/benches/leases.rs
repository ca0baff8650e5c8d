//! The benchmark suite: our public API against the raw redis client, on the same servers, in
//! the same run, printed as ratios, with the CPUs pinned.
//!
//! `cargo bench -p lock-tests --bench leases` runs every row; name rows or placements to run
//! some: `cargo bench -p lock-tests --bench leases -- memory handoff split`. Rows: `uncontended`,
//! `saturated`, `handoff`, `redlock`, `renewal` (Redis, run once per placement), `memory` and
//! `cluster` (run once; `cluster` first, unpinned). Placements: `split` (every redis-server on one CPU, this process and all its
//! threads on another) and `same` (all on one CPU); a placement name only selects among the
//! Redis rows. The suite starts its own redis-server processes; see BENCHMARKS.md for the
//! figures and what they mean.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed setup aborts the benchmark

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lock_core::{Lease, LeaseEvent, LockManager};
use lock_memory::MemoryBackend;
use lock_redis::{r2d2, RedisBackend, RedlockBackend};
use lock_tests::{cpu, ClusterOptions, RedisCluster, RedisServer};
use parking_lot::Mutex;

const TTL: Duration = Duration::from_secs(30);

/// The hidden first argument that makes this binary one process of the hand-off row:
/// `--handoff-worker ours|raw URL KEY ROUNDS START_NANOS` (see [`handoff_worker`]).
const HANDOFF_WORKER: &str = "--handoff-worker";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(HANDOFF_WORKER) {
        handoff_worker(&args[1..]);
        return;
    }
    // `cargo bench` passes `--bench`; every other word names rows or placements.
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let (placement_words, row_words): (Vec<&str>, Vec<&str>) = words
        .iter()
        .partition(|word| PLACEMENT_NAMES.contains(word));
    let wanted = |row: &str| row_words.is_empty() || row_words.iter().any(|w| row.contains(w));

    let cpus = cpu::allowed_cpus().unwrap();
    assert!(
        cpus.len() >= 2,
        "the suite needs two CPUs to place the client apart from the servers; allowed: {cpus:?}"
    );
    let (server_cpu, bench_cpu) = (cpus[0], cpus[1]);
    let placements = [
        Placement {
            name: "split",
            server_cpu,
            bench_cpu,
        },
        Placement {
            name: "same",
            server_cpu,
            bench_cpu: server_cpu,
        },
    ];
    println!("{}", machine_line());

    let mut redis_same_rate = None;
    if REDIS_ROWS.iter().any(|row| wanted(row)) {
        let server = RedisServer::start();
        println!(
            "redis-server {} on {}",
            server_version(&server),
            server.url()
        );
        for placement in placements
            .iter()
            .filter(|p| placement_words.is_empty() || placement_words.contains(&p.name))
        {
            // Every manager, pool and thread of a table is made after this, on its CPU.
            placement.apply(&[&server]);
            println!(
                "\n== placement {}: {}; round trip (PING) p50 {:.1?}; load average {}",
                placement.name,
                placement.describe(),
                ping_p50(&server),
                load_average(),
            );
            if wanted("uncontended") {
                let rate = uncontended(&server, placement);
                if !placement.is_split() {
                    redis_same_rate = Some(rate);
                }
            }
            if wanted("candidates") && !placement.is_split() {
                candidates(&server);
            }
            if wanted("saturated") {
                saturated(&server.url(), placement);
            }
            if wanted("handoff") {
                handoff(&server.url(), placement);
            }
            if wanted("redlock") {
                redlock(&server, placement);
            }
            if wanted("renewal") {
                renewal_at_scale(&server);
            }
            if wanted("replicas") {
                replicas(placement);
            }
        }
    }
    if wanted("memory") {
        cpu::pin_process(std::process::id(), bench_cpu).unwrap();
        println!(
            "\n== memory backend: this process (all its threads) on CPU {bench_cpu}; load average {}",
            load_average()
        );
        memory(redis_same_rate);
    }

    if wanted("cluster") {
        // Last, so that it does not grow this process before the renewal row measures what a
        // lease costs. Unpinned: three masters and the client share the machine's CPUs as the
        // scheduler sees fit (threads made from now on inherit it).
        cpu::pin_process_to(std::process::id(), &cpus).unwrap();
        println!(
            "\n== Redis Cluster (3 masters + 3 replicas) against one server: unpinned; load average {}",
            load_average()
        );
        cluster();
    }
}

const PLACEMENT_NAMES: [&str; 2] = ["split", "same"];
const REDIS_ROWS: [&str; 7] = [
    "uncontended",
    "candidates",
    "saturated",
    "handoff",
    "redlock",
    "renewal",
    "replicas",
];

/// Where the redis-servers and this process (every thread of it) run. Threads and child
/// processes created after [`Placement::apply`] inherit its CPU.
struct Placement {
    name: &'static str,
    server_cpu: usize,
    bench_cpu: usize,
}

impl Placement {
    fn is_split(&self) -> bool {
        self.server_cpu != self.bench_cpu
    }

    /// Pins every thread of this process, and `servers`.
    fn apply(&self, servers: &[&RedisServer]) {
        cpu::pin_process(std::process::id(), self.bench_cpu).unwrap();
        for server in servers {
            server.pin_to_cpu(self.server_cpu);
        }
    }

    fn describe(&self) -> String {
        if self.is_split() {
            format!(
                "every redis-server on CPU {}, this process (all its threads) on CPU {}",
                self.server_cpu, self.bench_cpu
            )
        } else {
            format!(
                "every redis-server and this process (all its threads) on CPU {}",
                self.server_cpu
            )
        }
    }

    /// `target LABEL: met` (or `MISSED`) where the issue sets the target for this placement,
    /// `no target in PLACEMENT` elsewhere.
    fn target(&self, applies: bool, label: &str, met: bool) -> String {
        if applies {
            verdict(label, met)
        } else {
            format!("no target in {}", self.name)
        }
    }
}

fn verdict(label: &str, met: bool) -> String {
    format!("target {label}: {}", if met { "met" } else { "MISSED" })
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

/// The 1, 5 and 15 minute load averages: how busy the machine was around a table.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
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

/// Cycles per second over `duration` of cycles (a round trip is 10 times longer in `split`
/// than in `same`: a fixed duration keeps every side of a round equally long in both).
fn rate_for(duration: Duration, mut cycle: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut cycles = 0u64;
    while started.elapsed() < duration {
        cycle();
        cycles += 1;
    }
    cycles as f64 / started.elapsed().as_secs_f64()
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
        let unlock = redis::Script::new(COMPARE_AND_DELETE);
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
        assert_eq!(self.release_by_our_script(&mut connection, key, "token"), 1);
    }

    /// `release.lua` called with the keys and arguments `RedisBackend::release` gives it (prefix
    /// `raw:`): keep this in step with lock-redis's release script and its call in
    /// `backend.rs`.
    fn release_by_our_script(
        &self,
        connection: &mut redis::Connection,
        key: &str,
        token: &str,
    ) -> i64 {
        self.release
            .key(format!("raw:{{{key}}}"))
            .key(format!("raw:{{{key}}}:released"))
            .arg(token)
            .arg(10_000) // the marker's TTL in milliseconds, as the backend's default
            .arg("PUBLISH") // how a backend on one server announces the release
            .invoke(connection)
            .unwrap()
    }

    fn cycle(&self, key: &str, token: &str) {
        let mut connection = self.pool.get().unwrap();
        assert!(
            self.try_lock(&mut connection, key, token),
            "raw lock was taken"
        );
        assert!(self.compare_and_delete(&mut connection, key, token));
    }

    /// `SET key token NX PX ttl`: whether the lock was free.
    fn try_lock(&self, connection: &mut redis::Connection, key: &str, token: &str) -> bool {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query(connection)
            .unwrap();
        set.is_some()
    }

    /// Compare-and-delete: whether the token held the lock.
    fn compare_and_delete(
        &self,
        connection: &mut redis::Connection,
        key: &str,
        token: &str,
    ) -> bool {
        let deleted: i64 = self.unlock.key(key).arg(token).invoke(connection).unwrap();
        deleted == 1
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

/// The server's command time per cycle: what its slow log records with a threshold of zero.
#[derive(Default)]
struct ServerTime {
    /// Every command a client sent, but the measurement's own, per cycle.
    per_cycle: Duration,
    /// `(command, calls per cycle, time per cycle)`, the costliest first.
    by_command: Vec<(String, f64, Duration)>,
}

impl ServerTime {
    fn breakdown(&self) -> String {
        self.by_command
            .iter()
            .map(|(name, calls, time)| format!("{calls:.1} {name} {time:.1?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Entries the slow log keeps during a measurement: more than the cycles of one measurement log
/// (each command a script calls is an entry of its own).
const SLOWLOG_ENTRIES: usize = 50_000;

/// The time the server spent executing commands over `cycles` cycles, per cycle: every command
/// a client sent (whatever its name), but the measurement's own `SLOWLOG`.
///
/// Why the slow log and not `INFO commandstats`: commandstats also counts each command a script
/// calls, on its own line, while the script's own line already includes its time, so a sum over
/// every line counts the work inside scripts twice. The slow log (threshold 0) records the same
/// durations as commandstats, one entry per call, and tells a script's calls apart by their
/// client (the script's, with no address).
fn server_time_per_cycle(server: &RedisServer, cycles: u32, mut cycle: impl FnMut()) -> ServerTime {
    let mut connection = server.connection();
    server.log_every_command(SLOWLOG_ENTRIES);
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut connection)
        .unwrap();
    for _ in 0..cycles {
        cycle();
    }
    // (id, time, duration in µs, arguments, client address, client name)
    type Entry = (u64, u64, u64, Vec<Vec<u8>>, String, String);
    let entries: Vec<Entry> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(SLOWLOG_ENTRIES)
        .query(&mut connection)
        .unwrap();
    assert!(
        entries.len() < SLOWLOG_ENTRIES,
        "the slow log overflowed: measure fewer cycles"
    );
    // Back to the defaults: logging every command costs the server time.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(10_000)
        .arg("slowlog-max-len")
        .arg(128)
        .query(&mut connection)
        .unwrap();
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut connection)
        .unwrap();
    let mut totals: Vec<(String, u64, u64)> = Vec::new();
    for (_, _, micros, args, client, _) in entries {
        let name = args
            .first()
            .map(|name| String::from_utf8_lossy(name).to_lowercase())
            .unwrap_or_default();
        // A script's calls come from its own client, which has no address.
        if client.starts_with('?') || client.is_empty() || name == "slowlog" {
            continue;
        }
        match totals.iter_mut().find(|(known, _, _)| *known == name) {
            Some((_, calls, total)) => {
                *calls += 1;
                *total += micros;
            }
            None => totals.push((name, 1, micros)),
        }
    }
    let mut by_command: Vec<(String, f64, Duration)> = totals
        .into_iter()
        .map(|(name, calls, micros)| {
            (
                name,
                calls as f64 / f64::from(cycles),
                Duration::from_micros(micros) / cycles,
            )
        })
        .collect();
    by_command.sort_by_key(|(_, _, time)| std::cmp::Reverse(*time));
    ServerTime {
        per_cycle: by_command.iter().map(|(_, _, time)| *time).sum(),
        by_command,
    }
}

/// Acquire + release on one uncontended key, one thread: rates in paired rounds, then the
/// server's command time per cycle. Returns our rate.
fn uncontended(server: &RedisServer, placement: &Placement) -> f64 {
    let url = server.url();
    let url = url.as_str();
    let raw = RawLock::new(url, 1);
    let manager = ours(url, 1);
    let side = Duration::from_millis(100);
    let figures = paired(
        15,
        &mut [
            &mut || rate_for(side, || raw.cycle("raw:uncontended", "token")),
            &mut || rate_for(side, || our_cycle(&manager, "uncontended")),
            // Where the difference goes: the raw client running our two scripts (fence
            // counter, release announcement) instead of SET NX PX and compare-and-delete.
            &mut || rate_for(side, || raw.scripts_cycle("scripts")),
        ],
    );
    let (raw_rate, our_rate, scripts_rate) =
        (figures.medians[0], figures.medians[1], figures.medians[2]);
    let (ratio, scripts_ratio) = (figures.ratios[1], figures.ratios[2]);
    // The same split in the server's command time, which the VM's latency swings do not blur.
    const CYCLES: u32 = 1000;
    let (mut raw_time, mut our_time) = (ServerTime::default(), ServerTime::default());
    let times = paired(
        5,
        &mut [
            &mut || {
                raw_time =
                    server_time_per_cycle(server, CYCLES, || raw.cycle("raw:uncontended", "token"));
                raw_time.per_cycle.as_secs_f64()
            },
            &mut || {
                our_time =
                    server_time_per_cycle(server, CYCLES, || our_cycle(&manager, "uncontended"));
                our_time.per_cycle.as_secs_f64()
            },
        ],
    );
    // What the server process pays in all, requests and replies included: its CPU time.
    // About a second of the server's CPU per side in `same`; in `split` the round trips make
    // the cycles slower, and each costs the server more (a wake-up per request).
    let cpu_cycles: u32 = if placement.is_split() { 10_000 } else { 40_000 };
    let cpu = paired(
        3,
        &mut [
            &mut || {
                server_cpu_per_cycle(server, cpu_cycles, || {
                    raw.cycle("raw:uncontended", "token");
                })
            },
            &mut || server_cpu_per_cycle(server, cpu_cycles, || our_cycle(&manager, "uncontended")),
        ],
    );
    let (target, label) = if placement.is_split() {
        (0.95, ">= 0.95 in split")
    } else {
        (0.80, ">= 0.80 in same (CPU cost)")
    };
    println!(
        "uncontended  acquire+release, 1 thread:   ours {our_rate:>8.0}/s  raw {raw_rate:>8.0}/s  ratio {ratio:.2} ({}); raw client running our scripts {scripts_rate:>8.0}/s, ratio {scripts_ratio:.2}",
        verdict(label, ratio >= target),
    );
    println!(
        "             server time per cycle (slow log, every command sent): ours {:.1?}, raw {:.1?}, ours/raw {:.2} ({}; medians of 5 paired rounds of {CYCLES} cycles)\n             ours: {}\n             raw:  {}",
        Duration::from_secs_f64(times.medians[1]),
        Duration::from_secs_f64(times.medians[0]),
        times.ratios[1],
        verdict("<= 1.5", times.ratios[1] <= 1.5),
        our_time.breakdown(),
        raw_time.breakdown(),
    );
    println!(
        "             server CPU per cycle (utime + stime of redis-server: commands, reading requests, writing replies): ours {:.1?}, raw {:.1?}, ours/raw {:.2} (medians of 3 paired rounds of {cpu_cycles} cycles)",
        Duration::from_secs_f64(cpu.medians[1]),
        Duration::from_secs_f64(cpu.medians[0]),
        cpu.ratios[1],
    );
    our_rate
}

/// The CPU time of the server's process per cycle, over `cycles` cycles (`/proc` counts it in
/// hundredths of a second: measure enough cycles for that to be fine).
fn server_cpu_per_cycle(server: &RedisServer, cycles: u32, mut cycle: impl FnMut()) -> f64 {
    let before = cpu_seconds(server.pid());
    for _ in 0..cycles {
        cycle();
    }
    (cpu_seconds(server.pid()) - before) / f64::from(cycles)
}

/// The raw client's release: delete the key if the token holds it.
const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// One way to take and release a fenced lock, measured by [`candidates`].
struct Candidate {
    name: &'static str,
    /// What it gives up against ours.
    gives_up: &'static str,
    /// The commands the client sends itself (commandstats counts a script's or a transaction's
    /// inner commands on their own lines too: only these are summed).
    sent: &'static [&'static str],
    acquire: Acquire,
    release: Release,
}

enum Acquire {
    /// `SET key token NX PX ttl`: no fence.
    SetNx,
    /// `acquire.lua`.
    Script,
    /// `MULTI`, `SET key token NX GET PX ttl`, `INCR counter`, `TIME`, `EXEC`: the client would
    /// take `max(INCR, TIME)` as the fence.
    Transaction,
}

enum Release {
    /// `release.lua`: marker and announcement.
    Script,
    /// GET, DEL and the announcement, without the marker.
    Unmarked,
    /// Compare-and-delete.
    CompareAndDelete,
}

/// The "fewest server microseconds per cycle that keep every guarantee": every
/// candidate's server cost per acquire + release, against the raw client's, and what each gives
/// up. Run in `same` only (in `split` the server's CPU is mostly its wake-ups).
fn candidates(server: &RedisServer) {
    const CYCLES: u32 = 20_000;
    let candidates = [
        Candidate {
            name: "raw: SET NX PX + compare-and-delete",
            gives_up: "fences, waking waiters, knowing a retried release",
            sent: &["set", "evalsha"],
            acquire: Acquire::SetNx,
            release: Release::CompareAndDelete,
        },
        Candidate {
            name: "ours: acquire.lua + release.lua",
            gives_up: "nothing",
            sent: &["evalsha"],
            acquire: Acquire::Script,
            release: Release::Script,
        },
        Candidate {
            name: "acquire.lua + release without marker",
            gives_up: "knowing that a retried release succeeded",
            sent: &["evalsha"],
            acquire: Acquire::Script,
            release: Release::Unmarked,
        },
        Candidate {
            name: "acquire.lua + compare-and-delete",
            gives_up: "that, and waking waiters on release",
            sent: &["evalsha"],
            acquire: Acquire::Script,
            release: Release::CompareAndDelete,
        },
        Candidate {
            name: "MULTI SET NX GET PX, INCR, TIME + release.lua",
            gives_up: "fence order across a server clock that steps back (the counter no longer keeps the highest fence)",
            sent: &["multi", "exec", "evalsha"],
            acquire: Acquire::Transaction,
            release: Release::Script,
        },
        Candidate {
            name: "MULTI SET NX GET PX, INCR, TIME + compare-and-delete",
            gives_up: "all of the above",
            sent: &["multi", "exec", "evalsha"],
            acquire: Acquire::Transaction,
            release: Release::CompareAndDelete,
        },
    ];
    let acquire = redis::Script::new(include_str!("../../lock-redis/src/scripts/acquire.lua"));
    let release = redis::Script::new(include_str!("../../lock-redis/src/scripts/release.lua"));
    let unmarked = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) redis.pcall('PUBLISH', KEYS[1], '') return 1 end return 0",
    );
    let unlock = redis::Script::new(COMPARE_AND_DELETE);
    let (lock, counter, marker) = ("cand:{k}", "cand:{k}:fence", "cand:{k}:released");
    let token = "0123456789abcdef0123456789abcdef";
    let ttl = TTL.as_millis() as u64;
    let mut connection = server.connection();
    let cycle = |candidate: &Candidate, connection: &mut redis::Connection| {
        match candidate.acquire {
            Acquire::SetNx => {
                let set: Option<String> = redis::cmd("SET")
                    .arg(lock)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query(connection)
                    .unwrap();
                assert!(set.is_some());
            }
            Acquire::Script => {
                let granted: Vec<i64> = acquire
                    .key(lock)
                    .key(counter)
                    .arg(token)
                    .arg(ttl)
                    .invoke(connection)
                    .unwrap();
                assert_eq!(granted.first(), Some(&1));
            }
            Acquire::Transaction => {
                let (holder, _fence, _time): (Option<String>, u64, (u64, u64)) = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(lock)
                    .arg(token)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ttl)
                    .cmd("INCR")
                    .arg(counter)
                    .cmd("TIME")
                    .query(connection)
                    .unwrap();
                assert!(holder.is_none());
            }
        }
        let released: i64 = match candidate.release {
            Release::Script => release
                .key(lock)
                .key(marker)
                .arg(token)
                .arg(10_000)
                .arg("PUBLISH")
                .invoke(connection),
            Release::Unmarked => unmarked.key(lock).arg(token).invoke(connection),
            Release::CompareAndDelete => unlock.key(lock).arg(token).invoke(connection),
        }
        .unwrap();
        assert_eq!(released, 1);
    };
    // Each script cached, each candidate warm.
    for candidate in &candidates {
        for _ in 0..100 {
            cycle(candidate, &mut connection);
        }
    }
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> =
        candidates.iter().map(|_| Default::default()).collect();
    for _round in 0..3 {
        for (candidate, (commands, cpu)) in candidates.iter().zip(&mut figures) {
            let () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query(&mut connection)
                .unwrap();
            let per_cycle =
                server_cpu_per_cycle(server, CYCLES, || cycle(candidate, &mut connection));
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut connection)
                .unwrap();
            commands.push(sent_usec(&stats, candidate.sent) / f64::from(CYCLES));
            cpu.push(per_cycle);
        }
    }
    let medians: Vec<(f64, f64)> = figures
        .into_iter()
        .map(|(commands, cpu)| (median(commands), median(cpu)))
        .collect();
    let (raw_commands, raw_cpu) = medians[0];
    println!("candidates   server cost per acquire + release, one connection, medians of 3 rounds of {CYCLES} cycles: command time (INFO commandstats, the commands sent) and the server's CPU (utime + stime)");
    for (candidate, (commands, cpu)) in candidates.iter().zip(&medians) {
        println!(
            "             {:<52} commands {:>5.2}µs ({:.2}x raw)  CPU {:>5.1}µs ({:.2}x raw)  gives up: {}",
            candidate.name,
            commands,
            commands / raw_commands,
            cpu * 1e6,
            cpu / raw_cpu,
            candidate.gives_up,
        );
    }
}

/// The microseconds `INFO commandstats` counts for the commands named `sent`.
fn sent_usec(stats: &str, sent: &[&str]) -> f64 {
    stats
        .lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            if !sent.contains(&name) {
                return None;
            }
            let usec = fields
                .split(',')
                .find_map(|field| field.strip_prefix("usec="))?;
            usec.parse::<f64>().ok()
        })
        .sum()
}

fn memory(redis_same_rate: Option<f64>) {
    let manager = LockManager::new(MemoryBackend::new());
    let rate = median(
        (0..5)
            .map(|_| rate(200_000, || our_cycle(&manager, "memory")))
            .collect(),
    );
    let versus = match redis_same_rate {
        Some(redis) => format!(
            "{:.0}x Redis uncontended in same ({redis:.0}/s; {})",
            rate / redis,
            verdict(">= 100x", rate / redis >= 100.0)
        ),
        None => "no Redis figure in same to compare with (run the `uncontended` row in `same` too)"
            .to_owned(),
    };
    println!(
        "memory       acquire+release, 1 thread:   ours {rate:>8.0}/s ({}); {versus}",
        verdict(">= 2,000,000/s", rate >= 2_000_000.0)
    );
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

fn saturated(url: &str, placement: &Placement) {
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
        "saturated    8 threads, 64 keys, 8 conns:  ours {our_rate:>8.0}/s  raw {raw_rate:>8.0}/s  ratio {ratio:.2} ({}); raw client running our scripts {scripts_rate:>8.0}/s, ratio {scripts_ratio:.2}",
        placement.target(placement.is_split(), ">= 0.95", ratio >= 0.95),
    );
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: one clock for every process of the machine, so
/// the hand-off workers' timelines can be merged.
fn monotonic_nanos() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// A lock the hand-off row takes turns on.
trait HandoffLock: Sync {
    type Held;
    /// Blocks until `key` is ours.
    fn acquire(&self, key: &str) -> Self::Held;
    fn release(&self, key: &str, held: Self::Held);
}

impl HandoffLock for LockManager {
    type Held = Lease;
    fn acquire(&self, key: &str) -> Lease {
        self.acquire_timeout(key, TTL, Duration::from_secs(60))
            .unwrap()
    }
    fn release(&self, _key: &str, lease: Lease) {
        lease.release().unwrap();
    }
}

/// The baseline: the raw client retrying `SET NX PX` every millisecond, releasing with a
/// compare-and-delete script.
struct RawPoller(RawLock);

impl HandoffLock for RawPoller {
    type Held = String;
    fn acquire(&self, key: &str) -> String {
        let token = format!("{:016x}", fastrand::u64(..));
        let mut connection = self.0.pool.get().unwrap();
        while !self.0.try_lock(&mut connection, key, &token) {
            std::thread::sleep(Duration::from_millis(1));
        }
        token
    }
    fn release(&self, key: &str, token: String) {
        let mut connection = self.0.pool.get().unwrap();
        assert!(self.0.compare_and_delete(&mut connection, key, &token));
    }
}

/// One turn of a hand-off worker, in [`monotonic_nanos`].
#[derive(Clone, Copy, Debug)]
struct Turn {
    /// When the worker started to acquire.
    wait_from: u64,
    /// When the acquire returned.
    acquired: u64,
    /// When the worker started to release.
    release_from: u64,
    /// When the release returned.
    released: u64,
}

impl Turn {
    fn to_line(self) -> String {
        format!(
            "turn {} {} {} {}",
            self.wait_from, self.acquired, self.release_from, self.released
        )
    }

    fn from_line(line: &str) -> Option<Turn> {
        let mut fields = line.strip_prefix("turn ")?.split(' ').map(str::parse);
        let mut next = || fields.next()?.ok();
        Some(Turn {
            wait_from: next()?,
            acquired: next()?,
            release_from: next()?,
            released: next()?,
        })
    }
}

/// The hand-off loop: acquire, hold 1 ms, release, 5 ms of work outside, `rounds` times.
fn handoff_turns<L: HandoffLock>(lock: &L, key: &str, rounds: usize) -> Vec<Turn> {
    (0..rounds)
        .map(|_| {
            let wait_from = monotonic_nanos();
            let held = lock.acquire(key);
            let acquired = monotonic_nanos();
            std::thread::sleep(Duration::from_millis(1));
            let release_from = monotonic_nanos();
            lock.release(key, held);
            let released = monotonic_nanos();
            std::thread::sleep(Duration::from_millis(5));
            Turn {
                wait_from,
                acquired,
                release_from,
                released,
            }
        })
        .collect()
}

/// What a hand-off run measured.
struct Handoffs {
    /// From the start of each release to the next acquire, counting only releases that found
    /// another worker already waiting (the others measure the work outside, not the hand-off).
    gaps: Vec<Duration>,
    /// How long each release call took: one round trip, timed by the same workers at the same
    /// time as the gaps, which makes it the unit to count the gaps in.
    releases: Vec<Duration>,
}

/// Merges the workers' timelines (one `Vec` per worker) into hand-off gaps.
fn handoffs(workers: &[Vec<Turn>]) -> Handoffs {
    let mut acquisitions: Vec<u64> = workers.iter().flatten().map(|t| t.acquired).collect();
    acquisitions.sort_unstable();
    let mut gaps = Vec::new();
    let mut releases = Vec::new();
    for (worker, turns) in workers.iter().enumerate() {
        for turn in turns {
            releases.push(Duration::from_nanos(turn.released - turn.release_from));
            let at = turn.release_from;
            let someone_waits = workers
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != worker)
                .flat_map(|(_, turns)| turns)
                .any(|t| t.wait_from <= at && at < t.acquired);
            let next = acquisitions.get(acquisitions.partition_point(|&a| a <= at));
            if let (true, Some(next)) = (someone_waits, next) {
                gaps.push(Duration::from_nanos(next - at));
            }
        }
    }
    Handoffs { gaps, releases }
}

/// `threads` threads of this process taking turns on `key`.
fn handoff_threads<L: HandoffLock>(lock: &L, threads: usize, rounds: usize, key: &str) -> Handoffs {
    let workers: Vec<Vec<Turn>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| handoff_turns(lock, key, rounds)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    handoffs(&workers)
}

/// `processes` copies of this binary taking turns on `key` (`mode` `ours` or `raw`); they
/// inherit this process's CPU.
fn handoff_processes(
    url: &str,
    mode: &str,
    processes: usize,
    rounds: usize,
    key: &str,
) -> Handoffs {
    let exe = std::env::current_exe().unwrap();
    // Every worker starts its first turn at the same moment, once all have started and connected.
    let start_at = monotonic_nanos() + 500_000_000;
    let children: Vec<_> = (0..processes)
        .map(|_| {
            Command::new(&exe)
                .args([HANDOFF_WORKER, mode, url, key])
                .arg(rounds.to_string())
                .arg(start_at.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let workers: Vec<Vec<Turn>> = children
        .into_iter()
        .map(|mut child| {
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let turns: Vec<Turn> = stdout
                .lines()
                .map(Result::unwrap)
                .filter_map(|line| Turn::from_line(&line))
                .collect();
            assert!(child.wait().unwrap().success(), "a hand-off worker failed");
            assert_eq!(turns.len(), rounds, "a hand-off worker's turns");
            turns
        })
        .collect();
    handoffs(&workers)
}

/// One process of [`handoff_processes`]: `ours|raw URL KEY ROUNDS START_NANOS`; prints one
/// [`Turn`] line per turn.
fn handoff_worker(args: &[String]) {
    let [mode, url, key, rounds, start_at] = args else {
        panic!("usage: {HANDOFF_WORKER} ours|raw URL KEY ROUNDS START_NANOS, got {args:?}");
    };
    let rounds: usize = rounds.parse().unwrap();
    let start_at: u64 = start_at.parse().unwrap();
    let wait_for_start = || {
        let now = monotonic_nanos();
        std::thread::sleep(Duration::from_nanos(start_at.saturating_sub(now)));
    };
    let turns = match mode.as_str() {
        "ours" => {
            let manager = ours(url, 2);
            wait_for_start();
            handoff_turns(&manager, key, rounds)
        }
        "raw" => {
            let poller = RawPoller(RawLock::new(url, 1));
            wait_for_start();
            handoff_turns(&poller, key, rounds)
        }
        _ => panic!("unknown hand-off worker mode {mode:?}"),
    };
    let lines: Vec<String> = turns.into_iter().map(Turn::to_line).collect();
    println!("{}", lines.join("\n"));
}

/// Prints one hand-off line: ours against the raw 1 ms poller, measured in the same run.
fn print_handoff(placement: &Placement, workers: &str, mut ours: Handoffs, mut raw: Handoffs) {
    let (p50, p99) = (
        percentile(&mut ours.gaps, 0.5),
        percentile(&mut ours.gaps, 0.99),
    );
    let rtt = percentile(&mut ours.releases, 0.5);
    let (raw_p50, raw_p99) = (
        percentile(&mut raw.gaps, 0.5),
        percentile(&mut raw.gaps, 0.99),
    );
    let round_trips = p50.as_secs_f64() / rtt.as_secs_f64();
    let targets = if placement.is_split() {
        format!(
            "{}; {}",
            verdict("p50 < 3 RTT", round_trips < 3.0),
            verdict("p99 <= poller's p99", p99 <= raw_p99)
        )
    } else {
        format!("no target in {}", placement.name)
    };
    println!(
        "handoff      {workers:<13} release->acquire: ours p50 {p50:>9.1?} ({round_trips:.1} round trips of {rtt:.1?}, a release's p50 in the same run) p99 {p99:>9.1?} ({} gaps) | raw 1 ms poller p50 {raw_p50:>9.1?} p99 {raw_p99:>9.1?} ({} gaps) ({targets})",
        ours.gaps.len(),
        raw.gaps.len(),
    );
}

fn handoff(url: &str, placement: &Placement) {
    const TURNS: usize = 1200;
    for threads in [4, 16] {
        let rounds = TURNS / threads;
        let manager = ours(url, threads as u32 + 2);
        let our_run = handoff_threads(&manager, threads, rounds, &format!("handoff-{threads}"));
        let poller = RawPoller(RawLock::new(url, threads as u32));
        let raw_run = handoff_threads(&poller, threads, rounds, &format!("raw:handoff-{threads}"));
        print_handoff(
            placement,
            &format!("{threads:>2} threads,"),
            our_run,
            raw_run,
        );
    }
    const PROCESSES: usize = 4;
    let rounds = TURNS / PROCESSES;
    let our_run = handoff_processes(url, "ours", PROCESSES, rounds, "handoff-processes");
    let raw_run = handoff_processes(url, "raw", PROCESSES, rounds, "raw:handoff-processes");
    print_handoff(placement, " 4 processes,", our_run, raw_run);
}

/// What `min_replicas(1, ..)` costs an acquire: acquire+release p50 on a master with one
/// replica (both on the servers' CPU), with and without waiting for the replica's
/// acknowledgement, in paired rounds.
fn replicas(placement: &Placement) {
    let master = RedisServer::start();
    let replica = RedisServer::start();
    replica.replicate(master.addr());
    placement.apply(&[&master, &replica]);
    let plain = ours(&master.url(), 1);
    let waiting = LockManager::new(
        RedisBackend::builder(&master.url())
            .pool_size(1)
            .min_replicas(1, Duration::from_millis(500))
            .build()
            .unwrap(),
    );
    // The replica's link comes up a moment before it acknowledges writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting.try_acquire("replicas-probe", TTL).is_err() {
        assert!(Instant::now() < deadline, "the replica never acknowledged");
    }
    let p50 = |manager: &LockManager, key: &str| {
        percentile(&mut cycle_latencies(manager, key, 200), 0.5).as_secs_f64()
    };
    let figures = paired(
        9,
        &mut [&mut || p50(&plain, "replicas-plain"), &mut || {
            p50(&waiting, "replicas-waiting")
        }],
    );
    println!(
        "replicas     acquire+release p50, min_replicas(1): {:>9.1?} vs without {:>9.1?}  ratio {:.2} (no target: the cost of WAIT)",
        Duration::from_secs_f64(figures.medians[1]),
        Duration::from_secs_f64(figures.medians[0]),
        figures.ratios[1],
    );
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

fn redlock(single: &RedisServer, placement: &Placement) {
    let single_manager = ours(&single.url(), 1);
    for nodes in [3, 5] {
        let servers: Vec<RedisServer> = (0..nodes).map(|_| RedisServer::start()).collect();
        for server in &servers {
            server.pin_to_cpu(placement.server_cpu);
        }
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
        let ratio = figures.ratios[1];
        // What the fan-out through the nodes' worker threads costs this process: thread
        // switches and CPU per cycle, against one node's.
        let switches = |manager: &LockManager, key: &str| {
            const CYCLES: usize = 1000;
            let before = (context_switches(), cpu_seconds(std::process::id()));
            cycle_latencies(manager, key, CYCLES);
            let after = (context_switches(), cpu_seconds(std::process::id()));
            (
                (after.0 - before.0) as f64 / CYCLES as f64,
                Duration::from_secs_f64((after.1 - before.1) / CYCLES as f64),
            )
        };
        let (one_switches, one_cpu) = switches(&single_manager, "redlock-baseline");
        let (our_switches, our_cpu) = switches(&manager, "redlock");
        println!(
            "redlock      N={nodes} acquire+release p50:      {:>9.1?} vs one node {:>9.1?}  ratio {ratio:.2} ({}); per cycle, this process: {our_switches:.1} thread switches and {our_cpu:.1?} of CPU, against {one_switches:.1} and {one_cpu:.1?} for one node",
            Duration::from_secs_f64(redlock_p50),
            Duration::from_secs_f64(single_p50),
            placement.target(placement.is_split(), "<= 1.5", ratio <= 1.5),
        );
    }
}

/// Thread switches (voluntary and not) of every thread of this process so far.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
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

/// How many threads acquire (and release) the leases of the renewal row.
const ACQUIRERS: usize = 8;

/// Acquires `count` leases named `prefix:N` with [`ACQUIRERS`] threads, each keeping its leases
/// in a vector sized up front (so that the memory measured is the leases', not vector growth);
/// returns them and how long it took.
fn acquire_many(manager: &LockManager, prefix: &str, count: usize) -> (Vec<Vec<Lease>>, Duration) {
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

/// Releases (drops) the leases of [`acquire_many`], each part on its own thread.
fn release_many(leases: Vec<Vec<Lease>>) {
    std::thread::scope(|scope| {
        for part in leases {
            scope.spawn(move || drop(part));
        }
    });
}

fn held(leases: &[Vec<Lease>]) -> usize {
    leases
        .iter()
        .flatten()
        .filter(|lease| lease.is_held())
        .count()
}

/// Deletes what `count` released leases `prefix:N` leave on the server: each one's release
/// marker (which would otherwise expire, 100,000 at once, during a later measurement) and
/// fence counter. The key layout is the backend's with its default prefix (`lock:{KEY}:released`,
/// `lock:{KEY}:fence`).
fn delete_leftovers(url: &str, prefix: &str, count: usize) {
    let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
    for part in (0..count).collect::<Vec<_>>().chunks(500) {
        let mut command = redis::cmd("DEL");
        for n in part {
            command
                .arg(format!("lock:{{{prefix}:{n}}}:released"))
                .arg(format!("lock:{{{prefix}:{n}}}:fence"));
        }
        let _: i64 = command.query(&mut connection).unwrap();
    }
}

/// A manager whose hook records when each renewal completed.
fn recording_manager(url: &str, renew_fraction: f64) -> (LockManager, Arc<Mutex<Vec<Instant>>>) {
    let renewed_at: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let log = renewed_at.clone();
    let manager = renewing_manager(url, renew_fraction)
        .event_hook(move |event: &LeaseEvent<'_>| {
            if let LeaseEvent::Renewed { .. } = event {
                log.lock().push(Instant::now());
            }
        })
        .build()
        .unwrap();
    (manager, renewed_at)
}

/// A manager for the renewal rows, with a pool for [`ACQUIRERS`] threads, renewing at
/// `renew_fraction` of the TTL. The capacity measurements add no hook: they count renewals
/// with [`LockManager::stats`], which the manager keeps anyway.
fn renewing_manager(url: &str, renew_fraction: f64) -> lock_core::LockManagerBuilder {
    let backend = RedisBackend::builder(url)
        .pool_size(ACQUIRERS as u32 + 1)
        .build()
        .unwrap();
    LockManager::builder(backend).renew_fraction(renew_fraction)
}

/// Renewals `manager` has made so far.
fn renewals_made(manager: &LockManager) -> u64 {
    manager.stats().renewals.ok
}

/// The renewal baseline: the raw client renewing `count` keys of its own with `renew.lua`,
/// flat out, as our renewer does: batches of [`RAW_BATCH`] keys, one pipelined round trip
/// each, [`RAW_CHUNK`] keys per script call.
struct RawRenewals {
    connection: redis::Connection,
    script: redis::Script,
    keys: Vec<String>,
    token: &'static str,
}

const RAW_BATCH: usize = 512;
const RAW_CHUNK: usize = 128;

/// How the raw client's keys are made.
#[derive(Clone, Copy)]
enum RawKeys {
    /// As our leases' keys: named `lock:{rawcap:N}`, taken with our `acquire.lua` (which also
    /// writes a fence counter per key) by as many threads as take ours, with a 32-digit token:
    /// the same renewals as ours, on keys the server laid out in memory as it lays out ours.
    AsOurs,
    /// `raw:{renew:N}`, set by plain `SET`s in a tight pipeline, with the token `token`: the
    /// server packs them densely in memory, and renews them faster (a cost of memory layout,
    /// not of any client: shown for reference).
    Plain,
}

impl RawRenewals {
    /// Makes `count` keys with the TTL as `shape` says, and loads the script.
    fn new(url: &str, count: usize, shape: RawKeys) -> RawRenewals {
        let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
        let acquire = redis::Script::new(include_str!("../../lock-redis/src/scripts/acquire.lua"));
        acquire.load(&mut connection).unwrap();
        let (name, token) = match shape {
            RawKeys::AsOurs => ("lock:{rawcap:", "0123456789abcdef0123456789abcdef"),
            RawKeys::Plain => ("raw:{renew:", "token"),
        };
        let keys: Vec<String> = (0..count).map(|n| format!("{name}{n}}}")).collect();
        let ttl = TTL.as_millis() as u64;
        match shape {
            // As `acquire_many` takes ours: one script call (one round trip) per key, from
            // [`ACQUIRERS`] threads at once, so the server interleaves them alike.
            RawKeys::AsOurs => std::thread::scope(|scope| {
                for part in 0..ACQUIRERS {
                    let (keys, acquire) = (&keys, &acquire);
                    scope.spawn(move || {
                        let mut connection =
                            redis::Client::open(url).unwrap().get_connection().unwrap();
                        for key in keys.iter().skip(part).step_by(ACQUIRERS) {
                            let _: redis::Value = redis::cmd("EVALSHA")
                                .arg(acquire.get_hash())
                                .arg(2)
                                .arg(key)
                                .arg(format!("{key}:fence"))
                                .arg(token)
                                .arg(ttl)
                                .query(&mut connection)
                                .unwrap();
                        }
                    });
                }
            }),
            RawKeys::Plain => {
                for chunk in keys.chunks(1000) {
                    let mut pipe = redis::pipe();
                    for key in chunk {
                        pipe.cmd("SET")
                            .arg(key)
                            .arg(token)
                            .arg("PX")
                            .arg(ttl)
                            .ignore();
                    }
                    let () = pipe.query(&mut connection).unwrap();
                }
            }
        }
        let script = redis::Script::new(include_str!("../../lock-redis/src/scripts/renew.lua"));
        script.load(&mut connection).unwrap();
        RawRenewals {
            connection,
            script,
            keys,
            token,
        }
    }

    /// Renewals per second over `window`, going round the keys.
    fn rate(&mut self, window: Duration) -> f64 {
        let ttl = TTL.as_millis().to_string();
        let mut renewed = 0usize;
        let started = Instant::now();
        for batch in self.keys.chunks(RAW_BATCH).cycle() {
            if started.elapsed() >= window {
                break;
            }
            let mut pipe = redis::pipe();
            for chunk in batch.chunks(RAW_CHUNK) {
                // renew.lua's arguments: a key, its token and the TTL, for each key.
                let command = pipe.cmd("EVALSHA").arg(self.script.get_hash()).arg(0);
                for key in chunk {
                    command.arg(key).arg(self.token).arg(&ttl);
                }
            }
            let replies: Vec<Vec<i64>> = pipe.query(&mut self.connection).unwrap();
            renewed += replies
                .iter()
                .flatten()
                .filter(|&&reply| reply == 1)
                .count();
        }
        renewed as f64 / started.elapsed().as_secs_f64()
    }

    /// Deletes the keys, and their fence counters if any.
    fn delete_keys(mut self) {
        for chunk in self.keys.chunks(1000) {
            let counters: Vec<String> = chunk.iter().map(|key| format!("{key}:fence")).collect();
            let _: i64 = redis::cmd("DEL")
                .arg(chunk)
                .arg(counters)
                .query(&mut self.connection)
                .unwrap();
        }
    }
}

/// CPU time (user + system, every thread) process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends at the last ')'): utime and stime are the
    // 12th and 13th, in clock ticks of 1/100 s on Linux.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// How many scripts (`EVALSHA` and `EVAL`) the server has run since its statistics were reset.
fn script_calls(server: &RedisServer) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.connection())
        .unwrap();
    stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// How busy the `servers` (together) and this process were while `work` ran, each as a share
/// of one CPU: which side of a flat-out run is the bottleneck.
fn cpu_use<T>(servers: &[&RedisServer], work: impl FnOnce() -> T) -> (T, CpuUse) {
    let pids: Vec<u32> = servers.iter().map(|server| server.pid()).collect();
    let servers_cpu = || pids.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>();
    let me = std::process::id();
    let before = (servers_cpu(), cpu_seconds(me));
    let started = Instant::now();
    let result = work();
    let elapsed = started.elapsed().as_secs_f64();
    let after = (servers_cpu(), cpu_seconds(me));
    (
        result,
        CpuUse {
            server: (after.0 - before.0) / elapsed,
            bench: (after.1 - before.1) / elapsed,
        },
    )
}

/// Shares of one CPU, from [`cpu_use`].
#[derive(Clone, Copy)]
struct CpuUse {
    server: f64,
    bench: f64,
}

impl CpuUse {
    /// CPU time per operation at `rate` operations per second, and the shares of a CPU.
    fn per_operation(&self, rate: f64) -> String {
        let micros = |share: f64| Duration::from_secs_f64(share / rate);
        format!(
            "server {:.1?} + this process {:.1?} ({:.0}% + {:.0}% of a CPU)",
            micros(self.server),
            micros(self.bench),
            self.server * 100.0,
            self.bench * 100.0
        )
    }
}

fn renewal_at_scale(server: &RedisServer) {
    const LEASES: usize = 100_000;
    let url = &server.url();
    // The process's resident size only grows back to where an earlier placement left it: the
    // bytes per lease are measured in the first table of a run only.
    static MEASURED_MEMORY: std::sync::Once = std::sync::Once::new();
    let mut first_table = false;
    MEASURED_MEMORY.call_once(|| first_table = true);

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
    let held_on_schedule = held(&leases);
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
    release_many(leases);
    drop(manager);
    delete_leftovers(url, "scale", LEASES);

    // 2. Capacity: leases due every few milliseconds, far more often than any renewer can
    // serve; the renewer runs flat out, and the rate it sustains is its capacity. The raw
    // client renews the same number of keys the same way just before and just after.
    let window = Duration::from_secs(3);
    // Each side's keys exist only during its own windows: the server's key space is the same.
    let raw_window = |url: &str, shape: RawKeys| {
        let mut raw = RawRenewals::new(url, LEASES, shape);
        let measured = cpu_use(&[server], || raw.rate(window / 2));
        raw.delete_keys();
        measured
    };
    let (raw_before, raw_cpu_before) = raw_window(url, RawKeys::AsOurs);
    let (plain_before, _) = raw_window(url, RawKeys::Plain);
    let manager = renewing_manager(url, 0.0001).build().unwrap();
    let (leases, _) = acquire_many(&manager, "capacity", LEASES);
    let counted_from = renewals_made(&manager);
    let calls_before = script_calls(server);
    let ((), our_cpu) = cpu_use(&[server], || std::thread::sleep(window));
    let renewed = renewals_made(&manager) - counted_from;
    let keys_per_call = renewed as f64 / (script_calls(server) - calls_before) as f64;
    let capacity = renewed as f64 / window.as_secs_f64();
    let still_held = held(&leases);
    release_many(leases);
    drop(manager);
    delete_leftovers(url, "capacity", LEASES);
    let (plain_after, _) = raw_window(url, RawKeys::Plain);
    let (raw_after, raw_cpu_after) = raw_window(url, RawKeys::AsOurs);
    let raw_cpu = CpuUse {
        server: (raw_cpu_before.server + raw_cpu_after.server) / 2.0,
        bench: (raw_cpu_before.bench + raw_cpu_after.bench) / 2.0,
    };
    let raw_rate = (raw_before + raw_after) / 2.0;
    let plain_rate = (plain_before + plain_after) / 2.0;
    let ratio = capacity / raw_rate;

    let memory = if first_table {
        format!(
            "{per_lease:.0} bytes per held lease ({})",
            verdict("< 300", per_lease < 300.0)
        )
    } else {
        "bytes per lease: measured in the first table only".to_owned()
    };
    println!(
        "renewal      {LEASES} leases, TTL {TTL:?}: {} renewed on schedule, lateness p50 {p50:.1?} p99 {p99:.1?} ({}), {held_on_schedule} held; {memory}\n             flat out: ours {capacity:.0} renewals/s ({still_held} held), raw client with renew.lua on keys taken as ours are {raw_rate:.0}/s ({raw_before:.0} before, {raw_after:.0} after; {RAW_CHUNK} keys per call, {} calls per round trip), ratio {ratio:.2} ({}); raw on keys made by plain SETs {plain_rate:.0}/s (ours / that {:.2})\n             CPU time per renewal while flat out: ours {}; raw {}; ours renewed {keys_per_call:.0} leases per script call",
        renewals.len(),
        verdict(&format!("p99 < {:?}", TTL / 10), p99 < TTL / 10),
        RAW_BATCH / RAW_CHUNK,
        verdict(">= 0.9", ratio >= 0.9),
        capacity / plain_rate,
        our_cpu.per_operation(capacity),
        raw_cpu.per_operation(raw_rate),
    );
}

/// Leases renewed per second by a renewer running flat out over `count` leases (due every
/// few milliseconds) on the servers at `url`, over `window`; how many stayed held; and the CPU
/// that `masters` (together) and this process used meanwhile, and the share of a CPU that
/// `replicas` (together) used.
fn renewal_capacity(
    url: &str,
    (masters, replicas): (&[&RedisServer], &[&RedisServer]),
    prefix: &str,
    count: usize,
    window: Duration,
) -> (f64, usize, CpuUse, f64) {
    let manager = renewing_manager(url, 0.0001).build().unwrap();
    let (leases, _) = acquire_many(&manager, prefix, count);
    // Let the renewer reach its pace before counting.
    std::thread::sleep(Duration::from_millis(500));
    let counted_from = renewals_made(&manager);
    let (((), cpu), replicas_cpu) =
        cpu_use(replicas, || cpu_use(masters, || std::thread::sleep(window)));
    let renewed = renewals_made(&manager) - counted_from;
    let still_held = held(&leases);
    release_many(leases);
    (
        renewed as f64 / window.as_secs_f64(),
        still_held,
        cpu,
        replicas_cpu.server,
    )
}

/// The `cluster` row: renewal capacity for 100,000 leases on one master against the 3-master
/// cluster, and the uncontended acquire + release on each, in paired rounds.
fn cluster() {
    const LEASES: usize = 100_000;
    let single = RedisServer::start();
    let cluster = RedisCluster::start_with(ClusterOptions {
        node_timeout: Duration::from_secs(5),
        ..ClusterOptions::default()
    });
    let (single_url, cluster_url) = (single.url(), cluster.url());
    let masters = cluster.masters();
    let replicas: Vec<&RedisServer> = cluster
        .nodes()
        .iter()
        .filter(|node| !masters.iter().any(|master| master.port() == node.port()))
        .collect();
    let window = Duration::from_secs(3);
    let mut ratios = Vec::new();
    let mut rates = (Vec::new(), Vec::new());
    let mut cpu = (Vec::new(), Vec::new(), Vec::new());
    // Three rounds, so that the median is one round's figure; the side that runs first
    // alternates.
    for round in 0..3 {
        let single_side = || {
            renewal_capacity(
                &single_url,
                (&[&single], &[]),
                &format!("single{round}"),
                LEASES,
                window,
            )
        };
        let cluster_side = || {
            renewal_capacity(
                &cluster_url,
                (&masters, &replicas),
                &format!("cluster{round}"),
                LEASES,
                window,
            )
        };
        let ((one, one_held, one_cpu, _), (three, three_held, three_cpu, replicas_cpu)) =
            if round % 2 == 0 {
                let one = single_side();
                (one, cluster_side())
            } else {
                let three = cluster_side();
                (single_side(), three)
            };
        println!(
            "cluster      renewal round {round}: one master {one:.0} renewals/s ({one_held} held; {}), cluster {three:.0}/s ({three_held} held; the 3 masters' {}; the 3 replicas {:.1?} per renewal, {:.0}% of a CPU)",
            one_cpu.per_operation(one),
            three_cpu.per_operation(three),
            Duration::from_secs_f64(replicas_cpu / three),
            replicas_cpu * 100.0,
        );
        ratios.push(three / one);
        rates.0.push(one);
        rates.1.push(three);
        cpu.0.push(one_cpu.server / one);
        cpu.1.push(three_cpu.server / three);
        cpu.2.push(replicas_cpu / three);
    }
    let ratio = median(ratios);
    println!(
        "cluster      renewal capacity, {LEASES} leases flat out: one master {:.0}/s, 3-master cluster {:.0}/s, ratio {ratio:.2} ({}); server CPU per renewal: one master {:.1?}, the cluster's masters {:.1?} (together) and replicas {:.1?}",
        median(rates.0),
        median(rates.1),
        verdict(">= 2", ratio >= 2.0),
        Duration::from_secs_f64(median(cpu.0)),
        Duration::from_secs_f64(median(cpu.1)),
        Duration::from_secs_f64(median(cpu.2)),
    );

    let single_manager = ours(&single_url, 1);
    let cluster_manager = ours(&cluster_url, 1);
    let round = Duration::from_millis(200);
    let mut one = || rate_for(round, || our_cycle(&single_manager, "uncontended"));
    let mut three = || rate_for(round, || our_cycle(&cluster_manager, "uncontended"));
    let paired = paired(15, &mut [&mut one, &mut three]);
    println!(
        "cluster      uncontended try_acquire + release: one server {:.0}/s, cluster {:.0}/s, ratio {:.2} (no target)",
        paired.medians[0], paired.medians[1], paired.ratios[1]
    );
}
