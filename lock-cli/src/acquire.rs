//! Waiting for the lock: up to `--wait`, in short slices so that a signal or the progress line
//! is never more than a slice away.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use lock_core::{Error, Lease};
use nix::sys::signal::Signal;

use crate::cli::RunArgs;
use crate::connect::Connection;
use crate::exit;
use crate::progress::Progress;
use crate::report::{human, Failure};

/// The longest one `acquire_timeout` call waits before lockctl looks at its signals and
/// progress line again. Each call makes at least one real attempt, and is woken early by the
/// holder's release.
const SLICE: Duration = Duration::from_millis(500);

/// Acquires `args.key` for `args.ttl`, waiting up to `args.wait()`.
///
/// Fails with `args.conflict_exit_code` when another holder kept the key all along (the
/// message says for how much longer), [`exit::UNAVAILABLE`] when the server failed, and
/// 128 + N when signal N arrived meanwhile.
pub(crate) fn acquire(
    connection: &Connection,
    args: &RunArgs,
    signals: &Receiver<Signal>,
    progress: &mut Progress,
) -> Result<Lease, Failure> {
    let key = args.key.as_str();
    let started = Instant::now();
    let deadline = started.checked_add(args.wait());
    loop {
        let left = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let slice = left.map_or(SLICE, |left| left.min(SLICE));
        let outcome = connection.manager.acquire_timeout(key, args.ttl, slice);
        let (holder_remaining, last_error) = match outcome {
            Ok(lease) => {
                progress.clear();
                return Ok(lease);
            }
            Err(Error::Timeout {
                holder_remaining,
                last_error,
                ..
            }) => (holder_remaining, last_error),
            Err(error) => {
                progress.clear();
                return Err(connection.failure("cannot acquire lock", key, &error));
            }
        };
        let waited = started.elapsed();
        if let Ok(signal) = signals.try_recv() {
            progress.clear();
            return Err(interrupted(signal, key));
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            progress.clear();
            return Err(match last_error {
                Some(error) => {
                    connection.failure("cannot acquire lock", key, &Error::Backend(error))
                }
                None => conflict(args, holder_remaining, waited),
            });
        }
        progress.waiting(key, waited, holder_remaining, last_error.is_some());
    }
}

/// lockctl got `signal` before the command started: it exits as if killed by it.
pub(crate) fn interrupted(signal: Signal, key: &str) -> Failure {
    Failure::new(
        exit::of_signal(signal as i32),
        format!(
            "interrupted by {} while waiting for lock {key:?}",
            signal.as_str()
        ),
    )
}

/// Another holder kept the key for all of the wait.
fn conflict(args: &RunArgs, holder_remaining: Option<Duration>, waited: Duration) -> Failure {
    let holder = match holder_remaining {
        Some(left) => format!("another holder has it for {} more (its TTL)", human(left)),
        None => "another holder has it".to_owned(),
    };
    Failure::new(
        args.conflict_exit_code,
        format!(
            "lock {:?} is busy: {holder}; gave up after waiting {}",
            args.key,
            human(waited)
        ),
    )
}
