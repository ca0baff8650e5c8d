//! A private `redis-server` process per test: started on a free port, killed on `Drop`.
//!
//! Each [`RedisServer`] owns one child process and one temporary directory (its working
//! directory, log file and, when asked for, its Unix socket and append-only file). The process is
//! controlled with real signals: [`RedisServer::pause`] (`SIGSTOP`) makes the server silent while
//! its sockets stay open, [`RedisServer::kill`] (`SIGKILL`) makes it vanish, and
//! [`RedisServer::restart`] brings it back on the same port.
//!
//! Servers can also be made replicas of another ([`RedisServer::replicate`], possibly through a
//! [`TcpProxy`](crate::TcpProxy) that can cut the link) and promoted
//! ([`RedisServer::promote`]); take an RDB snapshot that the next restart loads
//! ([`RedisServer::save_snapshot`]); and get ACL users ([`RedisServer::add_acl_user`]).
//!
//! With [`ServerOptions::tls`], a server also listens with TLS on a second port
//! ([`RedisServer::tls_port`]), and [`RedisServer::url`] is a `rediss://` URL for it; the
//! harness's own connections ([`RedisServer::connection`]) keep using the plain-text port. A
//! server can also run as a Sentinel ([`ServerOptions::sentinel`]); [`SentinelGroup`](crate::SentinelGroup)
//! builds whole groups of them.

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::tls::ServerTls;

/// How long a starting server may take to answer `PING` before the start fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`RedisServer::restart`] keeps retrying when its old port is still taken.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// How many fresh ports [`RedisServer::start_with`] tries when another process steals one.
const PORT_ATTEMPTS: usize = 5;
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Connect and read timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Read and write timeouts of [`RedisServer::connection`].
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`RedisServer::replicate`] waits for the initial synchronisation.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the end of the server's log goes into a panic message.
const LOG_TAIL_BYTES: u64 = 4096;
/// Name of the server's log file (stdout and stderr) inside its directory.
const LOG_FILE: &str = "redis-server.log";
/// Name of the server's Unix socket inside its directory.
const SOCKET_FILE: &str = "redis.sock";
/// Names of the TLS certificate, key and CA files inside the server's directory.
const TLS_FILES: [&str; 3] = ["tls-cert.pem", "tls-key.pem", "tls-ca.pem"];
/// Name of a sentinel's configuration file inside its directory (the sentinel rewrites it).
const SENTINEL_CONFIG_FILE: &str = "sentinel.conf";

/// Distinguishes the temporary directories of servers started by the same test process.
static NEXT_SERVER_ID: AtomicUsize = AtomicUsize::new(0);

/// How a [`RedisServer`] is configured. The default is what most tests want: no persistence, no
/// password, clients connect over TCP.
#[derive(Clone, Default)]
pub struct ServerOptions {
    /// Keep the data across [`RedisServer::kill`] and [`RedisServer::restart`]: the server writes
    /// an append-only file, synced on every write (`--appendonly yes --appendfsync always`).
    /// Without it (`--save "" --appendonly no`), a restarted server starts empty, or with the
    /// data of the last [`RedisServer::save_snapshot`].
    pub persistence: bool,
    /// Require this password (`--requirepass`; a data server also replicates with it,
    /// `--masterauth`). [`RedisServer::url`] then carries it, so [`RedisServer::client`]
    /// authenticates; a client built from [`RedisServer::addr`] alone gets `NOAUTH` errors.
    pub password: Option<String>,
    /// Also listen on a Unix socket in the server's directory and make [`RedisServer::url`] a
    /// `redis+unix://` URL. The server keeps listening on its TCP port too, so
    /// [`RedisServer::addr`] still works (for example behind a [`TcpProxy`](crate::TcpProxy)).
    pub unix_socket: bool,
    /// Also listen with TLS on a port of its own ([`RedisServer::tls_port`]), with these
    /// certificates (see [`TestPki`](crate::tls::TestPki)); [`RedisServer::url`] is then a
    /// `rediss://127.0.0.1` URL for it. The plain-text port stays open for the harness.
    pub tls: Option<ServerTls>,
    /// Run as a Sentinel (`redis-server sentinel.conf --sentinel`) that monitors this master,
    /// instead of as a data server. Its configuration file lives in the server's directory and
    /// keeps what the sentinel learns across [`RedisServer::restart`].
    pub sentinel: Option<SentinelConfig>,
    /// Run as a Redis Cluster node (`--cluster-enabled yes`) with this node timeout, its cluster
    /// bus on a free port of its own. [`RedisCluster`](crate::RedisCluster) builds clusters of
    /// them.
    pub cluster_node_timeout: Option<Duration>,
}

/// What a server started as a Sentinel monitors, and how quickly it fails over
/// ([`ServerOptions::sentinel`]). Its own password, if any, is [`ServerOptions::password`].
#[derive(Clone)]
pub struct SentinelConfig {
    /// The name the master is monitored under (`sentinel monitor NAME ...`).
    pub master_name: String,
    /// Where the master listens when the sentinel starts.
    pub master: SocketAddr,
    /// How many sentinels must agree that the master is down before a failover.
    pub quorum: u32,
    /// How long the master must be silent to be deemed down (`down-after-milliseconds`).
    pub down_after: Duration,
    /// `failover-timeout`: also how long a sentinel waits before it tries a failover again.
    pub failover_timeout: Duration,
    /// The password of the master and its replicas (`sentinel auth-pass`).
    pub auth_pass: Option<String>,
    /// The password of the other sentinels (`sentinel sentinel-pass`).
    pub sentinel_pass: Option<String>,
}

impl fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |password: &Option<String>| password.as_ref().map(|_| "<redacted>");
        f.debug_struct("SentinelConfig")
            .field("master_name", &self.master_name)
            .field("master", &self.master)
            .field("quorum", &self.quorum)
            .field("down_after", &self.down_after)
            .field("failover_timeout", &self.failover_timeout)
            .field("auth_pass", &redacted(&self.auth_pass))
            .field("sentinel_pass", &redacted(&self.sentinel_pass))
            .finish()
    }
}

impl SentinelConfig {
    /// The configuration file's lines.
    fn file(&self) -> String {
        let name = &self.master_name;
        let (ip, port) = (self.master.ip(), self.master.port());
        let mut lines = vec![
            format!("sentinel monitor {name} {ip} {port} {}", self.quorum),
            format!(
                "sentinel down-after-milliseconds {name} {}",
                self.down_after.as_millis()
            ),
            format!(
                "sentinel failover-timeout {name} {}",
                self.failover_timeout.as_millis()
            ),
        ];
        // Quoted, for passwords with spaces.
        let quoted = |text: &str| format!("{:?}", text);
        if let Some(password) = &self.auth_pass {
            lines.push(format!("sentinel auth-pass {name} {}", quoted(password)));
        }
        if let Some(password) = &self.sentinel_pass {
            lines.push(format!("sentinel sentinel-pass {}", quoted(password)));
        }
        lines.join("\n") + "\n"
    }
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("persistence", &self.persistence)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("unix_socket", &self.unix_socket)
            .field("tls", &self.tls)
            .field("sentinel", &self.sentinel)
            .field("cluster_node_timeout", &self.cluster_node_timeout)
            .finish()
    }
}

/// A `redis-server` child process listening on `127.0.0.1` on a port of its own.
///
/// Dropping it resumes the process in case it was paused, kills it with `SIGKILL`, waits for it
/// and removes its temporary directory, so a failing test leaves nothing behind (unless the test
/// process itself is killed).
pub struct RedisServer {
    options: ServerOptions,
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The TLS port, with [`ServerOptions::tls`] (0 without).
    tls_port: u16,
    /// The cluster bus port, with [`ServerOptions::cluster_node_timeout`] (0 without).
    bus_port: u16,
    /// The running process; `None` after [`RedisServer::kill`].
    child: Option<Child>,
    /// Pid of the running process, or of the last one once killed.
    pid: u32,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("tls_port", &self.tls_port)
            .field("pid", &self.pid)
            .field("running", &self.child.is_some())
            .field("dir", &self.dir)
            .field("options", &self.options)
            .finish()
    }
}

/// Why one attempt to launch the server failed.
enum LaunchError {
    /// The port was taken by another process: try again (another port, or later).
    PortInUse,
    /// Anything else: the test cannot go on.
    Fatal(String),
}

impl RedisServer {
    /// Starts a server with [`ServerOptions::default`]: a free port on `127.0.0.1`, no
    /// persistence, no password.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not on `PATH` (the message says how to install it), or if the server
    /// does not answer `PING` within 10 seconds (the message includes the end of its log).
    pub fn start() -> RedisServer {
        RedisServer::start_with(ServerOptions::default())
    }

    /// Starts a server configured by `options` on a free port of `127.0.0.1` and waits until it
    /// answers `PING`.
    ///
    /// The port is found by binding `127.0.0.1:0` and releasing it; if another process takes it
    /// before the server binds it, the start is retried with a new port a few times.
    ///
    /// # Panics
    ///
    /// Same as [`RedisServer::start`].
    pub fn start_with(options: ServerOptions) -> RedisServer {
        let binary = find_redis_server();
        let dir = create_server_dir();
        if let Some(tls) = &options.tls {
            let contents = [&tls.identity.cert_pem, &tls.identity.key_pem, &tls.ca_pem];
            for (name, contents) in TLS_FILES.iter().zip(contents) {
                fs::write(dir.join(name), contents)
                    .unwrap_or_else(|e| panic!("cannot write {name} in {}: {e}", dir.display()));
            }
        }
        let mut server = RedisServer {
            options,
            binary,
            dir,
            port: 0,
            tls_port: 0,
            bus_port: 0,
            child: None,
            pid: 0,
        };
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            if server.options.tls.is_some() {
                server.tls_port = free_port();
            }
            if server.options.cluster_node_timeout.is_some() {
                server.bus_port = free_port();
            }
            match server.launch() {
                Ok(()) => return server,
                Err(LaunchError::PortInUse) => continue,
                Err(LaunchError::Fatal(message)) => panic!("{message}"),
            }
        }
        panic!(
            "redis-server could not bind a free port in {PORT_ATTEMPTS} attempts (each one was \
             taken by another process first); last log lines:\n{}",
            log_tail(&server.dir)
        )
    }

    /// The TCP port the server listens on (kept across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:`[`port`](RedisServer::port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The TLS port, with [`ServerOptions::tls`] (kept across [`RedisServer::restart`]).
    ///
    /// # Panics
    ///
    /// If the server was started without TLS.
    pub fn tls_port(&self) -> u16 {
        assert!(
            self.options.tls.is_some(),
            "redis-server on port {} has no TLS port: start it with ServerOptions::tls",
            self.port
        );
        self.tls_port
    }

    /// `127.0.0.1:`[`tls_port`](RedisServer::tls_port).
    ///
    /// # Panics
    ///
    /// If the server was started without TLS.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.tls_port()))
    }

    /// The URL a client should use: `redis://127.0.0.1:PORT`, `redis://:PASSWORD@127.0.0.1:PORT`
    /// with a password (percent-encoded), or `redis+unix:///DIR/redis.sock` (with `?pass=PASSWORD`
    /// when there is one) with [`ServerOptions::unix_socket`]; with [`ServerOptions::tls`],
    /// `rediss://127.0.0.1:TLS_PORT` (with the password, if any).
    pub fn url(&self) -> String {
        if self.options.tls.is_none() {
            return self.plain_url();
        }
        match self.options.password.as_deref().map(percent_encode) {
            Some(password) => format!("rediss://:{password}@127.0.0.1:{}", self.tls_port),
            None => format!("rediss://127.0.0.1:{}", self.tls_port),
        }
    }

    /// The URL of the plain-text port (or Unix socket), which the harness uses.
    fn plain_url(&self) -> String {
        let password = self.options.password.as_deref().map(percent_encode);
        if self.options.unix_socket {
            let path = self.socket_path();
            match password {
                Some(password) => format!("redis+unix://{}?pass={password}", path.display()),
                None => format!("redis+unix://{}", path.display()),
            }
        } else {
            match password {
                Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
                None => format!("redis://127.0.0.1:{}", self.port),
            }
        }
    }

    /// Whether the process runs (it was not [killed](RedisServer::kill), or was restarted).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id of the server; after [`RedisServer::kill`], that of the killed process.
    /// [`RedisServer::restart`] changes it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Pins the running server (every thread of its process) to CPU `cpu`, for benchmarks that
    /// choose where the server and its clients run; see [`crate::cpu`]. A restarted server is
    /// not pinned.
    ///
    /// # Panics
    ///
    /// If the server was killed, or the kernel refuses (no such CPU, say).
    pub fn pin_to_cpu(&self, cpu: usize) {
        assert!(
            self.child.is_some(),
            "cannot pin redis-server on port {} to CPU {cpu}: it was killed",
            self.port
        );
        crate::cpu::pin_process(self.pid, cpu)
            .unwrap_or_else(|e| panic!("cannot pin redis-server {} to CPU {cpu}: {e}", self.pid));
    }

    /// Freezes the server with `SIGSTOP`: connections stay open and the kernel still accepts new
    /// ones, but nothing is answered until [`RedisServer::resume`].
    ///
    /// # Panics
    ///
    /// If the server was killed, or the signal cannot be sent.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP, "pause");
    }

    /// Wakes up a server frozen by [`RedisServer::pause`] with `SIGCONT` (harmless if it was not
    /// paused).
    ///
    /// # Panics
    ///
    /// If the server was killed, or the signal cannot be sent.
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT, "resume");
    }

    /// Kills the server with `SIGKILL` and waits for the process to exit. Its connections break,
    /// new ones are refused. Does nothing if it is already killed.
    ///
    /// # Panics
    ///
    /// If waiting for the process fails.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The process may already have died on its own: ESRCH is fine.
            let _ = signal::kill(pid_of(&child), Signal::SIGKILL);
            child
                .wait()
                .unwrap_or_else(|e| panic!("could not wait for redis-server {}: {e}", self.pid));
        }
    }

    /// Kills the server if it is running, starts it again on the same port with the same
    /// options and directory, and waits until it answers `PING`.
    ///
    /// Without [`ServerOptions::persistence`] the restarted server is empty. If the port is still
    /// taken, binding is retried for a few seconds.
    ///
    /// # Panics
    ///
    /// If the port stays taken for 5 seconds, or the server does not answer within 10 seconds.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(LaunchError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(LaunchError::PortInUse) => panic!(
                    "redis-server could not be restarted: port {} stayed in use for {:?}; last \
                     log lines:\n{}",
                    self.port,
                    REBIND_TIMEOUT,
                    log_tail(&self.dir)
                ),
                Err(LaunchError::Fatal(message)) => panic!("{message}"),
            }
        }
    }

    /// A client for [`RedisServer::url`], for assertions made behind the lock's back (`DEL` a
    /// key, `KEYS *`, ...). For a server with [`ServerOptions::tls`], a plain-text client of
    /// its plain-text port.
    ///
    /// # Panics
    ///
    /// If the URL is rejected by the `redis` crate (a bug in this harness).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.plain_url())
            .unwrap_or_else(|e| panic!("invalid URL for redis-server on port {}: {e}", self.port))
    }

    /// The end of the server's log (its last 4 KiB), for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir)
    }

    /// How many of the server's client connections (`CLIENT LIST` lines) match `filter`.
    pub fn clients_where(&self, filter: impl Fn(&str) -> bool) -> usize {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut self.connection())
            .unwrap();
        clients.lines().filter(|line| filter(line)).count()
    }

    /// Makes the slow log record every command the server runs from now on (a threshold of
    /// zero), keeping the last `entries`, each command a script calls included.
    pub fn log_every_command(&self, entries: usize) {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(0)
            .arg("slowlog-max-len")
            .arg(entries)
            .query(&mut self.connection())
            .unwrap();
    }

    /// How many times the server ran `acquire.lua` since [`log_every_command`] turned its slow
    /// log on: each attempt to take a key through a `RedisBackend` is one. A waiter's attempts
    /// show when it has tried again and gone back to sleep.
    ///
    /// [`log_every_command`]: RedisServer::log_every_command
    pub fn acquire_attempts(&self) -> usize {
        let acquire = redis::Script::new(include_str!("../../lock-redis/src/scripts/acquire.lua"));
        self.script_runs(acquire.get_hash())
    }

    /// How many times the server was asked to run the script whose SHA1 is `hash` (`EVALSHA`)
    /// since [`log_every_command`] turned its slow log on. The `EVAL` that follows a refused
    /// `EVALSHA` is not counted again.
    ///
    /// [`log_every_command`]: RedisServer::log_every_command
    pub fn script_runs(&self, hash: &str) -> usize {
        let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(-1)
            .query(&mut self.connection())
            .unwrap();
        entries
            .iter()
            .filter_map(|entry| match entry {
                // Each entry: id, time, duration, the command's arguments, ...
                redis::Value::Array(fields) => fields.get(3),
                _ => None,
            })
            .filter_map(|arguments| redis::from_redis_value_ref::<Vec<String>>(arguments).ok())
            .filter(|arguments| {
                arguments
                    .first()
                    .is_some_and(|name| name.eq_ignore_ascii_case("EVALSHA"))
                    && arguments.get(1).map(String::as_str) == Some(hash)
            })
            .count()
    }

    /// How many scripts the server has run (`INFO commandstats`: `EVALSHA` and `EVAL` calls):
    /// each lease operation of a Redis backend is one.
    pub fn script_calls(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.connection())
            .unwrap();
        ["cmdstat_evalsha:calls=", "cmdstat_eval:calls="]
            .iter()
            .filter_map(|prefix| {
                let line = info.lines().find(|line| line.starts_with(prefix))?;
                line[prefix.len()..].split(',').next()?.parse::<u64>().ok()
            })
            .sum()
    }

    /// How many clients are subscribed to `channel` (`PUBSUB NUMSUB`).
    pub fn subscribers(&self, channel: &str) -> u64 {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.connection())
            .unwrap();
        counts.first().map_or(0, |(_, count)| *count)
    }

    /// How many clients are subscribed to the shard channel `channel` on this server
    /// (`PUBSUB SHARDNUMSUB`, Redis 7: sharded pub/sub of a cluster).
    pub fn shard_subscribers(&self, channel: &str) -> u64 {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query(&mut self.connection())
            .unwrap();
        counts.first().map_or(0, |(_, count)| *count)
    }

    /// A new connection from [`RedisServer::client`], with 5-second connect, read and write
    /// timeouts so a test against a silent server fails instead of hanging.
    ///
    /// # Panics
    ///
    /// If the connection cannot be made (the message includes the end of the server's log).
    pub fn connection(&self) -> redis::Connection {
        let connection = self
            .client()
            .get_connection_with_timeout(CONNECTION_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to redis-server on port {} (pid {}): {e}; last log lines:\n{}",
                    self.port,
                    self.pid,
                    log_tail(&self.dir)
                )
            });
        connection
            .set_read_timeout(Some(CONNECTION_TIMEOUT))
            .expect("setting the read timeout of a redis connection");
        connection
            .set_write_timeout(Some(CONNECTION_TIMEOUT))
            .expect("setting the write timeout of a redis connection");
        connection
    }

    /// Makes this server a replica of the server at `master` (the master's
    /// [`addr`](RedisServer::addr), or that of a [`TcpProxy`](crate::TcpProxy) in front of it, so
    /// a test can cut the link), and waits until the initial synchronisation is done. The master
    /// must require no password, or this server's own ([`ServerOptions::password`]).
    ///
    /// # Panics
    ///
    /// If the server refuses, or the link is not up within 10 seconds.
    pub fn replicate(&self, master: SocketAddr) {
        let mut connection = self.connection();
        redis::cmd("REPLICAOF")
            .arg(master.ip().to_string())
            .arg(master.port())
            .exec(&mut connection)
            .unwrap_or_else(|e| panic!("REPLICAOF {master} on port {}: {e}", self.port));
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut connection)
                .unwrap_or_else(|e| panic!("INFO replication on port {}: {e}", self.port));
            let up = info
                .lines()
                .any(|line| line.trim() == "master_link_status:up");
            let syncing = info
                .lines()
                .any(|line| line.trim() == "master_sync_in_progress:1");
            if up && !syncing {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica on port {} did not sync with {master} within {SYNC_TIMEOUT:?}; \
                 INFO replication:\n{info}\nlast log lines:\n{}",
                self.port,
                log_tail(&self.dir)
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until this replica has received everything `master` has written so far (its
    /// replication offset reaches the master's).
    ///
    /// # Panics
    ///
    /// If it does not within 10 seconds.
    pub fn wait_caught_up_with(&self, master: &RedisServer) {
        let target = replication_field(master, "master_repl_offset");
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let offset = replication_field(self, "slave_repl_offset");
            if offset >= target {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica on port {} is at offset {offset} after {SYNC_TIMEOUT:?}, its master \
                 on port {} at {target}",
                self.port,
                master.port
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Promotes a replica to a master (`REPLICAOF NO ONE`): it keeps the data it has and accepts
    /// writes.
    ///
    /// # Panics
    ///
    /// If the server refuses.
    pub fn promote(&self) {
        redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .exec(&mut self.connection())
            .unwrap_or_else(|e| panic!("REPLICAOF NO ONE on port {}: {e}", self.port));
    }

    /// Writes an RDB snapshot of the data now (`SAVE`). Without
    /// [`ServerOptions::persistence`], the next [`RedisServer::restart`] starts with this data,
    /// as a server restored from an old backup would.
    ///
    /// # Panics
    ///
    /// If the server refuses or cannot write the file.
    pub fn save_snapshot(&self) {
        redis::cmd("SAVE")
            .exec(&mut self.connection())
            .unwrap_or_else(|e| panic!("SAVE on port {}: {e}", self.port));
    }

    /// Adds the ACL user `name` with `password` and exactly the ACL `rules` (space-separated, as
    /// after `ACL SETUSER name`: `~keys:* +get ...`), starting from nothing (`reset`), and
    /// returns a URL that logs in as that user.
    ///
    /// # Panics
    ///
    /// If the server refuses the rules.
    pub fn add_acl_user(&self, name: &str, password: &str, rules: &str) -> String {
        let mut command = redis::cmd("ACL");
        command
            .arg("SETUSER")
            .arg(name)
            .arg("reset")
            .arg("on")
            .arg(format!(">{password}"));
        for rule in rules.split_whitespace() {
            command.arg(rule);
        }
        command
            .exec(&mut self.connection())
            .unwrap_or_else(|e| panic!("ACL SETUSER {name} {rules} on port {}: {e}", self.port));
        format!(
            "redis://{}:{}@127.0.0.1:{}",
            percent_encode(name),
            percent_encode(password),
            self.port
        )
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    fn signal(&self, signal: Signal, action: &str) {
        let child = self.child.as_ref().unwrap_or_else(|| {
            panic!(
                "cannot {action} redis-server on port {}: it was killed (call restart() first)",
                self.port
            )
        });
        signal::kill(pid_of(child), signal).unwrap_or_else(|e| {
            panic!(
                "cannot {action} redis-server {} with {signal}: {e}",
                self.pid
            )
        });
    }

    /// Spawns the process on `self.port` and waits until it answers. On failure, the process is
    /// reaped and `self.child` stays `None`.
    fn launch(&mut self) -> Result<(), LaunchError> {
        // Only what this launch writes to the (appended) log decides why it failed.
        let log_start = fs::metadata(self.dir.join(LOG_FILE)).map_or(0, |m| m.len());
        let mut child = self.spawn()?;
        let pid = child.id();
        match self.wait_ready(&mut child, log_start) {
            Ok(()) => {
                self.child = Some(child);
                self.pid = pid;
                Ok(())
            }
            Err(error) => {
                let _ = signal::kill(pid_of(&child), Signal::SIGKILL);
                let _ = child.wait();
                Err(error)
            }
        }
    }

    fn spawn(&self) -> Result<Child, LaunchError> {
        let log_path = self.dir.join(LOG_FILE);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| LaunchError::Fatal(format!("cannot open {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| LaunchError::Fatal(format!("cannot clone {}: {e}", log_path.display())))?;

        let mut command = Command::new(&self.binary);
        if let Some(sentinel) = &self.options.sentinel {
            let config = self.dir.join(SENTINEL_CONFIG_FILE);
            // A restarted sentinel keeps what it rewrote into its file.
            if !config.exists() {
                fs::write(&config, sentinel.file()).map_err(|e| {
                    LaunchError::Fatal(format!("cannot write {}: {e}", config.display()))
                })?;
            }
            command.arg(&config).arg("--sentinel");
        }
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--loglevel", "warning"])
            // Replicas sync at once instead of waiting for more to join.
            .args(["--repl-diskless-sync-delay", "0"]);
        if self.options.persistence {
            command.args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]);
        } else {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        if let Some(password) = &self.options.password {
            command.args(["--requirepass", password]);
            if self.options.sentinel.is_none() {
                // Replicating a master that has the same password.
                command.args(["--masterauth", password]);
            }
        }
        if self.options.unix_socket {
            command
                .arg("--unixsocket")
                .arg(self.socket_path())
                .args(["--unixsocketperm", "700"]);
        }
        if let Some(timeout) = self.options.cluster_node_timeout {
            command
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-node-timeout", &timeout.as_millis().to_string()])
                .args(["--cluster-port", &self.bus_port.to_string()]);
        }
        if let Some(tls) = &self.options.tls {
            let [cert, key, ca] = TLS_FILES.map(|name| self.dir.join(name));
            command
                .args(["--tls-port", &self.tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", tls.client_auth.flag()]);
        }
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                LaunchError::Fatal(format!(
                    "cannot spawn {} on port {}: {e}",
                    self.binary.display(),
                    self.port
                ))
            })
    }

    /// Polls until `child` itself answers `PING`, or it exits, or [`READY_TIMEOUT`] passes.
    ///
    /// The answer must come from `child` (checked with `INFO server`'s `process_id`): if another
    /// server stole the port, it answers `PING` too while `child` is exiting.
    fn wait_ready(&self, child: &mut Child, log_start: u64) -> Result<(), LaunchError> {
        let client = redis::Client::open(self.plain_url()).map_err(|e| {
            LaunchError::Fatal(format!(
                "invalid URL for redis-server on port {}: {e}",
                self.port
            ))
        })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| {
                LaunchError::Fatal(format!("cannot check redis-server {}: {e}", child.id()))
            })? {
                if read_log(&self.dir, log_start).is_ok_and(|log| log.contains("already in use")) {
                    return Err(LaunchError::PortInUse);
                }
                return Err(LaunchError::Fatal(format!(
                    "redis-server on port {} exited at startup ({status}); last log lines:\n{}",
                    self.port,
                    log_tail(&self.dir)
                )));
            }
            let last_error = match probe(&client) {
                Ok(pid) if pid == child.id() => return Ok(()),
                Ok(pid) => format!("port {} is answered by pid {pid}", self.port),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(LaunchError::Fatal(format!(
                    "redis-server on port {} (pid {}) did not answer PING within {READY_TIMEOUT:?} \
                     (last error: {last_error}); last log lines:\n{}",
                    self.port,
                    child.id(),
                    log_tail(&self.dir)
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors are ignored: Drop must not panic, and the process may already be gone.
            let pid = pid_of(&child);
            let _ = signal::kill(pid, Signal::SIGCONT);
            let _ = signal::kill(pid, Signal::SIGKILL);
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A numeric field of `server`'s `INFO replication`.
fn replication_field(server: &RedisServer, name: &str) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut server.connection())
        .unwrap_or_else(|e| panic!("INFO replication on port {}: {e}", server.port));
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no {name} in INFO replication of port {}:\n{info}",
                server.port
            )
        })
}

/// One readiness probe: `PING`, then the pid of the process that answered.
fn probe(client: &redis::Client) -> redis::RedisResult<u32> {
    let mut connection = client.get_connection_with_timeout(PROBE_TIMEOUT)?;
    connection.set_read_timeout(Some(PROBE_TIMEOUT))?;
    connection.set_write_timeout(Some(PROBE_TIMEOUT))?;
    redis::cmd("PING").query::<String>(&mut connection)?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut connection)?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or(0))
}

fn pid_of(child: &Child) -> Pid {
    let pid = i32::try_from(child.id()).expect("process ids fit in an i32");
    Pid::from_raw(pid)
}

/// The `redis-server` executable found on `PATH`.
fn find_redis_server() -> PathBuf {
    find_binary("redis-server", "redis-server")
}

/// The path of the program `name` on `PATH`.
///
/// # Panics
///
/// If there is none, with the command that installs `package` (Debian/Ubuntu).
pub(crate) fn find_binary(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found on PATH: install it with `sudo apt-get install -y {package}` \
                 (Debian/Ubuntu)"
            )
        })
}

/// A fresh, empty directory under the system temp dir for a `redis-server`, unique to this
/// process and server.
fn create_server_dir() -> PathBuf {
    create_temp_dir("redis")
}

/// A fresh, empty directory `lock-tests-{kind}-{pid}-{n}` under the system temp dir, unique to
/// this process and server.
pub(crate) fn create_temp_dir(kind: &str) -> PathBuf {
    let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lock-tests-{kind}-{}-{id}", std::process::id()));
    // A directory of the same name can only be left over by a dead process that had our pid.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {kind} directory {}: {e}", dir.display()));
    dir
}

/// A port of `127.0.0.1` that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// The server's log from byte `offset` to its end.
fn read_log(dir: &Path, offset: u64) -> std::io::Result<String> {
    let mut file = File::open(dir.join(LOG_FILE))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last lines of the server's log, for panic messages.
fn log_tail(dir: &Path) -> String {
    let path = dir.join(LOG_FILE);
    let tail =
        fs::metadata(&path).and_then(|m| read_log(dir, m.len().saturating_sub(LOG_TAIL_BYTES)));
    match tail {
        Ok(text) if text.trim().is_empty() => format!("({} is empty)", path.display()),
        Ok(text) => text,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a password in a URL.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
