//! `lockctl`: run any command under a renewed, fenced lease on Redis or Redlock (a distributed
//! flock). See `lockctl --help`, and the README's "Command line" section.
//!
//! The modules, by job: `cli` (the command line), `exit` (the exit codes), `connect` (a lock
//! manager on the named servers), `run` (the `run` subcommand) with `acquire` (waiting for the
//! lock), `child` (starting the command so that it never outlives lockctl), `process_group`
//! (stopping it), `signals` and `progress`; `operator` (`status` and `release --force`);
//! `report` (one-line messages).

mod acquire;
mod child;
mod cli;
mod connect;
mod exit;
mod operator;
mod process_group;
mod progress;
mod report;
mod run;
mod signals;

use std::ffi::OsString;
use std::io::Write;

use crate::cli::{Command, Parsed};

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|first| first == child::LAUNCHER) {
        std::process::exit(child::launch(&args[2..]).into());
    }
    log_to_stderr_if_asked();
    let code = match cli::parse(args) {
        Parsed::Exit {
            code,
            stdout,
            stderr,
        } => {
            print!("{stdout}");
            eprint!("{stderr}");
            code
        }
        Parsed::Cli(cli) => {
            let outcome = match &cli.command {
                Command::Run(run) => run::run(run, &cli.server, cli.quiet),
                Command::Status(status) => operator::status(status, &cli.server),
                Command::Release(release) => operator::force_release(release, &cli.server),
            };
            outcome.unwrap_or_else(|failure| {
                eprintln!("lockctl: {failure}");
                failure.code
            })
        }
    };
    let _ = std::io::stdout().flush();
    // Exits without waiting for any thread (see `run::run`).
    std::process::exit(code.into());
}

/// With `RUST_LOG` set (`RUST_LOG=debug`, say), the libraries' logs go to stderr.
fn log_to_stderr_if_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}
