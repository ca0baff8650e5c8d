//! The renewal schedule: a pure data structure that decides which leases are due, and what
//! follows from each renewal's outcome. It takes `now` as an argument and never reads a clock,
//! so its timing is unit-tested without threads or sleeps.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::clock::saturating_add;

/// The validity a TTL leaves once clock drift is allowed for: `ttl - (ttl / 100 + 2 ms)`, the
/// Redlock formula. `None` when nothing is left.
pub(crate) fn validity(ttl: Duration) -> Option<Duration> {
    let drift = ttl / 100 + Duration::from_millis(2);
    ttl.checked_sub(drift).filter(|left| !left.is_zero())
}

/// When a lease acquired with `ttl` by a request sent at `sent_at` is first due for renewal.
pub(crate) fn first_renewal(renew_fraction: f64, sent_at: Instant, ttl: Duration) -> Instant {
    let validity = validity(ttl).unwrap_or(Duration::ZERO);
    renewal_time(
        renew_fraction,
        sent_at,
        validity,
        saturating_add(sent_at, validity),
    )
}

/// The renewal time of a lease last renewed (or acquired) by a request sent at `sent_at`:
/// after `fraction` of its validity, and never after the end of it.
fn renewal_time(
    fraction: f64,
    sent_at: Instant,
    validity: Duration,
    valid_until: Instant,
) -> Instant {
    saturating_add(sent_at, validity.mul_f64(fraction)).min(valid_until)
}

/// The longest pause between two attempts to renew a failing lease.
const MAX_RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// The shortest pause between two attempts to renew a failing lease.
const MIN_RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// A [`Slot`] whose lease is not on the schedule.
const UNTRACKED: u64 = u64::MAX;
/// A [`Slot`] whose lease's renewal is in flight: off the queue, still tracked.
const IN_FLIGHT: u64 = u64::MAX - 1;

/// Where a lease stands on the schedule: its due time (nanoseconds after the schedule's epoch),
/// [`IN_FLIGHT`] or [`UNTRACKED`].
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

    fn set(&self, due: u64) {
        self.0.store(due, Ordering::Relaxed);
    }
}

/// What the schedule needs of a lease.
pub(crate) trait Scheduled: Clone {
    /// Unique among the leases of one schedule: breaks ties between equal due times.
    fn id(&self) -> u64;
    /// The TTL each renewal asks for.
    fn ttl(&self) -> Duration;
    /// The lease's place on the schedule.
    fn slot(&self) -> &Slot;
}

/// A queued lease: the end of its validity travels with it.
struct Queued<T> {
    item: T,
    /// Nanoseconds after the epoch.
    valid_until: u64,
}

/// A lease taken off the schedule by [`Schedule::pop_due`] for renewal. Hand it back to
/// [`Schedule::renewed`] or [`Schedule::failed`] with the outcome.
#[derive(Debug)]
pub(crate) struct InFlight<T> {
    pub(crate) item: T,
    /// The end of the lease's validity: the renewal must be answered by then.
    pub(crate) valid_until: Instant,
    valid_until_ticks: u64,
}

/// Leases taken off the schedule by [`Schedule::pop_due`].
#[derive(Debug)]
pub(crate) struct DueLeases<T> {
    /// Due for renewal.
    pub(crate) renew: Vec<InFlight<T>>,
    /// Past their validity before they could be renewed: lost, and removed from the schedule.
    pub(crate) expired: Vec<T>,
}

/// What to do after a failed renewal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// Still valid: retry at this time.
    RetryAt(Instant),
    /// The validity ran out: lost, and removed from the schedule.
    Expired,
    /// Not on the schedule (untracked meanwhile).
    Unknown,
}

/// Tracked leases ordered by due time: O(log n) per tracked, untracked or due lease, and one
/// queue entry per lease (the lease's [`Slot`] says where that entry is).
pub(crate) struct Schedule<T> {
    /// Every tracked lease that is not in flight, by `(due, id)`.
    queue: BTreeMap<(u64, u64), Queued<T>>,
    /// Renew after this fraction of the validity (default one third).
    renew_fraction: f64,
    /// Time zero of the slots' nanosecond times: no lease is acquired before it.
    epoch: Instant,
}

impl<T: Scheduled> Schedule<T> {
    /// An empty schedule whose leases are all acquired at `epoch` or later.
    pub(crate) fn new(renew_fraction: f64, epoch: Instant) -> Schedule<T> {
        Schedule {
            queue: BTreeMap::new(),
            renew_fraction,
            epoch,
        }
    }

    fn ticks(&self, at: Instant) -> u64 {
        // Below the slot markers, whatever the instant.
        nanos(at.saturating_duration_since(self.epoch)).min(IN_FLIGHT - 1)
    }

    fn instant(&self, ticks: u64) -> Instant {
        saturating_add(self.epoch, Duration::from_nanos(ticks))
    }

    /// The lease's validity, in nanoseconds.
    fn validity_of(item: &T) -> u64 {
        nanos(validity(item.ttl()).unwrap_or(Duration::ZERO))
    }

    /// Starts renewing a lease acquired by a request sent at `sent_at`.
    pub(crate) fn track(&mut self, item: T, sent_at: Instant) {
        self.remove(&item);
        let sent = self.ticks(sent_at);
        let valid_until = sent.saturating_add(Self::validity_of(&item));
        self.enqueue(item, sent, valid_until);
    }

    /// Queues `item` for renewal after the renew fraction of its validity, counted from
    /// `sent` (and never after `valid_until`).
    fn enqueue(&mut self, item: T, sent: u64, valid_until: u64) {
        let due = self.ticks(renewal_time(
            self.renew_fraction,
            self.instant(sent),
            Duration::from_nanos(Self::validity_of(&item)),
            self.instant(valid_until),
        ));
        self.queue_at(item, due, valid_until);
    }

    fn queue_at(&mut self, item: T, due: u64, valid_until: u64) {
        let due = due.min(IN_FLIGHT - 1);
        item.slot().set(due);
        self.queue
            .insert((due, item.id()), Queued { item, valid_until });
    }

    /// Stops renewing a lease; false if it was not tracked.
    pub(crate) fn remove(&mut self, item: &T) -> bool {
        let slot = item.slot();
        match slot.get() {
            UNTRACKED => return false,
            IN_FLIGHT => {}
            due => {
                self.queue.remove(&(due, item.id()));
            }
        }
        slot.set(UNTRACKED);
        true
    }

    /// The earliest due time, if any lease is scheduled.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.queue
            .first_key_value()
            .map(|((due, _), _)| self.instant(*due))
    }

    /// Takes up to `limit` leases due at `now` off the schedule, in due order. Leases already
    /// past their validity come back as expired (not counted in `limit`) and are removed.
    pub(crate) fn pop_due(&mut self, now: Instant, limit: usize) -> DueLeases<T> {
        let now = self.ticks(now);
        let mut due = DueLeases {
            renew: Vec::new(),
            expired: Vec::new(),
        };
        while due.renew.len() < limit {
            let Some(entry) = self.queue.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let Queued { item, valid_until } = entry.remove();
            if now >= valid_until {
                item.slot().set(UNTRACKED);
                due.expired.push(item);
            } else {
                item.slot().set(IN_FLIGHT);
                due.renew.push(InFlight {
                    item,
                    valid_until: self.instant(valid_until),
                    valid_until_ticks: valid_until,
                });
            }
        }
        due
    }

    /// A renewal sent at `sent_at` succeeded: returns the new end of the lease's validity and
    /// puts it back on the schedule. `None` if the lease was untracked meanwhile.
    pub(crate) fn renewed(&mut self, lease: InFlight<T>, sent_at: Instant) -> Option<Instant> {
        if lease.item.slot().get() != IN_FLIGHT {
            return None;
        }
        let sent = self.ticks(sent_at);
        let valid_until = lease
            .valid_until_ticks
            .max(sent.saturating_add(Self::validity_of(&lease.item)));
        self.enqueue(lease.item, sent, valid_until);
        Some(self.instant(valid_until))
    }

    /// A renewal failed transiently at `now`: retry soon if the lease is still valid.
    pub(crate) fn failed(&mut self, lease: InFlight<T>, now: Instant) -> AfterFailure {
        let slot = lease.item.slot();
        if slot.get() != IN_FLIGHT {
            return AfterFailure::Unknown;
        }
        let now = self.ticks(now);
        let valid_until = lease.valid_until_ticks;
        if now >= valid_until {
            slot.set(UNTRACKED);
            return AfterFailure::Expired;
        }
        let interval = (Duration::from_nanos(Self::validity_of(&lease.item)) / 10)
            .clamp(MIN_RETRY_INTERVAL, MAX_RETRY_INTERVAL);
        // Never later than the end of validity, where the lease is declared lost.
        let at = now.saturating_add(nanos(interval)).min(valid_until);
        self.queue_at(lease.item, at, valid_until);
        AfterFailure::RetryAt(self.instant(at))
    }
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
        ttl: Duration,
        slot: Slot,
    }

    type Item = Arc<TestLease>;

    impl Scheduled for Item {
        fn id(&self) -> u64 {
            self.id
        }
        fn ttl(&self) -> Duration {
            self.ttl
        }
        fn slot(&self) -> &Slot {
            &self.slot
        }
    }

    fn lease(id: u64, ttl: Duration) -> Item {
        Arc::new(TestLease {
            id,
            ttl,
            slot: Slot::new(),
        })
    }

    fn schedule() -> (Schedule<Item>, Instant) {
        let t0 = Instant::now();
        (Schedule::new(1.0 / 3.0, t0), t0)
    }

    fn ids(leases: &[InFlight<Item>]) -> Vec<u64> {
        leases.iter().map(|lease| lease.item.id).collect()
    }

    /// Takes exactly one lease due at `now` off the schedule.
    fn pop_one(schedule: &mut Schedule<Item>, now: Instant) -> InFlight<Item> {
        let mut due = schedule.pop_due(now, 10);
        assert_eq!(due.renew.len(), 1, "{due:?}");
        due.renew.remove(0)
    }

    #[test]
    fn validity_subtracts_the_drift_allowance() {
        assert_eq!(validity(30 * SEC), Some(30 * SEC - 300 * MS - 2 * MS));
        assert_eq!(validity(2 * MS), None);
        assert!(validity(3 * MS).is_some());
    }

    #[test]
    fn a_lease_is_due_after_a_third_of_its_validity() {
        let (mut schedule, t0) = schedule();
        schedule.track(lease(1, 3 * SEC), t0);
        let validity = validity(3 * SEC).unwrap();
        assert_eq!(schedule.next_due(), Some(t0 + validity / 3));
        assert_eq!(
            first_renewal(1.0 / 3.0, t0, 3 * SEC),
            t0 + validity / 3,
            "the manager's wake-up hint agrees"
        );
        let early = schedule.pop_due(t0 + validity / 3 - MS, 10);
        assert!(early.renew.is_empty() && early.expired.is_empty());
        let due = pop_one(&mut schedule, t0 + validity / 3);
        assert_eq!((due.item.id, due.valid_until), (1, t0 + validity));
        assert_eq!(schedule.next_due(), None, "in flight: not due again");
    }

    #[test]
    fn due_leases_come_in_due_order_and_in_batches() {
        let (mut schedule, t0) = schedule();
        let leases: Vec<Item> = (0..10).map(|id| lease(id, 3 * SEC)).collect();
        for lease in &leases {
            schedule.track(lease.clone(), t0 + (10 - lease.id as u32) * MS);
        }
        let later = t0 + 1100 * MS;
        assert_eq!(ids(&schedule.pop_due(later, 4).renew), vec![9, 8, 7, 6]);
        assert_eq!(ids(&schedule.pop_due(later, 4).renew), vec![5, 4, 3, 2]);
        assert_eq!(ids(&schedule.pop_due(later, 4).renew), vec![1, 0]);
        assert!(
            leases.iter().all(|lease| schedule.remove(lease)),
            "in-flight leases stay tracked"
        );
    }

    #[test]
    fn equal_due_times_are_all_kept() {
        let (mut schedule, t0) = schedule();
        for id in 0..3 {
            schedule.track(lease(id, SEC), t0);
        }
        assert_eq!(
            ids(&schedule.pop_due(t0 + 500 * MS, 10).renew),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn leases_past_their_validity_expire_instead_of_renewing() {
        let (mut schedule, t0) = schedule();
        let leases: Vec<Item> = (0..3).map(|id| lease(id, SEC)).collect();
        for lease in &leases {
            schedule.track(lease.clone(), t0);
        }
        let due = schedule.pop_due(t0 + SEC, 1);
        assert!(due.renew.is_empty());
        assert_eq!(
            due.expired.len(),
            3,
            "expired leases do not count against the batch"
        );
        assert!(
            leases.iter().all(|lease| !schedule.remove(lease)),
            "expired leases are no longer tracked"
        );
    }

    #[test]
    fn renewal_moves_validity_from_the_send_time() {
        let (mut schedule, t0) = schedule();
        schedule.track(lease(1, 3 * SEC), t0);
        let validity = validity(3 * SEC).unwrap();
        let sent = t0 + SEC;
        let due = pop_one(&mut schedule, sent);
        assert_eq!(schedule.renewed(due, sent), Some(sent + validity));
        assert_eq!(schedule.next_due(), Some(sent + validity / 3));
    }

    #[test]
    fn a_late_answer_never_shortens_the_validity() {
        let (mut schedule, t0) = schedule();
        schedule.track(lease(1, 3 * SEC), t0 + SEC);
        let validity = validity(3 * SEC).unwrap();
        let due = pop_one(&mut schedule, t0 + 2 * SEC);
        // The renewal's request is dated before the acquisition's (a slow clock read).
        assert_eq!(schedule.renewed(due, t0), Some(t0 + SEC + validity));
    }

    #[test]
    fn failures_retry_until_the_validity_ends_then_expire_once() {
        let (mut schedule, t0) = schedule();
        let item = lease(1, SEC);
        schedule.track(item.clone(), t0);
        let validity = validity(SEC).unwrap();
        let valid_until = t0 + validity;
        let mut now = t0 + validity / 3;
        let mut attempts = 0;
        loop {
            let mut due = schedule.pop_due(now, 10);
            if !due.expired.is_empty() {
                assert_eq!(due.expired.len(), 1);
                break;
            }
            assert_eq!(due.renew.len(), 1);
            attempts += 1;
            match schedule.failed(due.renew.remove(0), now) {
                AfterFailure::RetryAt(at) => {
                    assert!(at <= valid_until, "a retry is never after the validity");
                    assert!(at > now);
                    now = at;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(now >= valid_until, "lost only once the validity ended");
        assert!(attempts >= 5, "retried {attempts} times");
        assert!(!schedule.remove(&item), "no longer tracked");
        assert!(
            schedule.pop_due(now + SEC, 10).expired.is_empty(),
            "lost exactly once"
        );
    }

    #[test]
    fn a_failure_after_the_validity_expires_at_once() {
        let (mut schedule, t0) = schedule();
        let item = lease(1, SEC);
        schedule.track(item.clone(), t0);
        let due = pop_one(&mut schedule, t0 + 400 * MS);
        assert_eq!(schedule.failed(due, t0 + SEC), AfterFailure::Expired);
        assert!(!schedule.remove(&item));
    }

    #[test]
    fn untracked_leases_are_never_due() {
        let (mut schedule, t0) = schedule();
        let (a, b) = (lease(1, SEC), lease(2, SEC));
        schedule.track(a.clone(), t0);
        schedule.track(b.clone(), t0);
        assert!(schedule.remove(&a));
        assert!(!schedule.remove(&a), "removed once");
        let due = pop_one(&mut schedule, t0 + 500 * MS);
        assert_eq!(due.item.id, 2);
        // Untracked while in flight: its outcome changes nothing.
        assert!(schedule.remove(&b));
        assert_eq!(schedule.renewed(due, t0 + 500 * MS), None);
        assert_eq!(schedule.next_due(), None);
    }

    #[test]
    fn tracking_again_replaces_the_old_place() {
        let (mut schedule, t0) = schedule();
        let item = lease(1, 3 * SEC);
        schedule.track(item.clone(), t0);
        schedule.track(item, t0 + SEC);
        let validity = validity(3 * SEC).unwrap();
        assert_eq!(schedule.next_due(), Some(t0 + SEC + validity / 3));
        assert_eq!(
            schedule.pop_due(t0 + 10 * SEC, 10).expired.len(),
            1,
            "one entry"
        );
    }
}
