//! Release wake-ups on a Redis Cluster, over sharded pub/sub: a key's releases are announced
//! with `SPUBLISH` on its channel (named like its lock key, so in its slot), which only the
//! master that owns the slot (and its replicas) hears; the subscriber listens there with
//! `SSUBSCRIBE`, only while a thread of this process waits for the key.
//!
//! One thread per backend (`lock-redis-cluster-subscriber`, started with the first wait) keeps
//! a connection to each master that owns the slot of a key with waiters, and looks at the
//! recorded layout every [`LAYOUT_CHECK`]: a key whose slot moved to another master (a failover,
//! a slot move) is subscribed again there, and its waiters woken once, in case a release went
//! unheard meanwhile (the same as when a key is first subscribed). A master that ends a
//! subscription itself (`sunsubscribe`, when its slot moved away), refuses one (`MOVED`), or
//! whose connection fails, makes the thread look at the layout anew and subscribe again where
//! the slot is. Waiters also keep the manager's backoff, so a missed message costs latency only.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use lock_core::{ReleaseWaiters, WeakReleaseWaiters};
use redis::cluster::NodeAddress;
use redis::{Connection, ProtocolVersion, PushKind, Value};

use super::spec::ClusterSpec;
use super::{slot_of, Layout};
use crate::connection::sentinel::spec::Address;
use crate::scripts::keys::release_channel;
use crate::subscriber::WaiterThread;

/// How long a read on one master's connection waits for a message.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How often the thread compares its subscriptions with the recorded layout.
const LAYOUT_CHECK: Duration = Duration::from_millis(100);

/// What the thread needs.
pub(crate) struct Settings {
    pub(crate) spec: ClusterSpec,
    pub(super) layout: Arc<Layout>,
    pub(crate) key_prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) target: String,
}

/// The sharded subscriber of one cluster backend: its registry of waiters and its lazily
/// started thread.
pub(crate) type ClusterSubscriber = WaiterThread<Settings>;

impl ClusterSubscriber {
    pub(crate) fn new(settings: Settings) -> ClusterSubscriber {
        WaiterThread::start_on_first_wait(
            "lock-redis-cluster-subscriber",
            settings,
            |settings, registry, changes| Listener::new(settings).run(registry, changes),
        )
    }
}

/// The thread's state: a connection per master, and where each key is subscribed.
struct Listener<'a> {
    settings: &'a Settings,
    connections: HashMap<NodeAddress, Connection>,
    /// The master each subscribed key is subscribed on.
    subscribed: HashMap<Box<str>, NodeAddress>,
    /// The key of each subscribed channel.
    channels: HashMap<String, Box<str>>,
    /// Keys whose subscription a master ended, or lost with its connection, not subscribed
    /// again yet.
    orphans: HashSet<Box<str>>,
    checked_at: Option<Instant>,
}

impl<'a> Listener<'a> {
    fn new(settings: &'a Settings) -> Listener<'a> {
        Listener {
            settings,
            connections: HashMap::new(),
            subscribed: HashMap::new(),
            channels: HashMap::new(),
            orphans: HashSet::new(),
            checked_at: None,
        }
    }

    /// Follows waiters, the layout and messages until the backend is gone.
    fn run(mut self, registry: &WeakReleaseWaiters, changes: &Receiver<Box<str>>) {
        loop {
            // The upgraded registry is not held while blocking: it would keep the backend's
            // registry, and so the channel's sender, alive.
            let Some(idle) = registry.upgrade().map(|registry| registry.is_empty()) else {
                return;
            };
            let changed = if idle {
                // Nobody waits: wait for a waiter.
                match changes.recv() {
                    Ok(_) => true,
                    Err(_) => return,
                }
            } else if self.connections.is_empty() {
                // Waiters, but no master reached yet: try again soon.
                match changes.recv_timeout(POLL_INTERVAL) {
                    Ok(_) => true,
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match changes.try_recv() {
                    Ok(_) => true,
                    Err(TryRecvError::Empty) => false,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            let Some(live) = registry.upgrade() else {
                return;
            };
            let due = self
                .checked_at
                .is_none_or(|at| at.elapsed() >= LAYOUT_CHECK);
            if changed || due {
                self.checked_at = Some(Instant::now());
                self.follow(&live);
            }
            self.read(&live);
        }
    }

    /// Subscribes every key with waiters on the master that owns its slot now, and
    /// unsubscribes the others.
    fn follow(&mut self, registry: &ReleaseWaiters) {
        let wanted = registry.keys();
        let unwanted: Vec<Box<str>> = self
            .subscribed
            .keys()
            .filter(|key| registry.waiting(key) == 0)
            .cloned()
            .collect();
        for key in unwanted {
            self.unsubscribe(&key, "SUNSUBSCRIBE");
        }
        self.orphans.retain(|key| registry.waiting(key) > 0);
        for key in wanted {
            let channel = release_channel(&self.settings.key_prefix, &key);
            let Some(master) = self.settings.layout.master_of(slot_of(&channel)) else {
                self.settings.layout.refresh_now();
                continue;
            };
            if self.subscribed.get(&key) == Some(&master) {
                continue;
            }
            if self.orphans.contains(&key) {
                // A master ended its subscription, or its connection failed: the layout may
                // be stale, so have a fresh look (at most every 100 ms) until it is subscribed.
                self.settings.layout.refresh_now();
            }

            self.unsubscribe(&key, "SUNSUBSCRIBE");
            let subscribe = redis::cmd("SSUBSCRIBE").arg(&channel).get_packed_command();
            let sent = self
                .connection(&master)
                .map(|connection| connection.send_packed_command(&subscribe));
            match sent {
                Some(Ok(())) => {
                    self.orphans.remove(&key);
                    self.channels.insert(channel, key.clone());
                    self.subscribed.insert(key.clone(), master);
                    // Its releases went unheard until now.
                    registry.wake_every(&key);
                }
                Some(Err(error)) => self.lost(&master, &error.to_string(), registry),
                None => self.settings.layout.refresh_now(),
            }
        }
    }

    /// Forgets `key`'s subscription, telling its master with `command` if its connection
    /// lives (`None` when the master ended it itself).
    fn unsubscribe(&mut self, key: &str, command: &str) {
        let Some(master) = self.subscribed.remove(key) else {
            return;
        };
        let channel = release_channel(&self.settings.key_prefix, key);
        self.channels.remove(&channel);
        if let Some(connection) = self.connections.get_mut(&master) {
            // Its confirmation is read (and ignored) with the messages.
            let _ = connection
                .send_packed_command(&redis::cmd(command).arg(&channel).get_packed_command());
        }
    }

    /// The connection to `master`, opened if needed; `None` if it cannot be.
    fn connection(&mut self, master: &NodeAddress) -> Option<&mut Connection> {
        if !self.connections.contains_key(master) {
            let settings = self.settings;
            // RESP3: messages come as push values, which a connection never mistakes for the
            // late reply of a read that timed out (it would skip as many replies as reads
            // timed out, and this thread's reads time out all the time).
            let opened = settings
                .spec
                .node_info(&Address::new(master.host(), master.port()))
                .and_then(|info| {
                    let resp3 = info
                        .redis_settings()
                        .clone()
                        .set_protocol(ProtocolVersion::RESP3);
                    redis::Client::open(info.set_redis_settings(resp3))
                })
                .and_then(|client| client.get_connection_with_timeout(settings.connect_timeout))
                .and_then(|connection| {
                    connection.set_write_timeout(Some(settings.command_timeout))?;
                    connection.set_read_timeout(Some(POLL_INTERVAL))?;
                    Ok(connection)
                });
            match opened {
                Ok(connection) => {
                    self.connections.insert(master.clone(), connection);
                }
                Err(error) => {
                    tracing::debug!(redis = %settings.target, %master, %error, "the cluster subscriber cannot reach a master");
                    return None;
                }
            }
        }
        self.connections.get_mut(master)
    }

    /// Reads what each master sent within [`POLL_INTERVAL`], and wakes waiters.
    fn read(&mut self, registry: &ReleaseWaiters) {
        let masters: Vec<NodeAddress> = self.connections.keys().cloned().collect();
        for master in masters {
            while let Some(connection) = self.connections.get_mut(&master) {
                match connection.recv_response() {
                    Ok(value) => self.dispatch(&master, value, registry),
                    Err(error) if error.is_timeout() => break,
                    Err(error) => {
                        self.lost(&master, &error.to_string(), registry);
                        break;
                    }
                }
            }
        }
    }

    /// One message from `master`.
    fn dispatch(&mut self, master: &NodeAddress, value: Value, registry: &ReleaseWaiters) {
        let (kind, data) = match value {
            Value::Push { kind, data } => (kind, data),
            Value::ServerError(error) => {
                // A subscription refused: the slot is elsewhere now (MOVED).
                tracing::debug!(redis = %self.settings.target, %master, ?error, "a master refused a sharded subscription");
                self.resubscribe_from(master, registry);
                return;
            }
            _ => return,
        };
        let channel = match data.first() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            _ => return,
        };
        let Some(key) = self.channels.get(&channel).cloned() else {
            return; // unsubscribed since it was sent
        };
        match kind {
            PushKind::SMessage => registry.wake_one(&key),
            // The master ended the subscription itself: the slot moved away.
            PushKind::SUnsubscribe if self.subscribed.get(&key) == Some(master) => {
                self.subscribed.remove(&key);
                self.channels.remove(&channel);
                self.orphans.insert(key);
                self.settings.layout.refresh_now();
                self.checked_at = None;
            }
            _ => {}
        }
    }

    /// `master`'s connection failed: every key subscribed there is subscribed again where the
    /// layout says, once it has been looked at anew.
    fn lost(&mut self, master: &NodeAddress, error: &str, registry: &ReleaseWaiters) {
        tracing::debug!(redis = %self.settings.target, %master, error, "the cluster subscriber lost a master's connection");
        self.connections.remove(master);
        self.resubscribe_from(master, registry);
    }

    fn resubscribe_from(&mut self, master: &NodeAddress, registry: &ReleaseWaiters) {
        let keys: Vec<Box<str>> = self
            .subscribed
            .iter()
            .filter(|(_, on)| *on == master)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.orphans.insert(key.clone());
            self.subscribed.remove(key);
            self.channels
                .remove(&release_channel(&self.settings.key_prefix, key));
            registry.wake_every(key);
        }
        self.settings.layout.refresh_now();
        self.checked_at = None;
    }
}
