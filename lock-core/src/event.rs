//! The event hook: how an application observes what happens to its leases.

use std::time::Instant;

use crate::{BackendError, LostReason};

/// Something that happened to a lease, passed to the manager's [`EventHook`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum LeaseEvent<'a> {
    /// A lease was acquired.
    Acquired {
        /// The lease's key.
        key: &'a str,
        /// Its fence.
        fence: u64,
        /// Until when it is trusted.
        valid_until: Instant,
    },
    /// The renewer extended a lease.
    Renewed {
        /// The lease's key.
        key: &'a str,
        /// Its fence.
        fence: u64,
        /// The new end of its validity.
        valid_until: Instant,
    },
    /// A renewal failed with a transient error; it is retried until the lease's validity ends.
    RenewalFailed {
        /// The lease's key.
        key: &'a str,
        /// Its fence.
        fence: u64,
        /// What failed.
        error: &'a BackendError,
    },
    /// A lease is still valid but could not be renewed: it will be lost at `valid_until` unless a
    /// retry succeeds first (Curator's SUSPENDED). Reported once per run of failures.
    Suspect {
        /// The lease's key.
        key: &'a str,
        /// Its fence.
        fence: u64,
        /// When it will be lost.
        valid_until: Instant,
    },
    /// A lease was lost. Reported exactly once per lease.
    Lost {
        /// The lease's key.
        key: &'a str,
        /// Its fence.
        fence: u64,
        /// Why.
        reason: &'a LostReason,
    },
    /// A lease was released by its holder (explicitly or by drop).
    Released {
        /// The lease's key.
        key: &'a str,
        /// Its fence.
        fence: u64,
    },
}

/// Receives every [`LeaseEvent`] of a manager.
///
/// Called synchronously on the thread where the event happens (the renewer thread for renewals
/// and most losses, the caller's thread otherwise), never while a lock of the manager is held. It
/// must be quick and must not block. A hook that panics is caught and logged with `tracing`: it
/// can neither stop the renewer nor unwind into a `Lease`'s drop. Closures implement it:
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use lock_core::{LeaseEvent, LockManager};
/// use lock_memory::MemoryBackend;
///
/// let acquired = Arc::new(AtomicUsize::new(0));
/// let counter = acquired.clone();
/// let manager = LockManager::builder(MemoryBackend::new())
///     .event_hook(move |event: &LeaseEvent<'_>| {
///         if let LeaseEvent::Acquired { .. } = event {
///             counter.fetch_add(1, Ordering::Relaxed);
///         }
///     })
///     .build()?;
/// manager.try_acquire("job", Duration::from_secs(5))?;
/// assert_eq!(acquired.load(Ordering::Relaxed), 1);
/// # Ok::<(), lock_core::Error>(())
/// ```
///
/// A hook that holds a [`LockManager`](crate::LockManager) clone keeps the manager, and its
/// renewer thread, alive.
pub trait EventHook: Send + Sync + 'static {
    /// Called once per event.
    fn on_event(&self, event: &LeaseEvent<'_>);
}

impl<F> EventHook for F
where
    F: Fn(&LeaseEvent<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &LeaseEvent<'_>) {
        self(event)
    }
}

/// The default hook: ignores every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopHook;

impl EventHook for NoopHook {
    fn on_event(&self, _event: &LeaseEvent<'_>) {}
}

/// A hook that logs every event with `tracing`: losses and suspicions at `warn`, failed renewals
/// at `info`, the rest at `debug`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingHook;

impl EventHook for TracingHook {
    fn on_event(&self, event: &LeaseEvent<'_>) {
        match *event {
            LeaseEvent::Acquired { key, fence, .. } => {
                tracing::debug!(key, fence, "lease acquired")
            }
            LeaseEvent::Renewed { key, fence, .. } => tracing::debug!(key, fence, "lease renewed"),
            LeaseEvent::RenewalFailed { key, fence, error } => {
                tracing::info!(key, fence, %error, "lease renewal failed, retrying")
            }
            LeaseEvent::Suspect { key, fence, .. } => {
                tracing::warn!(key, fence, "lease suspect: renewals failing")
            }
            LeaseEvent::Lost { key, fence, reason } => {
                tracing::warn!(key, fence, %reason, "lease lost")
            }
            LeaseEvent::Released { key, fence } => tracing::debug!(key, fence, "lease released"),
        }
    }
}

/// The manager's wrapper around the user's hook: a panic in the hook is caught and logged.
pub(crate) struct GuardedHook(pub(crate) Box<dyn EventHook>);

impl EventHook for GuardedHook {
    fn on_event(&self, event: &LeaseEvent<'_>) {
        let call = std::panic::AssertUnwindSafe(|| self.0.on_event(event));
        if std::panic::catch_unwind(call).is_err() {
            tracing::error!(
                ?event,
                "the lease event hook panicked; the event was dropped"
            );
        }
    }
}
