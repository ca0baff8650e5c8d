//! SIGINT, SIGTERM and SIGHUP, received on a channel instead of ending lockctl, so that they can
//! be passed on to the command.

use crossbeam_channel::Receiver;
use nix::sys::signal::{SigSet, Signal};

use crate::exit;
use crate::report::Failure;

/// The signals lockctl passes on to the command's process group.
const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Blocks the forwarded signals in the calling thread, and so in every thread it starts from
/// now on, and starts a thread that receives them (`sigwait`) and sends them on the returned
/// channel. Call it before any other thread starts, or a signal may kill lockctl through a
/// thread that does not block it. Processes inherit the mask: the command's launcher clears it
/// before it becomes the command (see `child::launch`).
pub(crate) fn listen() -> Result<Receiver<Signal>, Failure> {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    let failed = |what: &str, error: &dyn std::fmt::Display| {
        Failure::new(exit::OS_ERROR, format!("{what}: {error}"))
    };
    set.thread_block()
        .map_err(|errno| failed("cannot block signals", &errno))?;
    let (sender, receiver) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("lockctl-signals".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                if sender.send(signal).is_err() {
                    return;
                }
            }
        })
        .map_err(|error| failed("cannot start the signal thread", &error))?;
    Ok(receiver)
}
