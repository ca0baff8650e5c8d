//! Many threads, one key: mutual exclusion and fence order under contention.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup is a failed test

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lock_core::LockManager;
use lock_memory::MemoryBackend;
use parking_lot::Mutex;

const THREADS: usize = 8;
const INCREMENTS: usize = 5_000;

#[test]
fn guarded_increments_lose_no_update_and_fences_follow_commit_order() {
    let manager = LockManager::new(MemoryBackend::new());
    // A read-modify-write split in two steps: without mutual exclusion, updates get lost.
    let counter = Arc::new(AtomicU64::new(0));
    let fences = Arc::new(Mutex::new(Vec::with_capacity(THREADS * INCREMENTS)));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (manager, counter, fences) = (manager.clone(), counter.clone(), fences.clone());
            std::thread::spawn(move || {
                for _ in 0..INCREMENTS {
                    let lease = manager
                        .acquire_timeout(
                            "counter",
                            Duration::from_secs(30),
                            Duration::from_secs(60),
                        )
                        .unwrap();
                    let value = counter.load(Ordering::Relaxed);
                    std::hint::spin_loop();
                    counter.store(value + 1, Ordering::Relaxed);
                    fences.lock().push(lease.fence());
                    lease.release().unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    assert_eq!(
        counter.load(Ordering::Relaxed),
        (THREADS * INCREMENTS) as u64,
        "lost updates"
    );
    let fences = fences.lock();
    assert_eq!(fences.len(), THREADS * INCREMENTS);
    assert!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "fences are not strictly increasing in the order the critical sections ran"
    );
}
