//! The renewal schedule: a pure data structure that decides which leases are due, and what
//! follows from each renewal's outcome. It takes `now` as an argument and never reads a clock,
//! so its timing is unit-tested without threads or sleeps.

use std::collections::{BTreeSet, HashMap};
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

/// A slot's `due` while its renewal is in flight: not on the queue.
const IN_FLIGHT: u64 = u64::MAX;

/// One tracked lease. Times are nanoseconds after the schedule's epoch, which keeps a slot at
/// 32 bytes besides its item: the renewer may track a hundred thousand of them.
struct Slot<T> {
    item: T,
    validity: u64,
    valid_until: u64,
    /// When the slot is due, or [`IN_FLIGHT`].
    due: u64,
}

/// Leases taken off the schedule by [`Schedule::pop_due`].
#[derive(Debug)]
pub(crate) struct DueLeases<T> {
    /// Due for renewal, with the end of their validity.
    pub(crate) renew: Vec<(u64, T, Instant)>,
    /// Past their validity before they could be renewed: lost, and removed from the schedule.
    pub(crate) expired: Vec<(u64, T)>,
}

/// What to do after a failed renewal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AfterFailure<T> {
    /// Still valid: retry at this time.
    RetryAt(Instant),
    /// The validity ran out: lost, and removed from the schedule.
    Expired(T),
    /// Not on the schedule (untracked meanwhile).
    Unknown,
}

/// Tracked leases ordered by due time: O(log n) per tracked, untracked or due lease.
pub(crate) struct Schedule<T> {
    /// `(due, id)` of every slot that is not in flight.
    queue: BTreeSet<(u64, u64)>,
    slots: HashMap<u64, Slot<T>>,
    /// Renew after this fraction of the validity (default one third).
    renew_fraction: f64,
    /// Time zero of the slots' nanosecond times: no lease is acquired before it.
    epoch: Instant,
}

impl<T: Clone> Schedule<T> {
    /// An empty schedule whose leases are all acquired at `epoch` or later.
    pub(crate) fn new(renew_fraction: f64, epoch: Instant) -> Schedule<T> {
        Schedule {
            queue: BTreeSet::new(),
            slots: HashMap::new(),
            renew_fraction,
            epoch,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    fn ticks(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch))
    }

    fn instant(&self, ticks: u64) -> Instant {
        saturating_add(self.epoch, Duration::from_nanos(ticks))
    }

    /// Starts renewing a lease acquired with `ttl` by a request sent at `sent_at`.
    pub(crate) fn track(&mut self, id: u64, item: T, ttl: Duration, sent_at: Instant) {
        let validity = validity(ttl).unwrap_or(Duration::ZERO);
        let valid_until = saturating_add(sent_at, validity);
        let due = self.ticks(renewal_time(
            self.renew_fraction,
            sent_at,
            validity,
            valid_until,
        ));
        self.remove(id);
        self.queue.insert((due, id));
        let slot = Slot {
            item,
            validity: nanos(validity),
            valid_until: self.ticks(valid_until),
            due,
        };
        self.slots.insert(id, slot);
    }

    /// Stops renewing a lease; returns its item if it was tracked.
    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        let slot = self.slots.remove(&id)?;
        if slot.due != IN_FLIGHT {
            self.queue.remove(&(slot.due, id));
        }
        Some(slot.item)
    }

    /// The earliest due time, if any lease is scheduled.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.queue.first().map(|(due, _)| self.instant(*due))
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
            let Some(&(at, id)) = self.queue.first() else {
                break;
            };
            if at > now {
                break;
            }
            self.queue.remove(&(at, id));
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if now >= slot.valid_until {
                if let Some(slot) = self.slots.remove(&id) {
                    due.expired.push((id, slot.item));
                }
            } else {
                slot.due = IN_FLIGHT;
                let valid_until = slot.valid_until;
                let item = slot.item.clone();
                due.renew.push((id, item, self.instant(valid_until)));
            }
        }
        due
    }

    /// A renewal of `id` sent at `sent_at` succeeded: returns the new end of its validity and
    /// puts it back on the schedule.
    pub(crate) fn renewed(&mut self, id: u64, sent_at: Instant) -> Option<Instant> {
        let sent = self.ticks(sent_at);
        let fraction = self.renew_fraction;
        let slot = self.slots.get_mut(&id)?;
        slot.valid_until = slot.valid_until.max(sent.saturating_add(slot.validity));
        let after = nanos(Duration::from_nanos(slot.validity).mul_f64(fraction));
        let due = sent.saturating_add(after).min(slot.valid_until);
        let valid_until = slot.valid_until;
        self.reschedule(id, due);
        Some(self.instant(valid_until))
    }

    /// A renewal of `id` failed transiently at `now`: retry soon if the lease is still valid.
    pub(crate) fn failed(&mut self, id: u64, now: Instant) -> AfterFailure<T> {
        let now_ticks = self.ticks(now);
        let Some(slot) = self.slots.get(&id) else {
            return AfterFailure::Unknown;
        };
        if now_ticks >= slot.valid_until {
            return match self.remove(id) {
                Some(item) => AfterFailure::Expired(item),
                None => AfterFailure::Unknown,
            };
        }
        let interval = (Duration::from_nanos(slot.validity) / 10)
            .clamp(MIN_RETRY_INTERVAL, MAX_RETRY_INTERVAL);
        // Never later than the end of validity, where the lease is declared lost.
        let at = now_ticks
            .saturating_add(nanos(interval))
            .min(slot.valid_until);
        self.reschedule(id, at);
        AfterFailure::RetryAt(self.instant(at))
    }

    fn reschedule(&mut self, id: u64, at: u64) {
        if let Some(slot) = self.slots.get_mut(&id) {
            if slot.due != IN_FLIGHT {
                self.queue.remove(&(slot.due, id));
            }
            slot.due = at;
            self.queue.insert((at, id));
        }
    }
}

/// A duration in nanoseconds, saturating (at about 584 years).
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn schedule() -> (Schedule<&'static str>, Instant) {
        let t0 = Instant::now();
        (Schedule::new(1.0 / 3.0, t0), t0)
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
        schedule.track(1, "a", 3 * SEC, t0);
        let validity = validity(3 * SEC).unwrap();
        assert_eq!(schedule.next_due(), Some(t0 + validity / 3));
        let early = schedule.pop_due(t0 + validity / 3 - MS, 10);
        assert!(early.renew.is_empty() && early.expired.is_empty());
        let due = schedule.pop_due(t0 + validity / 3, 10);
        assert_eq!(due.renew, vec![(1, "a", t0 + validity)]);
        assert_eq!(schedule.next_due(), None, "in flight: not due again");
    }

    #[test]
    fn due_leases_come_in_due_order_and_in_batches() {
        let (mut schedule, t0) = schedule();
        for id in 0..10u64 {
            schedule.track(id, "x", 3 * SEC, t0 + (10 - id as u32) * MS);
        }
        let later = t0 + 1100 * MS;
        let ids = |due: DueLeases<&str>| -> Vec<u64> { due.renew.iter().map(|r| r.0).collect() };
        assert_eq!(ids(schedule.pop_due(later, 4)), vec![9, 8, 7, 6]);
        assert_eq!(ids(schedule.pop_due(later, 4)), vec![5, 4, 3, 2]);
        assert_eq!(ids(schedule.pop_due(later, 4)), vec![1, 0]);
        assert_eq!(schedule.len(), 10, "in-flight leases stay tracked");
    }

    #[test]
    fn leases_past_their_validity_expire_instead_of_renewing() {
        let (mut schedule, t0) = schedule();
        for id in 0..3 {
            schedule.track(id, "x", SEC, t0);
        }
        let due = schedule.pop_due(t0 + SEC, 1);
        assert!(due.renew.is_empty());
        assert_eq!(
            due.expired.len(),
            3,
            "expired leases do not count against the batch"
        );
        assert_eq!(schedule.len(), 0);
    }

    #[test]
    fn renewal_moves_validity_from_the_send_time() {
        let (mut schedule, t0) = schedule();
        schedule.track(1, "a", 3 * SEC, t0);
        let validity = validity(3 * SEC).unwrap();
        let sent = t0 + SEC;
        schedule.pop_due(sent, 10);
        assert_eq!(schedule.renewed(1, sent), Some(sent + validity));
        assert_eq!(schedule.next_due(), Some(sent + validity / 3));
    }

    #[test]
    fn failures_retry_until_the_validity_ends_then_expire_once() {
        let (mut schedule, t0) = schedule();
        schedule.track(1, "a", SEC, t0);
        let validity = validity(SEC).unwrap();
        let valid_until = t0 + validity;
        let mut now = t0 + validity / 3;
        let mut attempts = 0;
        loop {
            let due = schedule.pop_due(now, 10);
            if !due.expired.is_empty() {
                assert_eq!(due.expired, vec![(1, "a")]);
                break;
            }
            assert_eq!(due.renew.len(), 1);
            attempts += 1;
            match schedule.failed(1, now) {
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
        assert_eq!(schedule.len(), 0);
        assert!(
            schedule.pop_due(now + SEC, 10).expired.is_empty(),
            "lost exactly once"
        );
        assert_eq!(schedule.failed(1, now), AfterFailure::Unknown);
    }

    #[test]
    fn a_failure_after_the_validity_expires_at_once() {
        let (mut schedule, t0) = schedule();
        schedule.track(1, "a", SEC, t0);
        schedule.pop_due(t0 + 400 * MS, 10);
        assert_eq!(schedule.failed(1, t0 + SEC), AfterFailure::Expired("a"));
    }

    #[test]
    fn untracked_leases_are_never_due() {
        let (mut schedule, t0) = schedule();
        schedule.track(1, "a", SEC, t0);
        schedule.track(2, "b", SEC, t0);
        assert_eq!(schedule.remove(1), Some("a"));
        let due = schedule.pop_due(t0 + 500 * MS, 10);
        assert_eq!(due.renew.len(), 1);
        assert_eq!(due.renew[0].0, 2);
        // Untracked while in flight: its outcome changes nothing.
        assert_eq!(schedule.remove(2), Some("b"));
        assert_eq!(schedule.renewed(2, t0 + 500 * MS), None);
        assert_eq!(schedule.next_due(), None);
    }
}
