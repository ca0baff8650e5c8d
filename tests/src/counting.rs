//! Processes that race on one lock: each runs `lease-holder count`, a read-modify-write counter
//! kept in Redis under the lease, and logs each critical section's fence; or `lease-holder
//! fenced-count`, the same counter behind fences, until told to stop.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Output, Stdio};

/// One racing process's work: `threads` threads doing `iterations` guarded increments each
/// ([`CountingRun::spawn`]), or increments of a fenced counter until stopped
/// ([`CountingRun::spawn_fenced`]).
#[derive(Debug, Clone, Copy)]
pub struct CountingRun<'a> {
    /// The `lease-holder` binary (`env!("CARGO_BIN_EXE_lease-holder")` in a test).
    pub holder: &'a str,
    /// The lock store: one Redis URL, or several separated by commas for a Redlock.
    pub locks: &'a str,
    /// The Redis URL that keeps the `counter` key and the `fences` list (a fenced run's counter).
    pub data: &'a str,
    /// The lock key they race on.
    pub key: &'a str,
    /// Threads per process.
    pub threads: usize,
    /// Increments per thread (a fenced run counts until stopped instead).
    pub iterations: usize,
}

impl CountingRun<'_> {
    /// Starts `processes` racing processes.
    pub fn spawn(&self, processes: usize) -> Vec<Child> {
        let (threads, iterations) = (self.threads.to_string(), self.iterations.to_string());
        (0..processes)
            .map(|_| {
                let args = [
                    "count",
                    self.locks,
                    self.data,
                    self.key,
                    &threads,
                    &iterations,
                    "counter",
                    "fences",
                ];
                spawn_holder(self.holder, &args, Stdio::null())
            })
            .collect()
    }

    /// Waits for `children` and checks on `data` that no update was lost and that fences
    /// strictly increase in the order the critical sections committed.
    pub fn check(&self, children: Vec<Child>, data: &mut redis::Connection) {
        use redis::Commands;
        let processes = children.len();
        for child in children {
            wait_for_success(child);
        }
        let total = (processes * self.threads * self.iterations) as u64;
        let counter: u64 = data.get("counter").expect("read the counter");
        assert_eq!(counter, total, "lost updates");
        let fences: Vec<u64> = data.lrange("fences", 0, -1).expect("read the fence log");
        assert_eq!(fences.len() as u64, total);
        assert!(
            fences.windows(2).all(|pair| pair[0] < pair[1]),
            "fences are not strictly increasing in commit order"
        );
    }
}

/// A running `lease-holder fenced-count` process.
#[derive(Debug)]
pub struct FencedCounter {
    child: Child,
    /// Closed to tell it to stop.
    stdin: Option<ChildStdin>,
}

/// What [`CountingRun::stop_fenced_and_check`] found, summed over the processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FencedTotals {
    /// Increments whose read and write the fences accepted.
    pub accepted: u64,
    /// Increments a fence refused (at the read or at the write).
    pub refused: u64,
    /// Leases found lost at their release.
    pub lost: u64,
}

/// Fenced runs: processes that increment a counter kept in the fenced resource `resource` (see
/// [`fenced_read`](crate::fenced::fenced_read)) under the lock, reading and writing it with their
/// lease's fence, until [`CountingRun::stop_fenced_and_check`]: each runs `lease-holder
/// fenced-count`. Unlike [`CountingRun::spawn`]'s, a lost lease is no failure: the fences, not
/// the lock, are what keeps every accepted increment.
impl CountingRun<'_> {
    /// Starts `processes` fenced counting processes.
    pub fn spawn_fenced(&self, processes: usize, resource: &str) -> Vec<FencedCounter> {
        let threads = self.threads.to_string();
        (0..processes)
            .map(|_| {
                let args = [
                    "fenced-count",
                    self.locks,
                    self.data,
                    self.key,
                    &threads,
                    resource,
                ];
                let mut child = spawn_holder(self.holder, &args, Stdio::piped());
                let stdin = child.stdin.take();
                FencedCounter { child, stdin }
            })
            .collect()
    }

    /// The value of the fenced counter `resource` now.
    pub fn fenced_value(&self, resource: &str, data: &mut redis::Connection) -> u64 {
        let value: Option<String> = redis::cmd("HGET")
            .arg(resource)
            .arg("value")
            .query(data)
            .expect("read the fenced counter");
        value.map_or(0, |value| value.parse().expect("a counter"))
    }

    /// Tells `counters` to stop, waits for them, and checks on `data` that the counter
    /// `resource` holds every increment the fences accepted: no update was lost that the fences
    /// did not refuse.
    pub fn stop_fenced_and_check(
        &self,
        counters: Vec<FencedCounter>,
        resource: &str,
        data: &mut redis::Connection,
    ) -> FencedTotals {
        let mut totals = FencedTotals::default();
        for mut counter in counters {
            // Closing stdin is the signal; a write error means it has already exited.
            if let Some(mut stdin) = counter.stdin.take() {
                let _ = stdin.write_all(b"stop\n");
            }
            let output = wait_for_success(counter.child);
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                let mut words = line.split_whitespace();
                let total = match words.next() {
                    Some("accepted") => &mut totals.accepted,
                    Some("refused") => &mut totals.refused,
                    Some("lost") => &mut totals.lost,
                    _ => continue,
                };
                *total += words
                    .next()
                    .and_then(|count| count.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("a count in {line:?}"));
            }
        }
        assert_eq!(
            self.fenced_value(resource, data),
            totals.accepted,
            "the counter lost updates the fences accepted ({totals:?})"
        );
        totals
    }
}

/// Starts the `lease-holder` binary with `args`, its output piped.
fn spawn_holder(holder: &str, args: &[&str], stdin: Stdio) -> Child {
    Command::new(holder)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lease-holder")
}

/// Waits for a `lease-holder` process and checks that it succeeded.
fn wait_for_success(child: Child) -> Output {
    let output = child.wait_with_output().expect("wait for lease-holder");
    assert!(
        output.status.success(),
        "a lease-holder process failed: {output:?}"
    );
    output
}
