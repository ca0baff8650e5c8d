//! The lock store an example runs on, and a worker's cuttable link to it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    AcquireOutcome, BackendError, DriftRule, LeaseBackend, LeaseRequest, Ownership, ReleaseWatch,
};
use lock_memory::MemoryBackend;
use lock_redis::RedisBackend;

/// The lock store named by the rest of a command line, with a description to print: the memory
/// backend when `args` is empty, a Redis server (one server, TLS or Sentinel: any URL
/// [`RedisBackend::builder`] takes) with `["--redis", URL]`.
///
/// On Redis, the keys get the prefix `NAME:PID:`, so that an example never touches an
/// application's locks.
///
/// # Errors
///
/// A usage message for any other `args`, or the Redis backend's error for a bad URL.
pub fn lock_store(
    name: &str,
    args: &[&str],
) -> crate::ExampleResult<(Arc<dyn LeaseBackend>, String)> {
    match args {
        [] => Ok((
            Arc::new(MemoryBackend::new()),
            "the in-process memory backend".into(),
        )),
        ["--redis", url] => {
            let backend = RedisBackend::builder(url)
                .key_prefix(format!("{name}:{}:", std::process::id()))
                .build()?;
            let described = format!("Redis at {}", lock_redis::redact_url(url));
            Ok((Arc::new(backend), described))
        }
        _ => Err(format!("usage: {name} [--redis redis://host:port]; got {args:?}").into()),
    }
}

/// One worker's link to the lock store: a [`LeaseBackend`] that forwards to another, and can be
/// cut to simulate a stalled process or a network partition (its renewals then fail, and its
/// leases expire).
#[derive(Clone)]
pub struct Link {
    store: Arc<dyn LeaseBackend>,
    cut: Arc<AtomicBool>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("cut", &self.cut.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// The error of every call through a cut [`Link`].
#[derive(Debug)]
struct LinkCut;

impl fmt::Display for LinkCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no route to the lock store")
    }
}

impl std::error::Error for LinkCut {}

impl Link {
    /// A link to `store`, not cut.
    pub fn new(store: Arc<dyn LeaseBackend>) -> Link {
        Link {
            store,
            cut: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on, every call fails with a transient error, as if the store did not answer.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Calls reach the store again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), BackendError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(BackendError::transient(LinkCut))
        } else {
            Ok(())
        }
    }
}

impl LeaseBackend for Link {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        self.check()?;
        self.store.try_acquire(request, timeout)
    }

    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        match self.check() {
            Ok(()) => self.store.renew_batch(requests, timeout),
            Err(error) => requests.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    fn release(
        &self,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        self.check()?;
        self.store.release(key, token, timeout)
    }

    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        self.store.watch_release(key)
    }

    fn drift(&self) -> DriftRule {
        self.store.drift()
    }
}
