//! An in-process [`LeaseBackend`] for unit tests of code that takes leases.
//!
//! [`MemoryBackend`] keeps leases in a map behind a mutex. It honours the whole
//! [`LeaseBackend`] contract (the conformance suite runs on it), so code tested against it
//! behaves the same on Redis. With a [`ManualClock`](lock_core::ManualClock) shared with the
//! manager, expiry, renewal and loss run in **virtual time**: a test advances the clock instead
//! of sleeping.
//!
//! ```
//! use std::time::Duration;
//! use lock_core::{LockManager, LostReason, ManualClock};
//! use lock_memory::MemoryBackend;
//!
//! let clock = ManualClock::new();
//! let backend = MemoryBackend::with_clock(clock.clone());
//! let manager = LockManager::builder(backend.clone()).clock(clock.clone()).build()?;
//!
//! let lease = manager.acquire("payroll", Duration::from_secs(30))?;
//! // Jump ten TTLs at once: no renewal could run in between, so the lease expired.
//! clock.advance(Duration::from_secs(300));
//! manager.settle();
//! assert!(!lease.is_held());
//! assert!(matches!(lease.lost().try_recv(), Ok(LostReason::Expired)));
//!
//! // Step a third of the TTL at a time, and the renewer keeps the lease alive.
//! let lease = manager.acquire("payroll", Duration::from_secs(30))?;
//! for _ in 0..30 {
//!     clock.advance(Duration::from_secs(10));
//!     manager.settle();
//! }
//! assert!(lease.is_held());
//! # Ok::<(), lock_core::Error>(())
//! ```
//!
//! It also lets tests break things on purpose: [`MemoryBackend::revoke`] deletes a key behind
//! its holder's back, and [`MemoryBackend::set_unreachable`] makes every call fail as a network
//! outage would.
//!
//! Limits: leases live in this process only, so it coordinates threads, not processes. The
//! fence counter of every key ever locked is kept for the life of the backend (a few dozen
//! bytes per distinct key).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::{
    AcquireOutcome, BackendError, Clock, LeaseBackend, LeaseRequest, Ownership, ReleaseWaiters,
    ReleaseWatch,
};
use parking_lot::Mutex;

/// An in-process lease store. Clones share one store.
///
/// Waiters registered through [`LeaseBackend::watch_release`] are woken the moment a key is
/// released, so hand-offs between threads take microseconds, not a backoff period.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    store: Arc<Store>,
}

#[derive(Default)]
struct Store {
    clock: Clock,
    keys: Mutex<HashMap<Box<str>, KeyState, BuildHasherDefault<KeyHasher>>>,
    unreachable: AtomicBool,
    waiters: ReleaseWaiters,
}

#[derive(Default)]
struct KeyState {
    /// The last fence issued for this key; kept after release so fences keep growing.
    last_fence: u64,
    /// The holder's token; meaningful while `expires_at` is set and in the future.
    token: String,
    expires_at: Option<Instant>,
}

impl KeyState {
    fn holder(&self, now: Instant) -> Option<(&str, Instant)> {
        self.expires_at
            .filter(|expires_at| now < *expires_at)
            .map(|expires_at| (self.token.as_str(), expires_at))
    }

    fn owned_by(&self, token: &str, now: Instant) -> bool {
        self.holder(now).is_some_and(|(holder, _)| holder == token)
    }

    fn clear(&mut self) {
        self.expires_at = None;
    }
}

/// The hash of the store's keys: each 8-byte word mixed in by one multiplication whose high
/// half is folded into its low half (as in wyhash and foldhash).
///
/// The standard map's SipHash resists keys crafted to collide, at about 5% of the time of an
/// in-memory acquire and release (which hash their key once each). A store's keys come from the
/// program that shares it, in one process, so that resistance would buy nothing here.
#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn mix(&mut self, word: u64) {
        /// Odd, with well-spread bits: the 64-bit golden ratio.
        const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
        let product = u128::from(self.0 ^ word) * u128::from(MULTIPLIER);
        self.0 = product as u64 ^ (product >> 64) as u64;
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut exact = [0; 8];
            exact.copy_from_slice(word);
            self.mix(u64::from_le_bytes(exact));
        }
        // The last 0 to 7 bytes in one word, and the length in its top byte, which they leave
        // free: byte strings that differ only in trailing zeros still differ.
        let last = words
            .remainder()
            .iter()
            .rev()
            .fold(0, |word, &byte| word << 8 | u64::from(byte));
        self.mix(last | (bytes.len() as u64) << 56);
    }

    fn write_u8(&mut self, byte: u8) {
        self.mix(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("clock", &self.store.clock)
            .field("keys", &self.store.keys.lock().len())
            .field(
                "unreachable",
                &self.store.unreachable.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl MemoryBackend {
    /// A store on the system clock.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// A store on `clock`: give the same clock to
    /// [`LockManagerBuilder::clock`](lock_core::LockManagerBuilder::clock) to run in virtual time.
    pub fn with_clock(clock: impl Into<Clock>) -> MemoryBackend {
        MemoryBackend {
            store: Arc::new(Store {
                clock: clock.into(),
                ..Store::default()
            }),
        }
    }

    /// The clock this store expires leases by.
    pub fn clock(&self) -> &Clock {
        &self.store.clock
    }

    /// Deletes `key` whoever holds it, as an operator or a failover would: the holder finds out
    /// at its next renewal. Returns whether the key was held.
    ///
    /// ```
    /// use lock_memory::MemoryBackend;
    ///
    /// let backend = MemoryBackend::new();
    /// assert!(!backend.revoke("nothing-here"));
    /// ```
    pub fn revoke(&self, key: &str) -> bool {
        let now = self.store.clock.now();
        let mut keys = self.store.keys.lock();
        match keys.get_mut(key) {
            Some(state) if state.holder(now).is_some() => {
                state.clear();
                drop(keys);
                self.store.waiters.wake_one(key);
                true
            }
            _ => false,
        }
    }

    /// While `true`, every call fails with a transient error, as if the store were unreachable;
    /// the leases it holds keep expiring by the clock.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::LockManager;
    /// use lock_memory::MemoryBackend;
    ///
    /// let backend = MemoryBackend::new();
    /// let manager = LockManager::new(backend.clone());
    /// backend.set_unreachable(true);
    /// let error = manager.try_acquire("k", Duration::from_secs(1)).unwrap_err();
    /// assert!(error.is_transient());
    /// ```
    pub fn set_unreachable(&self, unreachable: bool) {
        self.store.unreachable.store(unreachable, Ordering::SeqCst);
    }

    /// Whether `key` is held by anyone now.
    pub fn is_locked(&self, key: &str) -> bool {
        let now = self.store.clock.now();
        self.store
            .keys
            .lock()
            .get(key)
            .is_some_and(|state| state.holder(now).is_some())
    }

    /// How many threads are waiting for `key` to be released (registered through
    /// [`LeaseBackend::watch_release`]). Lets a test wait until a worker is blocked on a lock.
    ///
    /// ```
    /// use lock_memory::MemoryBackend;
    ///
    /// assert_eq!(MemoryBackend::new().waiting("k"), 0);
    /// ```
    pub fn waiting(&self, key: &str) -> usize {
        self.store.waiters.waiting(key)
    }

    fn check_reachable(&self) -> Result<(), BackendError> {
        if self.store.unreachable.load(Ordering::SeqCst) {
            Err(BackendError::transient(Unreachable))
        } else {
            Ok(())
        }
    }

    /// When a lease taken now for `ttl` expires. TTLs beyond [`MAX_TTL`](lock_core::MAX_TTL)
    /// (which the manager refuses) are held for `MAX_TTL`, so the addition cannot overflow.
    fn expiry(&self, now: Instant, ttl: Duration) -> Instant {
        now.checked_add(ttl.min(lock_core::MAX_TTL)).unwrap_or(now)
    }
}

/// The error of a [`MemoryBackend`] made unreachable with
/// [`set_unreachable`](MemoryBackend::set_unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable;

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the memory backend was set unreachable")
    }
}

impl std::error::Error for Unreachable {}

impl LeaseBackend for MemoryBackend {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        _timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        self.check_reachable()?;
        let now = self.store.clock.now();
        let mut keys = self.store.keys.lock();
        let state = match keys.get_mut(request.key) {
            Some(state) => state,
            None => keys.entry(request.key.into()).or_default(),
        };
        if let Some((holder, expires_at)) = state.holder(now) {
            if holder != request.token {
                return Ok(AcquireOutcome::Held {
                    remaining: Some(expires_at - now),
                });
            }
            // Our own token again (a retried attempt): the same lease, with a fresh TTL.
            state.expires_at = Some(self.expiry(now, request.ttl));
            return Ok(AcquireOutcome::Acquired {
                fence: state.last_fence,
            });
        }
        state.last_fence += 1;
        state.token.clear();
        state.token.push_str(request.token);
        state.expires_at = Some(self.expiry(now, request.ttl));
        Ok(AcquireOutcome::Acquired {
            fence: state.last_fence,
        })
    }

    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        _timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        if let Err(error) = self.check_reachable() {
            return requests.iter().map(|_| Err(error.clone())).collect();
        }
        let now = self.store.clock.now();
        let mut keys = self.store.keys.lock();
        requests
            .iter()
            .map(|request| match keys.get_mut(request.key) {
                Some(state) if state.owned_by(request.token, now) => {
                    state.expires_at = Some(self.expiry(now, request.ttl));
                    Ok(Ownership::Owned)
                }
                _ => Ok(Ownership::NotOwned),
            })
            .collect()
    }

    fn release(
        &self,
        key: &str,
        token: &str,
        _timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        self.check_reachable()?;
        let now = self.store.clock.now();
        let mut keys = self.store.keys.lock();
        match keys.get_mut(key) {
            Some(state) if state.owned_by(token, now) => {
                state.clear();
                drop(keys);
                self.store.waiters.wake_one(key);
                Ok(Ownership::Owned)
            }
            _ => Ok(Ownership::NotOwned),
        }
    }

    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        Some(self.store.waiters.register(key))
    }

    fn inspect(&self, key: &str, _timeout: Duration) -> Result<lock_core::KeyState, BackendError> {
        self.check_reachable()?;
        let now = self.store.clock.now();
        let keys = self.store.keys.lock();
        let Some(state) = keys.get(key) else {
            return Ok(lock_core::KeyState::Free { last_fence: None });
        };
        // Fences start at 1: a key whose every acquire was refused has issued none.
        let fence = Some(state.last_fence).filter(|fence| *fence > 0);
        Ok(match state.holder(now) {
            Some((_, expires_at)) => lock_core::KeyState::Held {
                remaining: Some(expires_at - now),
                fence,
            },
            None => lock_core::KeyState::Free { last_fence: fence },
        })
    }

    /// Deletes the key as [`revoke`](MemoryBackend::revoke) does.
    fn force_release(&self, key: &str, _timeout: Duration) -> Result<bool, BackendError> {
        self.check_reachable()?;
        Ok(self.revoke(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renew_one(
        backend: &MemoryBackend,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        backend
            .renew_batch(std::slice::from_ref(request), timeout)
            .remove(0)
    }

    const TTL: Duration = Duration::from_secs(10);

    fn request<'a>(key: &'a str, token: &'a str) -> LeaseRequest<'a> {
        LeaseRequest {
            key,
            token,
            ttl: TTL,
        }
    }

    #[test]
    fn key_hashes_differ_and_spread_over_a_maps_buckets_and_tags() {
        use std::collections::HashSet;
        use std::hash::BuildHasher;

        let hash = |key: &str| BuildHasherDefault::<KeyHasher>::default().hash_one(key);
        let keys: Vec<String> = (0..100_000)
            .map(|n| format!("orders:{n}"))
            .chain((0..1000).map(|n| "k".repeat(n)))
            .chain((0..1000).map(|n| format!("{n:x}")))
            .collect();
        let hashes: HashSet<u64> = keys.iter().map(|key| hash(key)).collect();
        assert_eq!(hashes.len(), keys.len(), "collisions");
        // The map picks a bucket by the low bits and a tag by the top seven.
        let buckets: HashSet<u64> = hashes.iter().map(|hash| hash & 0xffff).collect();
        let tags: HashSet<u64> = hashes.iter().map(|hash| hash >> 57).collect();
        assert!(buckets.len() > 0x10000 * 3 / 4, "{} buckets", buckets.len());
        assert_eq!(tags.len(), 128);
        for (a, b) in [
            ("a", "a\0"),
            ("", "\0"),
            ("12345678", "12345678\0"),
            ("ab", "ba"),
        ] {
            assert_ne!(hash(a), hash(b), "{a:?} and {b:?}");
        }
    }

    #[test]
    fn held_reports_the_remaining_ttl() {
        let clock = lock_core::ManualClock::new();
        let backend = MemoryBackend::with_clock(clock.clone());
        backend.try_acquire(&request("k", "a"), TTL).unwrap();
        clock.advance(Duration::from_secs(4));
        assert_eq!(
            backend.try_acquire(&request("k", "b"), TTL).unwrap(),
            AcquireOutcome::Held {
                remaining: Some(Duration::from_secs(6))
            }
        );
    }

    #[test]
    fn release_wakes_watchers_and_dropped_watches_unregister() {
        let backend = MemoryBackend::new();
        backend.try_acquire(&request("k", "a"), TTL).unwrap();
        let watch = backend.watch_release("k").unwrap();
        let dropped = backend.watch_release("k").unwrap();
        drop(dropped);
        assert_eq!(backend.waiting("k"), 1);
        backend.release("k", "a", TTL).unwrap();
        assert!(
            watch.receiver().try_recv().is_ok(),
            "the waiter was not woken"
        );
        drop(watch);
        assert_eq!(backend.waiting("k"), 0);
    }

    #[test]
    fn revoke_frees_the_key_and_wakes_waiters() {
        let backend = MemoryBackend::new();
        backend.try_acquire(&request("k", "a"), TTL).unwrap();
        let watch = backend.watch_release("k").unwrap();
        assert!(backend.revoke("k"));
        assert!(!backend.is_locked("k"));
        assert!(watch.receiver().try_recv().is_ok());
        assert_eq!(
            renew_one(&backend, &request("k", "a"), TTL).unwrap(),
            Ownership::NotOwned
        );
    }

    #[test]
    fn unreachable_fails_every_call_transiently() {
        let backend = MemoryBackend::new();
        backend.set_unreachable(true);
        let error = backend.try_acquire(&request("k", "a"), TTL).unwrap_err();
        assert!(error.is_transient());
        assert!(renew_one(&backend, &request("k", "a"), TTL).is_err());
        assert!(backend.release("k", "a", TTL).is_err());
        backend.set_unreachable(false);
        assert!(backend.try_acquire(&request("k", "a"), TTL).is_ok());
    }
}
