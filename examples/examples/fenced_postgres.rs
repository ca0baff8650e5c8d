//! Fenced writes to PostgreSQL: a holder stalls past its TTL, the lease goes to another, and the
//! table refuses the stale holder's late write, even before the new holder has written, because
//! the new holder claimed the row at acquisition. The stale holder's slow query is cancelled the
//! moment its lease is lost.
//!
//! ```text
//! cargo run --example fenced_postgres -- postgres://USER:PASSWORD@HOST:5432/DB             # memory backend
//! cargo run --example fenced_postgres -- postgres://USER@HOST/DB --redis redis://127.0.0.1:6379
//! ```
//!
//! It creates the table `fenced_invoices` if needed and rewrites one row of it, named after the
//! process. The recipe (the `BIGINT` fence column, the fenced upsert, the claim, the cancel) is
//! in `lock_examples::fenced_postgres`, which the tests run against a throwaway PostgreSQL.

use std::fmt;
use std::time::{Duration, Instant};

use lock_core::LockManager;
use lock_examples::fenced_postgres::{
    cancel_query_on_loss, claim, create_table, read_invoice, write_total, WriteOutcome,
};
use lock_examples::{exit_code, lock_store, ExampleResult, Link};
use postgres::error::SqlState;
use postgres::{Client, NoTls};

/// Short, so that the story takes a few seconds; real leases want seconds or minutes.
const TTL: Duration = Duration::from_millis(600);

fn main() -> std::process::ExitCode {
    exit_code("fenced_postgres", run())
}

fn run() -> ExampleResult {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some((postgres_url, lock_args)) = args.split_first() else {
        return Err("usage: fenced_postgres POSTGRES_URL [--redis redis://host:port]".into());
    };
    let (store, described) = lock_store("fenced_postgres", lock_args)?;
    let started = Instant::now();
    let say = move |who: &str, what: fmt::Arguments<'_>| {
        println!("{:>6.2}s  {who:<6} {what}", started.elapsed().as_secs_f64());
    };
    let connect = || Client::connect(postgres_url, NoTls);
    let mut setup = connect()?;
    create_table(&mut setup)?;
    // One row per run: the memory backend's fences start at 1 in every process, so a row left
    // by an earlier run (with a higher fence) would refuse this run's writes, as it should.
    let invoice = format!("invoice-{}", std::process::id());
    setup.execute(
        "DELETE FROM fenced_invoices WHERE invoice = $1",
        &[&invoice],
    )?;
    println!("Fenced writes to PostgreSQL, leases on {described}. TTL: {TTL:?}.\n");

    // Carol takes the invoice's lease and claims its row.
    let carol_link = Link::new(store.clone());
    let carol = LockManager::new(carol_link.clone());
    let mut carol_db = connect()?;
    let carol_lease = carol.acquire(&invoice, TTL)?;
    let carol_fence = carol_lease.fence();
    let claimed = claim(&mut carol_db, &invoice, carol_fence)?;
    say(
        "carol",
        format_args!("acquired {invoice} (fence {carol_fence}), claimed its row: {claimed:?}"),
    );

    // She starts a slow statement, then stalls towards the lock store (a long pause of her
    // process would do the same): her renewals fail, and her lease runs out.
    let slow_query = {
        let cancel = cancel_query_on_loss(&carol_lease, carol_db.cancel_token());
        carol_link.cut();
        say(
            "carol",
            format_args!("runs a slow statement; her link to the lock store is cut"),
        );
        let began = Instant::now();
        let outcome = carol_db.batch_execute("SELECT pg_sleep(30)");
        drop(cancel);
        (outcome, began.elapsed())
    };
    match slow_query {
        (Err(error), after) if error.code() == Some(&SqlState::QUERY_CANCELED) => say(
            "carol",
            format_args!("lease lost: her statement was cancelled after {after:.2?}"),
        ),
        (Err(error), _) => return Err(error.into()),
        (Ok(()), _) => return Err("the slow statement was not cancelled on loss".into()),
    }

    // Dave gets the lease once Carol's has expired, and claims the row at once.
    let dave = LockManager::new(Link::new(store.clone()));
    let mut dave_db = connect()?;
    let dave_lease = dave.acquire_timeout(&invoice, TTL, TTL * 4)?;
    let dave_fence = dave_lease.fence();
    let claimed = claim(&mut dave_db, &invoice, dave_fence)?;
    say(
        "dave",
        format_args!("acquired {invoice} (fence {dave_fence}), claimed its row: {claimed:?}"),
    );

    // A write Carol prepared before her stall arrives now, with her old fence. Dave has not
    // written yet: his claim alone refuses it.
    let late = write_total(&mut carol_db, &invoice, 100, carol_fence)?;
    say(
        "carol",
        format_args!("late write of total=100 with fence {carol_fence}: {late:?}"),
    );
    let written = write_total(&mut dave_db, &invoice, 120, dave_fence)?;
    say(
        "dave",
        format_args!("writes total=120 with fence {dave_fence}: {written:?}"),
    );
    dave_lease.release()?;
    carol_link.restore();
    if let Err(error) = carol_lease.release() {
        say("carol", format_args!("release reports: {error}"));
    }

    let row = read_invoice(&mut setup, &invoice)?;
    println!("\nRow {invoice}: {row:?}");
    setup.execute(
        "DELETE FROM fenced_invoices WHERE invoice = $1",
        &[&invoice],
    )?;
    if late != WriteOutcome::Refused || written != WriteOutcome::Accepted {
        return Err("the fences did not decide as expected".into());
    }
    Ok(())
}
