//! Release notifications: one shared pub/sub subscriber per backend, waking the waiters of a key
//! when its holder releases it.
//!
//! The subscriber is a named thread started by the first [`Subscriber::watch`]. It has its own
//! connection (not one of the pool's), `SUBSCRIBE`d to `<prefix>released`, on which
//! `release.lua` publishes the user key of every release. Each message wakes the longest-waiting
//! receiver registered for that key. When the connection dies, the thread reconnects with capped
//! exponential backoff, and on every (re)connection wakes every registered waiter once, since
//! releases may have been missed meanwhile; waiters fall back on the manager's backoff until
//! then.
//!
//! A refusal that retrying cannot cure (the user may not subscribe to the channel: `NOPERM`, a
//! wrong password) means no wake-ups: the thread warns once, wakes nobody, and tries again only
//! every [`REFUSED_RETRY`], in case the server's configuration changes.
//!
//! The thread holds only a weak handle ([`WeakReleaseWaiters`]) to the registry. It stops when the backend is
//! dropped: the backend drops the shutdown sender, and the thread notices within one poll
//! interval (or at once, when it is sleeping between reconnections).

use std::fmt;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use lock_core::{BackendErrorKind, ReleaseWaiters, ReleaseWatch, WeakReleaseWaiters};
use parking_lot::Mutex;
use redis::{PubSub, RedisError, Value};

use crate::errors::classify;

/// How long the subscriber blocks on a read before it checks whether to stop.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// After this long without any message, the subscriber pings the server to find out whether
/// the connection still works.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The first and the longest pause between reconnection attempts.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// The pause before subscribing again after a refusal that retrying cannot cure.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// How long dropping the backend waits for the thread to finish before leaving it to end on
/// its own (it holds nothing but weak references, so it cannot keep the backend alive).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// What the subscriber thread needs to (re)connect.
#[derive(Clone)]
pub(crate) struct SubscriberSettings {
    pub(crate) client: redis::Client,
    pub(crate) channel: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    /// The redacted URL, for logs.
    pub(crate) target: String,
}

/// The running thread, as the backend sees it.
struct SubscriberThread {
    handle: JoinHandle<()>,
    /// Dropped to tell the thread to stop.
    shutdown: Sender<()>,
    /// Disconnected when the thread has finished.
    finished: Receiver<()>,
}

/// The shared subscriber of one backend: its registry of waiters and its lazily started thread.
pub(crate) struct Subscriber {
    registry: ReleaseWaiters,
    settings: SubscriberSettings,
    thread: Mutex<Option<SubscriberThread>>,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("channel", &self.settings.channel)
            .field("started", &self.thread.lock().is_some())
            .field("waiters", &self.registry.len())
            .finish()
    }
}

impl Subscriber {
    pub(crate) fn new(settings: SubscriberSettings) -> Subscriber {
        Subscriber {
            registry: ReleaseWaiters::new(),
            settings,
            thread: Mutex::new(None),
        }
    }

    /// Registers a waiter for `key`, starting the thread if it is not running. Never touches
    /// the network.
    ///
    /// The waiter is registered before the thread starts, so it is among those woken once the
    /// subscription is up: a release published before that is never missed for good.
    pub(crate) fn watch(&self, key: &str) -> Option<ReleaseWatch> {
        let watch = self.registry.register(key);
        self.ensure_started().then_some(watch)
    }

    /// Starts the thread unless it runs; false if it could not be started.
    fn ensure_started(&self) -> bool {
        let mut thread = self.thread.lock();
        if let Some(running) = thread.as_ref() {
            if !running.handle.is_finished() {
                return true;
            }
        }
        let (shutdown, shutdown_rx) = crossbeam_channel::bounded::<()>(0);
        let (finished_tx, finished) = crossbeam_channel::bounded::<()>(0);
        let registry = self.registry.downgrade();
        let settings = self.settings.clone();
        let spawned = std::thread::Builder::new()
            .name("lock-redis-subscriber".to_owned())
            .spawn(move || {
                let _finished = finished_tx;
                run(&settings, &registry, &shutdown_rx);
            });
        match spawned {
            Ok(handle) => {
                *thread = Some(SubscriberThread {
                    handle,
                    shutdown,
                    finished,
                });
                true
            }
            Err(error) => {
                tracing::warn!(%error, "could not start the lock-redis subscriber thread; waiters use backoff only");
                false
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        drop(thread.shutdown);
        match thread.finished.recv_timeout(SHUTDOWN_GRACE) {
            Err(RecvTimeoutError::Disconnected) | Ok(()) => {
                let _ = thread.handle.join();
            }
            // Still connecting: it ends on its own once the attempt times out.
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Why the thread left a connection.
enum Left {
    /// Time to stop.
    Shutdown,
    /// The connection failed, or the server refused it for a reason retrying cannot cure.
    Lost(RedisError),
}

/// The thread's loop: connect, subscribe, dispatch; reconnect with backoff when that fails.
fn run(settings: &SubscriberSettings, registry: &WeakReleaseWaiters, shutdown: &Receiver<()>) {
    let mut backoff = Backoff::new(RECONNECT_BACKOFF.0, RECONNECT_BACKOFF.1);
    let mut failures = 0_u32;
    let mut refusal_reported = false;
    loop {
        if should_stop(registry, shutdown) {
            return;
        }
        let left = match connect(settings).and_then(|mut connection| {
            subscribe(&mut connection, &settings.channel).map(|()| connection)
        }) {
            Ok(mut connection) => {
                if failures > 0 {
                    tracing::info!(redis = %settings.target, "lock-redis subscriber reconnected");
                }
                failures = 0;
                backoff.reset();
                // Releases may have been published while nobody listened.
                if let Some(registry) = registry.upgrade() {
                    registry.wake_all();
                }
                listen(&mut connection.as_pubsub(), settings, registry, shutdown)
            }
            Err(error) => Left::Lost(error),
        };
        let error = match left {
            Left::Shutdown => return,
            Left::Lost(error) => error,
        };
        failures = failures.saturating_add(1);
        let pause = if classify(&error) == BackendErrorKind::Permanent {
            if !refusal_reported {
                refusal_reported = true;
                tracing::warn!(redis = %settings.target, channel = %settings.channel, %error, "Redis refuses the lock-redis subscriber (a missing ACL permission on the release channel?): waiters are not woken on release and rely on backoff; retrying every {REFUSED_RETRY:?}");
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
            backoff.next_delay()
        };
        match shutdown.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// `SUBSCRIBE channel`, reading the confirmation: a refusal (`NOPERM`) is an error here, where
/// `redis`' own `PubSub::subscribe` would ignore it and leave a connection that never hears a
/// release.
fn subscribe(connection: &mut redis::Connection, channel: &str) -> Result<(), RedisError> {
    connection.send_packed_command(&redis::cmd("SUBSCRIBE").arg(channel).get_packed_command())?;
    connection.recv_response()?.extract_error().map(drop)
}

/// True when the backend is gone.
fn should_stop(registry: &WeakReleaseWaiters, shutdown: &Receiver<()>) -> bool {
    registry.upgrade().is_none() || !matches!(shutdown.try_recv(), Err(TryRecvError::Empty))
}

/// A dedicated connection (not one of the pool's), with bounded reads and writes.
fn connect(settings: &SubscriberSettings) -> Result<redis::Connection, RedisError> {
    let connection = settings
        .client
        .get_connection_with_timeout(settings.connect_timeout)?;
    connection.set_write_timeout(Some(settings.command_timeout))?;
    connection.set_read_timeout(Some(settings.command_timeout))?;
    Ok(connection)
}

/// Dispatches messages until the connection fails or the backend is dropped.
fn listen(
    pubsub: &mut PubSub<'_>,
    settings: &SubscriberSettings,
    registry: &WeakReleaseWaiters,
    shutdown: &Receiver<()>,
) -> Left {
    if let Err(error) = pubsub.set_read_timeout(Some(POLL_INTERVAL)) {
        return Left::Lost(error);
    }
    let mut last_heard = Instant::now();
    loop {
        if should_stop(registry, shutdown) {
            return Left::Shutdown;
        }
        match pubsub.get_message() {
            Ok(message) => {
                last_heard = Instant::now();
                if message.get_channel_name() != settings.channel {
                    continue;
                }
                let Ok(key) = std::str::from_utf8(message.get_payload_bytes()) else {
                    continue;
                };
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

/// Checks that the subscribed connection still answers.
fn ping(pubsub: &mut PubSub<'_>, settings: &SubscriberSettings) -> Result<(), RedisError> {
    pubsub.set_read_timeout(Some(settings.command_timeout))?;
    let answer = pubsub.ping::<Value>();
    pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
    answer.map(|_| ())
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
