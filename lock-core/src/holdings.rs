//! Which leases each thread acquired: what lets a thread's second acquire of a key it holds
//! fail at once ([`Error::AlreadyHeld`](crate::Error::AlreadyHeld)) instead of waiting for
//! itself.
//!
//! A thread-local list, so that recording a grant takes no lock and touches no shared cache
//! line: one weak reference pushed per grant, nothing at release. It is read only after an
//! attempt found the key held, which an uncontended acquire never does. Entries of leases
//! gone are pruned when the list would grow, so it stays within twice the thread's live
//! leases.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::state::LeaseShared;

/// One lease acquired on this thread, and the manager it was acquired through (the address of
/// its shared state: a live lease keeps its manager alive, so no other manager has it).
type Holding = (usize, Weak<LeaseShared>);

thread_local! {
    static HOLDINGS: RefCell<Vec<Holding>> = const { RefCell::new(Vec::new()) };
}

/// The fewest entries the list holds before it prunes.
const MIN_CAPACITY: usize = 8;

/// Records that this thread acquired `lease` through manager `manager`.
pub(crate) fn record(manager: usize, lease: &Arc<LeaseShared>) {
    // A thread that is exiting has no list any more: it cannot acquire again either.
    let _ = HOLDINGS.try_with(|holdings| {
        let mut holdings = holdings.borrow_mut();
        if holdings.len() == holdings.capacity() {
            // Full: prune the leases gone (released or lost, and dropped) before growing.
            holdings.retain(|(_, lease)| lease.strong_count() > 0);
            if holdings.capacity() < MIN_CAPACITY {
                holdings.reserve_exact(MIN_CAPACITY);
            } else if holdings.len() >= holdings.capacity() / 2 {
                holdings.reserve(1); // doubles: pruning again soon would not pay
            }
        }
        holdings.push((manager, Arc::downgrade(lease)));
    });
}

/// Whether this thread holds `key` through manager `manager` at `now`: a lease it acquired,
/// neither released nor lost nor past its validity.
pub(crate) fn holds(manager: usize, key: &str, now: Instant) -> bool {
    HOLDINGS
        .try_with(|holdings| {
            holdings.borrow().iter().any(|(owner, lease)| {
                *owner == manager
                    && lease
                        .upgrade()
                        .is_some_and(|lease| &*lease.key == key && lease.is_valid_at(now))
            })
        })
        .unwrap_or(false)
}
