//! Which thread acquired each lease: what lets a thread's second acquire of a key it holds
//! fail at once ([`Error::AlreadyHeld`](crate::Error::AlreadyHeld)) instead of waiting for
//! itself.
//!
//! The hot path only counts: a grant stamps the lease with this thread's number and adds one to
//! a thread-local count, and a release on the same thread takes one off (no lock, no shared
//! cache line, no allocation). Only when an attempt found the key held, and this thread's count
//! says it may hold some lease, does the manager look for the key among its leases (the renewer
//! answers, see [`Command::HeldBy`](crate::renewer::Command::HeldBy)).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// This thread's number; zero until first asked.
    static THREAD: Cell<u64> = const { Cell::new(0) };
    /// Leases this thread acquired and has not released itself: at least as many as it holds.
    static ACQUIRED: Cell<u64> = const { Cell::new(0) };
}

/// The number of the next thread to ask for one.
static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

/// This thread's number: unique in the process, never zero.
pub(crate) fn this_thread() -> u64 {
    THREAD
        .try_with(|number| {
            if number.get() == 0 {
                number.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
            }
            number.get()
        })
        // A thread that is exiting: a number no lease carries.
        .unwrap_or(u64::MAX)
}

/// This thread acquired a lease (stamped with [`this_thread`]).
pub(crate) fn acquired() {
    let _ = ACQUIRED.try_with(|count| count.set(count.get().saturating_add(1)));
}

/// A lease stamped `holder` is being released on this thread.
pub(crate) fn released(holder: u64) {
    if holder == this_thread() {
        let _ = ACQUIRED.try_with(|count| count.set(count.get().saturating_sub(1)));
    }
}

/// Whether this thread may hold any lease: false means it holds none, through any manager.
pub(crate) fn may_hold_any() -> bool {
    ACQUIRED.try_with(|count| count.get() > 0).unwrap_or(false)
}
