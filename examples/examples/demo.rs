//! The lease story in three workers: a job that outlives its TTL, a worker that stalls and
//! loses its lease, and a fenced store that refuses the stale worker's late write.
//!
//! Run it with `cargo run --example demo` (memory backend), or against a Redis server with
//! `cargo run --example demo -- --redis redis://127.0.0.1:6379`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::{LeaseEvent, LockManager};
use lock_examples::{exit_code, lock_store, ExampleResult, Link};
use parking_lot::Mutex;

/// Short, so that the story takes a few seconds; real leases want seconds or minutes.
const TTL: Duration = Duration::from_millis(600);

fn main() -> std::process::ExitCode {
    exit_code("demo", run())
}

fn run() -> ExampleResult {
    let started = Instant::now();
    let say = move |who: &str, what: fmt::Arguments<'_>| {
        println!("{:>6.2}s  {who:<6} {what}", started.elapsed().as_secs_f64());
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (store, described) = lock_store("demo", &args)?;
    println!("Lease demo on {described}. TTL of every lease: {TTL:?}.\n");

    let renewals = Arc::new(AtomicUsize::new(0));
    // Each worker runs in its own "process": its own manager, and its own network link to the
    // lock store, which we can cut to simulate a stall or a partition.
    let worker = |name: &'static str| -> ExampleResult<(LockManager, Link)> {
        let link = Link::new(store.clone());
        let renewals = renewals.clone();
        let manager = LockManager::builder(link.clone())
            .event_hook(move |event: &LeaseEvent<'_>| match event {
                LeaseEvent::Renewed { key, .. } => {
                    renewals.fetch_add(1, Ordering::Relaxed);
                    tracing_like(name, format_args!("renewer extended {key:?}"));
                }
                LeaseEvent::Suspect { key, .. } => tracing_like(
                    name,
                    format_args!("renewer cannot reach the store: {key:?} is suspect"),
                ),
                _ => {}
            })
            .build()?;
        Ok((manager, link))
    };
    let ledger = Arc::new(FencedLedger::default());

    // 1. Alice: a job three times longer than the TTL, kept alive by renewal.
    let (alice, _) = worker("alice")?;
    let alice_job = {
        let ledger = ledger.clone();
        std::thread::spawn(move || -> ExampleResult<usize> {
            let lease = alice.acquire("nightly-report", TTL)?;
            say(
                "alice",
                format_args!(
                    "acquired \"nightly-report\" (fence {}); the job takes {:?}",
                    lease.fence(),
                    TTL * 3
                ),
            );
            let mut checks = 0;
            let job_ends = Instant::now() + TTL * 3;
            while Instant::now() < job_ends {
                std::thread::sleep(TTL / 6); // a chunk of work
                lease.ensure_held()?; // before each side effect
                checks += 1;
            }
            ledger.write("nightly-report", "done", lease.fence())?;
            say(
                "alice",
                format_args!(
                    "finished, still holding the lease after {checks} checks; wrote the report"
                ),
            );
            lease.release()?;
            Ok(checks)
        })
    };

    // 2. Carol takes the invoice, then stalls (a long GC pause, a frozen VM): her renewals stop.
    let (carol, carol_link) = worker("carol")?;
    let carol_lease = carol.acquire("invoice-7", TTL)?;
    let carol_fence = carol_lease.fence();
    say(
        "carol",
        format_args!("acquired \"invoice-7\" (fence {carol_fence}), starts computing the total"),
    );
    let lost = carol_lease.lost();
    carol_link.cut();
    say(
        "carol",
        format_args!("stalls: her process stops talking to the lock store"),
    );

    // 3. Dave wants the same invoice. He waits until the TTL frees it, then writes.
    let (dave, _) = worker("dave")?;
    say("dave", format_args!("waits for \"invoice-7\""));
    let dave_lease = dave.acquire_timeout("invoice-7", TTL, TTL * 4)?;
    say(
        "dave",
        format_args!(
            "acquired \"invoice-7\" (fence {}) once Carol's lease expired",
            dave_lease.fence()
        ),
    );
    ledger.write("invoice-7", "total=120 (by dave)", dave_lease.fence())?;
    say(
        "dave",
        format_args!(
            "wrote total=120 with fence {}: accepted",
            dave_lease.fence()
        ),
    );

    // Carol wakes up. Her lease has been reported lost on the channel she watches.
    let reason = lost.recv_timeout(TTL * 4)?;
    carol_link.restore();
    say(
        "carol",
        format_args!("wakes up; her lease was lost ({reason})"),
    );
    // A write she had in flight when she stalled arrives late, with her old fence.
    match ledger.write("invoice-7", "total=100 (by carol)", carol_fence) {
        Ok(()) => say(
            "carol",
            format_args!("late write ACCEPTED: this would be a lost update"),
        ),
        Err(refused) => say(
            "store",
            format_args!("refused Carol's late write: {refused}"),
        ),
    }
    say(
        "carol",
        format_args!("compensates: discards her draft and re-queues invoice-7 for checking"),
    );
    match carol_lease.release() {
        Ok(()) => say(
            "carol",
            format_args!("released (unexpected: the lease was lost)"),
        ),
        Err(error) => say(
            "carol",
            format_args!("release reports: {error}; Dave's key is untouched"),
        ),
    }
    dave_lease.release()?;

    let checks = alice_job.join().map_err(|_| "alice's thread panicked")??;
    println!("\nLedger: {}", ledger.describe());
    println!(
        "Alice's job ran {:?} on a {TTL:?} lease ({checks} checks, {} renewals in all); Carol's stale write was refused by fence {carol_fence} < {}.",
        TTL * 3,
        renewals.load(Ordering::Relaxed),
        ledger.fence_of("invoice-7"),
    );
    Ok(())
}

/// Prints renewer events with the worker's name (the demo's stand-in for a `tracing` subscriber).
fn tracing_like(who: &str, what: fmt::Arguments<'_>) {
    println!("          {who:<6} {what}");
}

/// A resource that keeps, per record, the highest fence it has accepted, and refuses writes
/// with a lower one: the check that makes a stale lock holder harmless.
#[derive(Default)]
struct FencedLedger {
    records: Mutex<BTreeMap<String, (u64, String)>>,
}

#[derive(Debug)]
struct StaleFence {
    offered: u64,
    highest: u64,
}

impl fmt::Display for StaleFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stale fence {} (already saw {})",
            self.offered, self.highest
        )
    }
}

impl std::error::Error for StaleFence {}

impl FencedLedger {
    fn write(&self, record: &str, value: &str, fence: u64) -> Result<(), StaleFence> {
        let mut records = self.records.lock();
        let entry = records
            .entry(record.to_owned())
            .or_insert((0, String::new()));
        if fence < entry.0 {
            return Err(StaleFence {
                offered: fence,
                highest: entry.0,
            });
        }
        *entry = (fence, value.to_owned());
        Ok(())
    }

    fn fence_of(&self, record: &str) -> u64 {
        self.records
            .lock()
            .get(record)
            .map_or(0, |(fence, _)| *fence)
    }

    fn describe(&self) -> String {
        let records = self.records.lock();
        let parts: Vec<String> = records
            .iter()
            .map(|(record, (fence, value))| format!("{record} = {value:?} (fence {fence})"))
            .collect();
        parts.join(", ")
    }
}
