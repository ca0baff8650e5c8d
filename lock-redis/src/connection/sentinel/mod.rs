//! The master of a Sentinel group: found by asking its sentinels, checked with `ROLE` on every
//! new connection, and followed through failovers.
//!
//! **Discovery** asks the sentinels in turn, starting with the one that answered last, for
//! `SENTINEL GET-MASTER-ADDR-BY-NAME`: the first answer wins. Each sentinel gets a fair share of
//! what is left of the connection's budget, so one silent sentinel cannot use it all. (The
//! `redis` crate's Sentinel client reads `SENTINEL MASTERS` instead, which names the old master
//! for about a second after `GET-MASTER-ADDR-BY-NAME` names the new one, and connects without a
//! timeout: neither suits calls that must be bounded.)
//!
//! **Every new connection** is opened to the master so found and asked `ROLE`: one whose server
//! is not a master is refused (a sentinel can name a master that has just been demoted), the
//! known master is forgotten, and the open fails as transient.
//!
//! **Following a failover.** Each connection remembers the *generation* of the master address it
//! was opened to; the generation changes whenever the known address does. A background thread
//! (`lock-redis-sentinel`, started with the first connection) asks a sentinel every
//! [`WATCH_INTERVAL`] where the master is, so within about that long after the sentinels switch,
//! pooled connections to the old master are stale: the pool drops them instead of handing them
//! out, and the release subscriber reconnects. A connection whose server answers `READONLY` (it
//! was demoted to a replica) is dropped too, and the master it was opened to is forgotten, so the
//! next connection asks the sentinels again. Connections opened within [`FRESH_FOR`] of the
//! watch's last answer use it without asking again; while no sentinel answers, they go to the
//! master named last (if its `ROLE` still says master).

pub(crate) mod spec;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use lock_core::BackendErrorKind;
use parking_lot::Mutex;
use redis::{
    Cmd, Connection, ConnectionInfo, ErrorKind, FromRedisValue, RedisConnectionInfo, RedisError,
    Role,
};

use crate::connection::deadline::Deadline;
use crate::errors::classify;
use spec::{Address, SentinelSpec};

/// How often the watch asks a sentinel where the master is.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// How long an answer of the sentinels serves new connections without asking again.
const FRESH_FOR: Duration = WATCH_INTERVAL;

/// The master of one Sentinel group, as this backend knows it. A cheap [`Clone`] handle.
#[derive(Clone)]
pub(crate) struct SentinelMaster {
    shared: Arc<Shared>,
}

struct Shared {
    spec: SentinelSpec,
    connect_timeout: Duration,
    /// The redacted URL, for logs.
    target: String,
    known: Mutex<Known>,
    /// Changes (under `known`'s lock) whenever the known master does.
    generation: AtomicU64,
    /// The sentinel that answered last, asked first.
    preferred: AtomicUsize,
    watch: Mutex<Watch>,
}

/// The master address last named by a sentinel.
struct Known {
    master: Option<Address>,
    confirmed_at: Option<Instant>,
}

/// The watch thread, from the backend's side.
enum Watch {
    NotStarted,
    /// Dropping the sender (with the backend) ends the thread.
    Running {
        _stop: Sender<()>,
    },
    CouldNotStart,
}

impl SentinelMaster {
    /// The master of the group `spec` names; nothing is asked until a connection is needed.
    pub(crate) fn new(spec: SentinelSpec, connect_timeout: Duration, target: String) -> Self {
        SentinelMaster {
            shared: Arc::new(Shared {
                spec,
                connect_timeout,
                target,
                known: Mutex::new(Known {
                    master: None,
                    confirmed_at: None,
                }),
                generation: AtomicU64::new(0),
                preferred: AtomicUsize::new(0),
                watch: Mutex::new(Watch::NotStarted),
            }),
        }
    }

    /// A connection to the master, whose server said `ROLE` master, opened within `timeout`
    /// (asking the sentinels included), and the generation of the master address it was
    /// opened to.
    pub(crate) fn open(&self, timeout: Duration) -> Result<(Connection, u64), RedisError> {
        let shared = &self.shared;
        let deadline = Deadline::after(timeout);
        shared.start_watch();
        let fresh = shared.known_master(Some(FRESH_FOR));
        if let Some((master, generation)) = &fresh {
            match shared.connect_master(master, *generation, &deadline) {
                Ok(connection) => return Ok((connection, *generation)),
                Err(error) => {
                    tracing::debug!(redis = %shared.target, %master, %error, "the master the sentinels named last is not usable; asking them again");
                }
            }
        }
        // If no sentinel answers, the master they named last (if it still says it is one) is
        // the best there is: the sentinels get half the time, so that it can still be tried.
        let fallback = shared.known_master(None).filter(|_| fresh.is_none());
        let asking = match (&fallback, time_left(&deadline)) {
            (Some(_), Some(left)) => deadline.narrowed(left / 2),
            _ => deadline,
        };
        match shared.ask_sentinels(&asking, &mut None) {
            Ok(master) => {
                let generation = shared.observe(&master);
                let connection = shared.connect_master(&master, generation, &deadline)?;
                Ok((connection, generation))
            }
            Err(error) => match fallback {
                Some((master, generation)) => shared
                    .connect_master(&master, generation, &deadline)
                    .map(|connection| (connection, generation))
                    .map_err(|_| error),
                None => Err(error),
            },
        }
    }

    /// Whether the master a connection of `generation` was opened to is still the one the
    /// sentinels name.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.shared.generation.load(Ordering::Acquire) == generation
    }

    /// A connection of `generation` was refused a write (`READONLY`): its server is a replica
    /// now. The master is forgotten, unless another has been found since.
    pub(crate) fn refused_write(&self, generation: u64) {
        let shared = &self.shared;
        if shared.forget(generation) {
            tracing::warn!(redis = %shared.target, "the Redis master refused a write (READONLY): it was demoted; asking the sentinels for the new one");
        }
    }
}

impl Shared {
    /// Starts the watch thread, once.
    fn start_watch(self: &Arc<Self>) {
        let mut watch = self.watch.lock();
        if !matches!(*watch, Watch::NotStarted) {
            return;
        }
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let shared = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("lock-redis-sentinel".to_owned())
            .spawn(move || watch_master(&shared, &stopped));
        *watch = match spawned {
            Ok(_detached) => Watch::Running { _stop: stop },
            Err(error) => {
                tracing::warn!(redis = %self.target, %error, "could not start the lock-redis Sentinel watch; failovers are followed only when connections fail");
                Watch::CouldNotStart
            }
        };
    }

    /// The master the sentinels named last (within `max_age`, if given), and its generation.
    fn known_master(&self, max_age: Option<Duration>) -> Option<(Address, u64)> {
        let known = self.known.lock();
        let fresh = match (max_age, known.confirmed_at) {
            (None, _) => true,
            (Some(max_age), Some(at)) => at.elapsed() < max_age,
            (Some(_), None) => false,
        };
        let master = known.master.clone().filter(|_| fresh)?;
        Some((master, self.generation.load(Ordering::Acquire)))
    }

    /// Records that a sentinel named `master` now; returns the generation of that address.
    fn observe(&self, master: &Address) -> u64 {
        let mut known = self.known.lock();
        if known.master.as_ref() != Some(master) {
            if let Some(previous) = &known.master {
                tracing::info!(redis = %self.target, from = %previous, to = %master, "the Sentinel group has a new master; following it");
            }
            known.master = Some(master.clone());
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        known.confirmed_at = Some(Instant::now());
        self.generation.load(Ordering::Acquire)
    }

    /// Forgets the master of `generation`, if it is still the known one; true if it was.
    fn forget(&self, generation: u64) -> bool {
        let mut known = self.known.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        known.master = None;
        known.confirmed_at = None;
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Connects to `master`, of `generation`, and checks that it says it is one; forgets it if
    /// it says otherwise.
    fn connect_master(
        &self,
        master: &Address,
        generation: u64,
        deadline: &Deadline,
    ) -> Result<Connection, RedisError> {
        let mut connection = connect(self.spec.master_info(master)?, deadline)?;
        match query_within::<Role>(&mut connection, &redis::cmd("ROLE"), deadline)? {
            Role::Primary { .. } => Ok(connection),
            role => {
                self.forget(generation);
                Err(not_master(master, &role))
            }
        }
    }

    /// Asks the sentinels in turn where the master is, starting with the one that answered
    /// last; each gets a fair share of what is left before `deadline`. `link` keeps a
    /// connection to the sentinel that answered, for the next time.
    fn ask_sentinels(
        &self,
        deadline: &Deadline,
        link: &mut Option<SentinelLink>,
    ) -> Result<Address, RedisError> {
        let sentinels = &self.spec.sentinels;
        let first = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        // The first refusal that asking again cannot cure (a wrong password, a server that is
        // no sentinel), returned as it is if every sentinel refused so.
        let mut refusal = None;
        let mut all_refused = true;
        for step in 0..sentinels.len() {
            let index = (first + step) % sentinels.len();
            let Some(left) = time_left(deadline) else {
                failures.push(format!("no time left to ask {}", sentinels[index]));
                all_refused = false;
                break;
            };
            let share = left / u32::try_from(sentinels.len() - step).unwrap_or(u32::MAX);
            match self.ask_sentinel(index, &deadline.narrowed(share), link) {
                Ok(Some(master)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(master);
                }
                Ok(None) => {
                    all_refused = false;
                    failures.push(format!(
                        "{} does not know the master {:?}",
                        sentinels[index], self.spec.master_name
                    ));
                }
                Err(error) => {
                    failures.push(format!("{}: {error}", sentinels[index]));
                    if classify(&error) == BackendErrorKind::Permanent {
                        refusal.get_or_insert(error);
                    } else {
                        all_refused = false;
                    }
                }
            }
        }
        match refusal {
            Some(refusal) if all_refused => Err(refusal),
            _ => Err(RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "no sentinel named the master",
                failures.join("; "),
            ))),
        }
    }

    /// Asks one sentinel, over `link` if it leads there, else over a new connection.
    fn ask_sentinel(
        &self,
        index: usize,
        deadline: &Deadline,
        link: &mut Option<SentinelLink>,
    ) -> Result<Option<Address>, RedisError> {
        let mut ask = redis::cmd("SENTINEL");
        ask.arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.spec.master_name);
        if let Some(mut linked) = link.take().filter(|linked| linked.index == index) {
            let answer =
                query_within::<Option<(String, u16)>>(&mut linked.connection, &ask, deadline);
            if let Ok(answer) = answer {
                *link = Some(linked);
                return Ok(answer.map(|(host, port)| Address::new(host, port)));
            }
            // The link broke: try a new connection to the same sentinel.
        }
        let mut connection = connect(
            self.spec.sentinel_info(&self.spec.sentinels[index])?,
            deadline,
        )?;
        let answer = query_within::<Option<(String, u16)>>(&mut connection, &ask, deadline)?;
        *link = Some(SentinelLink { index, connection });
        Ok(answer.map(|(host, port)| Address::new(host, port)))
    }
}

/// A connection to one sentinel, kept between two questions of the watch.
struct SentinelLink {
    index: usize,
    connection: Connection,
}

/// The watch thread: every [`WATCH_INTERVAL`], asks a sentinel where the master is, until the
/// backend is gone (the `stopped` channel disconnects).
fn watch_master(shared: &Weak<Shared>, stopped: &Receiver<()>) {
    let mut link = None;
    let mut failing = false;
    loop {
        if stopped.recv_timeout(WATCH_INTERVAL) != Err(RecvTimeoutError::Timeout) {
            return;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let deadline = Deadline::after(shared.connect_timeout);
        match shared.ask_sentinels(&deadline, &mut link) {
            Ok(master) => {
                shared.observe(&master);
                if failing {
                    tracing::info!(redis = %shared.target, "the sentinels answer again");
                }
                failing = false;
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(redis = %shared.target, %error, "no sentinel says where the Redis master is; a failover may go unnoticed until its connections fail");
            }
            Err(error) => {
                tracing::debug!(redis = %shared.target, %error, "still no sentinel says where the Redis master is");
            }
        }
    }
}

/// What is left before `deadline`; `None` when nothing is.
fn time_left(deadline: &Deadline) -> Option<Duration> {
    // Opening connections always runs under the connect timeout: `None` never happens.
    let left = deadline.remaining().unwrap_or(Duration::from_secs(3600));
    (!left.is_zero()).then_some(left)
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no time left to connect",
    ))
}

/// Sends `cmd` and reads its reply, both bounded by what is left before `deadline`.
fn query_within<T: FromRedisValue>(
    connection: &mut Connection,
    cmd: &Cmd,
    deadline: &Deadline,
) -> Result<T, RedisError> {
    let left = time_left(deadline).ok_or_else(timed_out)?;
    connection.set_read_timeout(Some(left))?;
    connection.set_write_timeout(Some(left))?;
    cmd.query(connection)
}

/// Connects within `deadline`: the TCP connection first, then `AUTH` and `SELECT` as round
/// trips of their own, each bounded by what is left. (The `redis` crate's handshake sends them
/// in one pipeline, with `CLIENT SETINFO`, and waits the full timeout for each reply even
/// after one timed out: four times the timeout against a silent server.) `CLIENT SETINFO` is
/// not sent.
fn connect(info: ConnectionInfo, deadline: &Deadline) -> Result<Connection, RedisError> {
    let settings = info.redis_settings().clone();
    let bare = info.set_redis_settings(RedisConnectionInfo::default().set_skip_set_lib_name());
    let left = time_left(deadline).ok_or_else(timed_out)?;
    let mut connection = redis::Client::open(bare)?.get_connection_with_timeout(left)?;
    if let Some(password) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(username) = settings.username() {
            auth.arg(username);
        }
        query_within::<()>(&mut connection, auth.arg(password), deadline)?;
    }
    if settings.db() != 0 {
        let select = redis::cmd("SELECT").arg(settings.db()).clone();
        query_within::<()>(&mut connection, &select, deadline)?;
    }
    Ok(connection)
}

fn not_master(address: &Address, role: &Role) -> RedisError {
    let role = match role {
        Role::Primary { .. } => "master",
        Role::Replica { .. } => "replica",
        Role::Sentinel { .. } => "sentinel",
        _ => "other than master",
    };
    RedisError::from((
        ErrorKind::MasterNameNotFoundBySentinel,
        "the server the sentinels named is not a master",
        format!("{address} says ROLE {role}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_group() -> SentinelMaster {
        // Nothing listens on port 1: connecting is refused at once.
        let spec = SentinelSpec::parse_url("redis+sentinel://127.0.0.1:1/mymaster").unwrap();
        SentinelMaster::new(spec, Duration::from_millis(200), "test".to_owned())
    }

    #[test]
    fn a_new_master_makes_the_connections_to_the_old_one_stale() {
        let master = unreachable_group();
        let shared = &master.shared;
        let (a, b) = (
            Address::new("10.0.0.1", 6379),
            Address::new("10.0.0.2", 6379),
        );
        let first = shared.observe(&a);
        assert!(master.is_current(first));
        assert_eq!(
            shared.observe(&a),
            first,
            "the same master again changes nothing"
        );
        assert_eq!(shared.known_master(Some(FRESH_FOR)), Some((a, first)));
        let second = shared.observe(&b);
        assert!(!master.is_current(first) && master.is_current(second));

        // A refusal on a connection to the old master forgets nothing newer.
        master.refused_write(first);
        assert!(master.is_current(second));
        // On one to the current master, it forgets it: the next connection asks the sentinels.
        master.refused_write(second);
        assert!(!master.is_current(second));
        assert_eq!(shared.known_master(None), None);
    }

    #[test]
    fn discovery_fails_as_transient_naming_each_sentinel_and_stays_bounded() {
        let spec =
            SentinelSpec::parse_url("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster").unwrap();
        let master = SentinelMaster::new(spec, Duration::from_millis(200), "test".to_owned());
        let started = Instant::now();
        let Err(error) = master.open(Duration::from_millis(200)) else {
            panic!("a connection through sentinels that do not listen");
        };
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(classify(&error), BackendErrorKind::Transient, "{error}");
        let message = error.to_string();
        assert!(
            message.contains("127.0.0.1:1") && message.contains("127.0.0.1:2"),
            "{message}"
        );
    }

    /// The watch thread holds only a weak handle between two questions, and ends when the
    /// backend's handles are gone (its channel disconnects).
    #[test]
    fn the_watch_does_not_keep_the_backend_alive() {
        let master = unreachable_group();
        assert!(
            master.open(Duration::from_millis(50)).is_err(),
            "starts the watch"
        );
        assert!(matches!(*master.shared.watch.lock(), Watch::Running { .. }));
        let shared = Arc::downgrade(&master.shared);
        drop(master);
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.strong_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the watch keeps the backend alive"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
