//! Synchronous distributed leases: locks with a TTL that renew themselves, tell their holder
//! the moment they are lost, and carry a fencing token.
//!
//! No async runtime: a [`LockManager`] runs one background OS thread (the renewer), and every
//! call blocks the caller for a bounded time.
//!
//! # Concepts
//!
//! - A [`LeaseBackend`] stores leases: `lock-redis` (one Redis, or Redlock over several) and
//!   `lock-memory` (in-process, with a manual clock for tests).
//! - A [`LockManager`] acquires leases on a backend: [`try_acquire`](LockManager::try_acquire)
//!   (one attempt), [`acquire`](LockManager::acquire) and
//!   [`acquire_timeout`](LockManager::acquire_timeout) (wait with backoff), and
//!   [`with_lease`](LockManager::with_lease) (run a closure under a lease;
//!   [`with_lease_outcome`](LockManager::with_lease_outcome) keeps the closure's value when
//!   the lease was lost meanwhile). The `*_default` forms
//!   ([`acquire_default`](LockManager::acquire_default) and others) take the builder's
//!   [`default_ttl`](LockManagerBuilder::default_ttl) and
//!   [`default_wait`](LockManagerBuilder::default_wait); [`stats`](LockManager::stats) says
//!   what the manager has done.
//! - A [`Lease`] is a guard: renewed in the background at about a third of its TTL, released on
//!   [`release`](Lease::release) or drop; [`extend`](Lease::extend) renews it at once with a
//!   new TTL.
//! - Loss: when renewals fail until the lease's validity ends, or the backend says the key is no
//!   longer ours, the lease is **lost**, exactly once: [`Lease::is_held`] turns false,
//!   [`Lease::lost`] receives a [`LostReason`], the callbacks given to [`Lease::on_lost`] run,
//!   and the [`EventHook`] hears of it.
//! - Fencing: every lease has a [`fence`](Lease::fence), strictly increasing per key. A
//!   resource that refuses writes with a lower fence than it has seen is safe even from a holder
//!   that lost its lease without knowing it.
//!
//! ```
//! use std::time::Duration;
//! use lock_core::LockManager;
//! use lock_memory::MemoryBackend;
//!
//! let manager = LockManager::new(MemoryBackend::new());
//! let lease = manager.acquire("reports:daily", Duration::from_secs(30))?;
//! // ... long work, renewed in the background ...
//! lease.ensure_held()?; // before a side effect: fails once the lease is lost
//! let fence = lease.fence(); // send along with writes to the protected resource
//! # let _ = fence;
//! lease.release()?;
//! # Ok::<(), lock_core::Error>(())
//! ```
//!
//! # Guarantees, and what is not promised
//!
//! - **Validity** is local and monotonic: `valid_until = instant_before_sending + validity`,
//!   where the backend's [`DriftRule`] gives `validity = ttl - (ttl * factor + fixed)` (by
//!   default 1% + 2 ms; Redlock uses its `drift_factor`). The same rule governs the acquisition
//!   and every renewal. Mutual exclusion holds while the backend's clock does not run faster
//!   than ours by more than the drift, and while the holder's process is not paused past
//!   `valid_until` between its check and its side effect. No lock can promise more: a GC pause
//!   or a SIGSTOP right after [`Lease::ensure_held`] returns is invisible to the holder.
//!   **Fencing** closes that gap, if the resource checks the fence.
//! - **Loss is reported once, and on time**: [`Lease::is_held`] reads the clock, so it is
//!   right even while no thread runs; the renewer never blocks on the backend (its worker makes
//!   the calls) and reports every loss no later than `valid_until` plus scheduling slack,
//!   whatever other calls are doing. One `Lost` event and one [`Lease::lost`] message per lost
//!   lease, whether the renewer, [`Lease::ensure_held`] or [`Lease::release`] finds it; a lost
//!   lease is never also reported as released, and a release whose outcome is unknown is never
//!   reported as a loss.
//! - **Waits mean what they say**: a wait bounds the waiting, not an attempt. Every attempt
//!   gets the backend's own timeouts, so a zero wait makes one real attempt; a timeout says why
//!   the last attempt failed; an acquire that gives up after an attempt whose outcome is
//!   unknown releases its token, best effort.
//! - **A lost lease never holds its holder up**: releasing or dropping it is best effort within
//!   [`CLEANUP_TIMEOUT`].
//! - **Renewals never revive a key**: a renewal only extends a key that still holds our token,
//!   and a lease is untracked before it is deleted.
//! - **Not re-entrant**: a thread's second acquire of a key it holds through the same manager
//!   fails at once with [`Error::AlreadyHeld`]; other threads (and other managers) wait for
//!   the holder as for any other.
//!
//! # Conformance
//!
//! With the `conformance` feature, the `conformance` module holds one check per point of the
//! [`LeaseBackend`] contract, and the `conformance_tests!` macro stamps them as tests.
//!
//! # Threads
//!
//! Each manager has one thread named [`RENEWER_THREAD_NAME`] that keeps time, and one I/O
//! worker (`lease-renew-io`) that makes its backend calls. The renewer sleeps until the next
//! lease falls due (with none, for at most a second) and hands every due lease to the worker in
//! batches of [`LockManagerBuilder::batch_size`], one backend call per batch; while a batch is
//! in flight it watches the end of each of its leases' validity. An acquire wakes the renewer
//! only for a lease due before the renewer's next wake-up, and a lease released before then
//! never reaches it: an uncontended acquire and release wake no thread. Neither thread holds a
//! handle that keeps the manager alive: when the last [`LockManager`] clone and the last
//! [`Lease`] are dropped, both are told to stop and joined.

mod backend;
mod clock;
mod error;
mod event;
mod handoff;
mod holdings;
mod inspect;
mod lease;
mod manager;
mod renewer;
mod retry;
mod schedule;
mod shared;
mod state;
mod stats;
mod validity;
mod waiters;

#[cfg(feature = "conformance")]
pub mod conformance;

/// The channel crate whose types this API hands out ([`Lease::lost`] returns a
/// [`channel::Receiver`]), re-exported so that you need not add `crossbeam-channel` yourself
/// nor guess its version. Wait on a loss and on your own work at once with
/// [`channel::select!`]:
///
/// ```
/// use std::time::Duration;
/// use lock_core::{channel, LockManager};
/// use lock_memory::MemoryBackend;
///
/// let manager = LockManager::new(MemoryBackend::new());
/// let lease = manager.acquire("import", Duration::from_secs(30))?;
/// let (done_tx, done) = channel::bounded::<()>(1);
/// done_tx.send(()).expect("the receiver is alive"); // the work finished
/// channel::select! {
///     recv(lease.lost()) -> reason => println!("abandoning the import: {reason:?}"),
///     recv(done) -> _ => lease.release()?,
/// }
/// # Ok::<(), lock_core::Error>(())
/// ```
pub use crossbeam_channel as channel;

pub use backend::{AcquireOutcome, LeaseBackend, LeaseRequest, Ownership, ReleaseWatch};
pub use clock::{Clock, ManualClock};
pub use error::{BackendError, BackendErrorKind, Error, LostReason};
pub use event::{EventHook, LeaseEvent, NoopHook, TracingHook};
pub use inspect::{KeyState, Unsupported};
pub use lease::{Lease, LeaseOutcome};
pub use manager::{LockManager, LockManagerBuilder, RENEWER_THREAD_NAME};
pub use retry::RetryPolicy;
pub use shared::CLEANUP_TIMEOUT;
pub use state::LeaseStatus;
pub use stats::{AcquireCounts, LossCounts, ManagerStats, RenewalCounts};
pub use validity::DriftRule;
pub use waiters::{ReleaseWaiters, WeakReleaseWaiters};

/// The longest TTL a lease may have: 365 days. Redis counts TTLs in milliseconds; a year keeps
/// every deadline far from overflow on any backend.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// The shortest TTL a lease may have: 3 ms, the least that leaves any validity after the clock
/// drift allowance (1% + 2 ms). Real leases want seconds.
pub const MIN_TTL: std::time::Duration = std::time::Duration::from_millis(3);
