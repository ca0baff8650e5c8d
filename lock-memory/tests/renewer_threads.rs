//! The renewer's threads are joined when the last handle goes. In a binary of its own: it
//! counts this process's threads, which other tests' managers would disturb when a runner
//! (`cargo test`) runs tests as threads of one process.
#![allow(clippy::unwrap_used)] // test code: a failure is a failed test

use std::time::{Duration, Instant};

use lock_core::LockManager;
use lock_memory::MemoryBackend;

const TTL: Duration = Duration::from_secs(30);

/// Threads of this process named `name` (Linux keeps the first 15 bytes).
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// The renewer threads and their I/O workers.
fn renewer_threads() -> (usize, usize) {
    (
        threads_named(lock_core::RENEWER_THREAD_NAME),
        threads_named("lease-renew-io"),
    )
}

#[test]
fn the_last_handle_stops_and_joins_the_renewer() {
    assert_eq!(renewer_threads(), (0, 0), "alone in its process");
    let manager = LockManager::new(MemoryBackend::new());
    let clone = manager.clone();
    // The threads name themselves once they run: wait for that.
    let deadline = Instant::now() + Duration::from_secs(10);
    while renewer_threads() != (1, 1) {
        assert!(
            Instant::now() < deadline,
            "not one renewer and one worker: {:?}",
            renewer_threads()
        );
        std::thread::yield_now();
    }
    let lease = manager.acquire("a", TTL).unwrap();
    drop(manager);
    drop(clone);
    assert_eq!(renewer_threads(), (1, 1), "a live lease keeps its manager");
    assert!(lease.is_held());
    drop(lease);
    assert_eq!(
        renewer_threads(),
        (0, 0),
        "both joined when the last handle went"
    );
}
