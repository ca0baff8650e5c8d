//! Shorthands for tests that call a Redis backend's [`LeaseBackend`] methods directly, without a
//! manager (so no retry hides what a call returns).

use std::time::Duration;

use lock_core::{AcquireOutcome, BackendError, LeaseBackend, LeaseRequest, ReleaseWatch};
use lock_redis::{RedisBackend, RedisBackendError};

/// The timeout given to calls that are expected to answer.
pub const CALL: Duration = Duration::from_secs(5);
/// How long to wait for a release notification (or the one a watch gets when the subscriber
/// has subscribed).
pub const WAKE_UP: Duration = Duration::from_secs(10);

/// A backend for `url` with 1-second connect, checkout and command timeouts.
///
/// # Panics
///
/// If the URL is rejected.
pub fn backend_at(url: &str) -> RedisBackend {
    RedisBackend::builder(url)
        .connect_timeout(Duration::from_secs(1))
        .checkout_timeout(Duration::from_secs(1))
        .command_timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_else(|e| panic!("a backend for {url}: {e}"))
}

/// A lease request.
pub fn request<'a>(key: &'a str, token: &'a str, ttl: Duration) -> LeaseRequest<'a> {
    LeaseRequest { key, token, ttl }
}

/// One acquire attempt, within [`CALL`].
///
/// # Panics
///
/// If the backend fails.
pub fn acquire(
    backend: &dyn LeaseBackend,
    key: &str,
    token: &str,
    ttl: Duration,
) -> AcquireOutcome {
    backend
        .try_acquire(&request(key, token, ttl), CALL)
        .unwrap_or_else(|e| panic!("acquire {key} for {token}: {e}"))
}

/// The fence of a granted acquire.
///
/// # Panics
///
/// If the lock was held by another token.
pub fn fence_of(outcome: AcquireOutcome) -> u64 {
    match outcome {
        AcquireOutcome::Acquired { fence } => fence,
        AcquireOutcome::Held { .. } => panic!("expected the lock to be free, got {outcome:?}"),
    }
}

/// The [`RedisBackendError`] a backend error carries.
///
/// # Panics
///
/// If its cause is something else.
pub fn redis_cause(error: &BackendError) -> &RedisBackendError {
    error
        .cause()
        .downcast_ref::<RedisBackendError>()
        .unwrap_or_else(|| panic!("the cause is not a RedisBackendError: {error:?}"))
}

/// Waits for a wake-up of `watch`: a release, or the subscriber having (re)subscribed.
///
/// # Panics
///
/// If none comes within [`WAKE_UP`]; `what` says which was expected.
pub fn wait_for_wakeup(watch: &ReleaseWatch, what: &str) {
    watch
        .receiver()
        .recv_timeout(WAKE_UP)
        .unwrap_or_else(|e| panic!("no wake-up ({what}) within {WAKE_UP:?}: {e}"));
}
