//! The command's process group: stopping it (SIGTERM, then SIGKILL) and telling when it is
//! gone.

use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::report::human;

/// How often lockctl looks whether a signalled process group is gone.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// How long lockctl waits for the command to be reaped after SIGKILL.
const AFTER_SIGKILL: Duration = Duration::from_secs(1);

/// SIGTERM to the process `group`; SIGKILL after `kill_after` unless every process of it has
/// exited by then. Returns once the command itself has exited (or a second after SIGKILL).
pub(crate) fn stop_group(
    group: Pid,
    exited: &Receiver<io::Result<ExitStatus>>,
    kill_after: Duration,
) {
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now().checked_add(kill_after);
    let mut command_done = false;
    loop {
        let left = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            break;
        }
        let pause = left.map_or(GROUP_POLL, |left| left.min(GROUP_POLL));
        if command_done {
            std::thread::sleep(pause);
        } else {
            match exited.recv_timeout(pause) {
                Ok(_) | Err(RecvTimeoutError::Disconnected) => command_done = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        if command_done && group_is_gone(group) {
            return;
        }
    }
    eprintln!(
        "lockctl: the command's process group outlived SIGTERM by {}: sending SIGKILL",
        human(kill_after)
    );
    let _ = killpg(group, Signal::SIGKILL);
    if !command_done {
        let _ = exited.recv_timeout(AFTER_SIGKILL);
    }
}

/// No live process is left in `group`. Zombies do not count: an orphan that died is a zombie
/// until init reaps it, which some containers' init never does.
fn group_is_gone(group: Pid) -> bool {
    if killpg(group, None) == Err(Errno::ESRCH) {
        return true;
    }
    live_members(group).is_some_and(|live| live == 0)
}

/// How many processes of `group` are alive (not zombies), from `/proc`; `None` where it cannot
/// be read.
fn live_members(group: Pid) -> Option<usize> {
    let mut live = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        // Processes come and go while we read: a vanished one is simply not counted.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat_says_live_member(&stat, group) {
            live += 1;
        }
    }
    Some(live)
}

/// Whether a `/proc/PID/stat` line is that of a live process of `group`: after the command name
/// (in parentheses, and free to contain anything), the state, the parent's pid, the group.
fn stat_says_live_member(stat: &str, group: Pid) -> bool {
    let Some((_, fields)) = stat.rsplit_once(") ") else {
        return false;
    };
    let mut fields = fields.split(' ');
    let (Some(state), Some(_parent), Some(pgrp)) = (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    !matches!(state, "Z" | "X") && pgrp.parse::<i32>().is_ok_and(|pgrp| pgrp == group.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombies_and_other_groups_are_not_live_members() {
        let group = Pid::from_raw(4242);
        assert!(stat_says_live_member(
            "4243 (sleep) S 4242 4242 4242 0 -1",
            group
        ));
        assert!(stat_says_live_member(
            "4242 (a) b (c) R 1 4242 4242 0",
            group
        ));
        assert!(!stat_says_live_member(
            "4243 (sleep) Z 1 4242 4242 0 -1",
            group
        ));
        assert!(!stat_says_live_member(
            "4243 (sleep) S 4242 4243 4242 0 -1",
            group
        ));
        assert!(!stat_says_live_member("garbage", group));
    }

    #[test]
    fn this_process_counts_in_its_own_group() {
        let group = nix::unistd::getpgrp();
        assert!(live_members(group).is_some_and(|live| live >= 1));
        assert!(!group_is_gone(group));
    }
}
