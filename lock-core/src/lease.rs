//! The [`Lease`] guard: what a holder keeps while it holds a key. Its state lives in
//! [`LeaseShared`], which the renewer shares; releasing goes through the manager's
//! [`ManagerShared::release`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::manager::validate_ttl;
use crate::shared::ManagerShared;
use crate::state::{LeaseShared, LeaseStatus};
use crate::{Error, LostReason};

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
    /// Set by [`release`](Lease::release), so that the drop after it does not release again.
    released: bool,
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
        Lease {
            shared,
            manager,
            released: false,
        }
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
    ///
    /// Fences are large on Redis (seeded by the server's clock in microseconds, about 2^51 today)
    /// and small on memory (1, 2, 3, ... per key), and always below `i64::MAX` in practice: store
    /// them in a signed 64-bit column (`BIGINT` in SQL), converting with `i64::try_from`. The
    /// `fenced_postgres` example of the workspace shows the whole recipe.
    pub fn fence(&self) -> u64 {
        self.shared.fence
    }

    /// The TTL the lease is renewed with.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl()
    }

    /// Until when the lease is trusted, on the manager's clock: the instant before the last
    /// successful acquire or renewal was sent, plus the validity the backend's
    /// [`DriftRule`](crate::DriftRule) leaves of the TTL (by default the TTL minus 1% and
    /// 2 ms; Redlock subtracts its `drift_factor`).
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
    ///
    /// # Errors
    ///
    /// [`Error::Lost`], with the reason, once the lease is lost.
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
    /// [`channel::select!`](crate::channel::select) to abandon work the moment the lease is
    /// gone (the [`channel`](crate::channel) module re-exports the crossbeam-channel this
    /// crate uses).
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

    /// Replaces the lease's TTL now: renews it at once, if it is still ours, to expire `ttl`
    /// from now, and renews it with `ttl` from then on.
    ///
    /// For holders that want to renew at their own checkpoints (before a step that must not
    /// run on a lease about to expire), or to lengthen (or shorten) a lease whose work turned
    /// out longer (or shorter) than planned. The backend call is the renewer's, owner-checked
    /// like every renewal: it never revives a key that is gone. On success,
    /// [`valid_until`](Lease::valid_until) counts from just before the call, with the
    /// backend's [`DriftRule`](crate::DriftRule) applied to `ttl` as for every renewal, and
    /// the next background renewal falls due at the usual fraction of the new validity. The
    /// call goes through the manager's renewal worker, after any renewal of this lease already
    /// sent, so that an earlier renewal with the old TTL never lands after it.
    ///
    /// **Limit**: a renewal whose outcome was unknown (it timed out on a slow link) may still
    /// reach the server later. If it lands after an extend that lengthened the TTL, the key
    /// expires by the old TTL from then on, sooner than this lease trusts, until the next
    /// renewal sets the new TTL again. Lengthening a lease right after a timed-out renewal
    /// leaves that window open; a fenced resource still refuses a writer that outlived it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::{LockManager, ManualClock};
    /// use lock_memory::MemoryBackend;
    ///
    /// let clock = ManualClock::new();
    /// let backend = MemoryBackend::with_clock(clock.clone());
    /// let manager = LockManager::builder(backend).clock(clock.clone()).build()?;
    /// let lease = manager.acquire("migration", Duration::from_secs(10))?;
    /// lease.extend(Duration::from_secs(600))?; // the migration turned out long
    /// assert_eq!(lease.ttl(), Duration::from_secs(600));
    /// assert!(lease.valid_until() > clock.now() + Duration::from_secs(590));
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidTtl`] (and [`is_invalid_input`](Error::is_invalid_input)) for a TTL
    ///   outside [`MIN_TTL`](crate::MIN_TTL)`..=`[`MAX_TTL`](crate::MAX_TTL), or one that
    ///   leaves no validity after the backend's drift allowance; nothing is sent.
    /// - [`Error::Lost`] if the lease was lost already, or the backend answered that the key no
    ///   longer holds our token (or refused the renewal for good): the loss is reported once,
    ///   through [`lost`](Lease::lost), [`on_lost`](Lease::on_lost) and the event hook, as on
    ///   every path.
    /// - [`Error::Backend`] (transient) if the backend could not answer within what is left of
    ///   the lease's validity: the lease keeps its TTL and its background renewals, and the
    ///   call may be retried. A permanent one, and nothing sent, when called on the renewer
    ///   thread (from an event hook), which would wait for itself.
    pub fn extend(&self, ttl: Duration) -> Result<(), Error> {
        let validity = validate_ttl(ttl, self.manager.backend.drift())?;
        self.ensure_held()?;
        match self.manager.extend(&self.shared, ttl, validity)? {
            Err(error) if error.is_transient() => Err(Error::Backend(error)),
            // Applied, or found lost (and reported) by the renewer.
            _ => self.ensure_held(),
        }
    }

    /// Runs `callback` once, with the reason, when the lease is lost: the way to react to a
    /// loss while the holder's thread is blocked (in a database query, say), without a thread
    /// per lease.
    ///
    /// - It runs on the thread that finds the loss: usually the manager's renewer thread (a
    ///   renewal answered that the key is no longer ours, or the lease's validity ran out), or
    ///   the holder's own thread when its [`is_held`](Lease::is_held),
    ///   [`ensure_held`](Lease::ensure_held), [`lost`](Lease::lost) or
    ///   [`release`](Lease::release) finds the loss first. It runs after the
    ///   [`Lost`](crate::LeaseEvent::Lost) event and the [`lost`](Lease::lost) message.
    /// - It runs at once, on this thread, if the lease is lost already.
    /// - It never runs if the lease is released first: it is dropped with the lease's state,
    ///   at the release or when the renewer next wakes up and forgets the lease.
    /// - Every callback registered runs, in the order registered; a panic in one is caught and
    ///   logged.
    ///
    /// **Callbacks must be quick and must not block**: they run on the renewer thread, which
    /// keeps every lease of the manager renewed. Send a message, set a flag, or fire a
    /// non-blocking request; never acquire or release a lease of the same manager there.
    ///
    /// The typical use: a worker runs a long database query under the lease. Before starting
    /// it, the worker registers a callback that holds the connection's cancel handle (for
    /// PostgreSQL, the client's cancel token), and the callback asks the server to cancel the
    /// query: the worker's blocked call then returns with an error, and the worker stops
    /// instead of committing work it no longer owns. Here, a flag stands in for the query:
    ///
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use lock_core::{LockManager, ManualClock};
    /// use lock_memory::MemoryBackend;
    ///
    /// let clock = ManualClock::new();
    /// let backend = MemoryBackend::with_clock(clock.clone());
    /// let manager = LockManager::builder(backend.clone()).clock(clock.clone()).build()?;
    /// let lease = manager.acquire("monthly-close", Duration::from_secs(30))?;
    ///
    /// let cancel_query = Arc::new(AtomicBool::new(false)); // e.g. a query's cancel token
    /// let cancel = cancel_query.clone();
    /// lease.on_lost(move |reason| {
    ///     // Quick: ask for the cancel and return; the blocked worker sees its query fail.
    ///     eprintln!("lease lost ({reason}): cancelling the query");
    ///     cancel.store(true, Ordering::SeqCst);
    /// });
    ///
    /// backend.revoke("monthly-close");        // the key vanishes behind the holder's back
    /// clock.advance(Duration::from_secs(10)); // the next renewal finds out
    /// manager.settle();
    /// assert!(cancel_query.load(Ordering::SeqCst));
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn on_lost(&self, callback: impl FnOnce(LostReason) + Send + 'static) {
        self.shared.on_lost(
            self.manager.clock.now(),
            &*self.manager.hook,
            Box::new(callback),
        );
    }

    /// Releases the lease: stops renewing it, then deletes the key if this lease still owns it.
    ///
    /// - `Ok(())`: the key was deleted.
    /// - [`Error::Lost`]: the lease had been lost, or the backend answered that our token no
    ///   longer held the key. The loss is reported once, through [`lost`](Lease::lost) and the
    ///   event hook, whichever path found it; the key is left alone if another holder owns it.
    /// - [`Error::Backend`]: the backend could not say (a timeout, a reply lost with its
    ///   connection). That is no loss: the key is deleted, or expires after its TTL.
    ///
    /// A lease that was already lost is released best effort, within
    /// [`CLEANUP_TIMEOUT`](crate::CLEANUP_TIMEOUT), so a caller reacting to the loss is not
    /// held up by a server that no longer answers.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] and [`Error::Backend`], as above.
    pub fn release(mut self) -> Result<(), Error> {
        self.released = true;
        self.manager.release(&self.shared)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(error) = self.manager.release(&self.shared) {
            tracing::debug!(key = %self.shared.key, %error, "releasing a dropped lease failed");
        }
    }
}

/// What [`LockManager::with_lease_outcome`](crate::LockManager::with_lease_outcome) returns
/// once its closure has run: the closure's value, and whether the lease was lost before the
/// closure returned (or found lost by the release after it).
///
/// With `lost` set, the closure's effects were not protected by the lease alone: another holder
/// may have acted meanwhile. `value` is what lets the caller tell what happened, typically the
/// protected resource's answer to a fenced write, made with [`fence`](LeaseOutcome::fence).
#[derive(Debug, Clone)]
#[must_use = "check `lost` before trusting `value`"]
pub struct LeaseOutcome<T> {
    /// What the closure returned.
    pub value: T,
    /// The lease's fence, the one the closure saw.
    pub fence: u64,
    /// Why the lease was lost, if it was lost before the closure returned or found lost by
    /// the release; `None` when it was held throughout.
    pub lost: Option<LostReason>,
}

impl<T> LeaseOutcome<T> {
    /// True if the lease was lost before the closure returned.
    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// The value if the lease was held throughout, else [`Error::Lost`]: what
    /// [`with_lease`](crate::LockManager::with_lease) returns.
    pub(crate) fn into_result(self, key: &str) -> Result<T, Error> {
        match self.lost {
            None => Ok(self.value),
            Some(reason) => Err(Error::Lost {
                key: key.to_owned(),
                reason,
            }),
        }
    }
}
