//! Processes that race on one lock: each runs `lease-holder count`, a read-modify-write counter
//! kept in Redis under the lease, and logs each critical section's fence.

use std::process::{Child, Command, Stdio};

/// One racing process's work: `threads` threads doing `iterations` guarded increments each.
#[derive(Debug, Clone, Copy)]
pub struct CountingRun<'a> {
    /// The `lease-holder` binary (`env!("CARGO_BIN_EXE_lease-holder")` in a test).
    pub holder: &'a str,
    /// The lock store: one Redis URL, or several separated by commas for a Redlock.
    pub locks: &'a str,
    /// The Redis URL that keeps the `counter` key and the `fences` list.
    pub data: &'a str,
    /// The lock key they race on.
    pub key: &'a str,
    /// Threads per process.
    pub threads: usize,
    /// Increments per thread.
    pub iterations: usize,
}

impl CountingRun<'_> {
    /// Starts `processes` racing processes.
    pub fn spawn(&self, processes: usize) -> Vec<Child> {
        (0..processes)
            .map(|_| {
                Command::new(self.holder)
                    .args([
                        "count",
                        self.locks,
                        self.data,
                        self.key,
                        &self.threads.to_string(),
                        &self.iterations.to_string(),
                        "counter",
                        "fences",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start lease-holder")
            })
            .collect()
    }

    /// Waits for `children` and checks on `data` that no update was lost and that fences
    /// strictly increase in the order the critical sections committed.
    pub fn check(&self, children: Vec<Child>, data: &mut redis::Connection) {
        use redis::Commands;
        let processes = children.len();
        for child in children {
            let output = child.wait_with_output().expect("wait for lease-holder");
            assert!(
                output.status.success(),
                "a counting process failed: {output:?}"
            );
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
