//! Release notifications: one shared pub/sub connection per backend, subscribed to a key's
//! channel only while a thread of this process waits for that key.
//!
//! `release.lua` publishes every release on the key's own channel (named like its lock key,
//! `<prefix>{<key>}`, see [`release_channel`]). A release nobody waits for costs a `PUBLISH` to a
//! channel without subscribers, and no other process hears of it.
//!
//! The waiters live in a [`ReleaseWaiters`] registry, which tells the subscriber thread (over a
//! crossbeam channel) whenever a key gains its first waiter or loses its last one. The thread,
//! started by the first [`Subscriber::watch`], then subscribes or unsubscribes that key's
//! channel on its connection. Each message wakes the longest-waiting waiter of its key.
//!
//! No release is missed for good: once a key's subscription is confirmed, every waiter of that
//! key is woken once, since the key may have been released between a waiter's last attempt and
//! the subscription (the same happens after every reconnection). Waiters also keep the
//! manager's backoff, so a missed message only costs latency.
//!
//! The thread reads its connection with a short timeout ([`POLL_INTERVAL`]) while it has
//! subscriptions, so that a new key's subscription waits at most that long; with none, it
//! blocks on the crossbeam channel alone and reads nothing. The `redis` crate's sync connection
//! offers no way to wait on a socket and a channel at once.
//!
//! Connections are opened by the backend's [`Connector`], as the pool's are: behind Sentinel,
//! to the master the sentinels name. When a failover moves the master, the connector says the
//! connection is stale (within its watch's interval), and the thread leaves it at once and
//! subscribes again on the new master, waking every waiter once as after any reconnection.
//!
//! When the connection dies, the thread reconnects with capped exponential backoff (only while
//! somebody waits). A refusal that retrying cannot cure (the user may not subscribe to the
//! channels: `NOPERM`, a wrong password; over TLS, a permanent [`TlsFailure`] such as an
//! untrusted certificate) means no wake-ups: the thread warns once and tries again only every
//! [`REFUSED_RETRY`], in case the server's configuration changes.
//!
//! The thread holds only a weak handle ([`WeakReleaseWaiters`]) to the registry, whose listener
//! holds the only sender of the thread's channel. Dropping the backend drops both: the thread
//! notices at once when it is idle, and within [`POLL_INTERVAL`] otherwise. Dropping never
//! waits for it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use lock_core::{BackendErrorKind, ReleaseWaiters, ReleaseWatch, WeakReleaseWaiters};
use parking_lot::Mutex;
use redis::{PubSub, RedisError, Value};

use crate::connection::connector::{Connector, Generation, OpenConnection};
use crate::connection::tls::handshake_failure;
use crate::errors::classify;
use crate::scripts::keys::release_channel;
use crate::TlsFailure;

/// How long the subscriber blocks on a read, while it has subscriptions, before it looks for
/// keys to subscribe or unsubscribe.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// After this long without any message, the subscriber pings the server to find out whether
/// the connection still works.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The first and the longest pause between reconnection attempts.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// The pause before subscribing again after a refusal that retrying cannot cure.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// What the subscriber thread needs to (re)connect.
#[derive(Clone)]
pub(crate) struct SubscriberSettings {
    pub(crate) connector: Connector,
    pub(crate) key_prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    /// The redacted URL, for logs.
    pub(crate) target: String,
    /// Whether `client` connects over TLS (`rediss://`).
    pub(crate) tls: bool,
}

/// The shared subscriber of one backend: its registry of waiters and its lazily started thread.
pub(crate) type Subscriber = WaiterThread<SubscriberSettings>;

impl Subscriber {
    pub(crate) fn new(settings: SubscriberSettings) -> Subscriber {
        WaiterThread::start_on_first_wait("lock-redis-subscriber", settings, run)
    }
}

/// A registry of the keys this process's threads wait for, and the thread that subscribes to
/// their release channels, started by the first wait: one server's subscriber
/// ([`Subscriber`]) and a cluster's sharded one share it, with their own `body`.
pub(crate) struct WaiterThread<S> {
    registry: ReleaseWaiters,
    /// The keys whose first waiter arrived or last waiter left, for the thread.
    changes: Receiver<Box<str>>,
    settings: Arc<S>,
    name: &'static str,
    /// The thread's loop; it returns once the registry is gone.
    body: fn(&S, &WeakReleaseWaiters, &Receiver<Box<str>>),
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<S> fmt::Debug for WaiterThread<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaiterThread")
            .field("name", &self.name)
            .field("started", &self.thread.lock().is_some())
            .field("waiters", &self.registry.len())
            .finish()
    }
}

impl<S: Send + Sync + 'static> WaiterThread<S> {
    /// A registry with no waiter yet; the thread named `name` runs `body` from the first wait.
    pub(crate) fn start_on_first_wait(
        name: &'static str,
        settings: S,
        body: fn(&S, &WeakReleaseWaiters, &Receiver<Box<str>>),
    ) -> WaiterThread<S> {
        let (sender, changes) = crossbeam_channel::unbounded();
        let registry = ReleaseWaiters::with_listener(move |key| {
            // Fails only once the thread has ended, when nobody needs to know.
            let _ = sender.send(key.into());
        });
        WaiterThread {
            registry,
            changes,
            settings: Arc::new(settings),
            name,
            body,
            thread: Mutex::new(None),
        }
    }

    /// Registers a waiter for `key`, starting the thread if it is not running. Never touches
    /// the network: the thread subscribes, and wakes the waiter once the subscription is
    /// confirmed. `None` if the thread could not be started: waiters then use backoff only.
    pub(crate) fn watch(&self, key: &str) -> Option<ReleaseWatch> {
        let watch = self.registry.register(key);
        self.ensure_started().then_some(watch)
    }

    /// Starts the thread unless it runs; false if it could not be started.
    fn ensure_started(&self) -> bool {
        let mut thread = self.thread.lock();
        if thread.as_ref().is_some_and(|handle| !handle.is_finished()) {
            return true;
        }
        let registry = self.registry.downgrade();
        let changes = self.changes.clone();
        let settings = Arc::clone(&self.settings);
        let body = self.body;
        let spawned = std::thread::Builder::new()
            .name(self.name.to_owned())
            .spawn(move || body(&settings, &registry, &changes));
        match spawned {
            Ok(handle) => {
                *thread = Some(handle);
                true
            }
            Err(error) => {
                tracing::warn!(%error, thread = self.name, "could not start a lock-redis subscriber thread; waiters use backoff only");
                false
            }
        }
    }
}

/// Why the thread left a connection.
enum Left {
    /// Time to stop: the backend is gone.
    Shutdown,
    /// Nobody waited any more by the time it connected: close until somebody does.
    Idle,
    /// The connection failed, or the server refused it for a reason retrying cannot cure.
    Lost(RedisError),
    /// No connection could be opened (over TLS, this may be a [`TlsFailure`]).
    NotConnected(RedisError),
    /// The connection leads to a server that no longer takes the writes: a failover moved the
    /// master, and releases are published on the new one.
    Stale,
}

/// The thread's loop: wait until somebody waits, connect, subscribe, dispatch; reconnect with
/// backoff when that fails.
fn run(settings: &SubscriberSettings, registry: &WeakReleaseWaiters, changes: &Receiver<Box<str>>) {
    let mut retry = Retry {
        backoff: Backoff::new(RECONNECT_BACKOFF.0, RECONNECT_BACKOFF.1),
        failures: 0,
    };
    let mut refusal_reported = false;
    loop {
        if !wait_for_waiters(registry, changes) {
            return;
        }
        let (error, tls_failure) = match session(settings, registry, changes, &mut retry) {
            Left::Shutdown => return,
            Left::Idle => continue,
            Left::Stale => {
                tracing::info!(redis = %settings.target, "the Redis master moved; the lock-redis subscriber follows it");
                continue;
            }
            Left::Lost(error) => (error, None),
            Left::NotConnected(error) => {
                let tls_failure = settings
                    .tls
                    .then(|| handshake_failure(&error).map(|(failure, _)| failure))
                    .flatten();
                (error, tls_failure)
            }
        };
        retry.failures = retry.failures.saturating_add(1);
        let failures = retry.failures;
        let kind = tls_failure.map_or_else(|| classify(&error), TlsFailure::kind);
        let pause = if kind == BackendErrorKind::Permanent {
            if !refusal_reported {
                refusal_reported = true;
                if let Some(tls_failure) = tls_failure {
                    tracing::warn!(redis = %settings.target, %error, "the lock-redis subscriber cannot connect over TLS: {tls_failure}: waiters are not woken on release and rely on backoff; retrying every {REFUSED_RETRY:?}");
                } else {
                    tracing::warn!(redis = %settings.target, prefix = %settings.key_prefix, %error, "Redis refuses the lock-redis subscriber (a missing ACL permission on the release channels?): waiters are not woken on release and rely on backoff; retrying every {REFUSED_RETRY:?}");
                }
            } else {
                tracing::debug!(redis = %settings.target, %error, failures, "Redis still refuses the lock-redis subscriber");
            }
            REFUSED_RETRY
        } else {
            if failures == 1 {
                tracing::warn!(redis = %settings.target, %error, "lock-redis subscriber lost its connection; reconnecting");
            } else {
                tracing::debug!(redis = %settings.target, %error, failures, "lock-redis subscriber could not reconnect");
            }
            retry.backoff.next_delay()
        };
        if !pause_for(pause, changes) {
            return;
        }
    }
}

/// Blocks until some key has a waiter; false when the backend is gone.
fn wait_for_waiters(registry: &WeakReleaseWaiters, changes: &Receiver<Box<str>>) -> bool {
    loop {
        // The upgraded registry is dropped before blocking: holding it would keep the backend's
        // registry, and so the channel's sender, alive.
        match registry.upgrade().map(|registry| registry.is_empty()) {
            None => return false,
            Some(false) => return true,
            Some(true) => {}
        }
        if changes.recv().is_err() {
            return false;
        }
    }
}

/// Sleeps `pause`, ignoring changes (a reconnection subscribes whatever is wanted then); false
/// when the backend is gone.
fn pause_for(pause: Duration, changes: &Receiver<Box<str>>) -> bool {
    let started = Instant::now();
    loop {
        let left = pause.saturating_sub(started.elapsed());
        if left.is_zero() {
            return true;
        }
        match changes.recv_timeout(left) {
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// One connection's life: subscribe to the keys that have waiters, then follow changes and
/// dispatch messages until the connection fails, nobody waits, or the backend is dropped.
fn session(
    settings: &SubscriberSettings,
    registry: &WeakReleaseWaiters,
    changes: &Receiver<Box<str>>,
    retry: &mut Retry,
) -> Left {
    let mut connection = match connect(settings) {
        Ok(connection) => connection,
        Err(error) => return Left::NotConnected(error),
    };
    let Some(keys) = registry.upgrade().map(|registry| registry.keys()) else {
        return Left::Shutdown;
    };
    if keys.is_empty() {
        return Left::Idle;
    }
    let mut channels = Channels::new(settings);
    // The first subscription of a connection reads its confirmations itself, so that a refusal
    // is seen: `redis`' `PubSub::subscribe` ignores one (which is also why later subscriptions,
    // to channels under the same prefix, are not checked again).
    if let Err(error) = subscribe_checked(&mut connection, &channels.add_all(keys)) {
        return Left::Lost(error);
    }
    if retry.failures > 0 {
        tracing::info!(redis = %settings.target, "lock-redis subscriber reconnected");
    }
    retry.reset();
    let Some(live) = registry.upgrade() else {
        return Left::Shutdown;
    };
    channels.wake_every_waiter(&live);
    drop(live);
    let generation = connection.generation();
    let mut pubsub = connection.as_pubsub();
    listen(
        &mut pubsub,
        &mut channels,
        settings,
        registry,
        changes,
        generation,
    )
}

/// The channels a connection is subscribed to, and the key of each.
struct Channels<'a> {
    settings: &'a SubscriberSettings,
    keys: HashMap<String, Box<str>>,
}

impl<'a> Channels<'a> {
    fn new(settings: &'a SubscriberSettings) -> Channels<'a> {
        Channels {
            settings,
            keys: HashMap::new(),
        }
    }

    fn channel(&self, key: &str) -> String {
        release_channel(&self.settings.key_prefix, key)
    }

    /// Records `keys` as subscribed; returns their channels.
    fn add_all(&mut self, keys: Vec<Box<str>>) -> Vec<String> {
        keys.into_iter()
            .map(|key| {
                let channel = self.channel(&key);
                self.keys.insert(channel.clone(), key);
                channel
            })
            .collect()
    }

    /// Wakes every waiter of every subscribed key.
    fn wake_every_waiter(&self, registry: &ReleaseWaiters) {
        for key in self.keys.values() {
            registry.wake_every(key);
        }
    }

    /// Brings `key`'s subscription in line with whether it has waiters now.
    fn follow(
        &mut self,
        pubsub: &mut PubSub<'_>,
        registry: &ReleaseWaiters,
        key: &str,
    ) -> Result<(), RedisError> {
        let channel = self.channel(key);
        let wanted = registry.waiting(key) > 0;
        if wanted == self.keys.contains_key(&channel) {
            return Ok(());
        }
        // Replies may take up to a command's timeout; messages meanwhile are kept by `PubSub`.
        pubsub.set_read_timeout(Some(self.settings.command_timeout))?;
        if wanted {
            pubsub.subscribe(&channel)?;
            self.keys.insert(channel, key.into());
            // Its releases went unheard until now.
            registry.wake_every(key);
        } else {
            pubsub.unsubscribe(&channel)?;
            self.keys.remove(&channel);
        }
        pubsub.set_read_timeout(Some(POLL_INTERVAL))
    }
}

/// `SUBSCRIBE` to every channel, reading each confirmation: a refusal (`NOPERM`) is an error
/// here.
fn subscribe_checked(
    connection: &mut redis::Connection,
    channels: &[String],
) -> Result<(), RedisError> {
    connection.send_packed_command(&redis::cmd("SUBSCRIBE").arg(channels).get_packed_command())?;
    for _ in channels {
        connection.recv_response()?.extract_error()?;
    }
    Ok(())
}

/// A dedicated connection (not one of the pool's), with bounded reads and writes.
fn connect(settings: &SubscriberSettings) -> Result<OpenConnection, RedisError> {
    let connection = settings.connector.open(settings.connect_timeout)?;
    connection.set_write_timeout(Some(settings.command_timeout))?;
    connection.set_read_timeout(Some(settings.command_timeout))?;
    Ok(connection)
}

/// Follows changes and dispatches messages until the connection fails or goes stale (it was
/// opened as `generation`), nobody waits, or the backend is dropped.
fn listen(
    pubsub: &mut PubSub<'_>,
    channels: &mut Channels<'_>,
    settings: &SubscriberSettings,
    registry: &WeakReleaseWaiters,
    changes: &Receiver<Box<str>>,
    generation: Generation,
) -> Left {
    if let Err(error) = pubsub.set_read_timeout(Some(POLL_INTERVAL)) {
        return Left::Lost(error);
    }
    let mut last_heard = Instant::now();
    loop {
        if !settings.connector.is_current(generation) {
            return Left::Stale;
        }
        let changed = if channels.keys.is_empty() {
            // Nothing to read: wait for a waiter. The connection stays open for it.
            match changes.recv() {
                Ok(key) => HashSet::from([key]),
                Err(_) => return Left::Shutdown,
            }
        } else {
            match drain(changes) {
                Some(changed) => changed,
                None => return Left::Shutdown,
            }
        };
        if !changed.is_empty() {
            let Some(live) = registry.upgrade() else {
                return Left::Shutdown;
            };
            for key in &changed {
                if let Err(error) = channels.follow(pubsub, &live, key) {
                    return Left::Lost(error);
                }
            }
            last_heard = Instant::now();
            continue;
        }
        match pubsub.get_message() {
            Ok(message) => {
                last_heard = Instant::now();
                let Some(key) = channels.keys.get(message.get_channel_name()) else {
                    continue; // unsubscribed since it was sent
                };
                tracing::trace!(redis = %settings.target, %key, "lock-redis subscriber heard a release");
                match registry.upgrade() {
                    Some(registry) => registry.wake_one(key),
                    None => return Left::Shutdown,
                }
            }
            Err(error) if error.is_timeout() => {
                if last_heard.elapsed() >= HEALTH_CHECK_INTERVAL {
                    if let Err(error) = ping(pubsub, settings) {
                        return Left::Lost(error);
                    }
                    last_heard = Instant::now();
                }
            }
            Err(error) => return Left::Lost(error),
        }
    }
}

/// The keys whose waiters changed since the last look, without blocking; `None` when the
/// backend is gone.
fn drain(changes: &Receiver<Box<str>>) -> Option<HashSet<Box<str>>> {
    let mut changed = HashSet::new();
    loop {
        match changes.try_recv() {
            Ok(key) => {
                changed.insert(key);
            }
            Err(TryRecvError::Empty) => return Some(changed),
            Err(TryRecvError::Disconnected) => return None,
        }
    }
}

/// Checks that the subscribed connection still answers.
fn ping(pubsub: &mut PubSub<'_>, settings: &SubscriberSettings) -> Result<(), RedisError> {
    pubsub.set_read_timeout(Some(settings.command_timeout))?;
    let answer = pubsub.ping::<Value>();
    pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
    answer.map(|_| ())
}

/// The reconnection state: failures in a row, and the backoff between them.
struct Retry {
    backoff: Backoff,
    failures: u32,
}

impl Retry {
    /// After a connection that worked.
    fn reset(&mut self) {
        self.failures = 0;
        self.backoff.reset();
    }
}

/// Capped exponential backoff with jitter.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    fn reset(&mut self) {
        self.next = self.first;
    }

    /// The next pause: the current step, jittered to 50–100 %, then the step doubles.
    fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<Duration> = (0..5).map(|_| backoff.next_delay()).collect();
        let caps = [100, 200, 400, 400, 400];
        for (delay, cap) in delays.iter().zip(caps) {
            assert!(*delay <= Duration::from_millis(cap), "{delays:?}");
            assert!(*delay >= Duration::from_millis(cap / 2), "{delays:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
