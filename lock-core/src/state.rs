//! The raw state of a lease, shared by its guard and the renewer: the one owner of its phase and
//! of its validity (the `lock_api` split: this is the raw lock, [`Lease`](crate::Lease) the
//! guard).
//!
//! Every change happens under one mutex and reads the clock inside it, so `is_held` answers
//! monotonically (once false, false for good), and every loss is reported exactly once, by
//! whichever path finds it first: the renewer, an expiry check, or a release.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::clock::saturating_add;
use crate::event::{EventHook, LeaseEvent};
use crate::handoff::{HandedOff, HandoffSlot};
use crate::schedule::{nanos, Scheduled, Slot};
use crate::LostReason;

/// What a holder can currently trust about its lease.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LeaseStatus {
    /// Held, and the last renewal (or the acquisition) succeeded.
    Held,
    /// Still within its validity, but renewals are failing: it will be lost at
    /// [`Lease::valid_until`](crate::Lease::valid_until) unless a retry succeeds first.
    Suspect,
    /// Lost; the holder must stop acting on it.
    Lost(LostReason),
}

/// An owner token: a random (v4) UUID, kept as 16 bytes and sent as its 32 hex digits. Two
/// `u64` halves rather than a `u128`, whose 16-byte alignment would pad every lease.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token([u64; 2]);

/// How long a token's text is: 32 hex digits.
const TOKEN_LEN: usize = 32;

/// A token's text, as backends see it.
pub(crate) struct TokenText([u8; TOKEN_LEN]);

impl Token {
    pub(crate) fn random() -> Token {
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        Token([high, low])
    }

    /// The UUID's 32 lower-case hex digits, without hyphens: see [`hex_digits`].
    pub(crate) fn text(&self) -> TokenText {
        let [high, low] = self.0;
        let mut hex = [0u8; TOKEN_LEN];
        hex[..16].copy_from_slice(&hex_digits(high));
        hex[16..].copy_from_slice(&hex_digits(low));
        TokenText(hex)
    }
}

/// The 16 lower-case hex digits of `value`, most significant first.
///
/// A token is written on every acquire and every release, so this works on all 16 digits at
/// once (a few arithmetic steps on a `u128`, one digit per byte) rather than one at a time.
fn hex_digits(value: u64) -> [u8; 16] {
    /// A one in each byte: 0x0101...01.
    const BYTES: u128 = u128::MAX / 0xff;
    // Spread the 16 nibbles apart, in order, until each has a byte of its own.
    let mut nibbles = u128::from(value);
    nibbles = (nibbles | nibbles << 32) & 0x0000_0000_ffff_ffff_0000_0000_ffff_ffff;
    nibbles = (nibbles | nibbles << 16) & 0x0000_ffff_0000_ffff_0000_ffff_0000_ffff;
    nibbles = (nibbles | nibbles << 8) & 0x00ff_00ff_00ff_00ff_00ff_00ff_00ff_00ff;
    nibbles = (nibbles | nibbles << 4) & 0x0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f;
    // Each byte is now a digit n in 0..16: '0' + n, plus ('a' - '0' - 10) where n > 9. No
    // byte carries into the next: every sum stays below 256.
    let letters = ((nibbles + BYTES * 6) >> 4) & BYTES;
    (nibbles + BYTES * u128::from(b'0') + letters * u128::from(b'a' - b'0' - 10)).to_be_bytes()
}

impl TokenText {
    pub(crate) fn as_str(&self) -> &str {
        // Always valid: `Token::text` writes ASCII hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

enum Phase {
    Held,
    Suspect,
    /// Boxed: a loss is rare, and every lease's state is 8 bytes smaller for it.
    Lost(Box<LostReason>),
    Released,
}

struct LeaseState {
    valid_until: Instant,
    /// The validity of the request that set `valid_until`, in nanoseconds: that request was
    /// sent at `valid_until - valid_for`, and only the answer to a request sent later may
    /// move it (see [`LeaseShared::renewed`]).
    valid_for_nanos: u64,
    phase: Phase,
    /// Created on the first call to [`LeaseShared::lost_receiver`] or
    /// [`LeaseShared::on_lost`], so leases nobody watches stay small.
    watchers: Option<Box<LossWatchers>>,
}

/// A callback to run once, when a lease is lost.
pub(crate) type LostCallback = Box<dyn FnOnce(LostReason) + Send>;

/// Who is told of a lease's loss, besides the event hook.
#[derive(Default)]
struct LossWatchers {
    /// The channel of [`LeaseShared::lost_receiver`], made on its first call.
    channel: Option<(Sender<LostReason>, Receiver<LostReason>)>,
    /// Callbacks registered by [`LeaseShared::on_lost`], not run yet.
    callbacks: Vec<LostCallback>,
}

impl LossWatchers {
    /// Tells the channel, and hands over the callbacks to run once the state's lock is dropped.
    fn lost(&mut self, reason: &LostReason) -> Vec<LostCallback> {
        if let Some((sender, _)) = &self.channel {
            // Capacity one, sent once: never blocks, never full.
            let _ = sender.try_send(reason.clone());
        }
        std::mem::take(&mut self.callbacks)
    }
}

/// What a lease was when its holder began to release it.
pub(crate) enum BeforeRelease {
    /// Held (or suspect): the release decides how it ends.
    Held,
    /// Lost already, and reported.
    Lost(LostReason),
    /// Released already: nothing left to do.
    Released,
}

/// An event to report once the state's lock is dropped.
#[must_use]
enum Report {
    Nothing,
    /// Lost, with the callbacks to run.
    Lost(LostReason, Vec<LostCallback>),
    Suspect(Instant),
    Renewed(Instant),
}

/// The shared part of one lease.
pub(crate) struct LeaseShared {
    pub(crate) key: Box<str>,
    /// The number of the thread that acquired it (see [`holdings`](crate::holdings)).
    pub(crate) holder: u64,
    pub(crate) token: Token,
    pub(crate) fence: u64,
    /// The TTL each renewal asks for, in nanoseconds (8 bytes rather than a `Duration`'s 16:
    /// leases come by the hundred thousand). Changed only by the renewer's worker, after an
    /// extend (see [`LeaseShared::set_ttl`]), which is also the only thread that reads it for
    /// requests, with the validity the backend's drift rule leaves of it: so each request's
    /// TTL and validity match.
    ttl_nanos: AtomicU64,
    /// The lease's place on the renewer's schedule.
    slot: Slot,
    /// The lease's place in the hand-off to the renewer, until the renewer takes it.
    handoff: HandoffSlot,
    state: Mutex<LeaseState>,
}

impl Scheduled for std::sync::Arc<LeaseShared> {
    /// The lease's address: unique among live leases, and the schedule keeps its leases alive.
    fn id(&self) -> u64 {
        std::sync::Arc::as_ptr(self) as usize as u64
    }

    fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl HandedOff for std::sync::Arc<LeaseShared> {
    fn handoff_slot(&self) -> &HandoffSlot {
        &self.handoff
    }
}

impl LeaseShared {
    /// A held lease, granted by a request sent at `sent_at`, trusted for `validity` from then.
    pub(crate) fn new(
        key: &str,
        holder: u64,
        token: Token,
        fence: u64,
        ttl: Duration,
        validity: Duration,
        sent_at: Instant,
    ) -> LeaseShared {
        LeaseShared {
            key: key.into(),
            holder,
            token,
            fence,
            ttl_nanos: AtomicU64::new(nanos(ttl)),
            slot: Slot::new(),
            handoff: HandoffSlot::new(),
            state: Mutex::new(LeaseState {
                valid_until: saturating_add(sent_at, validity),
                valid_for_nanos: nanos(validity),
                phase: Phase::Held,
                watchers: None,
            }),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl_nanos.load(Ordering::Relaxed))
    }

    /// The TTL that renewals ask for from now on. Called only by the renewer's worker, once
    /// the backend has set this TTL, before its next call.
    pub(crate) fn set_ttl(&self, ttl: Duration) {
        self.ttl_nanos.store(nanos(ttl), Ordering::Relaxed);
    }

    pub(crate) fn valid_until(&self) -> Instant {
        self.state.lock().valid_until
    }

    /// The end of validity of a lease not shared yet: read without taking the lock.
    pub(crate) fn valid_until_unshared(&mut self) -> Instant {
        self.state.get_mut().valid_until
    }

    /// Whether the lease is neither lost nor released, and within its validity at `now`
    /// (without reporting an expiry: the caller has no hook at hand).
    pub(crate) fn is_valid_at(&self, now: Instant) -> bool {
        let state = self.state.lock();
        matches!(state.phase, Phase::Held | Phase::Suspect) && now < state.valid_until
    }

    /// The status at `now`; a lease past its validity is lost now, whoever asks.
    pub(crate) fn status(&self, now: Instant, hook: &dyn EventHook) -> LeaseStatus {
        let (status, report) = {
            let mut state = self.state.lock();
            let report = expire_locked(&mut state, now);
            let status = match &state.phase {
                Phase::Held => LeaseStatus::Held,
                Phase::Suspect => LeaseStatus::Suspect,
                Phase::Lost(reason) => LeaseStatus::Lost((**reason).clone()),
                // No guard is left to ask; the renewer only needs "not held".
                Phase::Released => LeaseStatus::Lost(LostReason::TakenOver),
            };
            (status, report)
        };
        self.report(report, hook);
        status
    }

    /// The end of validity if the lease is still to be renewed at `now`; `None` once it is lost
    /// (reported here if its validity has just run out) or released.
    pub(crate) fn renewable_until(&self, now: Instant, hook: &dyn EventHook) -> Option<Instant> {
        let (report, valid_until) = {
            let mut state = self.state.lock();
            let report = expire_locked(&mut state, now);
            let valid_until =
                matches!(state.phase, Phase::Held | Phase::Suspect).then_some(state.valid_until);
            (report, valid_until)
        };
        self.report(report, hook);
        valid_until
    }

    /// A renewal (or an extend) sent at `sent_at`, whose TTL leaves `validity`, succeeded, and
    /// its answer came at `now`. Returns the new end of validity, or `None` if the lease was
    /// lost or released meanwhile (then it must not be renewed again).
    ///
    /// The validity counts from the latest request sent: the backend applies the renewer's
    /// worker's calls in the order they are made, so the last one sent set the key's TTL. An
    /// answer to a request sent before the one that set the validity confirms that the lease
    /// is ours and changes nothing else: with one TTL, a late answer never shortens the
    /// validity, and after an extend, an earlier renewal's answer never undoes it.
    pub(crate) fn renewed(
        &self,
        sent_at: Instant,
        validity: Duration,
        now: Instant,
        hook: &dyn EventHook,
    ) -> Option<Instant> {
        let report = {
            let mut state = self.state.lock();
            match expire_locked(&mut state, now) {
                Report::Nothing => match state.phase {
                    Phase::Held | Phase::Suspect => {
                        state.phase = Phase::Held;
                        let valid_since = state
                            .valid_until
                            .checked_sub(Duration::from_nanos(state.valid_for_nanos))
                            .unwrap_or(state.valid_until);
                        if sent_at >= valid_since {
                            state.valid_for_nanos = nanos(validity);
                            state.valid_until = saturating_add(sent_at, validity);
                        }
                        Report::Renewed(state.valid_until)
                    }
                    Phase::Lost(_) | Phase::Released => Report::Nothing,
                },
                lost => lost,
            }
        };
        let valid_until = match &report {
            Report::Renewed(valid_until) => Some(*valid_until),
            _ => None,
        };
        self.report(report, hook);
        valid_until
    }

    /// A renewal failed transiently, and its answer came at `now`. Returns the end of
    /// validity if the lease is still held (then suspect, reported once per run of failures),
    /// `None` if it is lost or released.
    pub(crate) fn renewal_failed(&self, now: Instant, hook: &dyn EventHook) -> Option<Instant> {
        let (report, valid_until) = {
            let mut state = self.state.lock();
            match expire_locked(&mut state, now) {
                Report::Nothing => match state.phase {
                    Phase::Held => {
                        state.phase = Phase::Suspect;
                        (Report::Suspect(state.valid_until), Some(state.valid_until))
                    }
                    Phase::Suspect => (Report::Nothing, Some(state.valid_until)),
                    Phase::Lost(_) | Phase::Released => (Report::Nothing, None),
                },
                lost => (lost, None),
            }
        };
        self.report(report, hook);
        valid_until
    }

    /// Reports the loss if the validity has run out at `now`.
    pub(crate) fn expire_if_due(&self, now: Instant, hook: &dyn EventHook) {
        let report = expire_locked(&mut self.state.lock(), now);
        self.report(report, hook);
    }

    /// The lease is lost for `reason` (reported only if it was neither lost nor released).
    pub(crate) fn lose(&self, reason: LostReason, hook: &dyn EventHook) {
        let report = lose_locked(&mut self.state.lock(), reason);
        self.report(report, hook);
    }

    /// The holder begins to release: from now on the lease is released for the renewer and for
    /// every other path. Returns what it was.
    pub(crate) fn begin_release(&self, now: Instant, hook: &dyn EventHook) -> BeforeRelease {
        let (report, before) = {
            let mut state = self.state.lock();
            let report = expire_locked(&mut state, now);
            let before = match std::mem::replace(&mut state.phase, Phase::Released) {
                Phase::Held | Phase::Suspect => BeforeRelease::Held,
                Phase::Lost(reason) => BeforeRelease::Lost(*reason),
                Phase::Released => BeforeRelease::Released,
            };
            (report, before)
        };
        self.report(report, hook);
        before
    }

    /// The release of a lease that was held found that the backend no longer had it: the loss
    /// happened before the release, and is reported now. Called only after [`begin_release`]
    /// answered [`BeforeRelease::Held`], so no other path has reported it.
    ///
    /// [`begin_release`]: LeaseShared::begin_release
    pub(crate) fn lost_before_release(&self, reason: LostReason, hook: &dyn EventHook) {
        let callbacks = match &mut self.state.lock().watchers {
            Some(watchers) => watchers.lost(&reason),
            None => Vec::new(),
        };
        self.report(Report::Lost(reason, callbacks), hook);
    }

    /// The receiver of this lease's loss: one channel per lease, made on first use.
    pub(crate) fn lost_receiver(&self) -> Receiver<LostReason> {
        let mut state = self.state.lock();
        let state = &mut *state;
        let watchers = state.watchers.get_or_insert_with(Box::default);
        if let Some((_, receiver)) = &watchers.channel {
            return receiver.clone();
        }
        let (sender, receiver) = crossbeam_channel::bounded(1);
        if let Phase::Lost(reason) = &state.phase {
            let _ = sender.try_send((**reason).clone());
        }
        watchers.channel = Some((sender, receiver.clone()));
        receiver
    }

    /// Runs `callback` once when the lease is lost: at once (on this thread) if it is lost at
    /// `now` already, never if it is released first.
    pub(crate) fn on_lost(&self, now: Instant, hook: &dyn EventHook, callback: LostCallback) {
        let (report, run_now) = {
            let mut state = self.state.lock();
            let state = &mut *state;
            let report = expire_locked(state, now);
            let run_now = match &state.phase {
                Phase::Held | Phase::Suspect => {
                    let watchers = state.watchers.get_or_insert_with(Box::default);
                    watchers.callbacks.push(callback);
                    None
                }
                Phase::Lost(reason) => Some(((**reason).clone(), callback)),
                Phase::Released => None,
            };
            (report, run_now)
        };
        self.report(report, hook);
        if let Some((reason, callback)) = run_now {
            run_lost_callback(&self.key, reason, callback);
        }
    }

    fn report(&self, report: Report, hook: &dyn EventHook) {
        let (key, fence) = (&*self.key, self.fence);
        match report {
            Report::Nothing => {}
            Report::Lost(reason, callbacks) => {
                hook.on_event(&LeaseEvent::Lost {
                    key,
                    fence,
                    reason: &reason,
                });
                for callback in callbacks {
                    run_lost_callback(key, reason.clone(), callback);
                }
            }
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

/// Runs a loss callback; a panic in it is caught and logged, like the event hook's.
fn run_lost_callback(key: &str, reason: LostReason, callback: LostCallback) {
    let call = std::panic::AssertUnwindSafe(|| callback(reason));
    if std::panic::catch_unwind(call).is_err() {
        tracing::error!(key, "a lease's on_lost callback panicked");
    }
}

/// Moves to `Lost` unless lost or released already, sends on the lost channel and hands over
/// the callbacks.
fn lose_locked(state: &mut LeaseState, reason: LostReason) -> Report {
    if matches!(state.phase, Phase::Lost(_) | Phase::Released) {
        return Report::Nothing;
    }
    state.phase = Phase::Lost(Box::new(reason.clone()));
    let callbacks = match &mut state.watchers {
        Some(watchers) => watchers.lost(&reason),
        None => Vec::new(),
    };
    Report::Lost(reason, callbacks)
}

/// A lease whose validity has run out at `now` is lost.
fn expire_locked(state: &mut LeaseState, now: Instant) -> Report {
    if now >= state.valid_until {
        lose_locked(state, LostReason::Expired)
    } else {
        Report::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validity_follows_the_latest_request_sent_whatever_the_order_of_answers() {
        let hook = crate::NoopHook;
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let (short, long) = (Duration::from_secs(10), Duration::from_secs(100));
        let lease = LeaseShared::new("k", 1, Token::random(), 1, short, short, at(0));
        assert_eq!(lease.valid_until(), at(10));
        // An extend sent at 2 s to a long TTL...
        assert_eq!(lease.renewed(at(2), long, at(3), &hook), Some(at(102)));
        // ...then the answer to a renewal sent before it, with the short TTL: no effect.
        assert_eq!(lease.renewed(at(1), short, at(4), &hook), Some(at(102)));
        // A later request sets the validity, shorter or not: that is what the backend holds.
        assert_eq!(lease.renewed(at(5), short, at(6), &hook), Some(at(15)));
        assert_eq!(lease.renewed(at(7), short, at(8), &hook), Some(at(17)));
        // With one TTL, a late answer never shortens the validity.
        assert_eq!(lease.renewed(at(6), short, at(9), &hook), Some(at(17)));
    }

    #[test]
    fn a_token_is_written_as_its_uuids_hex_digits() {
        let token = Token([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);
        assert_eq!(token.text().as_str(), "0123456789abcdeffedcba9876543210");
        for _ in 0..100 {
            let token = Token::random();
            let [high, low] = token.0;
            let uuid = uuid::Uuid::from_u64_pair(high, low);
            assert_eq!(token.text().as_str(), uuid.simple().to_string());
        }
    }
}
