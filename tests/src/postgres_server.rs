//! A throwaway PostgreSQL cluster per test: `initdb` in a temporary directory, `pg_ctl start` on
//! a free port of `127.0.0.1`, `pg_ctl stop -m immediate` and the directory removed on `Drop`.
//!
//! The binaries are looked up on `PATH`, then under `/usr/lib/postgresql/*/bin` (where Debian's
//! `postgresql` package puts them; the newest version wins). `initdb` refuses to run as root, so
//! when the tests run as root, `initdb`, `pg_ctl` and the server run as the user `nobody`, who
//! owns the cluster's directory. The cluster has one superuser, `postgres`, trusted without a
//! password, and listens on `127.0.0.1` only: never the machine's own PostgreSQL.

use std::fmt;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::server::{create_temp_dir, free_port};

/// The command that installs the binaries, quoted in the failure message when they are missing.
pub const INSTALL_COMMAND: &str = "sudo apt-get install -y postgresql";
/// Where Debian and Ubuntu install each version's binaries: `{POSTGRES_LIB}/VERSION/bin`.
const POSTGRES_LIB: &str = "/usr/lib/postgresql";
/// The unprivileged user the cluster runs as when the tests run as root.
const UNPRIVILEGED_USER: &str = "nobody";
/// How many fresh ports [`PostgresServer::start`] tries when another process steals one.
const PORT_ATTEMPTS: usize = 5;
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_WAIT_SECONDS: &str = "60";
/// The server's log, inside the cluster's directory.
const LOG_FILE: &str = "postgres.log";
/// How much of the end of the log goes into a panic message.
const LOG_TAIL_BYTES: usize = 4096;

/// A PostgreSQL cluster of its own, listening on `127.0.0.1:`[`port`](PostgresServer::port).
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and removes its directory, also
/// when the test panics; only a test process killed outright leaves it running.
///
/// ```no_run
/// let server = lock_tests::PostgresServer::start();
/// let mut client = server.client();
/// client.batch_execute("CREATE TABLE t (id BIGINT)").expect("a fresh database takes it");
/// ```
pub struct PostgresServer {
    bin_dir: PathBuf,
    /// The cluster's directory: its data directory `data`, its log and its Unix socket.
    dir: PathBuf,
    port: u16,
    /// The uid and gid the cluster runs as, when the tests run as root.
    run_as: Option<(u32, u32)>,
    /// Whether `pg_ctl start` succeeded (so `Drop` must stop the server).
    running: bool,
}

impl fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresServer")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("bin_dir", &self.bin_dir)
            .field("run_as", &self.run_as)
            .field("running", &self.running)
            .finish()
    }
}

impl PostgresServer {
    /// Creates a cluster (`initdb`) in a fresh temporary directory and starts it on a free port,
    /// waiting until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `initdb` or `pg_ctl` cannot be found (the message gives [`INSTALL_COMMAND`]), if the
    /// tests run as root and the user `nobody` does not exist, or if `initdb` or the start fail
    /// (the message includes their output and the end of the server's log).
    pub fn start() -> PostgresServer {
        let bin_dir = find_postgres_bin_dir();
        let run_as = unprivileged_ids();
        let dir = create_temp_dir("postgres");
        let mut server = PostgresServer {
            bin_dir,
            dir,
            port: 0,
            run_as,
            running: false,
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&server.dir, Some(uid), Some(gid)).unwrap_or_else(|e| {
                panic!(
                    "cannot give {} to {UNPRIVILEGED_USER}: {e}",
                    server.dir.display()
                )
            });
        }
        let data = server.data_dir();
        let initdb = server
            .command("initdb")
            .arg("--pgdata")
            .arg(&data)
            .args(["--username=postgres", "--auth=trust", "--no-sync"])
            .args(["--encoding=UTF8", "--locale=C"])
            .output();
        expect_success("initdb", initdb, &server.dir);
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off",
                server.port,
                server.dir.display()
            );
            let start = server
                .command("pg_ctl")
                .arg("--pgdata")
                .arg(&data)
                .arg("--log")
                .arg(server.dir.join(LOG_FILE))
                .args(["--wait", "--timeout", PG_CTL_WAIT_SECONDS, "-o", &options])
                .arg("start")
                .output();
            match start {
                Ok(output) if output.status.success() => {
                    server.running = true;
                    return server;
                }
                Ok(_) if log_tail(&server.dir).contains("Address already in use") => {
                    // Another process took the port first: the next attempt appends to the
                    // same log, after these lines.
                    continue;
                }
                start => expect_success("pg_ctl start", start, &server.dir),
            }
        }
        panic!(
            "PostgreSQL could not bind a free port in {PORT_ATTEMPTS} attempts; last log \
             lines:\n{}",
            log_tail(&server.dir)
        )
    }

    /// The TCP port the server listens on, on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser, on the default database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A new connection to [`url`](PostgresServer::url).
    ///
    /// # Panics
    ///
    /// If the server does not accept it.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test PostgreSQL on port {}: {e}",
                self.port
            )
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `program` of the cluster's binaries, run in its directory, as the unprivileged user
    /// when the tests run as root.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command.current_dir(&self.dir).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            let stop = self
                .command("pg_ctl")
                .arg("--pgdata")
                .arg(self.data_dir())
                .args([
                    "--mode=immediate",
                    "--wait",
                    "--timeout",
                    PG_CTL_WAIT_SECONDS,
                ])
                .arg("stop")
                .output();
            match stop {
                Ok(output) if output.status.success() => {}
                // No panic in a drop (it may run during a panic): say it, and leave the
                // directory for whoever looks into it.
                stop => {
                    eprintln!(
                        "lock-tests: could not stop the test PostgreSQL in {}: {}",
                        self.dir.display(),
                        describe(&stop)
                    );
                    return;
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The directory holding `initdb` and `pg_ctl`: the first on `PATH` that has both, else the
/// newest `/usr/lib/postgresql/VERSION/bin`.
///
/// # Panics
///
/// If there is none, with the command that installs them.
fn find_postgres_bin_dir() -> PathBuf {
    let has_both = |dir: &Path| ["initdb", "pg_ctl"].iter().all(|b| dir.join(b).is_file());
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_both(dir));
    if let Some(dir) = on_path {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(POSTGRES_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL's initdb and pg_ctl were found neither on PATH nor under \
             {POSTGRES_LIB}/*/bin: install them with `{INSTALL_COMMAND}` (Debian/Ubuntu)"
        ),
    }
}

/// The uid and gid of [`UNPRIVILEGED_USER`] when this process runs as root (initdb refuses
/// root), `None` otherwise.
fn unprivileged_ids() -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    match nix::unistd::User::from_name(UNPRIVILEGED_USER) {
        Ok(Some(user)) => Some((user.uid.as_raw(), user.gid.as_raw())),
        other => panic!(
            "the tests run as root, and initdb refuses root, but the user {UNPRIVILEGED_USER} \
             to run PostgreSQL as cannot be found: {other:?}"
        ),
    }
}

/// Panics with `what`'s output and the end of the server's log unless it succeeded.
fn expect_success(what: &str, result: std::io::Result<Output>, dir: &Path) {
    if !matches!(&result, Ok(output) if output.status.success()) {
        panic!(
            "{what} failed: {}\nlast lines of the server's log:\n{}",
            describe(&result),
            log_tail(dir)
        );
    }
}

/// A command's exit status and output, or why it did not run.
fn describe(result: &std::io::Result<Output>) -> String {
    match result {
        Ok(output) => format!(
            "{}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => format!("could not run it: {e}"),
    }
}

/// The last lines of the server's log, for panic messages.
fn log_tail(dir: &Path) -> String {
    match fs::read(dir.join(LOG_FILE)) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(e) => format!("(no log: {e})"),
    }
}
