//! The [`Lease`] guard and the state it shares with the renewer.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::event::{EventHook, LeaseEvent};
use crate::manager::ManagerShared;
use crate::schedule::{nanos, Scheduled, Slot};
use crate::{Error, LostReason, Ownership};

/// What a holder can currently trust about its lease.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LeaseStatus {
    /// Held, and the last renewal (or the acquisition) succeeded.
    Held,
    /// Still within its validity, but renewals are failing: it will be lost at
    /// [`Lease::valid_until`] unless a retry succeeds first.
    Suspect,
    /// Lost; the holder must stop acting on it.
    Lost(LostReason),
}

/// An owner token: a random (v4) UUID, kept as 16 bytes and sent as its 32 hex digits. Two
/// `u64` halves rather than a `u128`, whose 16-byte alignment would pad every lease.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token([u64; 2]);

/// A token's text, as backends see it.
pub(crate) struct TokenText([u8; 32]);

impl Token {
    pub(crate) fn random() -> Token {
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        Token([high, low])
    }

    pub(crate) fn text(&self) -> TokenText {
        let mut hex = [0u8; 32];
        let [high, low] = self.0;
        uuid::Uuid::from_u64_pair(high, low)
            .simple()
            .encode_lower(&mut hex);
        TokenText(hex)
    }
}

impl TokenText {
    pub(crate) fn as_str(&self) -> &str {
        // Always valid: `encode_lower` writes ASCII hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

enum Phase {
    Held,
    Suspect,
    Lost(LostReason),
    Released,
}

struct LeaseState {
    valid_until: Instant,
    phase: Phase,
    /// Created on the first call to [`Lease::lost`], so leases nobody watches stay small.
    lost_channel: Option<Box<(Sender<LostReason>, Receiver<LostReason>)>>,
}

/// The part of a lease shared by its guard and the renewer thread.
///
/// Every change of phase happens under one mutex and reads the clock inside it, so the answers
/// of `is_held` are monotonic: once false, false for good.
pub(crate) struct LeaseShared {
    pub(crate) id: u64,
    pub(crate) key: Box<str>,
    pub(crate) token: Token,
    pub(crate) fence: u64,
    /// The TTL in nanoseconds (8 bytes rather than a `Duration`'s 16: leases come by the
    /// hundred thousand). [`MAX_TTL`](crate::MAX_TTL) fits many times over.
    ttl_nanos: u64,
    /// The lease's place on the renewer's schedule.
    slot: Slot,
    state: Mutex<LeaseState>,
}

impl Scheduled for Arc<LeaseShared> {
    fn id(&self) -> u64 {
        self.id
    }

    fn ttl(&self) -> Duration {
        LeaseShared::ttl(self)
    }

    fn slot(&self) -> &Slot {
        &self.slot
    }
}

/// What a lease was when its guard released it.
enum BeforeRelease {
    Held,
    Lost(LostReason),
    /// Released already: nothing left to do.
    Released,
}

/// What the caller of a state change must report after the lock is dropped.
#[must_use]
pub(crate) enum Report {
    Nothing,
    Lost(LostReason),
    Suspect(Instant),
    Renewed(Instant),
}

impl LeaseShared {
    pub(crate) fn new(
        id: u64,
        key: &str,
        token: Token,
        fence: u64,
        ttl: Duration,
        valid_until: Instant,
    ) -> LeaseShared {
        LeaseShared {
            id,
            key: key.into(),
            token,
            fence,
            ttl_nanos: nanos(ttl),
            slot: Slot::new(),
            state: Mutex::new(LeaseState {
                valid_until,
                phase: Phase::Held,
                lost_channel: None,
            }),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl_nanos)
    }

    pub(crate) fn valid_until(&self) -> Instant {
        self.state.lock().valid_until
    }

    /// Moves to `Lost` unless already lost or released; sends on the lost channel.
    fn lose_locked(state: &mut LeaseState, reason: LostReason) -> Report {
        if matches!(state.phase, Phase::Lost(_) | Phase::Released) {
            return Report::Nothing;
        }
        state.phase = Phase::Lost(reason.clone());
        if let Some(channel) = &state.lost_channel {
            let (sender, _) = &**channel;
            // Capacity one, sent once: never blocks, never full.
            let _ = sender.try_send(reason.clone());
        }
        Report::Lost(reason)
    }

    /// Notices expiry: a lease whose validity has run out is lost, whoever looks first.
    fn check_expiry_locked(state: &mut LeaseState, now: Instant) -> Report {
        if now >= state.valid_until {
            Self::lose_locked(state, LostReason::Expired)
        } else {
            Report::Nothing
        }
    }

    pub(crate) fn status(&self, now: Instant, hook: &dyn EventHook) -> LeaseStatus {
        let (status, report) = {
            let mut state = self.state.lock();
            let report = Self::check_expiry_locked(&mut state, now);
            let status = match &state.phase {
                Phase::Held => LeaseStatus::Held,
                Phase::Suspect => LeaseStatus::Suspect,
                Phase::Lost(reason) => LeaseStatus::Lost(reason.clone()),
                // A released lease has no guard left to ask; the renewer treats it as gone.
                Phase::Released => LeaseStatus::Lost(LostReason::TakenOver),
            };
            (status, report)
        };
        self.report(report, hook);
        status
    }

    pub(crate) fn is_released(&self) -> bool {
        matches!(self.state.lock().phase, Phase::Released)
    }

    /// A renewal sent at a time that gives `valid_until` succeeded at `now`. Returns false when
    /// the lease was lost meanwhile (then it must not be renewed again).
    pub(crate) fn extend(&self, now: Instant, valid_until: Instant, hook: &dyn EventHook) -> bool {
        let report = {
            let mut state = self.state.lock();
            match Self::check_expiry_locked(&mut state, now) {
                Report::Nothing => match state.phase {
                    Phase::Held | Phase::Suspect => {
                        state.phase = Phase::Held;
                        state.valid_until = state.valid_until.max(valid_until);
                        Report::Renewed(state.valid_until)
                    }
                    Phase::Lost(_) | Phase::Released => Report::Nothing,
                },
                lost => lost,
            }
        };
        let renewed = matches!(report, Report::Renewed(_));
        self.report(report, hook);
        renewed
    }

    /// A renewal failed at `now` with the lease still valid: it becomes suspect.
    pub(crate) fn suspect(&self, now: Instant, hook: &dyn EventHook) {
        let report = {
            let mut state = self.state.lock();
            match Self::check_expiry_locked(&mut state, now) {
                Report::Nothing => match state.phase {
                    Phase::Held => {
                        state.phase = Phase::Suspect;
                        Report::Suspect(state.valid_until)
                    }
                    _ => Report::Nothing,
                },
                lost => lost,
            }
        };
        self.report(report, hook);
    }

    /// The lease is lost for `reason` (reported only if it was not lost or released already).
    pub(crate) fn lose(&self, reason: LostReason, hook: &dyn EventHook) {
        let report = Self::lose_locked(&mut self.state.lock(), reason);
        self.report(report, hook);
    }

    /// Marks the lease released; returns what it was until then.
    fn mark_released(&self, now: Instant, hook: &dyn EventHook) -> BeforeRelease {
        let (report, before) = {
            let mut state = self.state.lock();
            let report = Self::check_expiry_locked(&mut state, now);
            let before = match std::mem::replace(&mut state.phase, Phase::Released) {
                Phase::Held | Phase::Suspect => BeforeRelease::Held,
                Phase::Lost(reason) => BeforeRelease::Lost(reason),
                Phase::Released => BeforeRelease::Released,
            };
            (report, before)
        };
        self.report(report, hook);
        before
    }

    fn lost_receiver(&self) -> Receiver<LostReason> {
        let mut state = self.state.lock();
        let state = &mut *state;
        if let Some(channel) = &state.lost_channel {
            return channel.1.clone();
        }
        let (sender, receiver) = crossbeam_channel::bounded(1);
        if let Phase::Lost(reason) = &state.phase {
            let _ = sender.try_send(reason.clone());
        }
        state.lost_channel = Some(Box::new((sender, receiver.clone())));
        receiver
    }

    fn report(&self, report: Report, hook: &dyn EventHook) {
        let (key, fence) = (&*self.key, self.fence);
        match report {
            Report::Nothing => {}
            Report::Lost(reason) => hook.on_event(&LeaseEvent::Lost {
                key,
                fence,
                reason: &reason,
            }),
            Report::Suspect(valid_until) => hook.on_event(&LeaseEvent::Suspect {
                key,
                fence,
                valid_until,
            }),
            Report::Renewed(valid_until) => hook.on_event(&LeaseEvent::Renewed {
                key,
                fence,
                valid_until,
            }),
        }
    }
}

/// A held lease on one key: renewed in the background until it is released or dropped.
///
/// While [`is_held`](Lease::is_held) is true, no other holder can acquire the key, provided the
/// clocks behave (see the crate docs). Work that must not outlive the lease should check
/// [`ensure_held`](Lease::ensure_held) before each side effect, or watch [`lost`](Lease::lost),
/// and pass [`fence`](Lease::fence) to the protected resource so that it can refuse a stale
/// holder.
///
/// ```
/// use std::time::Duration;
/// use lock_core::LockManager;
/// use lock_memory::MemoryBackend;
///
/// let manager = LockManager::new(MemoryBackend::new());
/// let lease = manager.acquire("invoice-42", Duration::from_secs(30))?;
/// assert_eq!(lease.key(), "invoice-42");
/// assert!(lease.is_held());
/// lease.ensure_held()?;
/// lease.release()?;
/// # Ok::<(), lock_core::Error>(())
/// ```
#[must_use = "a lease is released as soon as it is dropped"]
pub struct Lease {
    shared: Arc<LeaseShared>,
    manager: Arc<ManagerShared>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key())
            .field("fence", &self.fence())
            .field("ttl", &self.shared.ttl())
            .field("valid_until", &self.valid_until())
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub(crate) fn new(shared: Arc<LeaseShared>, manager: Arc<ManagerShared>) -> Lease {
        Lease { shared, manager }
    }

    /// The key this lease holds.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The fencing token: strictly greater than every fence issued before for this key.
    ///
    /// Pass it with every write to the protected resource, and have the resource refuse a write
    /// whose fence is lower than the highest it has seen. That rejects a holder that lost its
    /// lease without knowing it (a long pause, a slow network), which no timeout can do.
    pub fn fence(&self) -> u64 {
        self.shared.fence
    }

    /// The TTL the lease is renewed with.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl()
    }

    /// Until when the lease is trusted, on the manager's clock: the instant before the last
    /// successful acquire or renewal was sent, plus the TTL, minus the clock drift allowance
    /// (1% of the TTL + 2 ms).
    pub fn valid_until(&self) -> Instant {
        self.shared.valid_until()
    }

    /// The lease's current status; noticing expiry here reports the loss at once.
    pub fn status(&self) -> LeaseStatus {
        self.shared
            .status(self.manager.clock.now(), &*self.manager.hook)
    }

    /// True while the lease is neither lost nor past its validity. Computed from the clock, so it
    /// turns false on time even if the renewer thread is stuck; once false, it stays false.
    pub fn is_held(&self) -> bool {
        !matches!(self.status(), LeaseStatus::Lost(_))
    }

    /// `Ok(())` while the lease is held, otherwise [`Error::Lost`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::{LockManager, ManualClock};
    /// use lock_memory::MemoryBackend;
    ///
    /// let clock = ManualClock::new();
    /// let backend = MemoryBackend::with_clock(clock.clone());
    /// let manager = LockManager::builder(backend.clone()).clock(clock.clone()).build()?;
    /// let lease = manager.acquire("report", Duration::from_secs(30))?;
    /// assert!(lease.ensure_held().is_ok());
    ///
    /// backend.revoke("report");               // the key vanishes behind the holder's back
    /// clock.advance(Duration::from_secs(10)); // the next renewal is due...
    /// manager.settle();                       // ...and the renewer has tried it
    /// assert!(lease.ensure_held().unwrap_err().is_lost());
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn ensure_held(&self) -> Result<(), Error> {
        match self.status() {
            LeaseStatus::Held | LeaseStatus::Suspect => Ok(()),
            LeaseStatus::Lost(reason) => Err(Error::Lost {
                key: self.key().to_owned(),
                reason,
            }),
        }
    }

    /// A channel that receives the reason once, when the lease is lost.
    ///
    /// Every call returns a receiver of the same channel; a loss that happened before the call is
    /// delivered too. Nothing is sent when the lease is released normally. Use it with
    /// `crossbeam_channel::select!` to abandon work the moment the lease is gone.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::{LockManager, LostReason};
    /// use lock_memory::MemoryBackend;
    ///
    /// let backend = MemoryBackend::new();
    /// let manager = LockManager::new(backend.clone());
    /// let lease = manager.acquire("sync", Duration::from_secs(10))?;
    /// let lost = lease.lost();
    /// assert!(lost.try_recv().is_err()); // still held
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn lost(&self) -> Receiver<LostReason> {
        // A lease past its validity is lost now, whether or not the renewer has run.
        let _ = self.status();
        self.shared.lost_receiver()
    }

    /// Releases the lease: stops renewing it, then deletes the key if this lease still owns it.
    ///
    /// Returns [`Error::Lost`] if the lease had been lost (the key is left alone if another
    /// holder owns it), or the backend's error if the delete could not be done (the key then
    /// expires after its TTL).
    pub fn release(self) -> Result<(), Error> {
        self.release_now()
    }

    fn release_now(&self) -> Result<(), Error> {
        let manager = &*self.manager;
        let lost = match self
            .shared
            .mark_released(manager.clock.now(), &*manager.hook)
        {
            BeforeRelease::Released => return Ok(()),
            BeforeRelease::Held => None,
            BeforeRelease::Lost(reason) => Some(reason),
        };
        // Untrack before the delete: the renewer drops the lease, and a renewal already in flight
        // cannot revive the key, because renewals only extend a key that holds our token.
        manager.untrack(&self.shared);
        let token = self.shared.token.text();
        let outcome = manager
            .backend
            .release(&self.shared.key, token.as_str(), Duration::MAX);
        manager.hook.on_event(&LeaseEvent::Released {
            key: &self.shared.key,
            fence: self.shared.fence,
        });
        let key = || self.shared.key.to_string();
        match (lost, outcome) {
            (Some(reason), _) => Err(Error::Lost { key: key(), reason }),
            (None, Ok(Ownership::Owned)) => Ok(()),
            (None, Ok(Ownership::NotOwned)) => Err(Error::Lost {
                key: key(),
                reason: LostReason::TakenOver,
            }),
            (None, Err(error)) => Err(error.into()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Err(error) = self.release_now() {
            tracing::debug!(key = %self.shared.key, %error, "releasing a dropped lease failed");
        }
    }
}
