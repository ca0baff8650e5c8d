//! New leases on their way to the renewer: a [`Handoff`] that an acquire adds its lease to
//! without a message, and that a release takes its lease back from if the renewer has not
//! taken it yet.
//!
//! Most leases in a loop of acquire and release live shorter than the renewer sleeps. Sent to
//! the renewer thread and called back by messages, each would cost two messages, wake that
//! thread, and make it free memory the caller allocated. Through the hand-off, a lease released
//! before the renewer next wakes never reaches the renewer at all; one still held when it wakes
//! is taken then, and its release sends the renewer an `Untrack` command.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// A [`HandoffSlot`] whose item is not waiting: not handed off yet, taken, or taken back.
const NOT_WAITING: usize = usize::MAX;

/// Where an item stands in a [`Handoff`]: its index while it waits there, or [`NOT_WAITING`].
///
/// It lives in the item, so taking an item back needs no search. Written only under the
/// hand-off's lock; an item that stops waiting never waits again.
#[derive(Debug)]
pub(crate) struct HandoffSlot(AtomicUsize);

impl HandoffSlot {
    /// The slot of an item not handed off yet.
    pub(crate) fn new() -> HandoffSlot {
        HandoffSlot(AtomicUsize::new(NOT_WAITING))
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, value: usize) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// What a hand-off needs of an item.
pub(crate) trait HandedOff {
    /// The item's place in the hand-off.
    fn handoff_slot(&self) -> &HandoffSlot;
}

/// Items waiting for the renewer to take them, each with its due time: O(1) to add, to take
/// back, and per item taken.
pub(crate) struct Handoff<T> {
    waiting: Mutex<Vec<(T, Instant)>>,
}

impl<T: HandedOff> Handoff<T> {
    pub(crate) fn new() -> Handoff<T> {
        Handoff {
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// Adds `item`, due at `due`; returns how many items wait now. Each item is added once.
    pub(crate) fn push(&self, item: T, due: Instant) -> usize {
        let mut waiting = self.waiting.lock();
        item.handoff_slot().set(waiting.len());
        waiting.push((item, due));
        waiting.len()
    }

    /// Takes `item` back if it is still waiting; false if it was taken.
    pub(crate) fn take_back(&self, item: &T) -> bool {
        // Only the lock's holder moves a waiting item, and nothing waits again once taken, so
        // "not waiting" seen without the lock is final.
        if item.handoff_slot().get() == NOT_WAITING {
            return false;
        }
        let removed = {
            let mut waiting = self.waiting.lock();
            let index = item.handoff_slot().get();
            if index >= waiting.len() {
                return false; // taken meanwhile: `NOT_WAITING` is past any end
            }
            let removed = waiting.swap_remove(index);
            if let Some((moved, _)) = waiting.get(index) {
                moved.handoff_slot().set(index);
            }
            item.handoff_slot().set(NOT_WAITING);
            removed
        };
        // Dropped once the lock is free: nothing the item owns is dropped under it.
        drop(removed);
        true
    }

    /// Moves every waiting item, with its due time, to the end of `into`.
    pub(crate) fn take_all(&self, into: &mut Vec<(T, Instant)>) {
        let mut waiting = self.waiting.lock();
        for (item, _) in waiting.iter() {
            item.handoff_slot().set(NOT_WAITING);
        }
        into.append(&mut waiting);
    }

    /// Whether no item waits. Takes the lock: a renewer that publishes its wake-up time and
    /// then finds the hand-off empty is sure that every later [`push`](Handoff::push) sees
    /// that time.
    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[derive(Debug)]
    struct TestLease {
        id: u64,
        slot: HandoffSlot,
    }

    type Item = Arc<TestLease>;

    impl HandedOff for Item {
        fn handoff_slot(&self) -> &HandoffSlot {
            &self.slot
        }
    }

    fn lease(id: u64) -> Item {
        Arc::new(TestLease {
            id,
            slot: HandoffSlot::new(),
        })
    }

    /// Sets its flag when dropped, by a normal exit or a panic.
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn take_ids(handoff: &Handoff<Item>) -> Vec<u64> {
        let mut taken = Vec::new();
        handoff.take_all(&mut taken);
        let mut ids: Vec<u64> = taken.iter().map(|(item, _)| item.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn items_taken_back_are_never_taken_and_the_rest_all_are() {
        let t0 = Instant::now();
        let handoff = Handoff::new();
        let leases: Vec<Item> = (0..5).map(lease).collect();
        for lease in &leases {
            handoff.push(lease.clone(), t0);
        }
        // The first, the last and a middle one: each removal moves another item.
        for id in [0, 4, 2] {
            assert!(handoff.take_back(&leases[id]));
            assert!(!handoff.take_back(&leases[id]), "taken back once");
        }
        assert_eq!(take_ids(&handoff), vec![1, 3]);
        assert!(handoff.is_empty());
        assert!(
            leases.iter().all(|lease| !handoff.take_back(lease)),
            "taken items cannot be taken back"
        );
    }

    #[test]
    fn items_keep_their_due_times_and_push_counts_the_waiting() {
        let t0 = Instant::now();
        let handoff = Handoff::new();
        let (a, b) = (lease(1), lease(2));
        assert_eq!(handoff.push(a.clone(), t0), 1);
        assert_eq!(handoff.push(b.clone(), t0 + Duration::from_secs(1)), 2);
        assert!(handoff.take_back(&a));
        assert!(!handoff.is_empty());
        let mut taken = vec![(lease(0), t0)];
        handoff.take_all(&mut taken);
        assert_eq!(taken.len(), 2, "appended to what was there");
        assert_eq!(taken[1].0.id, 2);
        assert_eq!(taken[1].1, t0 + Duration::from_secs(1));
        assert!(!handoff.take_back(&b));
    }

    #[test]
    fn racing_the_taker_each_item_is_taken_or_taken_back_exactly_once() {
        const ITEMS: u64 = 20_000;
        let t0 = Instant::now();
        let handoff = Handoff::new();
        let done = AtomicBool::new(false);
        let (taken, taken_back) = std::thread::scope(|scope| {
            // Stops the taker however this thread leaves, so a failure fails, not hangs.
            let stop_taker = StopOnDrop(&done);
            let taker = scope.spawn(|| {
                let mut taken = Vec::new();
                while !done.load(Ordering::SeqCst) {
                    handoff.take_all(&mut taken);
                }
                handoff.take_all(&mut taken);
                taken
            });
            // Several items wait at once and are taken back in random order, so that taking
            // one back moves another while the taker runs.
            let mut live = Vec::new();
            let mut taken_back = Vec::new();
            for id in 0..ITEMS {
                live.push(lease(id));
                handoff.push(live[live.len() - 1].clone(), t0);
                while live.len() > 4 || (id + 1 == ITEMS && !live.is_empty()) {
                    let item = live.swap_remove(fastrand::usize(..live.len()));
                    if handoff.take_back(&item) {
                        taken_back.push(item.id);
                    }
                }
            }
            drop(stop_taker);
            (taker.join().unwrap(), taken_back)
        });
        let mut ids: Vec<u64> = taken.iter().map(|(item, _)| item.id).collect();
        ids.extend(taken_back);
        ids.sort_unstable();
        assert_eq!(ids, (0..ITEMS).collect::<Vec<_>>());
    }

    #[test]
    fn an_item_never_handed_off_is_not_taken_back() {
        let handoff: Handoff<Item> = Handoff::new();
        assert!(!handoff.take_back(&lease(1)));
    }
}
