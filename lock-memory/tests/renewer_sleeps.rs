//! An uncontended acquire and release wake nobody: the renewer sleeps through a loop of them.
//! In a binary of its own: it reads the renewer thread's context switches, and other tests'
//! managers would add renewer threads to this process.
#![allow(clippy::unwrap_used)] // test code: a failure is a failed test

use std::time::{Duration, Instant};

use lock_core::{LockManager, RENEWER_THREAD_NAME};
use lock_memory::MemoryBackend;

const TTL: Duration = Duration::from_secs(30);
const CYCLES: u32 = 20_000;

/// How many times the renewer thread has gone to sleep (its voluntary context switches).
fn renewer_sleeps() -> u64 {
    let renewer = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|task| task.unwrap().path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm"))
                .is_ok_and(|comm| comm.trim() == RENEWER_THREAD_NAME)
        })
        .unwrap();
    let status = std::fs::read_to_string(renewer.join("status")).unwrap();
    let switches = status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .unwrap();
    switches.trim().parse().unwrap()
}

#[test]
fn a_loop_of_uncontended_acquires_and_releases_lets_the_renewer_sleep() {
    let manager = LockManager::new(MemoryBackend::new());
    manager.settle(); // the renewer runs, and has named itself
    let before = renewer_sleeps();
    let started = Instant::now();
    for _ in 0..CYCLES {
        let lease = manager.try_acquire("k", TTL).unwrap().unwrap();
        lease.release().unwrap();
    }
    let woken = renewer_sleeps() - before;
    // With nothing due it wakes by itself once a second; one more for the `settle()`.
    let allowed = started.elapsed().as_secs() + 2;
    assert!(
        woken <= allowed,
        "the renewer woke {woken} times in {CYCLES} cycles (at most {allowed} expected)"
    );
}
