//! When the renewer must act: a queue of leases ordered by due time, and the pure rules that
//! give those due times. Nothing here reads a clock or owns a lease's validity (the lease's
//! state does): callers pass `now` and `valid_until` in, so the timing is unit-tested without
//! threads or sleeps.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::clock::saturating_add;

/// When a lease last renewed (or acquired) by a request sent at `sent_at` is next due: after
/// `fraction` of its validity, and never after the end of it.
pub(crate) fn renewal_due(
    fraction: f64,
    sent_at: Instant,
    validity: Duration,
    valid_until: Instant,
) -> Instant {
    // In whole nanoseconds, rounded down (a few nanoseconds early at most): cheaper than
    // `Duration::mul_f64`'s exact rounding, and this runs on every acquire.
    let first = Duration::from_nanos((nanos(validity) as f64 * fraction) as u64);
    saturating_add(sent_at, first).min(valid_until)
}

/// The longest pause between two attempts to renew a failing lease.
const MAX_RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// The shortest pause between two attempts to renew a failing lease.
const MIN_RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// When to retry a renewal that failed at `now`: a tenth of the validity later (1 to 500 ms),
/// and never after `valid_until`, where the lease is lost.
pub(crate) fn retry_due(now: Instant, validity: Duration, valid_until: Instant) -> Instant {
    let interval = (validity / 10).clamp(MIN_RETRY_INTERVAL, MAX_RETRY_INTERVAL);
    saturating_add(now, interval).min(valid_until)
}

/// A [`Slot`] whose lease is not on the schedule.
const UNTRACKED: u64 = u64::MAX;
/// The bit of a [`Slot`] that marks a lease whose renewal is in flight: its entry is due at the
/// end of its validity, when its loss must be reported if no answer has come.
const IN_FLIGHT: u64 = 1 << 63;
/// The latest due time a slot can hold, in nanoseconds after the epoch (about 292 years).
const MAX_TICKS: u64 = IN_FLIGHT - 1;

/// Where a lease stands on the schedule: [`UNTRACKED`], or its due time in nanoseconds after
/// the schedule's epoch, with [`IN_FLIGHT`] set while its renewal is in flight.
///
/// It lives in the lease itself, so the schedule needs no table from leases to their places:
/// the queue is its only collection. Only the renewer thread reads or writes it (the atomic
/// makes the lease `Sync`, nothing more).
#[derive(Debug)]
pub(crate) struct Slot(AtomicU64);

impl Slot {
    pub(crate) fn new() -> Slot {
        Slot(AtomicU64::new(UNTRACKED))
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// What the schedule needs of a lease.
pub(crate) trait Scheduled: Clone {
    /// Unique among the leases of one schedule: breaks ties between equal due times.
    fn id(&self) -> u64;
    /// The lease's place on the schedule.
    fn slot(&self) -> &Slot;
}

/// Leases taken off the schedule by [`Schedule::pop_due`]; none of them is tracked any more.
#[derive(Debug)]
pub(crate) struct DueLeases<T> {
    /// Due for renewal, in due order.
    pub(crate) renew: Vec<T>,
    /// In flight past the end of their validity: lost unless the answer came.
    pub(crate) overdue: Vec<T>,
}

/// Tracked leases ordered by due time: O(log n) per tracked, untracked or due lease, and one
/// entry per lease (the lease's [`Slot`] says where that entry is).
pub(crate) struct Schedule<T> {
    queue: BTreeMap<(u64, u64), T>,
    /// Time zero of the slots' nanosecond times: no lease is acquired before it.
    epoch: Instant,
}

impl<T: Scheduled> Schedule<T> {
    /// An empty schedule whose leases are all acquired at `epoch` or later.
    pub(crate) fn new(epoch: Instant) -> Schedule<T> {
        Schedule {
            queue: BTreeMap::new(),
            epoch,
        }
    }

    fn ticks(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch)).min(MAX_TICKS)
    }

    fn instant(&self, ticks: u64) -> Instant {
        saturating_add(self.epoch, Duration::from_nanos(ticks))
    }

    fn insert(&mut self, item: T, at: Instant, flags: u64) {
        self.remove(&item);
        let ticks = self.ticks(at);
        item.slot().set(ticks | flags);
        self.queue.insert((ticks, item.id()), item);
    }

    /// Schedules `item`'s renewal at `due`, replacing its old place.
    pub(crate) fn track(&mut self, item: T, due: Instant) {
        self.insert(item, due, 0);
    }

    /// Marks `item`'s renewal as sent: it is due again at `valid_until`, to be reported lost if
    /// its answer has not come by then.
    pub(crate) fn watch_in_flight(&mut self, item: T, valid_until: Instant) {
        self.insert(item, valid_until, IN_FLIGHT);
    }

    /// Whether `item`'s renewal is in flight (and it was neither untracked nor overdue since).
    pub(crate) fn is_in_flight(&self, item: &T) -> bool {
        in_flight(item.slot().get())
    }

    /// Stops tracking `item`; false if it was not tracked.
    pub(crate) fn remove(&mut self, item: &T) -> bool {
        let slot = item.slot().get();
        if slot == UNTRACKED {
            return false;
        }
        self.queue.remove(&(slot & !IN_FLIGHT, item.id()));
        item.slot().set(UNTRACKED);
        true
    }

    /// Every tracked item, in due order.
    pub(crate) fn items(&self) -> impl Iterator<Item = &T> {
        self.queue.values()
    }

    /// The earliest due time, if any lease is tracked.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.queue
            .first_key_value()
            .map(|((due, _), _)| self.instant(*due))
    }

    /// Takes the leases due at `now` off the schedule, in due order: up to `limit` due for
    /// renewal, and every overdue one met on the way.
    pub(crate) fn pop_due(&mut self, now: Instant, limit: usize) -> DueLeases<T> {
        let now = self.ticks(now);
        let mut due = DueLeases {
            renew: Vec::new(),
            overdue: Vec::new(),
        };
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let in_flight = in_flight(entry.get().slot().get());
            if !in_flight && due.renew.len() >= limit {
                break;
            }
            let item = entry.remove();
            item.slot().set(UNTRACKED);
            if in_flight {
                due.overdue.push(item);
            } else {
                due.renew.push(item);
            }
        }
        due
    }
}

/// Whether a slot's value marks a lease in flight.
fn in_flight(slot: u64) -> bool {
    slot != UNTRACKED && slot & IN_FLIGHT != 0
}

/// A duration in nanoseconds, saturating (at about 584 years).
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[derive(Debug)]
    struct TestLease {
        id: u64,
        slot: Slot,
    }

    type Item = Arc<TestLease>;

    impl Scheduled for Item {
        fn id(&self) -> u64 {
            self.id
        }
        fn slot(&self) -> &Slot {
            &self.slot
        }
    }

    fn lease(id: u64) -> Item {
        Arc::new(TestLease {
            id,
            slot: Slot::new(),
        })
    }

    fn ids(leases: &[Item]) -> Vec<u64> {
        leases.iter().map(|lease| lease.id).collect()
    }

    #[test]
    fn a_lease_is_due_after_a_fraction_of_its_validity_and_never_after_it() {
        let t0 = Instant::now();
        assert_eq!(renewal_due(1.0 / 3.0, t0, 3 * SEC, t0 + 3 * SEC), t0 + SEC);
        // A late answer: the validity counts from an earlier send, and ends sooner.
        assert_eq!(
            renewal_due(1.0 / 3.0, t0, 3 * SEC, t0 + 500 * MS),
            t0 + 500 * MS
        );
    }

    #[test]
    fn retries_come_a_tenth_of_the_validity_later_within_bounds() {
        let t0 = Instant::now();
        let far = t0 + 3600 * SEC;
        assert_eq!(retry_due(t0, SEC, far), t0 + 100 * MS);
        assert_eq!(
            retry_due(t0, 3600 * SEC, far),
            t0 + 500 * MS,
            "at most 500 ms"
        );
        assert_eq!(retry_due(t0, 3 * MS, far), t0 + MS, "at least 1 ms");
        assert_eq!(
            retry_due(t0, SEC, t0 + 20 * MS),
            t0 + 20 * MS,
            "never after the validity"
        );
    }

    #[test]
    fn due_leases_come_in_due_order_and_in_batches() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        let leases: Vec<Item> = (0..10).map(lease).collect();
        for lease in &leases {
            schedule.track(lease.clone(), t0 + (10 - lease.id as u32) * MS);
        }
        assert_eq!(schedule.next_due(), Some(t0 + MS));
        let later = t0 + SEC;
        assert_eq!(ids(&schedule.pop_due(later, 4).renew), vec![9, 8, 7, 6]);
        assert_eq!(ids(&schedule.pop_due(later, 4).renew), vec![5, 4, 3, 2]);
        assert_eq!(ids(&schedule.pop_due(later, 4).renew), vec![1, 0]);
        assert_eq!(schedule.next_due(), None);
        assert!(
            leases.iter().all(|lease| !schedule.remove(lease)),
            "popped leases are no longer tracked"
        );
    }

    #[test]
    fn nothing_is_due_early_and_equal_due_times_are_all_kept() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        for id in 0..3 {
            schedule.track(lease(id), t0 + SEC);
        }
        let early = schedule.pop_due(t0 + SEC - MS, 10);
        assert!(early.renew.is_empty() && early.overdue.is_empty());
        assert_eq!(ids(&schedule.pop_due(t0 + SEC, 10).renew), vec![0, 1, 2]);
    }

    #[test]
    fn an_in_flight_lease_is_overdue_at_the_end_of_its_validity() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        let item = lease(1);
        schedule.track(item.clone(), t0 + SEC);
        let due = schedule.pop_due(t0 + SEC, 10);
        assert_eq!(ids(&due.renew), vec![1]);
        assert!(!schedule.is_in_flight(&item));
        schedule.watch_in_flight(item.clone(), t0 + 3 * SEC);
        assert!(schedule.is_in_flight(&item));
        assert_eq!(schedule.next_due(), Some(t0 + 3 * SEC));
        assert!(schedule.pop_due(t0 + 2 * SEC, 10).overdue.is_empty());
        let due = schedule.pop_due(t0 + 3 * SEC, 0);
        assert_eq!(
            ids(&due.overdue),
            vec![1],
            "overdue leases do not count against the batch"
        );
        assert!(
            !schedule.is_in_flight(&item),
            "an answer after that is ignored"
        );
    }

    #[test]
    fn untracked_leases_are_never_due_and_their_answers_are_ignored() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        let (a, b) = (lease(1), lease(2));
        schedule.track(a.clone(), t0);
        schedule.watch_in_flight(b.clone(), t0 + SEC);
        assert!(schedule.remove(&a));
        assert!(!schedule.remove(&a), "removed once");
        assert!(schedule.remove(&b));
        assert!(!schedule.is_in_flight(&b));
        assert_eq!(schedule.next_due(), None);
    }

    #[test]
    fn tracking_again_replaces_the_old_place() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        let item = lease(1);
        schedule.track(item.clone(), t0);
        schedule.track(item.clone(), t0 + SEC);
        assert_eq!(schedule.next_due(), Some(t0 + SEC));
        schedule.watch_in_flight(item, t0 + 2 * SEC);
        let due = schedule.pop_due(t0 + 10 * SEC, 10);
        assert_eq!((due.renew.len(), due.overdue.len()), (0, 1), "one entry");
    }

    #[test]
    fn far_future_times_saturate_below_the_in_flight_bit() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        let item = lease(1);
        let far = saturating_add(t0, Duration::MAX);
        schedule.track(item.clone(), far);
        assert!(!schedule.is_in_flight(&item));
        assert!(schedule.remove(&item));
    }
}
