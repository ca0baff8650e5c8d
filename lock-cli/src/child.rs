//! Starting the command so that it never outlives lockctl, without `unsafe`.
//!
//! Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`) must be set by the child itself,
//! between `fork` and `exec`; the standard library only runs code there through the `unsafe`
//! `CommandExt::pre_exec`. Instead, lockctl starts *itself* as the child, with the hidden first
//! argument [`LAUNCHER`]: that process (the launcher) arms the signal for itself with `nix`'s
//! safe `prctl::set_pdeathsig`, checks that lockctl is still its parent, and replaces itself
//! with the command (`CommandExt::exec`, safe), keeping its pid, its process group and the
//! armed signal (execve keeps it, except for set-user-ID or file-capability programs). The
//! cost is one more `exec` when the command starts.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use nix::sys::signal::{SigSet, Signal};

use crate::exit;

/// The first argument that makes lockctl the launcher of a command rather than the tool.
pub(crate) const LAUNCHER: &str = "__lockctl-launch";

/// Starts `command` (program and arguments) through the launcher, in a new process group whose
/// id is the returned child's pid, with `LOCK_KEY` and `LOCK_FENCE` in its environment.
///
/// Must be called from the thread that lives as long as lockctl (the main thread): the
/// parent-death signal fires when the thread that started the child ends.
pub(crate) fn spawn(command: &[OsString], key: &str, fence: u64) -> io::Result<Child> {
    Command::new(own_executable()?)
        .arg(LAUNCHER)
        .arg(std::process::id().to_string())
        .arg("--")
        .args(command)
        .env("LOCK_KEY", key)
        .env("LOCK_FENCE", fence.to_string())
        .process_group(0)
        .spawn()
}

/// This program: `/proc/self/exe` on Linux, which still works if the file was replaced or
/// deleted since lockctl started.
fn own_executable() -> io::Result<PathBuf> {
    if cfg!(target_os = "linux") {
        Ok(PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe()
    }
}

/// The launcher: `args` are what followed [`LAUNCHER`] (lockctl's pid, `--`, the command).
/// Becomes the command; returns only when that fails, with the code to exit with.
pub(crate) fn launch(args: &[OsString]) -> u8 {
    let (parent, program, arguments) = match args {
        [parent, separator, program, arguments @ ..] if separator == "--" => {
            match parent.to_str().and_then(|pid| pid.parse::<u32>().ok()) {
                Some(parent) => (parent, program, arguments),
                None => return misused(),
            }
        }
        _ => return misused(),
    };
    if let Err(errno) = arm_parent_death_signal() {
        eprintln!("lockctl: cannot set the command's parent-death signal: {errno}");
        return exit::OS_ERROR;
    }
    // lockctl may have died before the signal was armed: then nobody would send it.
    if !parent_is(parent) {
        return exit::of_signal(Signal::SIGTERM as i32);
    }
    // The mask survives exec, and lockctl blocks the signals it forwards (the standard library
    // leaves the mask as it finds it): the command must start with none blocked. A signal
    // lockctl forwarded meanwhile is delivered now, and ends the launcher as it would the
    // command.
    if let Err(errno) = SigSet::empty().thread_set_mask() {
        eprintln!("lockctl: cannot unblock the command's signals: {errno}");
        return exit::OS_ERROR;
    }
    let error = Command::new(program).args(arguments).exec();
    eprintln!("lockctl: cannot run {}: {error}", program.to_string_lossy());
    if error.kind() == io::ErrorKind::NotFound {
        exit::NOT_FOUND
    } else {
        exit::CANNOT_EXECUTE
    }
}

fn misused() -> u8 {
    eprintln!("lockctl: {LAUNCHER} is for lockctl's own use; see lockctl run --help");
    exit::USAGE
}

/// SIGTERM when the thread that started this process ends (Linux only; elsewhere the command
/// can outlive a lockctl killed with SIGKILL).
#[cfg(target_os = "linux")]
fn arm_parent_death_signal() -> nix::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
}

#[cfg(not(target_os = "linux"))]
fn arm_parent_death_signal() -> nix::Result<()> {
    Ok(())
}

fn parent_is(pid: u32) -> bool {
    u32::try_from(nix::unistd::getppid().as_raw()).is_ok_and(|parent| parent == pid)
}
