//! What operators ask of a key: [`KeyState`] (who, if anyone, holds it) and the [`Unsupported`]
//! error of a backend that cannot tell or cannot force a release.

use std::fmt;
use std::time::Duration;

use crate::BackendError;

/// What [`LeaseBackend::inspect`](crate::LeaseBackend::inspect) found at a key.
///
/// For status pages and operators. It is out of date as soon as it arrives: never decide from
/// it whether a lock may be taken (acquire instead).
///
/// ```
/// use std::time::Duration;
/// use lock_core::{KeyState, LockManager};
/// use lock_memory::MemoryBackend;
///
/// let manager = LockManager::new(MemoryBackend::new());
/// assert_eq!(manager.inspect("backup")?, KeyState::Free { last_fence: None });
///
/// let lease = manager.acquire("backup", Duration::from_secs(30))?;
/// let state = manager.inspect("backup")?;
/// assert!(state.is_held());
/// assert_eq!(state.fence(), Some(lease.fence()));
/// assert!(state.remaining().is_some_and(|left| left <= Duration::from_secs(30)));
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// Nobody holds the key: an acquire would get it now.
    Free {
        /// The highest fence issued for the key so far (the next holder's is greater), or
        /// `None` when the backend has none: the key was never locked, or its counter was lost.
        last_fence: Option<u64>,
    },
    /// The key is held: an acquire would have to wait.
    Held {
        /// How long the holder's TTL still runs, when the backend can tell (`None`: a key
        /// without TTL, which no lease leaves).
        remaining: Option<Duration>,
        /// The fence of the lease that holds the key (on Redlock, the highest any node
        /// issued, which may exceed it), or `None` when the backend has none.
        fence: Option<u64>,
    },
}

impl KeyState {
    /// True for [`KeyState::Held`].
    ///
    /// ```
    /// use lock_core::KeyState;
    ///
    /// assert!(!KeyState::Free { last_fence: Some(7) }.is_held());
    /// assert!(KeyState::Held { remaining: None, fence: Some(7) }.is_held());
    /// ```
    pub fn is_held(&self) -> bool {
        matches!(self, KeyState::Held { .. })
    }

    /// The highest fence issued for the key, held or not.
    ///
    /// ```
    /// use lock_core::KeyState;
    ///
    /// assert_eq!(KeyState::Free { last_fence: Some(7) }.fence(), Some(7));
    /// assert_eq!(KeyState::Held { remaining: None, fence: None }.fence(), None);
    /// ```
    pub fn fence(&self) -> Option<u64> {
        match *self {
            KeyState::Free { last_fence } => last_fence,
            KeyState::Held { fence, .. } => fence,
        }
    }

    /// How long the holder's TTL still runs: `None` for a free key, or when the backend cannot
    /// tell.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::KeyState;
    ///
    /// let held = KeyState::Held { remaining: Some(Duration::from_secs(3)), fence: Some(1) };
    /// assert_eq!(held.remaining(), Some(Duration::from_secs(3)));
    /// assert_eq!(KeyState::Free { last_fence: None }.remaining(), None);
    /// ```
    pub fn remaining(&self) -> Option<Duration> {
        match *self {
            KeyState::Free { .. } => None,
            KeyState::Held { remaining, .. } => remaining,
        }
    }
}

/// The cause of the permanent [`BackendError`] that a backend returns for an operation it does
/// not offer: what the default [`LeaseBackend::inspect`](crate::LeaseBackend::inspect) and
/// [`LeaseBackend::force_release`](crate::LeaseBackend::force_release) return.
///
/// ```
/// use lock_core::{BackendError, Unsupported};
///
/// let error = BackendError::unsupported("inspect");
/// assert!(error.is_unsupported() && !error.is_transient());
/// assert_eq!(
///     error.cause().downcast_ref::<Unsupported>().map(Unsupported::operation),
///     Some("inspect")
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported {
    operation: &'static str,
}

impl Unsupported {
    /// The operation the backend does not offer, as its method is named (`"inspect"`,
    /// `"force_release"`).
    pub fn operation(&self) -> &'static str {
        self.operation
    }
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "this backend does not support {}", self.operation)
    }
}

impl std::error::Error for Unsupported {}

impl BackendError {
    /// The permanent error of a backend that does not offer `operation`; its cause is an
    /// [`Unsupported`].
    pub fn unsupported(operation: &'static str) -> BackendError {
        BackendError::permanent(Unsupported { operation })
    }

    /// True when the backend does not offer the operation (see [`Unsupported`]).
    pub fn is_unsupported(&self) -> bool {
        self.cause().downcast_ref::<Unsupported>().is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{AcquireOutcome, LeaseBackend, LeaseRequest, LockManager, Ownership};

    /// A backend with only the required methods.
    struct Minimal;

    impl LeaseBackend for Minimal {
        fn try_acquire(
            &self,
            _request: &LeaseRequest<'_>,
            _timeout: Duration,
        ) -> Result<AcquireOutcome, BackendError> {
            Ok(AcquireOutcome::Acquired { fence: 1 })
        }

        fn renew_batch(
            &self,
            requests: &[LeaseRequest<'_>],
            _timeout: Duration,
        ) -> Vec<Result<Ownership, BackendError>> {
            requests.iter().map(|_| Ok(Ownership::Owned)).collect()
        }

        fn release(
            &self,
            _key: &str,
            _token: &str,
            _timeout: Duration,
        ) -> Result<Ownership, BackendError> {
            Ok(Ownership::Owned)
        }
    }

    #[test]
    fn the_defaults_refuse_with_a_permanent_unsupported_error() {
        for error in [
            Minimal.inspect("k", Duration::MAX).unwrap_err(),
            Minimal.force_release("k", Duration::MAX).unwrap_err(),
        ] {
            assert!(error.is_unsupported() && !error.is_transient(), "{error:?}");
        }
        let manager = LockManager::new(Minimal);
        let error = manager.inspect("k").unwrap_err();
        assert!(
            !error.is_transient() && !error.is_invalid_input(),
            "{error}"
        );
        assert!(manager.force_release("").unwrap_err().is_invalid_input());
    }

    /// A backend that offers the operators' calls.
    struct Inspectable;

    impl LeaseBackend for Inspectable {
        fn try_acquire(
            &self,
            request: &LeaseRequest<'_>,
            timeout: Duration,
        ) -> Result<AcquireOutcome, BackendError> {
            Minimal.try_acquire(request, timeout)
        }

        fn renew_batch(
            &self,
            requests: &[LeaseRequest<'_>],
            timeout: Duration,
        ) -> Vec<Result<Ownership, BackendError>> {
            Minimal.renew_batch(requests, timeout)
        }

        fn release(
            &self,
            key: &str,
            token: &str,
            timeout: Duration,
        ) -> Result<Ownership, BackendError> {
            Minimal.release(key, token, timeout)
        }

        fn inspect(&self, _key: &str, _timeout: Duration) -> Result<KeyState, BackendError> {
            Ok(KeyState::Free {
                last_fence: Some(7),
            })
        }

        fn force_release(&self, _key: &str, _timeout: Duration) -> Result<bool, BackendError> {
            Ok(true)
        }
    }

    #[test]
    fn a_shared_backend_forwards_the_operators_calls() {
        let backend: Arc<dyn LeaseBackend> = Arc::new(Inspectable);
        let manager = LockManager::new(backend);
        assert_eq!(
            manager.inspect("k").unwrap(),
            KeyState::Free {
                last_fence: Some(7)
            }
        );
        assert!(manager.force_release("k").unwrap());
    }
}
