//! What the workspace's runnable examples share, with each other and with the tests that run
//! their logic against real servers:
//!
//! - [`lock_store`]: the lock store a command line names (`--redis URL`, or the memory backend),
//!   and [`Link`], a worker's link to it that can be cut to simulate a stalled process.
//! - [`fenced_postgres`]: fenced writes to PostgreSQL, the recipe that makes a stale lease holder
//!   harmless: a `BIGINT` fence column, the fenced upsert, the claim at acquisition, and a query
//!   cancelled when its lease is lost.
//!
//! The examples: `cargo run --example demo [-- --redis URL]` and
//! `cargo run --example fenced_postgres -- POSTGRES_URL [--redis URL]`.

pub mod fenced_postgres;
pub mod lock_store;

pub use lock_store::{lock_store, Link};

use std::process::ExitCode;

/// What an example's `run` returns.
pub type ExampleResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// An example's exit: success, or `NAME failed: ERROR` and each of its causes on stderr, and
/// failure.
pub fn exit_code(name: &str, result: ExampleResult) -> ExitCode {
    let Err(error) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("{name} failed: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
    ExitCode::FAILURE
}

/// The README's Rust examples, compiled and run as doc tests (this crate depends on every
/// backend the README shows).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
