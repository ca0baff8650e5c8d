//! [`ManagerStats`]: what a manager has done, counted with relaxed atomics (no lock on the hot
//! path) and read as a snapshot by [`LockManager::stats`](crate::LockManager::stats).
//!
//! Most counts come from the lease events, through [`CountingHook`], which wraps the user's
//! hook: every event is counted where it is reported, once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::event::{EventHook, LeaseEvent};
use crate::schedule::nanos;
use crate::{Error, LostReason};

/// A snapshot of a manager's counters, from [`LockManager::stats`](crate::LockManager::stats).
///
/// Every count starts at zero when the manager is built and only grows (but
/// [`leases_held`](ManagerStats::leases_held)). The counters are read one by one without a
/// lock: while other threads work, a snapshot may show an event in one count and not yet in
/// another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStats {
    /// Leases granted and neither released nor lost yet: `acquires.granted - releases -
    /// losses.total()`.
    pub leases_held: u64,
    /// Calls that acquire, by outcome.
    pub acquires: AcquireCounts,
    /// Renewals, by outcome, and the renewer's batches.
    pub renewals: RenewalCounts,
    /// Leases lost, by [`LostReason`].
    pub losses: LossCounts,
    /// Leases released by their holders (explicitly or by drop), lost ones aside.
    pub releases: u64,
}

/// How the calls that acquire ended: `try_acquire`, `acquire`, `acquire_timeout`,
/// `with_lease` and their `*_default` forms count once per call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcquireCounts {
    /// Calls that returned a lease.
    pub granted: u64,
    /// Calls that found the key held and gave up: `try_acquire`'s `Ok(None)`, a timeout whose
    /// last attempt found another holder, and a key this thread holds already
    /// ([`Error::AlreadyHeld`]).
    pub busy: u64,
    /// Calls that failed otherwise: bad input, a backend error, a timeout whose last attempt
    /// failed.
    pub failed: u64,
}

/// What the renewer (and [`Lease::extend`](crate::Lease::extend)) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RenewalCounts {
    /// Renewals the backend applied, one per lease (an extend counts as one).
    pub ok: u64,
    /// Renewals that failed with a transient error, one per lease and attempt (retried until
    /// the lease's validity ends). A renewal that finds the lease gone is counted in
    /// [`losses`](ManagerStats::losses).
    pub failed: u64,
    /// Renewal batches answered by the backend (one backend call each).
    pub batches: u64,
    /// How long the last batch took, from sending to answer.
    pub last_batch_latency: Duration,
    /// The longest any batch took.
    pub max_batch_latency: Duration,
}

/// Leases lost, by reason; each lost lease counts once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LossCounts {
    /// [`LostReason::Expired`].
    pub expired: u64,
    /// [`LostReason::TakenOver`].
    pub taken_over: u64,
    /// [`LostReason::Rejected`].
    pub rejected: u64,
}

impl LossCounts {
    /// Every lost lease, whatever the reason.
    pub fn total(&self) -> u64 {
        self.expired + self.taken_over + self.rejected
    }
}

/// The live counters behind [`ManagerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    granted: AtomicU64,
    busy: AtomicU64,
    failed: AtomicU64,
    renewed: AtomicU64,
    renewal_failed: AtomicU64,
    batches: AtomicU64,
    last_batch_nanos: AtomicU64,
    max_batch_nanos: AtomicU64,
    expired: AtomicU64,
    taken_over: AtomicU64,
    rejected: AtomicU64,
    released: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counts a call that acquired nothing: busy when the key was held, failed otherwise.
    pub(crate) fn not_acquired(&self, error: Option<&Error>) {
        let busy = match error {
            None | Some(Error::AlreadyHeld { .. }) => true,
            Some(Error::Timeout { last_error, .. }) => last_error.is_none(),
            Some(_) => false,
        };
        bump(if busy { &self.busy } else { &self.failed });
    }

    /// Counts a renewal batch answered `latency` after it was sent (on the renewer thread only).
    pub(crate) fn batch_answered(&self, latency: Duration) {
        let latency = nanos(latency);
        bump(&self.batches);
        self.last_batch_nanos.store(latency, Ordering::Relaxed);
        self.max_batch_nanos.fetch_max(latency, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ManagerStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let losses = LossCounts {
            expired: read(&self.expired),
            taken_over: read(&self.taken_over),
            rejected: read(&self.rejected),
        };
        let acquires = AcquireCounts {
            granted: read(&self.granted),
            busy: read(&self.busy),
            failed: read(&self.failed),
        };
        let releases = read(&self.released);
        ManagerStats {
            leases_held: acquires
                .granted
                .saturating_sub(releases)
                .saturating_sub(losses.total()),
            acquires,
            renewals: RenewalCounts {
                ok: read(&self.renewed),
                failed: read(&self.renewal_failed),
                batches: read(&self.batches),
                last_batch_latency: Duration::from_nanos(read(&self.last_batch_nanos)),
                max_batch_latency: Duration::from_nanos(read(&self.max_batch_nanos)),
            },
            losses,
            releases,
        }
    }
}

/// The manager's hook: counts every event, then passes it to the user's hook, if any.
pub(crate) struct CountingHook {
    pub(crate) counters: Arc<Counters>,
    pub(crate) user: Option<Box<dyn EventHook>>,
}

impl EventHook for CountingHook {
    fn on_event(&self, event: &LeaseEvent<'_>) {
        let counters = &*self.counters;
        match event {
            LeaseEvent::Acquired { .. } => bump(&counters.granted),
            LeaseEvent::Renewed { .. } => bump(&counters.renewed),
            LeaseEvent::RenewalFailed { .. } => bump(&counters.renewal_failed),
            LeaseEvent::Lost { reason, .. } => bump(match reason {
                LostReason::Expired => &counters.expired,
                LostReason::TakenOver => &counters.taken_over,
                LostReason::Rejected(_) => &counters.rejected,
            }),
            LeaseEvent::Released { .. } => bump(&counters.released),
            LeaseEvent::Suspect { .. } => {}
        }
        if let Some(user) = &self.user {
            user.on_event(event);
        }
    }
}
