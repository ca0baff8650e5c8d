//! [`ReleaseWaiters`]: the waiters of released keys, for backends that announce releases.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::ReleaseWatch;

/// The threads waiting for keys to be released, for a backend's
/// [`watch_release`](crate::LeaseBackend::watch_release).
///
/// [`register`](ReleaseWaiters::register) returns the [`ReleaseWatch`] to hand back to the
/// manager; dropping the watch unregisters it. When the backend learns that a key was
/// released, [`wake_one`](ReleaseWaiters::wake_one) wakes its longest-waiting waiter: a release
/// frees the key for one holder, and waking all would only make them race for it (the others
/// keep their backoff as a fallback). Clones share one registry.
///
/// A backend that must subscribe to something per key (a pub/sub channel, say) builds the
/// registry [`with_listener`](ReleaseWaiters::with_listener): it is told whenever a key gains
/// its first waiter or loses its last one, and asks [`waiting`](ReleaseWaiters::waiting) which
/// of the two happened.
///
/// ```
/// use lock_core::ReleaseWaiters;
///
/// let waiters = ReleaseWaiters::new();
/// let first = waiters.register("report");
/// let second = waiters.register("report");
/// waiters.wake_one("report");
/// assert!(first.receiver().try_recv().is_ok());
/// assert!(second.receiver().try_recv().is_err());
/// drop(second);
/// assert_eq!(waiters.waiting("report"), 1);
/// ```
#[derive(Clone, Default)]
pub struct ReleaseWaiters {
    registry: Arc<Registry>,
}

/// A [`ReleaseWaiters`] that does not keep the registry alive: for a backend's background
/// thread, which must not outlive the backend.
#[derive(Clone, Debug, Default)]
pub struct WeakReleaseWaiters {
    registry: Weak<Registry>,
}

/// One registered waiter: its id and where to wake it.
type Waiter = (u64, Sender<()>);

/// Told the key whose first waiter arrived or whose last one left.
type Listener = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct Registry {
    waiters: Mutex<HashMap<Box<str>, Vec<Waiter>>>,
    /// How many keys have waiters, kept with `waiters` (under its lock): a wake-up when nobody
    /// waits anywhere (every uncontended release) reads it and takes no lock.
    ///
    /// No wake-up is lost by skipping the lock. A waiter registers, then tries the key again;
    /// a release deletes the key, then reads this count. If the waiter's try came after the
    /// delete, it finds the key free. If it came before, in the backend's own critical section
    /// (its lock, or the server's one thread), the registration happened before the delete,
    /// and so before this read, which therefore sees it.
    waited_keys: AtomicUsize,
    next_id: AtomicU64,
    listener: Option<Listener>,
}

impl Registry {
    fn changed(&self, key: &str) {
        if let Some(listener) = &self.listener {
            listener(key);
        }
    }
}

impl fmt::Debug for ReleaseWaiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseWaiters")
            .field("waiting", &self.len())
            .finish()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl ReleaseWaiters {
    /// An empty registry.
    pub fn new() -> ReleaseWaiters {
        ReleaseWaiters::default()
    }

    /// An empty registry that calls `listener` with a key whenever the key gains its first
    /// waiter or loses its last one.
    ///
    /// The listener runs while the registry is locked, so the calls for one key come in the
    /// order of the changes; it must be quick (sending on a channel, say) and must not call
    /// back into the registry.
    ///
    /// ```
    /// use lock_core::ReleaseWaiters;
    ///
    /// let (changes, changed) = crossbeam_channel::unbounded();
    /// let waiters = ReleaseWaiters::with_listener(move |key| {
    ///     let _ = changes.send(key.to_owned());
    /// });
    /// let first = waiters.register("report");
    /// let second = waiters.register("report");
    /// assert_eq!(changed.try_recv().as_deref(), Ok("report")); // its first waiter
    /// drop(first);
    /// assert!(changed.try_recv().is_err()); // still one waiting
    /// drop(second);
    /// assert_eq!(changed.try_recv().as_deref(), Ok("report")); // its last one left
    /// assert_eq!(waiters.waiting("report"), 0);
    /// ```
    pub fn with_listener(listener: impl Fn(&str) + Send + Sync + 'static) -> ReleaseWaiters {
        ReleaseWaiters {
            registry: Arc::new(Registry {
                listener: Some(Box::new(listener)),
                ..Registry::default()
            }),
        }
    }

    /// Registers a waiter for `key`; it is woken through the returned watch.
    pub fn register(&self, key: &str) -> ReleaseWatch {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut waiters = self.registry.waiters.lock();
            let senders = waiters.entry(key.into()).or_default();
            senders.push((id, sender));
            if senders.len() == 1 {
                self.registry.changed(key);
            }
            self.registry
                .waited_keys
                .store(waiters.len(), Ordering::Release);
        }
        let registration = Registration {
            registry: Arc::downgrade(&self.registry),
            key: key.into(),
            id,
        };
        ReleaseWatch::new(receiver, registration)
    }

    /// Wakes the longest-waiting waiter of `key` that has no wake-up pending yet.
    pub fn wake_one(&self, key: &str) {
        if self.nobody_waits() {
            return;
        }
        if let Some(waiters) = self.registry.waiters.lock().get(key) {
            // A full channel means already woken: each release wakes one more waiter.
            for (_, sender) in waiters {
                if sender.try_send(()).is_ok() {
                    return;
                }
            }
        }
    }

    /// Wakes every waiter of `key`: after its releases may have gone unheard (before a
    /// subscription to them took effect, say).
    pub fn wake_every(&self, key: &str) {
        if self.nobody_waits() {
            return;
        }
        if let Some(waiters) = self.registry.waiters.lock().get(key) {
            for (_, sender) in waiters {
                let _ = sender.try_send(());
            }
        }
    }

    /// Whether no key has a waiter, without locking (see `Registry::waited_keys`).
    fn nobody_waits(&self) -> bool {
        self.registry.waited_keys.load(Ordering::Acquire) == 0
    }

    /// How many waiters `key` has.
    pub fn waiting(&self, key: &str) -> usize {
        self.registry.waiters.lock().get(key).map_or(0, Vec::len)
    }

    /// The keys that have waiters.
    pub fn keys(&self) -> Vec<Box<str>> {
        self.registry.waiters.lock().keys().cloned().collect()
    }

    /// How many waiters there are in all.
    pub fn len(&self) -> usize {
        self.registry.waiters.lock().values().map(Vec::len).sum()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A handle that does not keep this registry alive.
    pub fn downgrade(&self) -> WeakReleaseWaiters {
        WeakReleaseWaiters {
            registry: Arc::downgrade(&self.registry),
        }
    }
}

impl WeakReleaseWaiters {
    /// The registry, unless every [`ReleaseWaiters`] handle is gone.
    pub fn upgrade(&self) -> Option<ReleaseWaiters> {
        self.registry
            .upgrade()
            .map(|registry| ReleaseWaiters { registry })
    }
}

/// Unregisters a waiter when its [`ReleaseWatch`] is dropped.
struct Registration {
    registry: Weak<Registry>,
    key: Box<str>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut waiters = registry.waiters.lock();
        if let Some(senders) = waiters.get_mut(&self.key) {
            senders.retain(|(id, _)| *id != self.id);
            if senders.is_empty() {
                waiters.remove(&self.key);
                registry.changed(&self.key);
                registry.waited_keys.store(waiters.len(), Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_ups_go_by_key_one_per_call_and_registrations_end_on_drop() {
        let waiters = ReleaseWaiters::new();
        let a = waiters.register("a");
        let a2 = waiters.register("a");
        let b = waiters.register("b");
        assert_eq!(waiters.len(), 3);

        waiters.wake_one("a");
        waiters.wake_one("a");
        assert_eq!(a.receiver().try_recv(), Ok(()));
        assert!(a.receiver().try_recv().is_err(), "wake-ups coalesce");
        assert_eq!(a2.receiver().try_recv(), Ok(()));
        assert!(b.receiver().try_recv().is_err());

        waiters.wake_every("a");
        assert_eq!(a.receiver().try_recv(), Ok(()));
        assert_eq!(a2.receiver().try_recv(), Ok(()));
        assert!(b.receiver().try_recv().is_err(), "another key was woken");
        let mut keys = waiters.keys();
        keys.sort();
        assert_eq!(keys, ["a".into(), "b".into()]);

        drop(a);
        drop(a2);
        assert_eq!(waiters.len(), 1);
        assert_eq!(waiters.waiting("a"), 0);
        drop(b);
        assert!(waiters.is_empty());
    }

    #[test]
    fn a_watch_outliving_its_registry_drops_quietly() {
        let waiters = ReleaseWaiters::new();
        let weak = waiters.downgrade();
        let watch = waiters.register("a");
        drop(waiters);
        assert!(weak.upgrade().is_none());
        assert!(watch.receiver().try_recv().is_err());
        drop(watch);
    }
}
