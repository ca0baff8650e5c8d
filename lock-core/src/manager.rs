//! [`LockManager`]: acquires leases, waits for busy keys, and owns the renewer thread.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::saturating_add;
use crate::event::{EventHook, GuardedHook, LeaseEvent};
use crate::holdings;
use crate::renewer::{start, CleanUp, Command, RenewerSettings, Wake};
use crate::retry::RetryPolicy;
use crate::schedule::renewal_due;
use crate::shared::ManagerShared;
use crate::state::{LeaseShared, Token};
use crate::stats::{Counters, CountingHook};
use crate::{
    AcquireOutcome, BackendError, Clock, DriftRule, Error, Lease, LeaseBackend, LeaseOutcome,
    LeaseRequest, ManagerStats, MAX_TTL,
};

mod operator;

/// The name of every manager's renewer thread.
pub const RENEWER_THREAD_NAME: &str = "lease-renewer";

/// Hands out [`Lease`]s on a [`LeaseBackend`] and keeps them renewed.
///
/// A cheap [`Clone`] handle: clones share one backend and one renewer thread. Building a manager
/// spawns that thread; dropping the last handle (and the last [`Lease`], which holds one) stops
/// it and joins it.
///
/// ```
/// use std::time::Duration;
/// use lock_core::LockManager;
/// use lock_memory::MemoryBackend;
///
/// let backend = MemoryBackend::new();
/// let manager = LockManager::new(backend.clone());
///
/// // One attempt: `None` when another holder has the key.
/// let lease = manager.try_acquire("orders", Duration::from_secs(10))?.expect("free");
/// let elsewhere = LockManager::new(backend); // another process, say
/// assert!(elsewhere.try_acquire("orders", Duration::from_secs(10))?.is_none());
/// drop(lease);
///
/// // Wait up to one second for the key, run a closure under the lease, release it.
/// let total = manager.with_lease("orders", Duration::from_secs(10), Duration::from_secs(1), |lease| {
///     assert!(lease.is_held());
///     40 + 2
/// })?;
/// assert_eq!(total, 42);
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone)]
pub struct LockManager {
    shared: Arc<ManagerShared>,
    config: Config,
}

#[derive(Debug, Clone)]
struct Config {
    default_ttl: Duration,
    default_wait: Duration,
    renew_fraction: f64,
    retry: RetryPolicy,
    batch_size: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            default_ttl: Duration::from_secs(30),
            default_wait: Duration::from_secs(10),
            renew_fraction: 1.0 / 3.0,
            retry: RetryPolicy::default(),
            batch_size: 512,
        }
    }
}

/// Configures and builds a [`LockManager`]; made by [`LockManager::builder`].
///
/// ```
/// use std::time::Duration;
/// use lock_core::{LockManager, RetryPolicy, TracingHook};
/// use lock_memory::MemoryBackend;
///
/// let manager = LockManager::builder(MemoryBackend::new())
///     .default_wait(Duration::from_secs(2))
///     .renew_fraction(0.25)
///     .retry(RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(50)))
///     .event_hook(TracingHook)
///     .build()?;
/// # drop(manager);
/// # Ok::<(), lock_core::Error>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct LockManagerBuilder {
    backend: Arc<dyn LeaseBackend>,
    clock: Clock,
    /// The user's hook, if any; the manager counts every event before passing it on.
    hook: Option<Box<dyn EventHook>>,
    config: Config,
}

impl fmt::Debug for LockManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManagerBuilder")
            .field("clock", &self.clock)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LockManagerBuilder {
    /// The TTL of the `*_default` calls ([`acquire_default`](LockManager::acquire_default),
    /// [`try_acquire_default`](LockManager::try_acquire_default),
    /// [`with_lease_default`](LockManager::with_lease_default)), so that call sites can leave
    /// it out. Default: 30 seconds. [`build`](LockManagerBuilder::build) refuses a TTL that
    /// [`try_acquire`](LockManager::try_acquire) would refuse.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::builder(MemoryBackend::new())
    ///     .default_ttl(Duration::from_secs(60))
    ///     .default_wait(Duration::from_secs(5))
    ///     .build()?;
    /// let lease = manager.acquire_default("billing")?; // 60 s TTL, waits up to 5 s
    /// assert_eq!(lease.ttl(), Duration::from_secs(60));
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config.default_ttl = ttl;
        self
    }

    /// How long [`LockManager::acquire`] and the `*_default` calls wait for a busy key.
    /// Default: 10 seconds. `Duration::MAX` waits without a deadline.
    pub fn default_wait(mut self, wait: Duration) -> Self {
        self.config.default_wait = wait;
        self
    }

    /// When to renew, as a fraction of the lease's validity: strictly between 0 and 1. Default:
    /// one third (a lease is renewed about every TTL/3, so two renewals can fail before it is
    /// lost).
    pub fn renew_fraction(mut self, fraction: f64) -> Self {
        self.config.renew_fraction = fraction;
        self
    }

    /// The backoff between attempts of a waiting acquire. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// The clock leases are timed with. Default: [`Clock::System`]. Give a
    /// [`ManualClock`](crate::ManualClock) (and the same one to the memory backend) to run in
    /// virtual time.
    pub fn clock(mut self, clock: impl Into<Clock>) -> Self {
        self.clock = clock.into();
        self
    }

    /// Where lease events go. Default: nowhere (as [`NoopHook`](crate::NoopHook));
    /// [`TracingHook`](crate::TracingHook) logs them.
    pub fn event_hook(mut self, hook: impl EventHook) -> Self {
        self.hook = Some(Box::new(GuardedHook(Box::new(hook))));
        self
    }

    /// The most leases the renewer sends to the backend in one call. Default: 512.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.config.batch_size = size;
        self
    }

    /// Checks the settings and starts the manager's renewer thread.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a setting out of range (a `default_ttl` that leaves no
    /// validity after the backend's drift or exceeds [`MAX_TTL`], a `renew_fraction` outside
    /// (0, 1), a zero `batch_size`, a bad retry policy), or when the operating system refuses
    /// to start the renewer thread.
    pub fn build(self) -> Result<LockManager, Error> {
        let config = self.config;
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if let Err(error) = validate_ttl(config.default_ttl, self.backend.drift()) {
            return invalid(format!("default_ttl: {error}"));
        }
        if !(config.renew_fraction > 0.0 && config.renew_fraction < 1.0) {
            return invalid(format!(
                "renew_fraction must be strictly between 0 and 1, not {}",
                config.renew_fraction
            ));
        }
        if config.batch_size == 0 {
            return invalid("batch_size must be at least 1".into());
        }
        if let Err(reason) = config.retry.validate() {
            return invalid(reason);
        }
        let counters = Arc::new(Counters::default());
        let hook: Arc<dyn EventHook> = Arc::new(CountingHook {
            counters: counters.clone(),
            user: self.hook,
        });
        let (mailbox, renewer) = start(RenewerSettings {
            backend: self.backend.clone(),
            clock: self.clock.clone(),
            hook: hook.clone(),
            counters: counters.clone(),
            renew_fraction: config.renew_fraction,
            batch_size: config.batch_size,
            thread_name: RENEWER_THREAD_NAME,
        })
        .map_err(|error| Error::InvalidConfig {
            reason: format!("cannot start the renewer thread: {error}"),
        })?;
        Ok(LockManager {
            shared: Arc::new(ManagerShared {
                backend: self.backend,
                clock: self.clock,
                hook,
                counters,
                mailbox,
                renewer: Mutex::new(Some(renewer)),
            }),
            config,
        })
    }
}

/// The outcome of one attempt.
enum Attempt {
    Acquired(Lease),
    Held { remaining: Option<Duration> },
}

/// Why the last attempt of a waiting acquire did not get the key.
enum Refused {
    /// Another holder has it.
    Held { remaining: Option<Duration> },
    /// The backend failed transiently: the attempt may have taken the key for our token.
    Failed(BackendError),
}

impl LockManager {
    /// A manager with the default settings.
    ///
    /// # Panics
    ///
    /// If the operating system refuses to start the renewer thread. Use
    /// [`builder`](LockManager::builder) and [`build`](LockManagerBuilder::build) to get that as
    /// an error instead.
    #[allow(clippy::expect_used)]
    pub fn new(backend: impl LeaseBackend) -> LockManager {
        LockManager::builder(backend)
            .build()
            .expect("the default configuration is valid; only spawning the renewer thread can fail")
    }

    /// A builder, to change the defaults.
    pub fn builder(backend: impl LeaseBackend) -> LockManagerBuilder {
        LockManagerBuilder {
            backend: Arc::new(backend),
            clock: Clock::default(),
            hook: None,
            config: Config::default(),
        }
    }

    /// One attempt to acquire `key` for `ttl`: `Ok(None)` when another holder has it.
    ///
    /// The attempt gets the backend's own timeouts. Backend errors, transient or not, are
    /// returned as they are: nothing is retried. After a transient error the attempt may still
    /// have taken the key on the server; it is given back, best effort, with the same token.
    ///
    /// Leases are not re-entrant: see [`acquire`](LockManager::acquire). Here, a key this
    /// thread holds through this manager is [`Error::AlreadyHeld`], not `Ok(None)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] or [`Error::InvalidTtl`] for bad input (nothing is sent),
    /// [`Error::AlreadyHeld`] for a key this thread holds, [`Error::Backend`] when the attempt
    /// failed (transient or permanent).
    pub fn try_acquire(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, Error> {
        let result = self.try_acquire_uncounted(key, ttl);
        match &result {
            Ok(Some(_)) => {} // counted by its `Acquired` event
            Ok(None) => self.shared.counters.not_acquired(None),
            Err(error) => self.shared.counters.not_acquired(Some(error)),
        }
        result
    }

    /// [`try_acquire`](LockManager::try_acquire), leaving a refusal uncounted.
    #[inline]
    fn try_acquire_uncounted(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, Error> {
        let validity = self.validate(key, ttl)?;
        let token = Token::random();
        match self.attempt(key, ttl, validity, token) {
            Ok(Attempt::Acquired(lease)) => Ok(Some(lease)),
            Ok(Attempt::Held { .. }) => {
                self.refuse_if_held_here(key)?;
                Ok(None)
            }
            Err(Error::Backend(error)) if error.is_transient() => {
                self.clean_up(key, ttl, token);
                Err(Error::Backend(error))
            }
            Err(error) => Err(error),
        }
    }

    /// Acquires `key` for `ttl`, waiting up to the builder's
    /// [`default_wait`](LockManagerBuilder::default_wait).
    ///
    /// **Not re-entrant.** A lease excludes every other acquire of its key, this thread's
    /// included: a thread's second acquire of a key it already holds through this manager fails
    /// at once with [`Error::AlreadyHeld`] (rather than waiting its whole wait for itself);
    /// pass the first [`Lease`] down instead. Other threads, even through this manager, wait
    /// for the holder as for any other. A lease acquired on this thread and moved to another
    /// still counts as this thread's.
    ///
    /// What the check costs: each grant notes its thread (a thread-local count, no lock), and
    /// only when an attempt finds the key held, by a thread that holds some lease, does the
    /// manager look for the key among its leases (a message to its renewer thread, which scans
    /// them): an uncontended acquire, or a waiter that holds nothing, pays nothing more.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let lease = manager.acquire("import", Duration::from_secs(30))?;
    /// let again = manager.acquire("import", Duration::from_secs(30)).unwrap_err();
    /// assert!(again.is_already_held()); // at once, not after the default wait
    /// # drop(lease);
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire_timeout`](LockManager::acquire_timeout).
    pub fn acquire(&self, key: &str, ttl: Duration) -> Result<Lease, Error> {
        self.acquire_timeout(key, ttl, self.config.default_wait)
    }

    /// Acquires `key` for `ttl`, waiting up to `wait` while another holder has it or the backend
    /// fails transiently; then fails with an error whose [`is_timeout`](Error::is_timeout) is
    /// true and that says why the last attempt failed (the holder's remaining TTL, or the
    /// backend's error as its [`source`](std::error::Error::source)). `Duration::MAX` waits
    /// without a deadline; `Duration::ZERO` makes exactly one attempt.
    ///
    /// The wait bounds the waiting, not an attempt: every attempt, the last one included, gets
    /// the backend's own timeouts. Between attempts it sleeps with capped exponential backoff and
    /// full jitter, never past the holder's remaining TTL or the deadline, and wakes early when
    /// the backend announces the key's release. An acquire that gives up after an attempt whose
    /// outcome is unknown gives the key back, best effort, with its token: the renewer's worker
    /// releases it in the background, with the backend's own timeouts.
    ///
    /// # Errors
    ///
    /// - [`Error::Timeout`] when `wait` ran out: the key stayed held by another holder, or the
    ///   backend kept failing transiently (then the error's source).
    /// - [`Error::AlreadyHeld`] at once, for a key this thread holds through this manager.
    /// - [`Error::InvalidKey`] or [`Error::InvalidTtl`] for bad input (nothing is sent).
    /// - [`Error::Backend`] for a permanent backend error (retrying cannot help).
    pub fn acquire_timeout(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, Error> {
        let result = self.acquire_timeout_uncounted(key, ttl, wait);
        if let Err(error) = &result {
            self.shared.counters.not_acquired(Some(error));
        }
        result
    }

    /// [`acquire_timeout`](LockManager::acquire_timeout), leaving a refusal uncounted.
    fn acquire_timeout_uncounted(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, Error> {
        let validity = self.validate(key, ttl)?;
        let clock = &self.shared.clock;
        let started = clock.now();
        let deadline = started.checked_add(wait);
        let mut backoff = self.config.retry.backoff();
        // One token for every attempt: an attempt that failed on our side but still took the
        // key on the server is picked up by the next attempt instead of blocking the key.
        let token = Token::random();
        // Watch for releases only once the key was found busy: an uncontended acquire
        // registers nothing. Registered before the next attempt, so no release slips between.
        // `None`: not registered yet; `Some(None)`: the backend has no release notifications.
        let mut watch = None;
        loop {
            let refused = match self.attempt(key, ttl, validity, token) {
                Ok(Attempt::Acquired(lease)) => return Ok(lease),
                Ok(Attempt::Held { remaining }) => {
                    if watch.is_none() {
                        // Only after the first attempt: an acquire that gets the key, or one
                        // that waits, never looks.
                        self.refuse_if_held_here(key)?;
                    }
                    Refused::Held { remaining }
                }
                Err(Error::Backend(error)) if error.is_transient() => Refused::Failed(error),
                Err(error) => return Err(error),
            };
            let now = clock.now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                let waited = now.saturating_duration_since(started);
                return Err(match refused {
                    Refused::Held { remaining } => Error::Timeout {
                        key: key.to_owned(),
                        waited,
                        holder_remaining: remaining,
                        last_error: None,
                    },
                    Refused::Failed(error) => {
                        self.clean_up(key, ttl, token);
                        Error::Timeout {
                            key: key.to_owned(),
                            waited,
                            holder_remaining: None,
                            last_error: Some(error),
                        }
                    }
                });
            }
            let remaining = match refused {
                Refused::Held { remaining } => remaining,
                Refused::Failed(_) => None,
            };
            let Some(watch) = &watch else {
                // The key is busy: watch for its release from now on, and try once more at
                // once, so that a release between the first attempt and the watch is not
                // missed.
                watch = Some(self.shared.backend.watch_release(key));
                continue;
            };
            let delay = backoff.next_delay(fastrand::f64(), remaining);
            let wake = saturating_add(now, delay);
            let wake = deadline.map_or(wake, |deadline| wake.min(deadline));
            match watch {
                Some(watch) => {
                    let _ = clock.recv_until(watch.receiver(), Some(wake));
                }
                None => clock.sleep_until(wake),
            }
        }
    }

    /// Runs `f` under a lease on `key` (waiting up to `wait` for it), then releases the lease.
    ///
    /// Returns `f`'s value, or [`Error::Lost`] if the lease was lost before `f` returned, or
    /// found lost by the release: the caller must then treat `f`'s effects as unprotected (this
    /// is where fencing matters). A release whose outcome is unknown (the backend did not
    /// answer) is no loss: the value is returned, the failure logged, and the key expires after
    /// its TTL if it was not deleted. If `f` panics, the lease is released and the panic
    /// continues in the caller.
    ///
    /// A loss drops `f`'s value. When the value says what happened to the protected resource
    /// (a fenced write that the resource accepted or refused), use
    /// [`with_lease_outcome`](LockManager::with_lease_outcome), which returns it with the loss:
    /// this call is that one, with a loss turned into [`Error::Lost`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let fence = manager.with_lease("nightly", Duration::from_secs(30), Duration::ZERO, |lease| {
    ///     lease.fence()
    /// })?;
    /// assert!(fence > 0);
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`acquire_timeout`](LockManager::acquire_timeout) (the closure did not run),
    /// and [`Error::Lost`] when the lease was lost while the closure ran (it did run).
    pub fn with_lease<T>(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
        f: impl FnOnce(&Lease) -> T,
    ) -> Result<T, Error> {
        self.with_lease_outcome(key, ttl, wait, f)?.into_result(key)
    }

    /// Runs `f` under a lease on `key` (waiting up to `wait` for it), releases the lease, and
    /// returns `f`'s value together with whether the lease was lost before `f` returned.
    ///
    /// The same as [`with_lease`](LockManager::with_lease), except that a loss does not
    /// drop the value: [`LeaseOutcome::lost`] says why the lease was lost, and
    /// [`LeaseOutcome::value`] is still there to tell, say, whether the resource accepted
    /// the closure's fenced write (it was made before the next holder's) or refused it (a
    /// newer fence had been seen). A loss is reported once, through [`Lease::lost`], the
    /// event hook and here, as on every path.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::{LockManager, ManualClock};
    /// use lock_memory::MemoryBackend;
    ///
    /// let clock = ManualClock::new();
    /// let backend = MemoryBackend::with_clock(clock.clone());
    /// let manager = LockManager::builder(backend.clone()).clock(clock.clone()).build()?;
    /// let outcome = manager.with_lease_outcome("ledger", Duration::from_secs(30), Duration::ZERO, |lease| {
    ///     backend.revoke("ledger");               // the key vanishes while we work...
    ///     clock.advance(Duration::from_secs(10)); // ...and the next renewal finds out
    ///     manager.settle();
    ///     "write accepted at fence" // what the resource answered to our fenced write
    /// })?;
    /// assert_eq!(outcome.value, "write accepted at fence");
    /// assert!(outcome.lost.is_some());
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`acquire_timeout`](LockManager::acquire_timeout): the closure did not run.
    /// Once it has run, the answer is always `Ok`.
    pub fn with_lease_outcome<T>(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
        f: impl FnOnce(&Lease) -> T,
    ) -> Result<LeaseOutcome<T>, Error> {
        let lease = self.acquire_timeout(key, ttl, wait)?;
        let fence = lease.fence();
        let value = f(&lease);
        let held = lease.ensure_held();
        let released = lease.release();
        let lost = match (held, released) {
            (Err(error), _) | (Ok(()), Err(error)) if error.is_lost() => error.into_lost_reason(),
            (Ok(()), Err(error)) => {
                tracing::warn!(key, %error, "releasing the lease after with_lease failed; it expires after its TTL");
                None
            }
            _ => None,
        };
        Ok(LeaseOutcome { value, fence, lost })
    }

    /// [`acquire`](LockManager::acquire) with the builder's
    /// [`default_ttl`](LockManagerBuilder::default_ttl): waits up to its
    /// [`default_wait`](LockManagerBuilder::default_wait).
    ///
    /// ```
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let lease = manager.acquire_default("reports")?; // 30 s TTL, waits up to 10 s
    /// lease.release()?;
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire_timeout`](LockManager::acquire_timeout).
    pub fn acquire_default(&self, key: &str) -> Result<Lease, Error> {
        self.acquire_timeout(key, self.config.default_ttl, self.config.default_wait)
    }

    /// [`try_acquire`](LockManager::try_acquire) with the builder's
    /// [`default_ttl`](LockManagerBuilder::default_ttl): one attempt, `Ok(None)` when
    /// another holder has the key.
    ///
    /// ```
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let backend = MemoryBackend::new();
    /// let (ours, theirs) = (LockManager::new(backend.clone()), LockManager::new(backend));
    /// let lease = ours.try_acquire_default("reports")?.expect("free");
    /// assert!(theirs.try_acquire_default("reports")?.is_none());
    /// # drop(lease);
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](LockManager::try_acquire).
    pub fn try_acquire_default(&self, key: &str) -> Result<Option<Lease>, Error> {
        self.try_acquire(key, self.config.default_ttl)
    }

    /// [`with_lease`](LockManager::with_lease) with the builder's
    /// [`default_ttl`](LockManagerBuilder::default_ttl) and
    /// [`default_wait`](LockManagerBuilder::default_wait).
    ///
    /// ```
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let fence = manager.with_lease_default("reports", |lease| lease.fence())?;
    /// assert!(fence > 0);
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`with_lease`](LockManager::with_lease).
    pub fn with_lease_default<T>(
        &self,
        key: &str,
        f: impl FnOnce(&Lease) -> T,
    ) -> Result<T, Error> {
        self.with_lease(key, self.config.default_ttl, self.config.default_wait, f)
    }

    /// Waits until the renewer thread has applied every lease acquired or released before this
    /// call, and has handled every renewal due at the clock's current time.
    ///
    /// Meant for tests in virtual time: advance a [`ManualClock`](crate::ManualClock), then
    /// `settle()` before looking at the leases. Returns at once if the renewer is gone.
    pub fn settle(&self) {
        let (reply, done) = crossbeam_channel::bounded(1);
        self.shared.mailbox.send(Command::Settle(reply), Wake::Now);
        // Disconnected (the renewer is gone) ends the wait too.
        let _ = done.recv();
    }

    /// A snapshot of what this manager (all its clones) has done: leases held, acquires,
    /// renewals, losses by reason and releases. Counted with relaxed atomics as things
    /// happen, so keeping count costs the hot path nothing measurable; reading is a few loads.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let lease = manager.acquire("stats", Duration::from_secs(30))?;
    /// let again = manager.try_acquire("stats", Duration::from_secs(30)).unwrap_err();
    /// assert!(again.is_already_held()); // counted as busy
    /// lease.release()?;
    /// let stats = manager.stats();
    /// assert_eq!(stats.acquires.granted, 1);
    /// assert_eq!(stats.acquires.busy, 1);
    /// assert_eq!(stats.releases, 1);
    /// assert_eq!(stats.leases_held, 0);
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn stats(&self) -> ManagerStats {
        self.shared.counters.snapshot()
    }

    /// The clock this manager times leases with.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// One attempt, with the backend's own timeouts.
    fn attempt(
        &self,
        key: &str,
        ttl: Duration,
        validity: Duration,
        token: Token,
    ) -> Result<Attempt, Error> {
        let shared = &self.shared;
        let text = token.text();
        let request = LeaseRequest {
            key,
            token: text.as_str(),
            ttl,
        };
        let sent_at = shared.clock.now();
        let fence = match shared.backend.try_acquire(&request, Duration::MAX)? {
            AcquireOutcome::Acquired { fence } => fence,
            AcquireOutcome::Held { remaining } => return Ok(Attempt::Held { remaining }),
        };
        let holder = holdings::this_thread();
        let mut lease = LeaseShared::new(key, holder, token, fence, ttl, validity, sent_at);
        let valid_until = lease.valid_until_unshared();
        let lease = Arc::new(lease);
        if shared.clock.now() >= valid_until {
            // The answer came too late to leave any validity: give the key back.
            self.clean_up(key, ttl, token);
            return Err(Error::Backend(BackendError::transient(
                "the backend answered after the whole validity of the lease had passed",
            )));
        }
        let due = renewal_due(self.config.renew_fraction, sent_at, validity, valid_until);
        holdings::acquired();
        shared.mailbox.track(lease.clone(), due);
        shared.hook.on_event(&LeaseEvent::Acquired {
            key,
            fence,
            valid_until,
        });
        Ok(Attempt::Acquired(Lease::new(lease, shared.clone())))
    }

    /// [`Error::AlreadyHeld`] if this thread holds `key` through this manager: called once an
    /// attempt found the key held, so the uncontended path never pays for it.
    fn refuse_if_held_here(&self, key: &str) -> Result<(), Error> {
        if holdings::may_hold_any() && self.shared.held_by(key, holdings::this_thread()) {
            return Err(Error::AlreadyHeld {
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    /// Gives back, best effort, a key that an attempt with an unknown outcome may have taken
    /// for `token`: the renewer's worker releases it with the backend's own timeouts, so the
    /// caller does not wait, and a slow link that failed the attempt does not fail the clean-up.
    fn clean_up(&self, key: &str, ttl: Duration, token: Token) {
        let until = saturating_add(self.shared.clock.now(), ttl);
        self.shared.mailbox.send(
            Command::CleanUp(CleanUp {
                key: key.into(),
                token,
                until,
                attempts: 0,
            }),
            Wake::Now,
        );
    }

    /// Checks a key and a TTL before any backend sees them; returns the validity the backend's
    /// drift rule leaves of the TTL.
    fn validate(&self, key: &str, ttl: Duration) -> Result<Duration, Error> {
        validate(key, ttl, self.shared.backend.drift())
    }
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("clock", &self.shared.clock)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Checks a key and a TTL before any backend sees them; returns the validity `drift` leaves of
/// the TTL.
fn validate(key: &str, ttl: Duration, drift: DriftRule) -> Result<Duration, Error> {
    validate_key(key)?;
    validate_ttl(ttl, drift)
}

/// Checks a TTL before any backend sees it; returns the validity `drift` leaves of it.
pub(crate) fn validate_ttl(ttl: Duration, drift: DriftRule) -> Result<Duration, Error> {
    if ttl.is_zero() {
        return Err(Error::InvalidTtl {
            ttl,
            reason: "a lease needs a positive TTL",
        });
    }
    if ttl > MAX_TTL {
        return Err(Error::InvalidTtl {
            ttl,
            reason: "longer than MAX_TTL (365 days)",
        });
    }
    drift.validity(ttl).ok_or(Error::InvalidTtl {
        ttl,
        reason: "too short to leave any validity after the backend's clock drift allowance",
    })
}

/// Checks a key before any backend sees it.
fn validate_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "the key is empty",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let ms = Duration::from_millis(1);
        let validate = |key, ttl| validate(key, ttl, DriftRule::DEFAULT);
        assert!(matches!(
            validate("", ms * 100),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(
            validate("k", Duration::ZERO),
            Err(Error::InvalidTtl { .. })
        ));
        assert!(matches!(
            validate("k", ms * 2),
            Err(Error::InvalidTtl { .. })
        ));
        assert!(matches!(
            validate("k", Duration::MAX),
            Err(Error::InvalidTtl { .. })
        ));
        assert!(validate("k", ms * 3).is_ok());
        assert!(validate("k", MAX_TTL).is_ok());
        let cautious = DriftRule::new(0.3, ms * 2).unwrap();
        assert_eq!(
            super::validate("k", Duration::from_secs(10), cautious).unwrap(),
            Duration::from_millis(6_998),
            "the backend's rule decides the validity"
        );
    }
}
