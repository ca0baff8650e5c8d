//! The errors of this crate: [`Error`] for callers of the manager, [`BackendError`] for backend authors.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Why a lease stopped being held before its holder released it.
///
/// Delivered once, on [`Lease::lost`](crate::Lease::lost), through the event hook and in
/// [`Error::Lost`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease's validity ran out before a renewal succeeded (the backend was slow, unreachable or
    /// failing, or the renewer could not run in time). Another holder may own the key now.
    Expired,
    /// The backend answered that our token no longer owns the key: it was deleted, it expired on the
    /// server, or another holder took it.
    TakenOver,
    /// The backend refused the renewal with a permanent error (for example a wrong key type or a
    /// missing permission), so the lease cannot be kept.
    Rejected(BackendError),
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "its validity ran out before a renewal succeeded",
            LostReason::TakenOver => "the backend no longer holds it for our token",
            // The error itself is the `source` of `Error::Lost`.
            LostReason::Rejected(_) => "the backend rejected its renewal",
        })
    }
}

/// The error type of [`LockManager`](crate::LockManager) and [`Lease`](crate::Lease).
///
/// Match on the helpers ([`is_timeout`](Error::is_timeout), [`is_lost`](Error::is_lost),
/// [`is_invalid_input`](Error::is_invalid_input)) rather than on variants where you can: the enum
/// may grow.
///
/// ```
/// use std::time::Duration;
/// use lock_core::LockManager;
/// use lock_memory::MemoryBackend;
///
/// let manager = LockManager::new(MemoryBackend::new());
/// let err = manager.try_acquire("", Duration::from_secs(1)).unwrap_err();
/// assert!(err.is_invalid_input());
/// assert!(!err.is_timeout() && !err.is_lost());
/// ```
///
/// Each error prints its own message once: the cause, when there is one, is its
/// [`source`](std::error::Error::source), never repeated in its `Display` (print the chain to
/// see it all, as `anyhow`'s `{:#}` does).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The key is not usable (empty, for example).
    InvalidKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TTL is zero, too short to leave any validity after clock drift, or too long.
    InvalidTtl {
        /// The TTL that was asked for.
        ttl: Duration,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A builder setting is out of range.
    InvalidConfig {
        /// Which setting, and why.
        reason: String,
    },
    /// The lock was not acquired within the caller's wait.
    Timeout {
        /// The key that was asked for.
        key: String,
        /// How long the caller waited.
        waited: Duration,
        /// When the last attempt found another holder: how long that holder's TTL still ran,
        /// if the backend said.
        holder_remaining: Option<Duration>,
        /// When the last attempt failed instead: the backend's transient error (also the
        /// error's `source`).
        last_error: Option<BackendError>,
    },
    /// This thread already holds the key, through a lease of the same manager: leases are not
    /// re-entrant, and waiting would only wait for ourselves. Release the first lease, or pass
    /// it down instead of acquiring again.
    AlreadyHeld {
        /// The key that was asked for.
        key: String,
    },
    /// The lease was lost: it can no longer be trusted to exclude other holders.
    Lost {
        /// The lease's key.
        key: String,
        /// Why it was lost.
        reason: LostReason,
    },
    /// The backend failed with an error that retrying does not cure, or the caller asked for one
    /// attempt only.
    Backend(BackendError),
}

impl From<BackendError> for Error {
    fn from(error: BackendError) -> Error {
        Error::Backend(error)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidKey { reason } => write!(f, "invalid lock key: {reason}"),
            Error::InvalidTtl { ttl, reason } => write!(f, "invalid lease TTL {ttl:?}: {reason}"),
            Error::InvalidConfig { reason } => write!(f, "invalid configuration: {reason}"),
            Error::Timeout {
                key,
                waited,
                holder_remaining,
                last_error,
            } => {
                write!(f, "timed out after {waited:?} waiting for lock {key:?}: ")?;
                match (last_error, holder_remaining) {
                    (Some(_), _) => f.write_str("the last attempt failed"),
                    (None, Some(left)) => {
                        write!(f, "another holder has it, its TTL runs {left:?} more")
                    }
                    (None, None) => f.write_str("another holder has it"),
                }
            }
            Error::AlreadyHeld { key } => write!(
                f,
                "lock {key:?} is already held by this thread through this manager (leases are not re-entrant)"
            ),
            Error::Lost { key, reason } => write!(f, "lease on {key:?} was lost: {reason}"),
            // Transparent: the backend error speaks for itself.
            Error::Backend(error) => fmt::Display::fmt(error, f),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Timeout {
                last_error: Some(error),
                ..
            }
            | Error::Lost {
                reason: LostReason::Rejected(error),
                ..
            } => Some(error),
            Error::Backend(error) => error.source(),
            _ => None,
        }
    }
}

impl Error {
    /// True when the caller's wait ran out before the lock could be acquired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True when a lease was lost before it was released.
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost { .. })
    }

    /// True when this thread already holds the key through the same manager
    /// ([`Error::AlreadyHeld`]): leases are not re-entrant.
    pub fn is_already_held(&self) -> bool {
        matches!(self, Error::AlreadyHeld { .. })
    }

    /// True for a bad key, TTL or setting: the call can never succeed as it was made.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidKey { .. } | Error::InvalidTtl { .. } | Error::InvalidConfig { .. }
        )
    }

    /// True for a backend error that may go away if the call is retried.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Backend(error) if error.is_transient())
    }

    /// The reason a lease was lost, for [`Error::Lost`], taking the error.
    pub(crate) fn into_lost_reason(self) -> Option<LostReason> {
        match self {
            Error::Lost { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The reason a lease was lost, for [`Error::Lost`].
    pub fn lost_reason(&self) -> Option<&LostReason> {
        match self {
            Error::Lost { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Whether retrying a failed backend call can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The backend could not answer now (refused or reset connection, timeout, a server that is
    /// loading or failing over). The manager retries until the caller's deadline, and the renewer
    /// until the lease's validity ends.
    Transient,
    /// The backend answered, and retrying the same call will not change its answer (a wrong key
    /// type, a missing permission, failed authentication, a bad URL).
    Permanent,
}

/// A failure reported by a [`LeaseBackend`](crate::LeaseBackend), with its cause kept as the
/// [`source`](std::error::Error::source) (and so not repeated in its `Display`).
///
/// Cheap to clone, so that one failed batch can be reported for each of its leases.
///
/// ```
/// use lock_core::{BackendError, BackendErrorKind};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let error = BackendError::transient(io);
/// assert!(error.is_transient());
/// assert_eq!(error.kind(), BackendErrorKind::Transient);
/// assert_eq!(error.to_string(), "transient backend error");
/// assert_eq!(std::error::Error::source(&error).unwrap().to_string(), "refused");
/// ```
#[derive(Clone)]
pub struct BackendError {
    kind: BackendErrorKind,
    cause: Arc<dyn StdError + Send + Sync + 'static>,
}

impl BackendError {
    /// An error of the given kind, caused by `cause`.
    pub fn new(
        kind: BackendErrorKind,
        cause: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> BackendError {
        BackendError {
            kind,
            cause: Arc::from(cause.into()),
        }
    }

    /// A failure that retrying may cure.
    pub fn transient(cause: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> BackendError {
        BackendError::new(BackendErrorKind::Transient, cause)
    }

    /// A failure that retrying will not cure.
    pub fn permanent(cause: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> BackendError {
        BackendError::new(BackendErrorKind::Permanent, cause)
    }

    /// Whether retrying may help.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// True for [`BackendErrorKind::Transient`].
    pub fn is_transient(&self) -> bool {
        self.kind == BackendErrorKind::Transient
    }

    /// The underlying error, to downcast to the backend's own error type.
    pub fn cause(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.cause
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendError")
            .field("kind", &self.kind)
            .field("cause", &self.cause)
            .finish()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BackendErrorKind::Transient => "transient",
            BackendErrorKind::Permanent => "permanent",
        };
        write!(f, "{kind} backend error")
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.cause)
    }
}
