//! The `fenced_postgres` example's recipe against a real PostgreSQL (a throwaway cluster per
//! test): a holder paused past its TTL writes late, and the fenced upsert refuses it, from the
//! new holder's claim on; a lost lease cancels its holder's running statement.

// Test code: a failed step is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::{LeaseBackend, LockManager, ManualClock};
use lock_examples::fenced_postgres::{
    cancel_query_on_loss, claim, create_table, fence_to_sql, read_invoice, write_total,
    FencedWriteError, InvoiceRow, WriteOutcome,
};
use lock_examples::Link;
use lock_memory::MemoryBackend;
use lock_redis::RedisBackend;
use lock_tests::{wait_until, PostgresServer, RedisServer};
use postgres::error::SqlState;

const TTL: Duration = Duration::from_secs(30);
/// Longer than [`TTL`]: a holder paused this long has lost its lease.
const PAUSE: Duration = Duration::from_secs(31);
/// Deadline of the waits on a real clock.
const WAIT: Duration = Duration::from_secs(10);
const INVOICE: &str = "invoice-7";

/// Two holders' managers on one memory backend, in virtual time: the old holder (its process
/// paused, with its renewer, while the clock moves) and the new one.
fn virtual_holders() -> (LockManager, LockManager, ManualClock) {
    let clock = ManualClock::new();
    let backend = MemoryBackend::with_clock(clock.clone());
    let manager = || {
        LockManager::builder(backend.clone())
            .clock(clock.clone())
            .build()
            .unwrap()
    };
    (manager(), manager(), clock)
}

/// A fresh cluster with the example's table, and a connection to it.
fn database() -> (PostgresServer, postgres::Client) {
    let server = PostgresServer::start();
    let mut client = server.client();
    create_table(&mut client).unwrap();
    (server, client)
}

fn row(client: &mut postgres::Client) -> InvoiceRow {
    read_invoice(client, INVOICE)
        .unwrap()
        .expect("the invoice has a row")
}

/// Waits until a connection runs `statement`.
fn wait_until_running(db: &mut postgres::Client, statement: &str) {
    wait_until(&format!("{statement:?} runs"), WAIT, || {
        let running: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                &[&statement],
            )
            .unwrap()
            .get(0);
        running == 1
    });
}

fn sql(fence: u64) -> i64 {
    fence_to_sql(fence).unwrap()
}

#[test]
fn a_holder_paused_past_its_ttl_is_refused_from_the_new_holders_claim_on() {
    let (_server, mut db) = database();
    let (old_manager, new_manager, clock) = virtual_holders();

    let old = old_manager.acquire(INVOICE, TTL).unwrap();
    let old_fence = old.fence();
    assert_eq!(
        claim(&mut db, INVOICE, old_fence).unwrap(),
        WriteOutcome::Accepted
    );
    assert_eq!(
        write_total(&mut db, INVOICE, 100, old_fence).unwrap(),
        WriteOutcome::Accepted
    );
    // A holder writes again with its one fence.
    assert_eq!(
        write_total(&mut db, INVOICE, 101, old_fence).unwrap(),
        WriteOutcome::Accepted
    );

    // The old holder's process is paused past its TTL: nothing of it runs, time passes.
    clock.advance(PAUSE);
    old_manager.settle();
    assert!(!old.is_held(), "the paused holder's lease ran out");

    let new = new_manager
        .try_acquire(INVOICE, TTL)
        .unwrap()
        .expect("the key is free");
    let new_fence = new.fence();
    assert!(new_fence > old_fence);
    assert_eq!(
        claim(&mut db, INVOICE, new_fence).unwrap(),
        WriteOutcome::Accepted
    );

    // The old holder wakes up and writes what it prepared: refused by the claim alone.
    assert_eq!(
        write_total(&mut db, INVOICE, 999, old_fence).unwrap(),
        WriteOutcome::Refused
    );
    // A claim it retries is refused too.
    assert_eq!(
        claim(&mut db, INVOICE, old_fence).unwrap(),
        WriteOutcome::Refused
    );
    assert_eq!(
        row(&mut db),
        InvoiceRow {
            total: Some(101),
            fence: sql(new_fence)
        },
        "the claim kept the old total and took the new fence"
    );

    assert_eq!(
        write_total(&mut db, INVOICE, 120, new_fence).unwrap(),
        WriteOutcome::Accepted
    );
    assert_eq!(
        write_total(&mut db, INVOICE, 999, old_fence).unwrap(),
        WriteOutcome::Refused
    );
    assert_eq!(
        row(&mut db),
        InvoiceRow {
            total: Some(120),
            fence: sql(new_fence)
        }
    );
    assert!(old.release().unwrap_err().is_lost());
    new.release().unwrap();
}

#[test]
fn without_a_claim_a_stale_write_lands_until_the_new_holder_writes() {
    // Why the claim exists: the fenced upsert alone refuses a stale holder only once a newer
    // fence has written the row.
    let (_server, mut db) = database();
    let (old_manager, new_manager, clock) = virtual_holders();

    let old = old_manager.acquire(INVOICE, TTL).unwrap();
    clock.advance(PAUSE);
    old_manager.settle();
    let new = new_manager
        .try_acquire(INVOICE, TTL)
        .unwrap()
        .expect("the key is free");

    assert_eq!(
        write_total(&mut db, INVOICE, 999, old.fence()).unwrap(),
        WriteOutcome::Accepted,
        "no newer fence has touched the row yet"
    );
    assert_eq!(
        write_total(&mut db, INVOICE, 120, new.fence()).unwrap(),
        WriteOutcome::Accepted
    );
    assert_eq!(
        write_total(&mut db, INVOICE, 999, old.fence()).unwrap(),
        WriteOutcome::Refused
    );
    assert_eq!(row(&mut db).total, Some(120));
}

#[test]
fn a_lost_lease_cancels_its_holders_running_statement() {
    let (server, mut db) = database();
    let (manager, _, clock) = virtual_holders();
    let lease = manager.acquire(INVOICE, TTL).unwrap();
    let mut holder_db = server.client();
    let cancel = cancel_query_on_loss(&lease, holder_db.cancel_token());

    let (done, outcome) = crossbeam_channel::bounded(1);
    let statement = std::thread::spawn(move || {
        let began = Instant::now();
        let result = holder_db.batch_execute("SELECT pg_sleep(60)");
        done.send((result, began.elapsed())).unwrap();
    });
    wait_until_running(&mut db, "SELECT pg_sleep(60)");
    assert!(
        outcome.try_recv().is_err(),
        "the statement still runs while the lease is held"
    );

    clock.advance(PAUSE);
    manager.settle();
    let (result, took) = outcome
        .recv_timeout(WAIT)
        .expect("the statement was cancelled when the lease was lost");
    let error = result.expect_err("a cancelled statement fails");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    drop(cancel);
    statement.join().unwrap();
}

#[test]
fn dropping_the_guard_stops_watching() {
    let (server, mut db) = database();
    let (manager, _, clock) = virtual_holders();
    let lease = manager.acquire(INVOICE, TTL).unwrap();
    let mut holder_db = server.client();
    drop(cancel_query_on_loss(&lease, holder_db.cancel_token()));
    let statement = std::thread::spawn(move || holder_db.batch_execute("SELECT pg_sleep(1)"));
    wait_until_running(&mut db, "SELECT pg_sleep(1)");
    // The lease is lost while the statement runs: with the guard gone, nothing cancels it.
    clock.advance(PAUSE);
    manager.settle();
    assert!(!lease.is_held());
    statement
        .join()
        .unwrap()
        .expect("the statement ran to its end");
}

#[test]
fn fences_that_do_not_fit_a_bigint_are_a_typed_error() {
    assert!(matches!(
        fence_to_sql(u64::MAX),
        Err(FencedWriteError::FenceOutOfRange(u64::MAX))
    ));
    assert_eq!(fence_to_sql(i64::MAX as u64).unwrap(), i64::MAX);
}

#[test]
fn on_redis_a_holder_cut_off_past_its_ttl_is_refused_and_its_statement_cancelled() {
    // The example's story on a real clock, with Redis fences (about 2^51: they need the
    // BIGINT column): the old holder's link to Redis is cut, as if its process were paused.
    let (server, mut db) = database();
    let redis = RedisServer::start();
    let store: Arc<dyn LeaseBackend> = Arc::new(RedisBackend::connect(&redis.url()).unwrap());
    let ttl = Duration::from_millis(600);

    let old_link = Link::new(store.clone());
    let old_manager = LockManager::new(old_link.clone());
    let old = old_manager.acquire(INVOICE, ttl).unwrap();
    let old_fence = old.fence();
    assert!(old_fence > u64::from(u32::MAX), "Redis fences are large");
    assert_eq!(
        claim(&mut db, INVOICE, old_fence).unwrap(),
        WriteOutcome::Accepted
    );

    let mut old_db = server.client();
    let cancel = cancel_query_on_loss(&old, old_db.cancel_token());
    old_link.cut();
    let cancelled = old_db.batch_execute("SELECT pg_sleep(30)").unwrap_err();
    assert_eq!(cancelled.code(), Some(&SqlState::QUERY_CANCELED));
    drop(cancel);
    assert!(!old.is_held());

    let new_manager = LockManager::new(Link::new(store));
    let new = new_manager.acquire_timeout(INVOICE, ttl, WAIT).unwrap();
    assert!(new.fence() > old_fence);
    assert_eq!(
        claim(&mut db, INVOICE, new.fence()).unwrap(),
        WriteOutcome::Accepted
    );
    assert_eq!(
        write_total(&mut old_db, INVOICE, 100, old_fence).unwrap(),
        WriteOutcome::Refused
    );
    assert_eq!(
        write_total(&mut db, INVOICE, 120, new.fence()).unwrap(),
        WriteOutcome::Accepted
    );
    assert_eq!(
        row(&mut db),
        InvoiceRow {
            total: Some(120),
            fence: sql(new.fence())
        }
    );
    new.release().unwrap();
    old_link.restore();
    assert!(old.release().unwrap_err().is_lost());
}
