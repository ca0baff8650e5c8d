//! The operators' calls of [`LockManager`]: [`inspect`](LockManager::inspect) and
//! [`force_release`](LockManager::force_release). They go straight to the backend, with its own
//! timeouts, and touch no lease of this manager.

use std::time::Duration;

use super::{validate_key, LockManager};
use crate::{Error, KeyState};

impl LockManager {
    /// Says whether `key` is held, for how much longer, and its fence: one call to the backend,
    /// with its own timeouts. Changes nothing.
    ///
    /// For status pages and operators: the answer is out of date as soon as it arrives, so
    /// never decide from it whether to acquire. A backend that cannot tell fails with a
    /// permanent error whose [`is_unsupported`](crate::BackendError::is_unsupported) is true.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for an empty key; [`Error::Backend`] when the backend fails or
    /// cannot inspect keys.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// assert!(!manager.inspect("deploy")?.is_held());
    /// let lease = manager.acquire("deploy", Duration::from_secs(30))?;
    /// assert_eq!(manager.inspect("deploy")?.fence(), Some(lease.fence()));
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn inspect(&self, key: &str) -> Result<KeyState, Error> {
        validate_key(key)?;
        Ok(self.shared.backend.inspect(key, Duration::MAX)?)
    }

    /// Deletes `key` whatever token holds it, and wakes its waiters; `Ok(true)` when it was
    /// held. One call to the backend, with its own timeouts.
    ///
    /// For operators freeing a lock whose holder is stuck. The holder is not told at once: it
    /// finds its lease lost at its next renewal (within a third of its TTL, by default), and
    /// may work unprotected until then, so a resource that checks fences is what keeps this
    /// safe. The next holder's fence is higher than the deleted holder's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for an empty key; [`Error::Backend`] when the backend fails (the
    /// key may or may not have been deleted) or cannot force a release.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let stuck = manager.acquire("deploy", Duration::from_secs(30))?;
    /// assert!(manager.force_release("deploy")?);
    /// let next = manager.try_acquire("deploy", Duration::from_secs(30))?.expect("free again");
    /// assert!(next.fence() > stuck.fence());
    /// assert!(!manager.force_release("elsewhere")?, "nothing was held there");
    /// # Ok::<(), lock_core::Error>(())
    /// ```
    pub fn force_release(&self, key: &str) -> Result<bool, Error> {
        validate_key(key)?;
        Ok(self.shared.backend.force_release(key, Duration::MAX)?)
    }
}
