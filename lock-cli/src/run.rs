//! `lockctl run`: acquire, run the command under the renewed lease, and stop it the moment the
//! lease is lost.

use std::io;
use std::mem::ManuallyDrop;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use crossbeam_channel::{select, Receiver};
use lock_core::Lease;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::acquire::{acquire, interrupted};
use crate::cli::{RunArgs, ServerArgs};
use crate::connect::connect;
use crate::process_group::stop_group;
use crate::progress::Progress;
use crate::report::{chain, human, Failure};
use crate::{child, exit, signals};

/// Runs `lockctl run`; returns the code to exit with.
pub(crate) fn run(args: &RunArgs, server: &ServerArgs, quiet: bool) -> Result<u8, Failure> {
    // First, before any other thread starts (see `signals::listen`).
    let signals = signals::listen()?;
    // Dropped only after a normal end: dropping a manager waits for its calls in flight (on
    // Redlock, the release on the nodes that answered after the majority), and those may be
    // waiting on a server that no longer answers (a lost lease's last renewal, a failed
    // attempt's clean-up), while lockctl must exit on time. Keys left behind expire after their
    // TTL.
    let connection = ManuallyDrop::new(connect(server)?);
    let lease = acquire(&connection, args, &signals, &mut Progress::new(quiet))?;
    if let Ok(signal) = signals.try_recv() {
        release_after_the_command(lease);
        return Err(interrupted(signal, &args.key));
    }
    let command = match child::spawn(&args.command, &args.key, lease.fence()) {
        Ok(command) => command,
        Err(error) => {
            release_after_the_command(lease);
            return Err(Failure::new(
                exit::OS_ERROR,
                format!("cannot start the command: {error}"),
            ));
        }
    };
    match supervise(command, lease, &signals, args.kill_after)? {
        Ended::Exited(code) => {
            drop(ManuallyDrop::into_inner(connection));
            Ok(code)
        }
        Ended::Lost => Ok(exit::LOST),
    }
}

/// How a supervised command ended.
enum Ended {
    /// It exited while the lease was held; the lease is released. The code to exit with.
    Exited(u8),
    /// The lease was lost, and the command stopped.
    Lost,
}

/// Waits for the command to exit while passing signals on to its process group, and stops the
/// group the moment the lease is lost.
fn supervise(
    command: Child,
    lease: Lease,
    signals: &Receiver<Signal>,
    kill_after: Duration,
) -> Result<Ended, Failure> {
    // The command leads its own process group: its pid is the group's id.
    let group = Pid::from_raw(i32::try_from(command.id()).unwrap_or(i32::MAX));
    let exited = match wait_in_background(command) {
        Ok(exited) => exited,
        Err(error) => {
            let _ = killpg(group, Signal::SIGKILL);
            release_after_the_command(lease);
            return Err(Failure::new(
                exit::OS_ERROR,
                format!("cannot watch the command: {error}"),
            ));
        }
    };
    let lost = lease.lost();
    loop {
        select! {
            recv(exited) -> status => return finish(lease, status.unwrap_or_else(|_| Err(io::Error::other("the waiting thread ended")))),
            recv(lost) -> reason => {
                let reason = reason.map_or_else(|_| "lost".to_owned(), |reason| reason.to_string());
                eprintln!(
                    "lockctl: the lease on {:?} was lost ({reason}): stopping the command \
                     (SIGTERM to its process group, SIGKILL after {})",
                    lease.key(),
                    human(kill_after)
                );
                stop_group(group, &exited, kill_after);
                // Best effort, within lock_core::CLEANUP_TIMEOUT: the lease is lost.
                let _ = lease.release();
                return Ok(Ended::Lost);
            },
            recv(signals) -> signal => {
                if let Ok(signal) = signal {
                    // ESRCH: the group is gone already; its exit is on its way.
                    let _ = killpg(group, signal);
                }
            },
        }
    }
}

/// The command exited: release the lease and pass its status on, unless the lease was lost
/// before it exited (then its work was not protected to the end).
fn finish(lease: Lease, status: io::Result<ExitStatus>) -> Result<Ended, Failure> {
    let key = lease.key().to_owned();
    let held = lease.ensure_held();
    let released = lease.release();
    let status = status.map_err(|error| {
        Failure::new(
            exit::OS_ERROR,
            format!("cannot tell how the command ended: {error}"),
        )
    })?;
    match (held, released) {
        (Err(lost), _) | (_, Err(lost)) if lost.is_lost() => Err(Failure::new(
            exit::LOST,
            format!(
                "the lease on {key:?} was lost before the command ended ({status}): its work \
                 was not protected to the end: {}",
                chain(&lost)
            ),
        )),
        (_, Err(error)) => {
            eprintln!(
                "lockctl: releasing {key:?} failed (it expires after its TTL): {}",
                chain(&error)
            );
            Ok(Ended::Exited(exit::of_status(status)))
        }
        _ => Ok(Ended::Exited(exit::of_status(status))),
    }
}

/// Releases the lease of a command that ended or never started; a failure only delays the
/// next holder until the TTL ends, so it is reported and not fatal.
fn release_after_the_command(lease: Lease) {
    let key = lease.key().to_owned();
    if let Err(error) = lease.release() {
        eprintln!(
            "lockctl: releasing {key:?} failed (it expires after its TTL): {}",
            chain(&error)
        );
    }
}

/// Reaps the command on a thread of its own; its status arrives on the returned channel.
fn wait_in_background(mut command: Child) -> io::Result<Receiver<io::Result<ExitStatus>>> {
    let (sender, receiver) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("lockctl-wait".into())
        .spawn(move || {
            let _ = sender.send(command.wait());
        })?;
    Ok(receiver)
}
