//! The [`LeaseBackend`] trait: the few atomic operations a store must offer to hold leases.

use std::fmt;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::{BackendError, DriftRule, KeyState};

/// One lease as a backend sees it: a key, the owner's token and a time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRequest<'a> {
    /// The lock's key, as the user gave it (never empty).
    pub key: &'a str,
    /// The owner's token: unique per acquisition, ASCII, at most 64 bytes.
    pub token: &'a str,
    /// The time to live to set: at least 3 ms, at most [`MAX_TTL`](crate::MAX_TTL).
    pub ttl: Duration,
}

/// The answer to [`LeaseBackend::try_acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The key is ours, with this fence.
    Acquired {
        /// Strictly greater than every fence issued before for this key.
        fence: u64,
    },
    /// Another token holds the key.
    Held {
        /// How long the holder's TTL still runs, when the backend knows it. Waiters never sleep
        /// longer than this before trying again.
        remaining: Option<Duration>,
    },
}

/// The answer to [`LeaseBackend::renew_batch`] (per lease) and [`LeaseBackend::release`] when the
/// backend answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// The token owned the key, and the operation was applied.
    Owned,
    /// The token does not own the key (it is gone, expired or held by another token); nothing was
    /// changed.
    NotOwned,
}

/// A subscription to the release of one key, returned by [`LeaseBackend::watch_release`].
///
/// The backend sends `()` on the receiver when the key may have become free. Spurious wake-ups
/// are allowed; missed ones only cost latency, because waiters also retry on a backoff. Dropping
/// the watch drops `registration`, which is how a backend unregisters the waiter.
pub struct ReleaseWatch {
    receiver: Receiver<()>,
    _registration: Box<dyn Send>,
}

impl ReleaseWatch {
    /// A watch that delivers on `receiver` and unregisters when `registration` is dropped.
    pub fn new(receiver: Receiver<()>, registration: impl Send + 'static) -> ReleaseWatch {
        ReleaseWatch {
            receiver,
            _registration: Box::new(registration),
        }
    }

    /// Where release notifications arrive.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.receiver
    }
}

impl fmt::Debug for ReleaseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseWatch")
            .field("pending", &self.receiver.len())
            .finish_non_exhaustive()
    }
}

/// A store that can hold leases: the only part of the stack that differs between Redis, Redlock
/// and the in-process memory backend.
///
/// Waiting, retries, jitter, renewal scheduling and loss reporting live in
/// [`LockManager`](crate::LockManager); a backend only performs single atomic operations. The
/// manager validates every key and TTL before calling the backend. The trait is object safe:
/// the manager holds an `Arc<dyn LeaseBackend>`.
///
/// Every method that talks to the store takes a `timeout`: the longest the call may block.
/// `Duration::MAX` means "use your own configured timeouts" (every acquire attempt and every
/// release of a held lease); a shorter one is the remaining validity of the leases in a renewal
/// batch, or [`CLEANUP_TIMEOUT`](crate::CLEANUP_TIMEOUT) for best-effort clean-ups. A backend
/// uses the smaller of it and its own timeouts, and returns a
/// [transient](BackendError::transient) error when it runs out.
///
/// # Contract
///
/// Numbered as the checks in [`conformance`](crate#conformance) that test each point; points 9
/// to 15 are kept by the manager on top of any backend that keeps points 1 to 8 and states its
/// drift rule, and are checked on every backend all the same. Points 16 and 17 are the
/// operators' calls, [`inspect`](LeaseBackend::inspect) and
/// [`force_release`](LeaseBackend::force_release): a backend may leave them out (their
/// defaults return [`BackendError::unsupported`], which the checks accept).
///
/// 1. **mutual_exclusion**: `try_acquire` grants a key to one token at a time; while that
///    token's TTL runs, every other token gets [`AcquireOutcome::Held`]. The holder's own token
///    gets [`AcquireOutcome::Acquired`] again, with a fresh TTL and a fence no lower than the one
///    first issued: the manager reuses one token for all attempts of an `acquire`, so an attempt
///    whose answer was lost is picked up by the next one.
/// 2. **only_owner_renews_or_releases**: `renew_batch` and `release` change a key only when the
///    token owns it; otherwise they return [`Ownership::NotOwned`] and change nothing.
/// 3. **fences_strictly_increase**: each grant carries a fence strictly greater than every fence
///    granted before for that key, across releases and expiries (and, for stores that can restart
///    or fail over, across those: see each backend's docs for what it assumes).
/// 4. **unrenewed_lease_expires_after_ttl**: a granted key stays held for its TTL, then frees
///    itself without any call.
/// 5. **renewal_extends_lease**: a renewal replaces the remaining TTL with the request's TTL.
/// 6. **loss_is_reported_once**: when the key is deleted, expires or is taken over, its renewal
///    says [`Ownership::NotOwned`] (the manager turns that into one loss report).
/// 7. **release_after_loss_is_safe**: `release` with a stale token never deletes another
///    token's key.
/// 8. **no_renewal_after_release**: a renewal never recreates a key that is gone: it only
///    extends a key that holds the token.
/// 9. **validity_follows_the_backends_drift_rule**: the holder trusts a lease for
///    [`drift`](LeaseBackend::drift)`.validity(ttl)` from before each acquire or renewal was
///    sent.
/// 10. **a_loss_is_reported_once_whichever_path_finds_it**: one `Lost` event and one `lost()`
///     message per lost lease, whether the renewer, `ensure_held` or `release` finds it, and no
///     `Released` event for it.
/// 11. **loss_is_reported_on_time_while_another_renewal_hangs**: a call that hangs delays no
///     loss report past `valid_until`.
/// 12. **a_release_with_an_unknown_outcome_is_no_loss**: `release` answers
///     [`Ownership::NotOwned`] only when it knows the token did not own the key when its
///     request ran; a backend may remember a token's release and answer
///     [`Ownership::Owned`] to a repeat of it, and when a retry cannot tell whether an earlier
///     attempt deleted the key, it returns a transient error, which the manager never reports as
///     a loss.
/// 13. **a_zero_wait_makes_one_real_attempt**: a wait bounds waiting, not an attempt.
/// 14. **an_acquire_that_gives_up_leaves_no_lock**: after an attempt whose outcome is unknown,
///     the manager releases its token, best effort.
/// 15. **releasing_a_lost_lease_returns_promptly**: within
///     [`CLEANUP_TIMEOUT`](crate::CLEANUP_TIMEOUT), whatever the store does.
/// 16. **inspect_reports_the_holder_and_its_fence**: while a token holds the key, `inspect`
///     says [`KeyState::Held`], with a remaining TTL no longer than what is left of the
///     holder's TTL and a fence no lower than the holder's; once the key is released or
///     expired, [`KeyState::Free`] with a last fence no lower than any issued. It changes
///     nothing.
/// 17. **force_release_frees_the_key_and_fences_keep_growing**: `force_release` deletes the key
///     whatever token holds it (and wakes its waiters); the holder's next renewal says
///     [`Ownership::NotOwned`], and the next grant's fence is higher than the deleted
///     holder's.
/// 18. **extend_replaces_the_ttl**: a renewal sets the key's TTL to the request's TTL whether
///     it is longer or shorter than the one before (the manager's
///     [`Lease::extend`](crate::Lease::extend) renews with a new TTL; no other method is
///     needed).
///
/// All operations are atomic per key. An operation that fails must leave nothing behind (an
/// acquire that errors has not taken the key). Errors must be classified:
/// [transient](BackendError::transient) when retrying may help,
/// [permanent](BackendError::permanent) when it cannot.
pub trait LeaseBackend: Send + Sync + 'static {
    /// Takes `request.key` for `request.token` if it is free.
    ///
    /// Called once per attempt by `try_acquire`, and again after each backoff by `acquire`; one
    /// round trip.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the backend cannot say whether the key was taken within
    /// `timeout`, or refuses the call: transient when a retry may help, permanent otherwise.
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError>;

    /// Sets each key's TTL to its request's TTL if the request's token owns it, returning one
    /// result per request, in order.
    ///
    /// Called by the renewer's worker with every lease that is due (up to
    /// [`LockManagerBuilder::batch_size`](crate::LockManagerBuilder::batch_size) at a time), at a
    /// fraction of each lease's validity. A backend that can pipeline sends the whole batch in one
    /// round trip. A renewal is safe to repeat: renewing twice leaves the key as renewing once.
    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>>;

    /// Deletes the key if `token` owns it, and wakes the key's waiters.
    ///
    /// Called when a lease is released or dropped, after the renewer has stopped renewing it.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the outcome is unknown (no answer within `timeout`) or the call
    /// was refused; the manager reports it as such, never as a loss.
    fn release(&self, key: &str, token: &str, timeout: Duration)
        -> Result<Ownership, BackendError>;

    /// Subscribes to the release of `key`, if the backend can tell waiters about releases.
    ///
    /// The manager calls it once per wait, after a first attempt found the key held, and then
    /// tries once more at once, so that a release between that attempt and the watch still
    /// wakes the waiter; an acquire that gets the key at once never calls it. Must be cheap and
    /// must not block on the network (a backend that subscribes to something does so in the
    /// background, and wakes the watch once the subscription is in place, in case the key was
    /// released meanwhile). The default returns `None`: waiters then rely on backoff alone.
    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        let _ = key;
        None
    }

    /// How much of a TTL a holder may trust on this backend.
    ///
    /// Called when a lease is acquired and after each renewal: the lease is valid until the
    /// instant before the request was sent plus [`DriftRule::validity`] of its TTL, and a TTL
    /// that leaves no validity is refused before any call. Must be cheap and constant for the
    /// backend's lifetime. The default is [`DriftRule::DEFAULT`] (1% + 2 ms).
    fn drift(&self) -> DriftRule {
        DriftRule::DEFAULT
    }

    /// Says whether `key` is held, for how much longer, and its fence, without changing it.
    ///
    /// For operators and status pages (`lockctl status`), called by
    /// [`LockManager::inspect`](crate::LockManager::inspect); never on the lease path. One round
    /// trip (one per node on Redlock). The default returns the permanent
    /// [`BackendError::unsupported`] error.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the backend does not answer within `timeout`, refuses the call,
    /// or cannot inspect keys.
    fn inspect(&self, key: &str, timeout: Duration) -> Result<KeyState, BackendError> {
        let _ = (key, timeout);
        Err(BackendError::unsupported("inspect"))
    }

    /// Deletes `key` whatever token holds it, and wakes its waiters; returns whether it was
    /// held.
    ///
    /// For operators freeing a stuck lock (`lockctl release --force`), called by
    /// [`LockManager::force_release`](crate::LockManager::force_release); never on the lease
    /// path. The fence counter stays, so the next holder still gets a higher fence; the holder
    /// finds out at its next renewal. The default returns the permanent
    /// [`BackendError::unsupported`] error.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the backend does not answer within `timeout` (the key may or
    /// may not be deleted), refuses the call, or cannot force a release.
    fn force_release(&self, key: &str, timeout: Duration) -> Result<bool, BackendError> {
        let _ = (key, timeout);
        Err(BackendError::unsupported("force_release"))
    }
}

impl<B: LeaseBackend + ?Sized> LeaseBackend for std::sync::Arc<B> {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        (**self).try_acquire(request, timeout)
    }

    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        (**self).renew_batch(requests, timeout)
    }

    fn release(
        &self,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        (**self).release(key, token, timeout)
    }

    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        (**self).watch_release(key)
    }

    fn drift(&self) -> DriftRule {
        (**self).drift()
    }

    fn inspect(&self, key: &str, timeout: Duration) -> Result<KeyState, BackendError> {
        (**self).inspect(key, timeout)
    }

    fn force_release(&self, key: &str, timeout: Duration) -> Result<bool, BackendError> {
        (**self).force_release(key, timeout)
    }
}
