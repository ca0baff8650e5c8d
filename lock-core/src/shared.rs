//! [`ManagerShared`]: what a manager's handles and its leases share, and the release path that
//! both the guard and its drop take.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::event::{EventHook, LeaseEvent};
use crate::holdings;
use crate::renewer::{Command, Extension, Mailbox, Wake};
use crate::state::{BeforeRelease, LeaseShared};
use crate::stats::Counters;
use crate::{BackendError, Clock, Error, LeaseBackend, LostReason, Ownership};

/// How long a best-effort backend call may take: the release of a lease that is already lost,
/// and the clean-up of an acquire that gave up after an attempt whose outcome is unknown. Such
/// calls change nothing the caller relies on, so they never hold the caller up for long.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_millis(250);

/// What a manager's handles and leases share.
pub(crate) struct ManagerShared {
    pub(crate) backend: Arc<dyn LeaseBackend>,
    pub(crate) clock: Clock,
    pub(crate) hook: Arc<dyn EventHook>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) mailbox: Mailbox,
    pub(crate) renewer: Mutex<Option<JoinHandle<()>>>,
}

impl ManagerShared {
    /// Releases a lease: stops renewing it, then deletes its key by token. See
    /// [`Lease::release`](crate::Lease::release) for what each outcome means.
    pub(crate) fn release(&self, lease: &Arc<LeaseShared>) -> Result<(), Error> {
        let hook = &*self.hook;
        let lost = match lease.begin_release(self.clock.now(), hook) {
            BeforeRelease::Released => return Ok(()),
            BeforeRelease::Held => None,
            BeforeRelease::Lost(reason) => Some(reason),
        };
        holdings::released(lease.holder);
        // Untrack before the delete: the renewer drops the lease, and a renewal already in flight
        // cannot revive the key, because renewals only extend a key that holds our token.
        self.mailbox.untrack(lease);
        let token = lease.token.text();
        let timeout = if lost.is_some() {
            CLEANUP_TIMEOUT
        } else {
            Duration::MAX
        };
        let outcome = self.backend.release(&lease.key, token.as_str(), timeout);
        let lost_error = |reason| Error::Lost {
            key: lease.key.to_string(),
            reason,
        };
        let released = || {
            hook.on_event(&LeaseEvent::Released {
                key: &lease.key,
                fence: lease.fence,
            })
        };
        match (lost, outcome) {
            // Reported when it was found; the key is someone else's or gone.
            (Some(reason), _) => Err(lost_error(reason)),
            (None, Ok(Ownership::Owned)) => {
                released();
                Ok(())
            }
            (None, Ok(Ownership::NotOwned)) => {
                lease.lost_before_release(LostReason::TakenOver, hook);
                Err(lost_error(LostReason::TakenOver))
            }
            // Unknown or refused: no loss. The key is gone, or expires after its TTL.
            (None, Err(error)) => {
                released();
                Err(error.into())
            }
        }
    }

    /// Whether this is the renewer's thread (a loss callback or an event hook runs there): a
    /// call that waits for the renewer must not wait there.
    fn on_renewer_thread(&self) -> bool {
        self.renewer
            .lock()
            .as_ref()
            .is_some_and(|renewer| renewer.thread().id() == std::thread::current().id())
    }

    /// Whether `key` is held, at the clock's current time, by a lease of this manager that
    /// thread `holder` acquired: asks the renewer, which knows every tracked lease. `false` on
    /// the renewer's own thread (a loss callback or event hook that acquires), which cannot
    /// wait for itself.
    pub(crate) fn held_by(&self, key: &str, holder: u64) -> bool {
        if self.on_renewer_thread() {
            return false;
        }
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.mailbox.send(
            Command::HeldBy {
                key: key.into(),
                holder,
                reply,
            },
            Wake::Now,
        );
        answer.recv().unwrap_or(false)
    }

    /// Renews `lease` at once with `ttl` (leaving `validity`), through the renewer's worker so
    /// that the call is ordered after every renewal of the lease sent before it; waits for the
    /// backend's answer, applied to the lease and its schedule. `Err` when nothing was sent. See
    /// [`Lease::extend`](crate::Lease::extend).
    pub(crate) fn extend(
        &self,
        lease: &Arc<LeaseShared>,
        ttl: Duration,
        validity: Duration,
    ) -> Result<Result<Ownership, BackendError>, Error> {
        if self.on_renewer_thread() {
            return Err(Error::Backend(BackendError::permanent(
                "Lease::extend cannot run on the renewer thread (in a loss callback or an event hook): it would wait for itself",
            )));
        }
        let timeout = lease
            .valid_until()
            .saturating_duration_since(self.clock.now());
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.mailbox.send(
            Command::Extend(Extension {
                lease: lease.clone(),
                ttl,
                validity,
                timeout,
                reply,
            }),
            Wake::Now,
        );
        Ok(answer
            .recv()
            .unwrap_or_else(|_| Err(BackendError::transient("the renewer has stopped"))))
    }
}

impl Drop for ManagerShared {
    fn drop(&mut self) {
        self.mailbox.send(Command::Shutdown, Wake::Now);
        if let Some(thread) = self.renewer.get_mut().take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}
