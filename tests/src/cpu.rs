//! CPU placement, for benchmarks that must not let the scheduler decide where the client and
//! the server run (on a small machine, a loopback round trip costs several times more when the
//! two sit on different CPUs, and an unpinned run flips between the two).
//!
//! [`pin_process`] pins every thread a process has now; threads it creates later inherit the
//! affinity of the thread that creates them, and so do child processes.
//! [`RedisServer::pin_to_cpu`](crate::RedisServer::pin_to_cpu) applies it to a server.

use std::io;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The CPUs this process may run on now (its own thread's affinity), in increasing order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// Pins every thread of process `pid` (as listed in `/proc/PID/task`) to CPU `cpu`.
///
/// A thread that exits while the list is walked is skipped. `pin_process(std::process::id(),
/// cpu)` pins the calling process, all its threads included.
pub fn pin_process(pid: u32, cpu: usize) -> io::Result<()> {
    pin_process_to(pid, &[cpu])
}

/// Lets every thread of process `pid` run on any of `cpus` (and on no other), as
/// [`pin_process`] does for one CPU: `pin_process_to(pid, &allowed_cpus()?)` unpins it.
pub fn pin_process_to(pid: u32, cpus: &[usize]) -> io::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)?;
    }
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}
