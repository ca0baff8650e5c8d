//! The benchmark suite: our public API against the raw redis client, measured in the same run.
//!
//! `cargo bench -p lock-tests --bench leases` prints one row per scenario. Pass row names to run
//! only some: `cargo bench -p lock-tests --bench leases -- memory`.

use std::time::{Duration, Instant};

use lock_core::LockManager;
use lock_memory::MemoryBackend;

const TTL: Duration = Duration::from_secs(30);

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let wanted = |row: &str| filters.is_empty() || filters.iter().any(|f| row.contains(f.as_str()));
    println!("{}", machine_line());
    if wanted("memory") {
        memory_uncontended();
    }
}

fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: {cores} cores, {}", std::env::consts::ARCH)
}

/// Runs `cycle` `iterations` times per sample and returns the best cycles per second over
/// `samples` samples (the least disturbed by the rest of the machine).
fn best_rate(samples: usize, iterations: u64, mut cycle: impl FnMut()) -> f64 {
    (0..samples)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                cycle();
            }
            iterations as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn memory_uncontended() {
    let manager = LockManager::new(MemoryBackend::new());
    let rate = best_rate(5, 200_000, || {
        let lease = manager.try_acquire("bench", TTL).ok().flatten();
        let released = lease.map(lock_core::Lease::release);
        assert!(matches!(released, Some(Ok(()))), "uncontended cycle failed");
    });
    println!("memory  uncontended acquire+release, 1 thread: {rate:>12.0} cycles/s (target >= 1,000,000)");
}
