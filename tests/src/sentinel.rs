//! A Sentinel group on free ports: data servers (a master and its replicas) and sentinels
//! (`redis-server --sentinel`), every one a [`RedisServer`], with the faults a failover test needs:
//! kill the master, force a failover (`SENTINEL FAILOVER`), wait until the sentinels agree on
//! the new master, and demote the old one.
//!
//! ```no_run
//! use lock_tests::SentinelGroup;
//!
//! let group = SentinelGroup::start(); // one master, two replicas, three sentinels
//! let backend = lock_redis::RedisBackend::connect(&group.url()).expect("a valid URL");
//! let old = group.force_failover();
//! let new = group.wait_for_new_master(old);
//! assert_ne!(old, new);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::server::{percent_encode, RedisServer, SentinelConfig, ServerOptions};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";

/// How long the sentinels may take to agree: on the group at its start (they find each other
/// through hello messages every 2 s), and on a new master after a failover.
const AGREEMENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between two looks at the sentinels.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The shape of a [`SentinelGroup`].
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Replicas of the first master.
    pub replicas: usize,
    /// Sentinels; the quorum is a majority of them.
    pub sentinels: usize,
    /// How long the master must be silent before the sentinels deem it down.
    pub down_after: Duration,
    /// Sentinel's `failover-timeout` (also the least time between two failovers a sentinel
    /// starts on its own, times two).
    pub failover_timeout: Duration,
    /// The password of the master and its replicas.
    pub password: Option<String>,
    /// The password of the sentinels.
    pub sentinel_password: Option<String>,
}

impl Default for GroupOptions {
    /// One master, two replicas, three sentinels (quorum 2), down after 1 s, no passwords.
    fn default() -> GroupOptions {
        GroupOptions {
            replicas: 2,
            sentinels: 3,
            down_after: Duration::from_secs(1),
            failover_timeout: Duration::from_secs(3),
            password: None,
            sentinel_password: None,
        }
    }
}

/// A master, its replicas and the sentinels that watch them, on free ports of `127.0.0.1`.
/// Dropping it stops every process.
pub struct SentinelGroup {
    /// Data servers; the first one was the master at the start.
    servers: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
    /// What [`SentinelGroup::url`] logs in with.
    password: Option<String>,
    sentinel_password: Option<String>,
}

impl fmt::Debug for SentinelGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = |servers: &[RedisServer]| -> Vec<u16> {
            servers.iter().map(RedisServer::port).collect()
        };
        f.debug_struct("SentinelGroup")
            .field("servers", &ports(&self.servers))
            .field("sentinels", &ports(&self.sentinels))
            .finish()
    }
}

impl SentinelGroup {
    /// Starts a group with [`GroupOptions::default`].
    ///
    /// # Panics
    ///
    /// As [`SentinelGroup::start_with`].
    pub fn start() -> SentinelGroup {
        SentinelGroup::start_with(GroupOptions::default())
    }

    /// Starts the master, its replicas (synchronised), then the sentinels, and waits until every
    /// sentinel names the master and knows every replica and every other sentinel.
    ///
    /// # Panics
    ///
    /// If a server cannot start, or the sentinels do not know the whole group within 15 s.
    pub fn start_with(options: GroupOptions) -> SentinelGroup {
        let data_server = || {
            RedisServer::start_with(ServerOptions {
                password: options.password.clone(),
                ..ServerOptions::default()
            })
        };
        let master = data_server();
        let replicas: Vec<RedisServer> = (0..options.replicas)
            .map(|_| {
                let replica = data_server();
                replica.replicate(master.addr());
                replica
            })
            .collect();
        let config = SentinelConfig {
            master_name: MASTER_NAME.to_owned(),
            master: master.addr(),
            quorum: u32::try_from(options.sentinels / 2 + 1).unwrap_or(u32::MAX),
            down_after: options.down_after,
            failover_timeout: options.failover_timeout,
            auth_pass: options.password.clone(),
            sentinel_pass: options.sentinel_password.clone(),
        };
        let sentinels = (0..options.sentinels)
            .map(|_| {
                RedisServer::start_with(ServerOptions {
                    sentinel: Some(config.clone()),
                    password: options.sentinel_password.clone(),
                    ..ServerOptions::default()
                })
            })
            .collect();
        let mut servers = vec![master];
        servers.extend(replicas);
        let group = SentinelGroup {
            servers,
            sentinels,
            password: options.password,
            sentinel_password: options.sentinel_password,
        };
        group.wait_until_known(options.replicas);
        group
    }

    /// `redis+sentinel://127.0.0.1:PORT,.../mymaster`: the URL of a backend on this group,
    /// with the master's password (`:PASSWORD@`) and the sentinels' (`?sentinel_password=`)
    /// when they have one.
    pub fn url(&self) -> String {
        let login = self.password.as_deref().map_or(String::new(), |password| {
            format!(":{}@", percent_encode(password))
        });
        let sentinel_login = self
            .sentinel_password
            .as_deref()
            .map_or(String::new(), |password| {
                format!("?sentinel_password={}", percent_encode(password))
            });
        format!(
            "redis+sentinel://{login}{}/{MASTER_NAME}{sentinel_login}",
            self.sentinel_addrs().join(",")
        )
    }

    /// The sentinels' `127.0.0.1:PORT` addresses.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|sentinel| sentinel.addr().to_string())
            .collect()
    }

    /// The sentinels.
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// The data servers: the master and its replicas, in the order they were started.
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// The data server at `addr`.
    ///
    /// # Panics
    ///
    /// If no data server of the group listens there.
    pub fn server(&self, addr: SocketAddr) -> &RedisServer {
        self.servers
            .iter()
            .find(|server| server.addr() == addr)
            .unwrap_or_else(|| panic!("no data server of {self:?} listens on {addr}"))
    }

    /// What each sentinel names as the master now (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    pub fn named_masters(&self) -> Vec<Option<SocketAddr>> {
        self.sentinels.iter().map(named_master).collect()
    }

    /// The master every sentinel names.
    ///
    /// # Panics
    ///
    /// If they do not all name the same one (during a failover: use
    /// [`SentinelGroup::wait_for_new_master`] first).
    pub fn master_addr(&self) -> SocketAddr {
        let named = self.named_masters();
        match named.as_slice() {
            [Some(first), rest @ ..] if rest.iter().all(|other| *other == Some(*first)) => *first,
            _ => panic!("the sentinels of {self:?} do not agree on the master: {named:?}"),
        }
    }

    /// The data server every sentinel names as the master.
    ///
    /// # Panics
    ///
    /// As [`SentinelGroup::master_addr`].
    pub fn master(&self) -> &RedisServer {
        self.server(self.master_addr())
    }

    /// Waits until every replica of the master has received everything it has written so far,
    /// so that a failover now loses nothing.
    ///
    /// # Panics
    ///
    /// As [`SentinelGroup::master_addr`] and [`RedisServer::wait_caught_up_with`].
    pub fn wait_replicated(&self) {
        let master = self.master();
        for replica in self.servers.iter().filter(|s| s.addr() != master.addr()) {
            replica.wait_caught_up_with(master);
        }
    }

    /// Kills the master with `SIGKILL`; returns its address. The sentinels fail over once it
    /// has been silent for the group's `down_after` and a majority agrees.
    ///
    /// # Panics
    ///
    /// As [`SentinelGroup::master_addr`].
    pub fn kill_master(&mut self) -> SocketAddr {
        let addr = self.master_addr();
        if let Some(master) = self.servers.iter_mut().find(|s| s.addr() == addr) {
            master.kill();
        }
        addr
    }

    /// Asks a sentinel to fail over now (`SENTINEL FAILOVER mymaster`) and returns once it names
    /// a new master, with the address of the master it replaces. It asks again while the
    /// sentinel refuses (a failover is in progress, or no replica is ready yet), and when the
    /// failover it started ends without a new master (Sentinel gives up on a replica that is
    /// not promoted within its `failover-timeout`, which a loaded machine can make happen).
    /// The old master keeps running, and keeps taking writes until Sentinel turns it into a
    /// replica about 10 s later (or [`SentinelGroup::demote`]).
    ///
    /// # Panics
    ///
    /// If the sentinel names no new master within 15 s (its log's end is in the message).
    pub fn force_failover(&self) -> SocketAddr {
        let old = self.master_addr();
        let sentinel = &self.sentinels[0];
        let deadline = Instant::now() + AGREEMENT_TIMEOUT;
        let mut refused = None;
        loop {
            let answer = redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg(MASTER_NAME)
                .exec(&mut sentinel.connection());
            match answer {
                Ok(()) => {
                    // Wait for the new master, or for the failover to end without one.
                    while failing_over(sentinel) {
                        if named_master(sentinel) != Some(old) {
                            return old;
                        }
                        self.assert_before(deadline, &format!("a master other than {old}"));
                        std::thread::sleep(POLL_INTERVAL);
                    }
                    if named_master(sentinel) != Some(old) {
                        return old;
                    }
                }
                // INPROG or NOGOODSLAVE: the group is still settling.
                Err(error) => refused = Some(error),
            }
            self.assert_before(
                deadline,
                &format!("a failover that replaces {old} (last refusal: {refused:?})"),
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Panics, with the ends of the sentinels' logs, if `deadline` has passed while waiting for
    /// `what`.
    fn assert_before(&self, deadline: Instant, what: &str) {
        assert!(
            Instant::now() < deadline,
            "the sentinels of {self:?} did not bring {what} within {AGREEMENT_TIMEOUT:?}; they \
             name {:?}; their logs end:\n{}",
            self.named_masters(),
            self.sentinel_logs()
        );
    }

    /// Waits until every sentinel names the same master other than `old` and that server
    /// says `ROLE` master; returns its address.
    ///
    /// # Panics
    ///
    /// If that does not happen within 15 s.
    pub fn wait_for_new_master(&self, old: SocketAddr) -> SocketAddr {
        let deadline = Instant::now() + AGREEMENT_TIMEOUT;
        loop {
            let named = self.named_masters();
            if let [Some(first), rest @ ..] = named.as_slice() {
                let agreed = rest.iter().all(|other| *other == Some(*first));
                if agreed && *first != old && is_master(self.server(*first)) {
                    return *first;
                }
            }
            self.assert_before(deadline, &format!("agreement on a master other than {old}"));
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Makes the data server at `old` a replica of the current master now, and waits until it
    /// has synchronised: what Sentinel itself does about 10 s after a forced failover, done
    /// early so that a test can fail over again soon.
    ///
    /// # Panics
    ///
    /// As [`SentinelGroup::master_addr`] and [`RedisServer::replicate`].
    pub fn demote(&self, old: SocketAddr) {
        self.server(old).replicate(self.master_addr());
    }

    /// The ends of the sentinels' logs, for failure messages.
    fn sentinel_logs(&self) -> String {
        self.sentinels
            .iter()
            .map(|sentinel| format!("--- sentinel {}:\n{}", sentinel.addr(), sentinel.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every sentinel names the first master and knows `replicas` replicas and
    /// every other sentinel.
    fn wait_until_known(&self, replicas: usize) {
        let master = self.servers[0].addr();
        let others = self.sentinels.len().saturating_sub(1);
        let deadline = Instant::now() + AGREEMENT_TIMEOUT;
        loop {
            let views: Vec<(Option<SocketAddr>, usize, usize)> = self
                .sentinels
                .iter()
                .map(|sentinel| {
                    let mut connection = sentinel.connection();
                    let mut known = |what: &str| -> Vec<HashMap<String, String>> {
                        redis::cmd("SENTINEL")
                            .arg(what)
                            .arg(MASTER_NAME)
                            .query(&mut connection)
                            .unwrap_or_default()
                    };
                    let ready_replicas = known("REPLICAS")
                        .iter()
                        .filter(|replica| replica.get("flags").is_some_and(|f| f == "slave"))
                        .count();
                    let sentinels = known("SENTINELS").len();
                    (named_master(sentinel), ready_replicas, sentinels)
                })
                .collect();
            if views
                .iter()
                .all(|view| *view == (Some(master), replicas, others))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels of {self:?} did not know the whole group within \
                 {AGREEMENT_TIMEOUT:?}: (master, ready replicas, other sentinels) = {views:?}"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// What `sentinel` names as the master now.
fn named_master(sentinel: &RedisServer) -> Option<SocketAddr> {
    let named: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(MASTER_NAME)
        .query(&mut sentinel.connection())
        .unwrap_or_else(|e| {
            panic!(
                "SENTINEL GET-MASTER-ADDR-BY-NAME on {}: {e}",
                sentinel.addr()
            )
        });
    let (host, port) = named?;
    let ip = host
        .parse()
        .unwrap_or_else(|e| panic!("sentinel {} names host {host:?}: {e}", sentinel.addr()));
    Some(SocketAddr::new(ip, port))
}

/// Whether `server` answers and says `ROLE` master.
fn is_master(server: &RedisServer) -> bool {
    let mut connection = server.connection();
    matches!(
        redis::cmd("ROLE").query(&mut connection),
        Ok(redis::Role::Primary { .. })
    )
}

/// Whether `sentinel` has a failover of the master in progress.
fn failing_over(sentinel: &RedisServer) -> bool {
    let master: HashMap<String, String> = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(MASTER_NAME)
        .query(&mut sentinel.connection())
        .unwrap_or_else(|e| panic!("SENTINEL MASTER on {}: {e}", sentinel.addr()));
    master
        .get("flags")
        .is_some_and(|flags| flags.contains("failover_in_progress"))
}
