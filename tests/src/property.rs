//! The property run's bookkeeping, shared by `tests/tests/property.rs` and the
//! `property-worker` binary: what each lease heard through the event hook, what the promises
//! about loss reports demand of it, and the critical sections that the Redis run checks for
//! mutual exclusion and fence order.
//!
//! The promises checked (see `DESIGN.md`, "Properties every backend must show"):
//!
//! - **Mutual exclusion**: no two leases of one key are held at the same instant, unless the key
//!   was deleted behind its holder's back (a [`Takeover`]); then fencing is the safety net.
//! - **Fences** strictly increase in grant order, so a protected resource that refuses lower
//!   fences never refuses a current holder.
//! - **Loss is reported exactly once**: a lost lease gives exactly one `Lost` event and one
//!   message on [`Lease::lost`](lock_core::Lease::lost), whichever path finds the loss, and no
//!   `Released` event; a lease released while held gives exactly one `Released` event and no
//!   `Lost`. See [`accounting_violations`].
//! - **Loss is reported on time**: no later than `valid_until` plus a slack each run names
//!   once. See [`LeaseFacts::lateness`].
//!
//! Times that must compare across processes ([`Section`], [`Takeover`]) are microseconds of
//! the system's wall clock ([`unix_micros`]): every process of a run is on the same machine, so
//! they read one clock. `Instant`s are not comparable across processes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lock_core::{Clock, EventHook, LeaseEvent};
use parking_lot::Mutex;

/// Microseconds since the Unix epoch on the system clock: a time every process on this machine
/// reads alike.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

/// What the event hook reported about one lease (identified by its key and fence).
#[derive(Debug, Clone, Default)]
pub struct EventTally {
    /// `Acquired` events.
    pub acquired: usize,
    /// `Renewed` events.
    pub renewed: usize,
    /// When each `Lost` event came, on the manager's clock.
    pub lost_at: Vec<Instant>,
    /// The name of the thread that reported the first `Lost` event (the renewer's, or a
    /// holder's).
    pub lost_by: Option<String>,
    /// `Released` events.
    pub released: usize,
}

/// Records every event of one or more managers, per lease, with the time it came on `clock`.
///
/// Leases are told apart by `(key, fence)`: fences are unique per key (a run that finds two
/// grants with one fence reports that first).
pub struct EventLedger {
    clock: Clock,
    tallies: Mutex<HashMap<(String, u64), EventTally>>,
}

impl fmt::Debug for EventLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventLedger")
            .field("clock", &self.clock)
            .field("leases", &self.tallies.lock().len())
            .finish()
    }
}

impl EventLedger {
    /// An empty ledger that stamps events with `clock` (the managers' clock).
    pub fn new(clock: Clock) -> Arc<EventLedger> {
        Arc::new(EventLedger {
            clock,
            tallies: Mutex::new(HashMap::new()),
        })
    }

    /// A hook for [`LockManagerBuilder::event_hook`](lock_core::LockManagerBuilder::event_hook)
    /// that records into this ledger.
    pub fn hook(self: &Arc<Self>) -> impl EventHook {
        let ledger = Arc::clone(self);
        move |event: &LeaseEvent<'_>| ledger.record(event)
    }

    /// What has been recorded for the lease `(key, fence)` so far.
    pub fn tally(&self, key: &str, fence: u64) -> EventTally {
        self.tallies
            .lock()
            .get(&(key.to_owned(), fence))
            .cloned()
            .unwrap_or_default()
    }

    fn record(&self, event: &LeaseEvent<'_>) {
        let now = self.clock.now();
        let (key, fence) = match *event {
            LeaseEvent::Acquired { key, fence, .. }
            | LeaseEvent::Renewed { key, fence, .. }
            | LeaseEvent::Lost { key, fence, .. }
            | LeaseEvent::Released { key, fence } => (key, fence),
            _ => return,
        };
        let mut tallies = self.tallies.lock();
        let tally = tallies.entry((key.to_owned(), fence)).or_default();
        match event {
            LeaseEvent::Acquired { .. } => tally.acquired += 1,
            LeaseEvent::Renewed { .. } => tally.renewed += 1,
            LeaseEvent::Lost { .. } => {
                tally.lost_at.push(now);
                let thread = std::thread::current();
                let name = thread.name().unwrap_or("unnamed");
                tally.lost_by.get_or_insert_with(|| name.to_owned());
            }
            LeaseEvent::Released { .. } => tally.released += 1,
            _ => {}
        }
    }
}

/// What the holder of a lease knows about it, to hold against its [`EventTally`].
#[derive(Debug, Clone)]
pub struct LeaseFacts {
    /// The holder knows the lease was lost: `is_held()` said false, `ensure_held()` or
    /// `release()` failed with `is_lost()`, or (in virtual time) the run knows the backend will
    /// answer "not owned" to its release.
    pub known_lost: bool,
    /// The lease was released or dropped.
    pub ended: bool,
    /// Messages received so far on the lease's `lost()` receiver.
    pub lost_messages: usize,
    /// The lease's `valid_until` when last looked at (it does not move once the lease is lost
    /// or released).
    pub valid_until: Instant,
    /// When the holder began to release or drop it, if it has.
    pub release_began: Option<Instant>,
}

impl LeaseFacts {
    /// When the loss was reported: the first `Lost` event's time, or the start of the
    /// holder's release if that came first; `None` if no `Lost` event came.
    ///
    /// A loss first reported after the holder began to release the lease counts as reported
    /// when the release began: from then on the holder no longer relies on the lease and the
    /// renewer no longer watches it, and the release's own call may take as long as the
    /// backend's timeouts allow.
    pub fn reported_at(&self, tally: &EventTally) -> Option<Instant> {
        let lost_at = *tally.lost_at.first()?;
        Some(
            self.release_began
                .map_or(lost_at, |began| lost_at.min(began)),
        )
    }

    /// How late the loss was reported ([`reported_at`](LeaseFacts::reported_at) minus
    /// `valid_until`), or `None` when it came on time (or there was none).
    pub fn lateness(&self, tally: &EventTally) -> Option<Duration> {
        self.reported_at(tally)?
            .checked_duration_since(self.valid_until)
            .filter(|late| !late.is_zero())
    }
}

/// Mutual exclusion: no two leases of one key held at once.
pub const MUTUAL_EXCLUSION: &str = "mutual exclusion (one held lease per key)";
/// Fences strictly increase in grant order, and no fence is granted twice.
pub const FENCE_ORDER: &str = "fences strictly increase in grant order";
/// The fenced resource accepts every write of a lease that is held.
pub const FENCED_WRITE: &str = "a held lease's fenced write is accepted";
/// A loss is reported no later than `valid_until` plus the run's slack.
pub const ON_TIME: &str = "a loss is reported by valid_until + slack";
/// A lost lease gives exactly one `Lost` event.
pub const ONE_LOST_EVENT: &str = "a lost lease gives exactly one Lost event";
/// A lost lease gives exactly one message on `lost()`.
pub const ONE_LOST_MESSAGE: &str = "a lost lease gives exactly one lost() message";
/// A lost lease is not also counted as a normal release.
pub const LOST_NOT_RELEASED: &str = "a lost lease gives no Released event";
/// A lease released while held gives exactly one `Released` event.
pub const ONE_RELEASED_EVENT: &str = "a lease released while held gives one Released event";
/// `ensure_held()` fails exactly when `is_held()` is false.
pub const ENSURE_HELD: &str = "ensure_held() agrees with is_held()";
/// Calls fail only in the documented ways (transient errors, timeouts, losses).
pub const CALL_RESULT: &str = "calls fail only as documented";

/// Checks that the events and `lost()` messages of one lease are what its fate demands, and
/// returns each broken promise with a sentence.
///
/// A lease is lost when the holder knows it ([`LeaseFacts::known_lost`]) or when a `Lost` event
/// or a `lost()` message says so; then it must have exactly one `Lost` event, exactly one
/// `lost()` message and no `Released` event. A lease that ended without being lost must have
/// exactly one `Released` event. A live lease that is not lost has neither. May be called at
/// any time: every requirement holds at every moment once the manager has settled (the hook
/// runs right after the `lost()` message is sent, on the same thread).
pub fn accounting_violations(
    facts: &LeaseFacts,
    tally: &EventTally,
) -> Vec<(&'static str, String)> {
    let mut broken = Vec::new();
    let lost_events = tally.lost_at.len();
    let lost = facts.known_lost || lost_events > 0 || facts.lost_messages > 0;
    if lost_events > 1 {
        broken.push((ONE_LOST_EVENT, format!("{lost_events} Lost events")));
    }
    if facts.lost_messages > 1 {
        let detail = format!("{} messages on lost()", facts.lost_messages);
        broken.push((ONE_LOST_MESSAGE, detail));
    }
    if tally.released > 1 {
        let detail = format!("{} Released events", tally.released);
        broken.push((ONE_RELEASED_EVENT, detail));
    }
    if lost {
        let how = if facts.known_lost {
            "the holder knows it is lost"
        } else if lost_events > 0 {
            "a Lost event says it is lost"
        } else {
            "lost() says it is lost"
        };
        if lost_events == 0 {
            broken.push((ONE_LOST_EVENT, format!("{how}, but no Lost event came")));
        }
        if facts.lost_messages == 0 {
            broken.push((
                ONE_LOST_MESSAGE,
                format!("{how}, but lost() received nothing"),
            ));
        }
        if tally.released > 0 {
            broken.push((
                LOST_NOT_RELEASED,
                format!("{how}, and a Released event came"),
            ));
        }
    } else if facts.ended && tally.released == 0 {
        let detail = "released while held, but no Released event came".to_owned();
        broken.push((ONE_RELEASED_EVENT, detail));
    }
    broken
}

/// One critical section: a stretch of time during which the lease `lease` (fence `fence`) of
/// `key` was held, as far as its holder could know.
///
/// `start_us` is read right *after* an `ensure_held()` that succeeded and `end_us` right
/// *before* another that succeeded; since a lost lease never comes back, the lease was held
/// during the whole of `[start_us, end_us]`. Two sections of the same key by different leases
/// must therefore be disjoint, and ordered like their fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The lock key.
    pub key: String,
    /// Names the lease across the run: `process/thread/sequence`.
    pub lease: String,
    /// The lease's fence.
    pub fence: u64,
    /// When the holder began to acquire the lease (before the call), in [`unix_micros`].
    pub acquiring_from_us: u64,
    /// Start of the section, in [`unix_micros`].
    pub start_us: u64,
    /// End of the section, in [`unix_micros`].
    pub end_us: u64,
    /// Fenced writes of the section that the resource refused.
    pub rejected_writes: u32,
}

impl Section {
    /// The section as one line of text: `section KEY LEASE FENCE ACQUIRING START END REJECTED`.
    pub fn to_line(&self) -> String {
        format!(
            "section {} {} {} {} {} {} {}",
            self.key,
            self.lease,
            self.fence,
            self.acquiring_from_us,
            self.start_us,
            self.end_us,
            self.rejected_writes
        )
    }

    /// Reads a line written by [`to_line`](Section::to_line); `None` for any other line.
    pub fn parse(line: &str) -> Option<Section> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["section", key, lease, fence, acquiring, start, end, rejected] = words.as_slice()
        else {
            return None;
        };
        Some(Section {
            key: (*key).to_owned(),
            lease: (*lease).to_owned(),
            fence: fence.parse().ok()?,
            acquiring_from_us: acquiring.parse().ok()?,
            start_us: start.parse().ok()?,
            end_us: end.parse().ok()?,
            rejected_writes: rejected.parse().ok()?,
        })
    }
}

/// A lock key deleted behind its holder's back (an operator's `DEL`, a failover): some time
/// in `[from_us, to_us]`, in [`unix_micros`]. Until the holder's next renewal finds out, the
/// holder still believes it holds the key while a new holder may take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The lock key.
    pub key: String,
    /// Read before the `DEL` was sent.
    pub from_us: u64,
    /// Read after its reply came.
    pub to_us: u64,
}

/// Checks critical sections of many processes for mutual exclusion and fence order, and
/// returns each broken promise with a sentence.
///
/// For every two sections `x` and `y` of one key by different leases with `x.fence <
/// y.fence`, `x` must end before `y` starts (within `tolerance_us` of clock reading error):
/// otherwise the two leases were held at once (they overlap) or the later grant has the lower
/// fence (`y` lies wholly before `x`). Two leases of one key must not share a fence. A section
/// must have no rejected fenced write: the resource refuses a write only after a write with a
/// higher fence, whose lease was granted later and held before this section's end, while this
/// lease was still held.
///
/// A [`Takeover`] of the key between the moment the lower-fenced lease began to be acquired and
/// the start of the other section excuses both findings: the old holder keeps believing it
/// holds the key until its next renewal, which is exactly what fencing is for.
pub fn section_violations(
    sections: &[Section],
    takeovers: &[Takeover],
    tolerance_us: u64,
) -> Vec<(&'static str, String)> {
    let mut broken = Vec::new();
    let mut by_key: HashMap<&str, Vec<&Section>> = HashMap::new();
    for section in sections {
        by_key.entry(&section.key).or_default().push(section);
    }
    let taken_over = |key: &str, from_us: u64, to_us: u64| {
        takeovers.iter().any(|takeover| {
            takeover.key == key
                && takeover.to_us.saturating_add(tolerance_us) >= from_us
                && takeover.from_us <= to_us.saturating_add(tolerance_us)
        })
    };
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        let mut sections = by_key.remove(key).unwrap_or_default();
        sections.sort_by_key(|section| (section.fence, section.start_us));
        let mut owners: HashMap<u64, &str> = HashMap::new();
        for section in &sections {
            let owner = *owners.entry(section.fence).or_insert(&section.lease);
            if owner != section.lease {
                let detail = format!(
                    "fence {} of key {key} was granted twice: to {owner} and to {}",
                    section.fence, section.lease
                );
                broken.push((FENCE_ORDER, detail));
            }
            if section.rejected_writes > 0
                && !taken_over(key, section.acquiring_from_us, section.end_us)
            {
                let detail = format!(
                    "{} fenced write(s) of {} (key {key}, fence {}) were rejected while it was \
                     held",
                    section.rejected_writes, section.lease, section.fence
                );
                broken.push((FENCED_WRITE, detail));
            }
        }
        for (index, later) in sections.iter().enumerate() {
            for earlier in &sections[..index] {
                if earlier.fence >= later.fence
                    || earlier.end_us <= later.start_us.saturating_add(tolerance_us)
                    || taken_over(key, earlier.acquiring_from_us, later.start_us)
                {
                    continue;
                }
                let (promise, what) =
                    if later.end_us.saturating_add(tolerance_us) < earlier.start_us {
                        (FENCE_ORDER, "the later grant has the lower fence")
                    } else {
                        (MUTUAL_EXCLUSION, "two holders at once")
                    };
                let detail = format!(
                    "{what} on key {key}: {} (fence {}) held it during [{}, {}] µs and {} \
                     (fence {}) during [{}, {}] µs",
                    earlier.lease,
                    earlier.fence,
                    earlier.start_us,
                    earlier.end_us,
                    later.lease,
                    later.fence,
                    later.start_us,
                    later.end_us
                );
                broken.push((promise, detail));
            }
        }
    }
    broken
}

/// The broken promises a run found, grouped by promise: how often each was broken, and the
/// first time it was, so that one failure does not hide the others.
#[derive(Debug, Default)]
pub struct Findings {
    promises: BTreeMap<String, (usize, String)>,
}

impl Findings {
    /// Records that `promise` was broken, as `detail` says.
    pub fn add(&mut self, promise: impl Into<String>, detail: impl Into<String>) {
        let entry = self
            .promises
            .entry(promise.into())
            .or_insert_with(|| (0, detail.into()));
        entry.0 += 1;
    }

    /// True when no promise was broken.
    pub fn is_empty(&self) -> bool {
        self.promises.is_empty()
    }
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (promise, (count, first)) in &self.promises {
            writeln!(f, "- {promise}: broken {count} time(s); first: {first}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(lease: &str, fence: u64, start_us: u64, end_us: u64) -> Section {
        Section {
            key: "k".into(),
            lease: lease.into(),
            fence,
            acquiring_from_us: start_us.saturating_sub(10),
            start_us,
            end_us,
            rejected_writes: 0,
        }
    }

    #[test]
    fn a_section_survives_its_line() {
        let original = Section {
            rejected_writes: 2,
            ..section("c1/0/7", 42, 100, 200)
        };
        assert_eq!(Section::parse(&original.to_line()), Some(original));
        assert_eq!(Section::parse("summary child"), None);
    }

    #[test]
    fn disjoint_sections_in_fence_order_pass() {
        let sections = [
            section("a", 1, 100, 200),
            section("a", 1, 210, 300),
            section("b", 2, 300, 400),
        ];
        assert!(section_violations(&sections, &[], 0).is_empty());
    }

    #[test]
    fn overlaps_inversions_and_duplicate_fences_are_found() {
        let promises = |sections: &[Section]| -> Vec<&str> {
            section_violations(sections, &[], 0)
                .into_iter()
                .map(|(promise, _)| promise)
                .collect()
        };
        let overlap = [section("a", 1, 100, 200), section("b", 2, 150, 250)];
        assert_eq!(promises(&overlap), [MUTUAL_EXCLUSION]);
        let inverted = [section("a", 2, 100, 200), section("b", 1, 300, 400)];
        assert_eq!(promises(&inverted), [FENCE_ORDER]);
        let twice = [section("a", 1, 100, 200), section("b", 1, 300, 400)];
        assert_eq!(promises(&twice), [FENCE_ORDER]);
        let rejected = [Section {
            rejected_writes: 1,
            ..section("a", 1, 100, 200)
        }];
        assert_eq!(promises(&rejected), [FENCED_WRITE]);
        let within_tolerance = [section("a", 1, 100, 200), section("b", 2, 199, 300)];
        assert!(section_violations(&within_tolerance, &[], 1).is_empty());
    }

    #[test]
    fn a_takeover_excuses_the_old_holder() {
        // `a` holds on after its key was deleted at 250 µs; `b` takes the key meanwhile.
        let sections = [
            section("a", 1, 100, 400),
            Section {
                acquiring_from_us: 90,
                rejected_writes: 1,
                ..section("a", 1, 410, 420)
            },
            section("b", 2, 300, 350),
        ];
        let takeover = Takeover {
            key: "k".into(),
            from_us: 250,
            to_us: 260,
        };
        assert!(section_violations(&sections, std::slice::from_ref(&takeover), 0).is_empty());
        let elsewhere = Takeover {
            key: "other".into(),
            ..takeover
        };
        assert_eq!(section_violations(&sections, &[elsewhere], 0).len(), 3);
    }

    #[test]
    fn accounting_demands_one_report_per_fate() {
        let now = Instant::now();
        let facts = LeaseFacts {
            known_lost: false,
            ended: true,
            lost_messages: 0,
            valid_until: now,
            release_began: Some(now),
        };
        let released = EventTally {
            acquired: 1,
            released: 1,
            ..EventTally::default()
        };
        assert!(accounting_violations(&facts, &released).is_empty());
        let lost = LeaseFacts {
            known_lost: true,
            lost_messages: 1,
            ..facts.clone()
        };
        let found = accounting_violations(&lost, &released);
        assert_eq!(found.len(), 2, "{found:?}"); // no Lost event, and Released
        let reported = EventTally {
            lost_at: vec![now + Duration::from_millis(3)],
            ..EventTally::default()
        };
        assert!(accounting_violations(&lost, &reported).is_empty());
        assert_eq!(lost.lateness(&reported), None); // found by the release itself
        let held = LeaseFacts {
            release_began: None,
            ..lost.clone()
        };
        assert_eq!(held.lateness(&reported), Some(Duration::from_millis(3)));
        let released_late = LeaseFacts {
            release_began: Some(now + Duration::from_millis(2)),
            ..lost
        };
        assert_eq!(
            released_late.lateness(&reported),
            Some(Duration::from_millis(2))
        );
    }
}
