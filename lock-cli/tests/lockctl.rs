//! `lockctl` as users run it: the built binary, real commands (`sh`, `sleep`), real
//! `redis-server` processes that the tests pause and break. Timing bounds are the issue's own,
//! and every wait is on a condition with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is a failed test

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lock_tests::{wait_until, RedisServer, ServerOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const LOCKCTL: &str = env!("CARGO_BIN_EXE_lockctl");

/// lockctl's exit codes, as the README's table gives them.
const USAGE: i32 = 64;
const UNAVAILABLE: i32 = 69;
const CONFLICT: i32 = 75;
const LOST: i32 = 76;
const NOT_FOUND: i32 = 127;

/// How long a process may take to start, or to notice a condition, on a loaded machine.
const STARTUP: Duration = Duration::from_secs(10);
/// The design's bound for reporting an unreachable, silent or refusing server.
const SERVER_ERROR_BOUND: Duration = Duration::from_secs(10);

/// A directory of its own per test, for marker files; removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lockctl-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.path(file)).unwrap_or_default()
    }

    /// Waits until `file` holds a whole line, and returns it.
    fn line(&self, file: &str) -> String {
        wait_until(&format!("{file} is written"), STARTUP, || {
            self.read(file).ends_with('\n')
        });
        self.read(file).trim().to_owned()
    }

    fn pid(&self, file: &str) -> Pid {
        Pid::from_raw(self.line(file).parse().unwrap())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `lockctl --redis URL ARGS...`, with nothing inherited that would change what it does.
fn lockctl(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(LOCKCTL);
    command
        .env_remove("LOCK_REDIS_URL")
        .env_remove("RUST_LOG")
        .arg("--redis")
        .arg(url)
        .args(args)
        .stdin(Stdio::null());
    command
}

/// A lockctl started in the background; its stdout and stderr go to files.
struct Running {
    child: Child,
    scratch: Scratch,
    started: Instant,
}

impl Running {
    fn start(mut command: Command) -> Running {
        let scratch = Scratch::new("output");
        command
            .stdout(fs::File::create(scratch.path("stdout")).unwrap())
            .stderr(fs::File::create(scratch.path("stderr")).unwrap());
        Running {
            child: command.spawn().unwrap(),
            scratch,
            started: Instant::now(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits up to `timeout` for lockctl to exit.
    fn exit_within(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "lockctl did not exit within {timeout:?}; its stderr:\n{}",
                    self.scratch.read("stderr")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Outcome {
            status,
            took: self.started.elapsed(),
            stdout: self.scratch.read("stdout"),
            stderr: self.scratch.read("stderr"),
        }
    }
}

/// How a lockctl ended.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    took: Duration,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("lockctl died of a signal: {self:?}"))
    }

    /// Asserts the exit code, and that lockctl said why on one line of stderr, without panicking.
    fn fails_with(&self, code: i32) -> &Outcome {
        assert_eq!(self.code(), code, "{self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "not one line: {self:?}");
        assert!(self.stderr.starts_with("lockctl: "), "{self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        self
    }
}

fn run(command: Command) -> Outcome {
    Running::start(command).exit_within(Duration::from_secs(60))
}

/// Whether `pid` is a live process (not gone, not a zombie waiting for its reaper).
fn alive(pid: Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Whether the lock `key` (default prefix) is held on `server`.
fn held(server: &RedisServer, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(format!("lock:{{{key}}}"))
        .query::<bool>(&mut server.connection())
        .unwrap()
}

/// A shell command that writes its fence to `fence`, says `ready`, and runs until killed.
fn holder_script(scratch: &Scratch) -> String {
    format!(
        "echo $LOCK_FENCE > {fence}; echo ready > {ready}; while :; do sleep 0.05; done",
        fence = scratch.path("fence").display(),
        ready = scratch.path("ready").display()
    )
}

/// Starts `lockctl run KEY --ttl TTL` on a command that writes its fence and `ready` to
/// `scratch`, then idles; returns once it is ready.
fn hold(url: &str, key: &str, ttl: &str, scratch: &Scratch) -> Running {
    let holder = Running::start(lockctl(
        url,
        &[
            "run",
            key,
            "--ttl",
            ttl,
            "--",
            "sh",
            "-c",
            &holder_script(scratch),
        ],
    ));
    scratch.line("ready");
    holder
}

/// A URL on which nothing listens.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

#[test]
fn a_second_run_waits_for_the_first_and_runs_after_it() {
    let server = RedisServer::start();
    let scratch = Scratch::new("second-waits");
    let log = scratch.path("log");
    let go = scratch.path("go");
    let first = Running::start(lockctl(
        &server.url(),
        &[
            "run",
            "queue",
            "--ttl",
            "2s",
            "--",
            "sh",
            "-c",
            &format!(
                "echo \"first $LOCK_FENCE\" >> {log}; while [ ! -e {go} ]; do sleep 0.02; done; echo first-end >> {log}",
                log = log.display(),
                go = go.display()
            ),
        ],
    ));
    wait_until("the first command runs", STARTUP, || {
        scratch.read("log").contains("first")
    });
    let second = Running::start(lockctl(
        &server.url(),
        &[
            "run",
            "queue",
            "--wait",
            "30s",
            "--",
            "sh",
            "-c",
            &format!("echo \"second $LOCK_FENCE\" >> {}", log.display()),
        ],
    ));
    // The second waits on the key's release channel: it is blocked, not running.
    wait_until("the second lockctl waits for the release", STARTUP, || {
        server.subscribers("lock:{queue}") >= 1
    });
    assert!(!scratch.read("log").contains("second"), "ran while held");
    fs::write(&go, "").unwrap();
    assert_eq!(first.exit_within(STARTUP).code(), 0);
    let second = second.exit_within(STARTUP);
    assert_eq!(second.code(), 0, "{second:?}");
    let log = scratch.read("log");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(
        lines[0].starts_with("first ") && lines[1] == "first-end",
        "{log}"
    );
    let fence = |line: &str| line.split(' ').nth(1).unwrap().parse::<u64>().unwrap();
    assert!(lines[2].starts_with("second "), "{log}");
    assert!(fence(lines[2]) > fence(lines[0]), "{log}");
    assert!(!held(&server, "queue"), "released after the second run");
}

#[test]
fn no_wait_fails_at_once_with_the_conflict_code_and_names_the_holders_ttl() {
    let server = RedisServer::start();
    let scratch = Scratch::new("no-wait");
    let holder = hold(&server.url(), "busy", "20s", &scratch);
    let refused = run(lockctl(
        &server.url(),
        &["run", "busy", "--no-wait", "--", "true"],
    ));
    refused.fails_with(CONFLICT);
    assert!(refused.took < Duration::from_secs(3), "{refused:?}");
    assert!(
        refused.stderr.contains("is busy") && refused.stderr.contains("s more (its TTL)"),
        "{refused:?}"
    );
    let custom = run(lockctl(
        &server.url(),
        &[
            "run",
            "busy",
            "--no-wait",
            "--conflict-exit-code",
            "9",
            "--",
            "true",
        ],
    ));
    custom.fails_with(9);
    kill(holder.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(holder.exit_within(STARTUP).code(), 143);
}

#[test]
fn wait_1s_gives_up_after_about_a_second() {
    let server = RedisServer::start();
    let scratch = Scratch::new("wait-1s");
    let holder = hold(&server.url(), "busy", "20s", &scratch);
    let refused = run(lockctl(
        &server.url(),
        &["run", "busy", "--wait", "1s", "--", "true"],
    ));
    // Not a terminal: no progress line, only the reason.
    refused.fails_with(CONFLICT);
    assert!(
        refused.took >= Duration::from_secs(1) && refused.took < Duration::from_secs(3),
        "{refused:?}"
    );
    assert!(
        refused.stderr.contains("gave up after waiting 1."),
        "{refused:?}"
    );
    kill(holder.pid(), Signal::SIGTERM).unwrap();
    holder.exit_within(STARTUP);
}

#[test]
fn a_command_running_10x_its_ttl_keeps_its_lease_and_fences_grow_from_run_to_run() {
    let server = RedisServer::start();
    let scratch = Scratch::new("long-run");
    let fences = scratch.path("fences");
    let script = format!("echo $LOCK_FENCE >> {}", fences.display());
    let long = run(lockctl(
        &server.url(),
        &[
            "run",
            "long",
            "--ttl",
            "1s",
            "--",
            "sh",
            "-c",
            &format!("{script}; sleep 10"),
        ],
    ));
    // Exit 0, not 76: the lease was held until the command ended.
    assert_eq!(long.code(), 0, "{long:?}");
    assert!(long.took >= Duration::from_secs(10), "{long:?}");
    for _ in 0..2 {
        let again = run(lockctl(
            &server.url(),
            &["run", "long", "--", "sh", "-c", &script],
        ));
        assert_eq!(again.code(), 0, "{again:?}");
    }
    let fences: Vec<u64> = scratch
        .read("fences")
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    assert_eq!(fences.len(), 3);
    assert!(
        fences.windows(2).all(|pair| pair[0] < pair[1]),
        "{fences:?}"
    );
}

/// Pauses `server` while `lockctl run --ttl 1s --kill-after 1s` runs `script`, and returns how
/// lockctl ended and how long after the pause.
fn lose_the_lease_under(scratch: &Scratch, script: &str) -> (Outcome, Duration) {
    let server = RedisServer::start();
    let lockctl = Running::start(lockctl(
        &server.url(),
        &[
            "run",
            "doomed",
            "--ttl",
            "1s",
            "--kill-after",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ],
    ));
    scratch.line("ready");
    server.pause();
    let paused_at = Instant::now();
    let outcome = lockctl.exit_within(STARTUP);
    let after_pause = paused_at.elapsed();
    server.resume();
    (outcome, after_pause)
}

#[test]
fn a_lost_lease_sends_sigterm_to_the_command_and_its_children() {
    let scratch = Scratch::new("lost-term");
    // The shell and its background sleep both die of SIGTERM.
    let script = format!(
        "sleep 1000 & echo $! > {grandchild}; echo $$ > {child}; echo ready > {ready}; wait",
        grandchild = scratch.path("grandchild").display(),
        child = scratch.path("child").display(),
        ready = scratch.path("ready").display()
    );
    let (outcome, after_pause) = lose_the_lease_under(&scratch, &script);
    assert_eq!(outcome.code(), LOST, "{outcome:?}");
    assert!(outcome.stderr.contains("was lost"), "{outcome:?}");
    assert!(
        !outcome.stderr.contains("sending SIGKILL"),
        "no SIGKILL needed: {outcome:?}"
    );
    // Within the TTL (plus a little): nothing waited for the kill-after.
    assert!(
        after_pause <= Duration::from_millis(1_900),
        "{after_pause:?}"
    );
    for process in ["child", "grandchild"] {
        let pid = scratch.pid(process);
        wait_until(
            &format!("the {process} is gone"),
            Duration::from_secs(1),
            || !alive(pid),
        );
    }
}

#[test]
fn a_lost_lease_sends_sigkill_after_kill_after_to_a_command_that_ignores_sigterm() {
    let scratch = Scratch::new("lost-kill");
    // Both the shell and its child shell ignore SIGTERM, but note that it came.
    let log = scratch.path("log");
    let script = format!(
        "trap 'echo child-term >> {log}' TERM; \
         sh -c \"trap 'echo grandchild-term >> {log}' TERM; echo \\$\\$ > {grandchild}; while :; do sleep 0.05; done\" & \
         echo $$ > {child}; echo ready > {ready}; while :; do sleep 0.05; done",
        log = log.display(),
        grandchild = scratch.path("grandchild").display(),
        child = scratch.path("child").display(),
        ready = scratch.path("ready").display()
    );
    let (outcome, after_pause) = lose_the_lease_under(&scratch, &script);
    assert_eq!(outcome.code(), LOST, "{outcome:?}");
    assert!(outcome.stderr.contains("sending SIGKILL"), "{outcome:?}");
    // The bound: TTL + kill-after + 1 s after the server went silent.
    assert!(after_pause <= Duration::from_secs(3), "{after_pause:?}");
    // SIGKILL came no sooner than kill-after after the loss, itself no sooner than the end of
    // the last renewal's validity (at least 2/3 of the TTL after the pause).
    assert!(
        after_pause >= Duration::from_millis(1_600),
        "{after_pause:?}"
    );
    let log = scratch.read("log");
    assert!(
        log.contains("child-term") && log.contains("grandchild-term"),
        "{log}"
    );
    for process in ["child", "grandchild"] {
        let pid = scratch.pid(process);
        wait_until(
            &format!("the {process} is gone"),
            Duration::from_secs(1),
            || !alive(pid),
        );
    }
}

#[test]
fn killing_lockctl_terminates_its_command_and_the_key_frees_after_the_ttl() {
    let server = RedisServer::start();
    let scratch = Scratch::new("parent-death");
    // `exec`: the command is `sleep` itself, which keeps the parent-death signal across exec.
    let script = format!(
        "echo $$ > {child}; echo ready > {ready}; exec sleep 1000",
        child = scratch.path("child").display(),
        ready = scratch.path("ready").display()
    );
    let lockctl = Running::start(lockctl(
        &server.url(),
        &["run", "orphan", "--ttl", "2s", "--", "sh", "-c", &script],
    ));
    scratch.line("ready");
    let child = scratch.pid("child");
    kill(lockctl.pid(), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let outcome = lockctl.exit_within(STARTUP);
    assert_eq!(outcome.status.code(), None, "killed: {outcome:?}");
    wait_until("the command is terminated", Duration::from_secs(2), || {
        !alive(child)
    });
    // Nobody released the key: it stays held until its TTL runs out, then frees itself.
    assert!(held(&server, "orphan"), "freed before its TTL");
    wait_until("the key frees", Duration::from_secs(3), || {
        !held(&server, "orphan")
    });
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1_200),
        "freed early"
    );
}

#[test]
fn exit_statuses_pass_through() {
    let server = RedisServer::start();
    let url = server.url();
    let exit_3 = run(lockctl(&url, &["run", "k", "--", "sh", "-c", "exit 3"]));
    assert_eq!(exit_3.code(), 3, "{exit_3:?}");
    assert!(exit_3.stderr.is_empty(), "{exit_3:?}");
    let killed = run(lockctl(&url, &["run", "k", "--", "sh", "-c", "kill -9 $$"]));
    assert_eq!(killed.code(), 137, "{killed:?}");
    let missing = run(lockctl(
        &url,
        &["run", "k", "--", "no-such-command-anywhere"],
    ));
    missing.fails_with(NOT_FOUND);
    assert!(
        missing.stderr.contains("no-such-command-anywhere"),
        "{missing:?}"
    );
    assert!(!held(&server, "k"), "every run released the key");
}

#[test]
fn signals_are_forwarded_and_the_lease_is_released_after_the_command_exits() {
    let server = RedisServer::start();
    for (signal, code) in [
        (Signal::SIGINT, 2),
        (Signal::SIGTERM, 15),
        (Signal::SIGHUP, 1),
    ] {
        let scratch = Scratch::new("signals");
        // The command reports which signal it got, and exits with its own code for it.
        let script = format!(
            "trap 'exit 12' INT; trap 'exit 25' TERM; trap 'exit 11' HUP; \
             echo ready > {ready}; while :; do sleep 0.05; done",
            ready = scratch.path("ready").display()
        );
        let lockctl = Running::start(lockctl(
            &server.url(),
            &["run", "signalled", "--", "sh", "-c", &script],
        ));
        scratch.line("ready");
        kill(lockctl.pid(), signal).unwrap();
        let outcome = lockctl.exit_within(STARTUP);
        assert_eq!(outcome.code(), 10 + code, "{signal}: {outcome:?}");
        assert!(!held(&server, "signalled"), "{signal}: not released");
    }
    // A command that does not handle the signal dies of it: 128 + N.
    let lockctl = Running::start(lockctl(
        &server.url(),
        &["run", "plain", "--", "sleep", "1000"],
    ));
    wait_until("sleep holds the key", STARTUP, || held(&server, "plain"));
    kill(lockctl.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(lockctl.exit_within(STARTUP).code(), 143);
}

#[test]
fn the_command_gets_its_key_and_fence_and_starts_with_no_signal_blocked_or_ignored() {
    let server = RedisServer::start();
    let outcome = run(lockctl(
        &server.url(),
        &[
            "run",
            "env-check",
            "--",
            "sh",
            "-c",
            "echo $LOCK_KEY $LOCK_FENCE",
        ],
    ));
    assert_eq!(outcome.code(), 0, "{outcome:?}");
    let words: Vec<&str> = outcome.stdout.split_whitespace().collect();
    assert_eq!(words[0], "env-check");
    assert!(words[1].parse::<u64>().unwrap() > 0);
    // `cat` reads its own status: lockctl blocks the signals it forwards, and Rust ignores
    // SIGPIPE; the command must see neither.
    let status = run(lockctl(
        &server.url(),
        &["run", "env-check", "--", "cat", "/proc/self/status"],
    ));
    let mask = |name: &str| {
        let line = status
            .stdout
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(mask("SigBlk:"), 0, "{}", status.stdout);
    for signal in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGPIPE,
        Signal::SIGTERM,
    ] {
        assert_eq!(
            mask("SigIgn:") & (1 << (signal as u64 - 1)),
            0,
            "{signal} ignored"
        );
    }
}

#[test]
fn status_and_force_release_on_a_held_key() {
    let server = RedisServer::start();
    let scratch = Scratch::new("status");
    let url = server.url();
    let free = run(lockctl(&url, &["status", "stuck"]));
    assert_eq!(free.code(), 0);
    assert_eq!(free.stdout.trim(), "lock \"stuck\" is free (never locked)");
    let holder = hold(&url, "stuck", "3s", &scratch);
    let fence: u64 = scratch.line("fence").parse().unwrap();

    let text = run(lockctl(&url, &["status", "stuck"]));
    assert_eq!(text.code(), 0, "{text:?}");
    assert!(text.stdout.contains("is held") && text.stdout.contains(&format!("fence {fence}")));
    let json = run(lockctl(&url, &["status", "stuck", "--json"]));
    let state: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(state["key"], "stuck");
    assert_eq!(state["held"], true);
    assert_eq!(state["fence"], fence);
    let remaining = state["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 3_000, "{state}");

    run(lockctl(&url, &["release", "stuck"])).fails_with(USAGE);
    let forced = run(lockctl(&url, &["release", "stuck", "--force"]));
    assert_eq!(forced.code(), 0, "{forced:?}");
    assert!(
        forced.stderr.contains("FORCE-RELEASED lock \"stuck\""),
        "{forced:?}"
    );
    let json = run(lockctl(&url, &["status", "stuck", "--json"]));
    let state: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(state["held"], false, "{state}");
    assert_eq!(state["remaining_ms"], serde_json::Value::Null);
    assert!(state["fence"].as_u64().unwrap() >= fence, "{state}");

    // The holder finds out at its next renewal (a third of its TTL), and stops its command.
    let lost = holder.exit_within(Duration::from_secs(3));
    assert_eq!(lost.code(), LOST, "{lost:?}");
    assert!(lost.stderr.contains("no longer holds it"), "{lost:?}");
    let next = run(lockctl(
        &url,
        &["run", "stuck", "--", "sh", "-c", "echo $LOCK_FENCE"],
    ));
    assert!(
        next.stdout.trim().parse::<u64>().unwrap() > fence,
        "{next:?}"
    );
    let again = run(lockctl(&url, &["release", "stuck", "--force"]));
    assert_eq!(again.code(), 0);
    assert!(again.stderr.contains("was not held"), "{again:?}");
}

#[test]
fn bad_command_lines_fail_with_the_usage_code() {
    // Nothing listens there: none of these may get as far as the server.
    let url = closed_port_url();
    for args in [
        &["run", "k", "--bogus", "--", "true"][..],
        &["run", "k", "--ttl", "5parsecs", "--", "true"],
        &["run", "k", "--ttl", "0s", "--", "true"],
        &["run", "k", "--ttl", "30", "--", "true"],
        &["run", "k"],
        &["run", "", "--", "true"],
        &["status"],
        &["release", "k"],
    ] {
        let outcome = run(lockctl(&url, args));
        outcome.fails_with(USAGE);
        assert!(
            outcome.took < Duration::from_secs(5),
            "{args:?}: {outcome:?}"
        );
    }
    let bad_url = run(lockctl("localhost:6379", &["status", "k"]));
    bad_url.fails_with(USAGE);
    assert!(bad_url.stderr.contains("invalid Redis URL"), "{bad_url:?}");
}

#[test]
fn an_unreachable_or_silent_server_fails_with_the_unavailable_code_in_time() {
    let closed = closed_port_url();
    for args in [
        &["run", "k", "--no-wait", "--", "true"][..],
        &["status", "k"],
        &["release", "k", "--force"],
    ] {
        let outcome = run(lockctl(&closed, args));
        outcome.fails_with(UNAVAILABLE);
        assert!(outcome.took < SERVER_ERROR_BOUND, "{args:?}: {outcome:?}");
    }
    let server = RedisServer::start();
    server.pause();
    for args in [
        &["run", "k", "--no-wait", "--", "true"][..],
        &["status", "k"],
    ] {
        let outcome = run(lockctl(&server.url(), args));
        outcome.fails_with(UNAVAILABLE);
        assert!(outcome.took < SERVER_ERROR_BOUND, "{args:?}: {outcome:?}");
    }
    // --timeout bounds each call; a wait bounds the waiting.
    let outcome = run(lockctl(
        &server.url(),
        &[
            "--timeout",
            "300ms",
            "run",
            "k",
            "--wait",
            "1s",
            "--",
            "true",
        ],
    ));
    outcome.fails_with(UNAVAILABLE);
    assert!(outcome.took < Duration::from_secs(3), "{outcome:?}");
    server.resume();
}

#[test]
fn a_wrong_password_fails_at_once_and_is_never_printed() {
    let server = RedisServer::start_with(ServerOptions {
        password: Some("right-secret".into()),
        ..ServerOptions::default()
    });
    let url = format!("redis://:wrong-secret@127.0.0.1:{}", server.port());
    for args in [&["run", "k", "--", "true"][..], &["status", "k"]] {
        let outcome = run(lockctl(&url, args));
        outcome.fails_with(UNAVAILABLE);
        assert!(outcome.took < SERVER_ERROR_BOUND, "{args:?}: {outcome:?}");
        assert!(!outcome.stderr.contains("wrong-secret"), "{outcome:?}");
        assert!(outcome.stderr.contains(":***@"), "{outcome:?}");
    }
    // And the right one works, given through LOCK_REDIS_URL instead of --redis.
    let mut status = Command::new(LOCKCTL);
    status
        .env("LOCK_REDIS_URL", server.url())
        .args(["status", "k"])
        .stdin(Stdio::null());
    let outcome = run(status);
    assert_eq!(outcome.code(), 0, "{outcome:?}");
}

#[test]
fn redlock_runs_commands_and_reports_status_over_a_majority() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let urls = urls.join(",");
    let redlock = |args: &[&str]| {
        let mut command = Command::new(LOCKCTL);
        command
            .env_remove("LOCK_REDIS_URL")
            .arg("--redlock")
            .arg(&urls)
            .args(args)
            .stdin(Stdio::null());
        command
    };
    let scratch = Scratch::new("redlock");
    let holder = Running::start(redlock(&[
        "run",
        "shared",
        "--",
        "sh",
        "-c",
        &holder_script(&scratch),
    ]));
    let fence: u64 = scratch.line("fence").parse().unwrap();
    let status = run(redlock(&["status", "shared", "--json"]));
    let state: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(state["held"], true, "{status:?}");
    assert!(state["fence"].as_u64().unwrap() >= fence, "{state}");
    run(redlock(&["run", "shared", "--no-wait", "--", "true"])).fails_with(CONFLICT);
    kill(holder.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(holder.exit_within(STARTUP).code(), 143);
    let status = run(redlock(&["status", "shared"]));
    assert!(status.stdout.contains("is free (last fence"), "{status:?}");
    for server in &servers {
        assert!(!held(server, "shared"), "a node kept the key");
    }
}

#[test]
fn help_lists_the_exit_codes_and_version_prints_the_version() {
    let help = run(lockctl("redis://unused", &["run", "--help"]));
    assert_eq!(help.code(), 0);
    for code in ["64", "69", "75", "76", "127", "128+N"] {
        assert!(
            help.stdout.contains(&format!("\n  {code} ")),
            "{code} missing:\n{}",
            help.stdout
        );
    }
    for flag in [
        "--ttl",
        "--wait",
        "--no-wait",
        "--kill-after",
        "--conflict-exit-code",
        "--redis",
        "--redlock",
        "--prefix",
        "--timeout",
        "--quiet",
    ] {
        assert!(help.stdout.contains(flag), "{flag} missing");
    }
    let version = run(lockctl("redis://unused", &["--version"]));
    assert_eq!(version.code(), 0);
    assert!(version.stdout.starts_with("lockctl "), "{version:?}");
}
