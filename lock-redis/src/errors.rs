//! [`RedisBackendError`], and the classification of Redis failures into transient and permanent
//! [`BackendError`]s.
//!
//! Errors print once: a message never repeats its [`source`](std::error::Error::source), so a
//! printer that walks the chain shows each cause one time.

use std::fmt;
use std::time::Duration;

use lock_core::{BackendError, BackendErrorKind};
use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::connection::tls::handshake_failure;
use crate::TlsFailure;

/// Which backend call failed, named in every [`RedisBackendError`] about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RedisOperation {
    /// [`LeaseBackend::try_acquire`](lock_core::LeaseBackend::try_acquire).
    Acquire,
    /// [`LeaseBackend::renew_batch`](lock_core::LeaseBackend::renew_batch), for one of its
    /// leases.
    Renew,
    /// [`LeaseBackend::release`](lock_core::LeaseBackend::release).
    Release,
    /// The write-back of a Redlock fence to one node.
    RaiseFence,
    /// [`LeaseBackend::inspect`](lock_core::LeaseBackend::inspect): reading who holds a lock.
    Inspect,
    /// [`LeaseBackend::force_release`](lock_core::LeaseBackend::force_release): deleting a
    /// lock whatever its token.
    ForceRelease,
    /// [`RedisBackend::eviction_policy`](crate::RedisBackend::eviction_policy): reading the
    /// server's `maxmemory-policy`. Not about a lock key.
    EvictionPolicy,
}

impl RedisOperation {
    /// Whether the call is about one lock key (all but the eviction policy check).
    fn has_key(self) -> bool {
        self != RedisOperation::EvictionPolicy
    }
}

impl fmt::Display for RedisOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisOperation::Acquire => "acquire",
            RedisOperation::Renew => "renew",
            RedisOperation::Release => "release",
            RedisOperation::RaiseFence => "raise fence",
            RedisOperation::Inspect => "inspection",
            RedisOperation::ForceRelease => "forced release",
            RedisOperation::EvictionPolicy => "eviction policy check",
        })
    }
}

/// What an error message says the call was: `acquire of lock "jobs:42"`, or just the
/// operation when it is not about a lock key.
fn subject(operation: &RedisOperation, key: &str) -> String {
    if operation.has_key() {
        format!("{operation} of lock {key:?}")
    } else {
        operation.to_string()
    }
}

/// Everything that can go wrong in `lock-redis`: building a backend, and each call to Redis.
///
/// Construction ([`RedisBackend::connect`](crate::RedisBackend::connect),
/// [`RedisBackendBuilder::build`](crate::RedisBackendBuilder::build)) returns it directly. Calls
/// through [`LeaseBackend`](lock_core::LeaseBackend) return a [`BackendError`] whose
/// [`cause`](BackendError::cause) is a `RedisBackendError`, so it can be downcast. Messages name
/// the operation and the lock key, and never contain a password.
///
/// A message does not repeat its [`source`](std::error::Error::source): what Redis said (say,
/// `WRONGTYPE` or `NOPERM`) is in the source of [`Command`](RedisBackendError::Command), so print
/// the whole chain to see it.
///
/// ```
/// use lock_redis::{RedisBackend, RedisBackendError};
///
/// let error = RedisBackend::connect("http://user:hunter2@localhost").unwrap_err();
/// assert!(matches!(error, RedisBackendError::InvalidUrl { .. }));
/// assert!(!error.to_string().contains("hunter2"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisBackendError {
    /// The URL does not parse as a Redis URL.
    #[error("invalid Redis URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL, with its password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL or a setting asks for something this build cannot do.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is unsupported, and why.
        what: &'static str,
    },
    /// A builder setting is out of range.
    #[error("invalid Redis backend configuration: {reason}")]
    InvalidConfig {
        /// Which setting, and why.
        reason: String,
    },
    /// The call ran out of time: the caller's timeout or the configured command timeout.
    #[error("redis {} timed out after {waited:?}", subject(.operation, .key))]
    Timeout {
        /// The call.
        operation: RedisOperation,
        /// The user's lock key (empty for a call about no key).
        key: String,
        /// How long the call ran.
        waited: Duration,
    },
    /// No pooled connection could be had in time: the server is unreachable, refuses or
    /// rejects connections, or every connection is busy.
    #[error("redis {}: no connection within {waited:?}: {reason}", subject(.operation, .key))]
    NoConnection {
        /// The call.
        operation: RedisOperation,
        /// The user's lock key (empty for a call about no key).
        key: String,
        /// How long the call waited for a connection.
        waited: Duration,
        /// Why, as far as the pool knows (the last failed connection attempt).
        reason: String,
    },
    /// A TLS connection could not be set up: the server's certificate was rejected, the server
    /// refused ours, or the handshake went unanswered. [`failure`](Self::Tls::failure) says which;
    /// the source is the [`rustls::Error`] when rustls failed (downcast it), else the socket's
    /// I/O error. Permanent unless [`TlsFailure::is_transient`].
    #[error(
        "redis {}: no TLS connection within {waited:?}: {failure}",
        subject(.operation, .key)
    )]
    Tls {
        /// The call.
        operation: RedisOperation,
        /// The user's lock key (empty for a call about no key).
        key: String,
        /// How long the call waited for a connection.
        waited: Duration,
        /// What went wrong.
        failure: TlsFailure,
        /// The [`rustls::Error`], or the I/O error of the socket.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Redis, or the connection to it, failed the command. What Redis said is the source.
    #[error("redis {} failed", subject(.operation, .key))]
    Command {
        /// The call.
        operation: RedisOperation,
        /// The user's lock key (empty for a call about no key).
        key: String,
        /// The error from the `redis` crate.
        #[source]
        source: RedisError,
    },
    /// Redis answered something the lease scripts never return.
    #[error("redis {}: unexpected reply {reply}", subject(.operation, .key))]
    UnexpectedReply {
        /// The call.
        operation: RedisOperation,
        /// The user's lock key (empty for a call about no key).
        key: String,
        /// The reply, abbreviated.
        reply: String,
    },
    /// The lock was taken, but fewer replicas than
    /// [`min_replicas`](crate::RedisBackendBuilder::min_replicas) asked for acknowledged it
    /// within its timeout (`WAIT`): a failover now could lose it. Transient: the lock manager
    /// counts the attempt as failed and gives the key back, best effort.
    #[error(
        "redis acquire of lock {key:?}: {acknowledged} of {wanted} replicas acknowledged it \
         within {waited:?}"
    )]
    NotReplicated {
        /// The user's lock key.
        key: String,
        /// How many replicas acknowledged the write.
        acknowledged: u32,
        /// How many were asked for.
        wanted: u32,
        /// How long `WAIT` waited.
        waited: Duration,
    },
    /// A release was sent, its connection dropped before the reply came, and the retry found
    /// the key no longer held by the token: the first attempt may have deleted it, or the lease
    /// may have been lost before. Transient; the key is not held by the token either way.
    #[error(
        "redis release of lock {key:?}: outcome unknown: the first attempt may have deleted \
         the key (its reply was lost with its connection), and the retry found it gone"
    )]
    ReleaseOutcomeUnknown {
        /// The user's lock key.
        key: String,
    },
}

impl RedisBackendError {
    /// The call this error is about, if it is about a call (not about construction).
    pub fn operation(&self) -> Option<RedisOperation> {
        match self {
            RedisBackendError::Timeout { operation, .. }
            | RedisBackendError::NoConnection { operation, .. }
            | RedisBackendError::Tls { operation, .. }
            | RedisBackendError::Command { operation, .. }
            | RedisBackendError::UnexpectedReply { operation, .. } => Some(*operation),
            RedisBackendError::ReleaseOutcomeUnknown { .. } => Some(RedisOperation::Release),
            RedisBackendError::NotReplicated { .. } => Some(RedisOperation::Acquire),
            _ => None,
        }
    }

    /// The user's lock key this error is about, if it is about a call on a lock.
    pub fn key(&self) -> Option<&str> {
        match self {
            RedisBackendError::Timeout { operation, key, .. }
            | RedisBackendError::NoConnection { operation, key, .. }
            | RedisBackendError::Tls { operation, key, .. }
            | RedisBackendError::Command { operation, key, .. }
            | RedisBackendError::UnexpectedReply { operation, key, .. } => {
                operation.has_key().then_some(key.as_str())
            }
            RedisBackendError::ReleaseOutcomeUnknown { key }
            | RedisBackendError::NotReplicated { key, .. } => Some(key),
            _ => None,
        }
    }

    /// What went wrong setting up TLS, for a [`Tls`](Self::Tls) error.
    ///
    /// ```
    /// use lock_redis::{RedisBackend, RedisBackendError};
    ///
    /// let error = RedisBackend::connect("localhost:6379").unwrap_err();
    /// assert_eq!(error.tls_failure(), None);
    /// ```
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            RedisBackendError::Tls { failure, .. } => Some(*failure),
            _ => None,
        }
    }

    /// True when the call ran out of time (including a socket read or write timeout).
    pub fn is_timeout(&self) -> bool {
        match self {
            RedisBackendError::Timeout { .. } => true,
            RedisBackendError::Command { source, .. } => source.is_timeout(),
            _ => false,
        }
    }
}

/// A failed call before it is given its operation and key.
#[derive(Debug, Clone)]
pub(crate) enum CallFailure {
    /// The deadline passed.
    Timeout { waited: Duration },
    /// The pool had no connection for us.
    NoConnection {
        waited: Duration,
        reason: String,
        kind: BackendErrorKind,
    },
    /// A TLS connection attempt failed: what went wrong, and the error that said so.
    Tls {
        waited: Duration,
        failure: TlsFailure,
        error: RedisError,
    },
    /// A command failed.
    Redis(RedisError),
    /// On a Redis Cluster, a redirection (`MOVED`, `ASK`) still met when the call gave up: the
    /// slot is moving, and a retry goes where it is. (On one server, `MOVED` is permanent: the
    /// URL names a cluster node.)
    Redirected(RedisError),
    /// A reply of the wrong shape.
    UnexpectedReply(String),
    /// A release retried after a lost reply found the key gone.
    ReleaseOutcomeUnknown,
    /// Too few replicas acknowledged a write in time.
    NotReplicated {
        acknowledged: u32,
        wanted: u32,
        waited: Duration,
    },
}

impl CallFailure {
    /// Whether retrying may help.
    pub(crate) fn kind(&self) -> BackendErrorKind {
        match self {
            CallFailure::Timeout { .. } => BackendErrorKind::Transient,
            CallFailure::NoConnection { kind, .. } => *kind,
            CallFailure::Tls { failure, .. } => failure.kind(),
            CallFailure::Redis(error) => classify(error),
            CallFailure::Redirected(_) => BackendErrorKind::Transient,
            CallFailure::UnexpectedReply(_) => BackendErrorKind::Permanent,
            CallFailure::ReleaseOutcomeUnknown | CallFailure::NotReplicated { .. } => {
                BackendErrorKind::Transient
            }
        }
    }

    /// The public error, naming the call.
    pub(crate) fn into_error(self, operation: RedisOperation, key: &str) -> RedisBackendError {
        let key = key.to_owned();
        match self {
            CallFailure::Timeout { waited } => RedisBackendError::Timeout {
                operation,
                key,
                waited,
            },
            CallFailure::NoConnection { waited, reason, .. } => RedisBackendError::NoConnection {
                operation,
                key,
                waited,
                reason,
            },
            CallFailure::Tls {
                waited,
                failure,
                error,
            } => RedisBackendError::Tls {
                operation,
                key,
                waited,
                failure,
                source: handshake_failure(&error)
                    .map_or_else(|| Box::new(error) as _, |(_, source)| source),
            },
            CallFailure::Redis(source) | CallFailure::Redirected(source) => {
                RedisBackendError::Command {
                    operation,
                    key,
                    source,
                }
            }
            CallFailure::UnexpectedReply(reply) => RedisBackendError::UnexpectedReply {
                operation,
                key,
                reply,
            },
            CallFailure::ReleaseOutcomeUnknown => RedisBackendError::ReleaseOutcomeUnknown { key },
            CallFailure::NotReplicated {
                acknowledged,
                wanted,
                waited,
            } => RedisBackendError::NotReplicated {
                key,
                acknowledged,
                wanted,
                waited,
            },
        }
    }

    /// The classified [`BackendError`] for the call.
    pub(crate) fn into_backend_error(self, operation: RedisOperation, key: &str) -> BackendError {
        let kind = self.kind();
        BackendError::new(kind, self.into_error(operation, key))
    }
}

/// The failure of a call that got no connection because the last attempt to open one failed
/// with `error`: a [`CallFailure::Tls`] when a TLS client's attempt failed in the TLS layer,
/// else a [`CallFailure::NoConnection`] classified by [`classify`].
pub(crate) fn connect_failure(waited: Duration, error: &RedisError, tls: bool) -> CallFailure {
    match tls.then(|| handshake_failure(error)).flatten() {
        Some((failure, _)) => CallFailure::Tls {
            waited,
            failure,
            error: error.clone(),
        },
        None => CallFailure::NoConnection {
            waited,
            reason: format!("the last connection attempt failed: {error}"),
            kind: classify(error),
        },
    }
}

impl From<RedisError> for CallFailure {
    fn from(error: RedisError) -> Self {
        CallFailure::Redis(error)
    }
}

/// Server error codes outside [`ServerErrorKind`] after which a retry may succeed.
const TRANSIENT_CODES: &[&str] = &["BUSY", "OOM", "MISCONF", "NOREPLICAS", "UNBLOCKED"];

/// Whether retrying a call that failed with `error` may help.
///
/// Transient: the connection (refused, reset, closed, I/O error, timeout) and servers that are
/// busy, loading, failing over, read-only or out of memory, and a script cache emptied by a
/// restart. Permanent: wrong key types, missing permissions, failed authentication, bad
/// configuration, script errors, replies that are not Redis at all, and anything unknown.
pub(crate) fn classify(error: &RedisError) -> BackendErrorKind {
    use BackendErrorKind::{Permanent, Transient};
    match error.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => Transient,
        ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel => {
            Transient
        }
        ErrorKind::Server(kind) => match kind {
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::NoScript => Transient,
            ServerErrorKind::ResponseError if is_too_many_clients(error) => Transient,
            _ => Permanent,
        },
        ErrorKind::Extension => match error.code() {
            Some(code) if TRANSIENT_CODES.contains(&code) => Transient,
            _ => Permanent,
        },
        _ => Permanent,
    }
}

/// `ERR max number of clients reached`: the server is full now, not misconfigured for us.
fn is_too_many_clients(error: &RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.contains("max number of clients"))
}

/// Whether a call that failed with `error` may be retried at once on another connection: the
/// connection is gone (closed, reset, refused), or any other I/O failure but a timeout broke the
/// round trip, such as a read interrupted by a signal (`EINTR`, which a blocking socket call
/// returns when the process is resumed after `SIGSTOP`). Not a timeout: a slow server is slow on
/// every connection.
/// Whether a call failed because the server had closed the connection cleanly (end of file)
/// before any reply: what a pooled connection shows after the server restarted, or closed it
/// while idle. A Redis server answers every command it runs before it closes a connection, so
/// the request is taken as not run. (A proxy that closes the client's connection after
/// forwarding a request would make this wrong; a release then still learns the truth from the
/// marker its first attempt left.)
pub(crate) fn closed_unread(failure: &CallFailure) -> bool {
    let CallFailure::Redis(error) = failure else {
        return false;
    };
    // The redis crate keeps the I/O error behind an `Arc`, and shows it only as its source.
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<Shared>())
        .and_then(|shared| shared.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
}

pub(crate) fn is_retryable_elsewhere(error: &RedisError) -> bool {
    error.is_connection_dropped()
        || error.is_connection_refusal()
        || (error.is_io_error() && !error.is_timeout())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io;

    use super::*;

    /// A server error reply, as the connection would parse it.
    fn server_error(reply: &str) -> RedisError {
        let value = redis::parse_redis_value(format!("-{reply}\r\n").as_bytes()).unwrap();
        value.extract_error().unwrap_err()
    }

    fn io_error(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::new(kind, "test"))
    }

    #[test]
    fn a_clean_close_is_told_apart_from_a_reset() {
        let closed = CallFailure::Redis(io_error(io::ErrorKind::UnexpectedEof));
        assert!(closed_unread(&closed));
        for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::Interrupted] {
            assert!(
                !closed_unread(&CallFailure::Redis(io_error(kind))),
                "{kind:?}"
            );
        }
        assert!(!closed_unread(&CallFailure::Timeout {
            waited: Duration::from_secs(1)
        }));
    }

    #[test]
    fn connection_failures_are_transient() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::TimedOut,
            io::ErrorKind::WouldBlock,
            io::ErrorKind::NotConnected,
            io::ErrorKind::Other,
        ] {
            assert_eq!(
                classify(&io_error(kind)),
                BackendErrorKind::Transient,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn busy_and_failing_over_servers_are_transient() {
        for reply in [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "MASTERDOWN Link with MASTER is down",
            "READONLY You can't write against a read only replica.",
            "NOSCRIPT No matching script. Please use EVAL.",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "NOREPLICAS Not enough good replicas to write.",
            "ERR max number of clients reached",
        ] {
            assert_eq!(
                classify(&server_error(reply)),
                BackendErrorKind::Transient,
                "{reply}"
            );
        }
    }

    #[test]
    fn refusals_that_a_retry_cannot_change_are_permanent() {
        for reply in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOPERM this user has no permissions to run the 'evalsha' command",
            "WRONGPASS invalid username-password pair or user is disabled.",
            "NOAUTH Authentication required.",
            "ERR user_script:1: Script attempted to access nonexistent global variable 'x'",
            "ERR unknown command 'EVALSHA'",
            "MOVED 3999 127.0.0.1:6381",
            "CROSSSLOT Keys in request don't hash to the same slot",
            "SOMETHINGNEW nobody knows",
        ] {
            assert_eq!(
                classify(&server_error(reply)),
                BackendErrorKind::Permanent,
                "{reply}"
            );
        }
    }

    #[test]
    fn client_side_failures_are_permanent() {
        for error in [
            RedisError::from((
                ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
            RedisError::from((ErrorKind::InvalidClientConfig, "Redis URL did not parse")),
            RedisError::from((ErrorKind::UnexpectedReturnType, "bad type")),
            RedisError::from((ErrorKind::Parse, "not RESP")),
        ] {
            assert_eq!(classify(&error), BackendErrorKind::Permanent, "{error}");
        }
    }

    /// An error and its sources, each once, as an error-chain printer shows them.
    pub(crate) fn chain(error: &dyn std::error::Error) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    #[test]
    fn failures_name_the_operation_and_key() {
        let failure = CallFailure::Redis(server_error(
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ));
        let error = failure.into_backend_error(RedisOperation::Renew, "jobs:42");
        assert!(!error.is_transient());
        let message = chain(&error);
        assert!(
            message.starts_with("permanent backend error: redis renew of lock \"jobs:42\" failed"),
            "{message}"
        );
        assert!(message.contains("WRONGTYPE"), "{message}");
        let cause = error
            .cause()
            .downcast_ref::<RedisBackendError>()
            .expect("the cause is a RedisBackendError");
        assert_eq!(cause.to_string(), "redis renew of lock \"jobs:42\" failed");
        // What Redis said is the source, not part of the message.
        let source = std::error::Error::source(cause).expect("a command error has a source");
        assert!(source.to_string().contains("WRONGTYPE"), "{source}");
        assert_eq!(cause.operation(), Some(RedisOperation::Renew));
        assert_eq!(cause.key(), Some("jobs:42"));

        let timeout = CallFailure::Timeout {
            waited: Duration::from_millis(1500),
        }
        .into_backend_error(RedisOperation::Acquire, "a");
        assert!(timeout.is_transient());
        assert_eq!(
            chain(&timeout),
            "transient backend error: redis acquire of lock \"a\" timed out after 1.5s"
        );

        let unknown =
            CallFailure::ReleaseOutcomeUnknown.into_backend_error(RedisOperation::Release, "r");
        assert!(unknown.is_transient());
        let cause = unknown.cause().downcast_ref::<RedisBackendError>().unwrap();
        assert_eq!(cause.operation(), Some(RedisOperation::Release));
        assert_eq!(cause.key(), Some("r"));
        assert!(cause.to_string().contains("outcome unknown"), "{cause}");
    }

    #[test]
    fn tls_failures_are_typed_with_the_rustls_error_as_source() {
        let rejected = RedisError::from(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        ));
        let failure = connect_failure(Duration::from_millis(5), &rejected, true);
        assert_eq!(failure.kind(), BackendErrorKind::Permanent);
        let error = failure.into_error(RedisOperation::Acquire, "k");
        assert_eq!(error.tls_failure(), Some(TlsFailure::Expired));
        assert_eq!(error.operation(), Some(RedisOperation::Acquire));
        assert_eq!(error.key(), Some("k"));
        let source = std::error::Error::source(&error).unwrap();
        assert_eq!(
            source.downcast_ref::<rustls::Error>(),
            Some(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))
        );
        assert!(chain(&error).contains("has expired"), "{}", chain(&error));

        // A silent server: transient. Not TLS at all (a plain client): no TLS failure.
        let silent = io_error(io::ErrorKind::WouldBlock);
        let failure = connect_failure(Duration::from_secs(1), &silent, true);
        assert_eq!(failure.kind(), BackendErrorKind::Transient);
        assert!(matches!(failure, CallFailure::Tls { .. }));
        let plain = connect_failure(Duration::from_secs(1), &silent, false);
        assert!(matches!(plain, CallFailure::NoConnection { .. }));
    }

    #[test]
    fn calls_about_no_lock_key_do_not_name_one() {
        let error = CallFailure::Timeout {
            waited: Duration::from_secs(1),
        }
        .into_error(RedisOperation::EvictionPolicy, "");
        assert_eq!(
            error.to_string(),
            "redis eviction policy check timed out after 1s"
        );
        assert_eq!(error.operation(), Some(RedisOperation::EvictionPolicy));
        assert_eq!(error.key(), None);
    }

    /// Every error of this crate, with the causes it can carry.
    fn every_error() -> Vec<RedisBackendError> {
        let failures = [
            CallFailure::Timeout {
                waited: Duration::from_millis(20),
            },
            CallFailure::NoConnection {
                waited: Duration::from_millis(20),
                reason: "the last connection attempt failed: refused".into(),
                kind: BackendErrorKind::Transient,
            },
            CallFailure::Redis(server_error("NOPERM this user has no permissions")),
            CallFailure::Redis(io_error(io::ErrorKind::ConnectionReset)),
            CallFailure::Tls {
                waited: Duration::from_millis(20),
                failure: TlsFailure::UnknownIssuer,
                error: RedisError::from(io::Error::new(
                    io::ErrorKind::InvalidData,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                )),
            },
            CallFailure::Tls {
                waited: Duration::from_millis(20),
                failure: TlsFailure::HandshakeTimeout,
                error: io_error(io::ErrorKind::WouldBlock),
            },
            CallFailure::UnexpectedReply("Okay".into()),
            CallFailure::ReleaseOutcomeUnknown,
        ];
        let mut errors: Vec<RedisBackendError> = failures
            .into_iter()
            .map(|failure| failure.into_error(RedisOperation::Release, "k"))
            .collect();
        errors.extend([
            RedisBackendError::InvalidUrl {
                url: "x".into(),
                reason: "bad".into(),
            },
            RedisBackendError::Unsupported { what: "TLS" },
            RedisBackendError::InvalidConfig {
                reason: "pool_size".into(),
            },
        ]);
        errors
    }

    /// Per the Rust API guidelines, a message either includes its cause or `source()` returns
    /// it, never both; this crate's errors leave the cause to `source()`. (The `redis` crate's
    /// own `RedisError` repeats its inner error, which is out of our hands: only the links
    /// from an error of this crate are checked.)
    #[test]
    fn errors_print_each_cause_once() {
        for error in every_error() {
            let mut current: &(dyn std::error::Error + 'static) = &error;
            while let Some(source) = current.source() {
                if current.is::<RedisBackendError>() {
                    let (message, cause) = (current.to_string(), source.to_string());
                    assert!(
                        !message.contains(&cause),
                        "{message:?} repeats its source {cause:?}"
                    );
                }
                current = source;
            }
        }
    }

    #[test]
    fn interrupted_and_dropped_connections_are_retried_elsewhere_but_timeouts_are_not() {
        for kind in [
            io::ErrorKind::Interrupted,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::ConnectionRefused,
        ] {
            assert!(is_retryable_elsewhere(&io_error(kind)), "{kind:?}");
        }
        for kind in [io::ErrorKind::TimedOut, io::ErrorKind::WouldBlock] {
            assert!(!is_retryable_elsewhere(&io_error(kind)), "{kind:?}");
        }
        assert!(!is_retryable_elsewhere(&server_error("LOADING x")));
        assert!(!is_retryable_elsewhere(&server_error("NOPERM y")));
        // An interruption is transient, like the dropped connections.
        assert_eq!(
            classify(&io_error(io::ErrorKind::Interrupted)),
            BackendErrorKind::Transient
        );
    }
}
