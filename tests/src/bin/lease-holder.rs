//! A separate process that holds leases on a Redis server, for tests that pause or kill a
//! *holder* rather than a server.
//!
//! LOCKS is one Redis URL (a `redis+sentinel://` or `redis+cluster://` one too), or several separated by commas for a
//! Redlock over those masters; DATA is the Redis URL where the counter, the fence log and the
//! fenced store live.
//!
//! ```text
//! lease-holder hold LOCKS DATA KEY TTL_MS
//!     acquires KEY, prints `acquired FENCE`, then obeys one command per stdin line:
//!     `check` prints `held` or `lost`; `write RESOURCE VALUE` does a fenced write and prints
//!     `accepted` or `rejected`; `release` releases, prints `released` or `release-error`, exits.
//! lease-holder calls URL
//!     until killed, acquires a fresh key with a fresh token straight from a RedisBackend (no
//!     manager, so no retry hides an error) and renews it; prints `ok` after each round, or
//!     `error: …` (the error and its sources) and exits with status 1 on the first error.
//! lease-holder count LOCKS DATA KEY THREADS ITERATIONS COUNTER LOG
//!     THREADS threads each do ITERATIONS guarded increments of the Redis key COUNTER (a GET then
//!     a SET), appending each critical section's fence to the list LOG; prints `done`.
//! lease-holder fenced-count LOCKS DATA KEY THREADS RESOURCE
//!     THREADS threads each repeat, until a line or the end of stdin: acquire KEY, read the
//!     counter in the fenced resource RESOURCE with the lease's fence, write it back plus one
//!     with the same fence, release. A lost lease is no failure (the fences protect the counter).
//!     Prints `accepted N` (increments whose read and write the fences accepted), `refused N` and
//!     `lost N` (leases found lost at their release).
//! ```

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lock_core::conformance::renew_one;
use lock_core::{AcquireOutcome, LeaseBackend, LeaseRequest, LockManager, Ownership};
use lock_redis::{RedisBackend, RedlockBackend};
use redis::Commands;

type Result<T = (), E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

fn main() -> Result {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["hold", locks, data, key, ttl_ms] => {
            hold(locks, data, key, Duration::from_millis(ttl_ms.parse()?))
        }
        ["calls", url] => calls(url),
        ["count", locks, data, key, threads, iterations, counter, log] => count(
            locks,
            data,
            key,
            threads.parse()?,
            iterations.parse()?,
            counter,
            log,
        ),
        ["fenced-count", locks, data, key, threads, resource] => {
            fenced_count(locks, data, key, threads.parse()?, resource)
        }
        _ => Err(format!("usage: see the docs of lease-holder; got {args:?}").into()),
    }
}

/// A manager on one server (or Sentinel group), or on a Redlock when `urls` lists several.
fn manager(urls: &str) -> Result<LockManager> {
    if urls.starts_with("redis+sentinel://") || urls.starts_with("redis+cluster://") {
        // Its commas separate sentinels or seed nodes, not Redlock nodes.
        return Ok(LockManager::new(RedisBackend::connect(urls)?));
    }
    let urls: Vec<&str> = urls.split(',').collect();
    Ok(match urls.as_slice() {
        [url] => LockManager::new(RedisBackend::connect(url)?),
        _ => LockManager::new(RedlockBackend::connect(&urls)?),
    })
}

fn hold(locks: &str, data: &str, key: &str, ttl: Duration) -> Result {
    let manager = manager(locks)?;
    let lease = manager.acquire(key, ttl)?;
    println!("acquired {}", lease.fence());
    let mut connection = redis::Client::open(data)?.get_connection()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["check"] => println!(
                "{}",
                if lease.ensure_held().is_ok() {
                    "held"
                } else {
                    "lost"
                }
            ),
            ["write", resource, value] => {
                let accepted =
                    lock_tests::fenced_write(&mut connection, resource, lease.fence(), value)?;
                println!("{}", if accepted { "accepted" } else { "rejected" });
            }
            ["release"] => {
                println!(
                    "{}",
                    if lease.release().is_ok() {
                        "released"
                    } else {
                        "release-error"
                    }
                );
                return Ok(());
            }
            _ => println!("unknown command {line:?}"),
        }
    }
    Ok(())
}

fn calls(url: &str) -> Result {
    let backend = RedisBackend::connect(url)?;
    let ttl = Duration::from_secs(30);
    let timeout = Duration::from_secs(5);
    for round in 0_u64.. {
        let (key, token) = (format!("calls-{round}"), format!("token-{round}"));
        let request = LeaseRequest {
            key: &key,
            token: &token,
            ttl,
        };
        let outcome = backend
            .try_acquire(&request, timeout)
            .unwrap_or_else(|error| exit_with(&error));
        if !matches!(outcome, AcquireOutcome::Acquired { .. }) {
            return Err(format!("{key} was not granted: {outcome:?}").into());
        }
        match renew_one(&backend, &request, timeout).unwrap_or_else(|error| exit_with(&error)) {
            Ownership::Owned => println!("ok"),
            other => return Err(format!("{key} renewed as {other:?}").into()),
        }
    }
    Ok(())
}

/// Prints `error: ` and the chain of `error`, and exits with status 1.
fn exit_with(error: &(dyn std::error::Error + 'static)) -> ! {
    println!("error: {}", lock_tests::error_chain(error));
    std::process::exit(1)
}

fn count(
    locks: &str,
    data: &str,
    key: &str,
    threads: usize,
    iterations: usize,
    counter: &str,
    log: &str,
) -> Result {
    on_threads(locks, data, threads, |manager, connection| {
        for _ in 0..iterations {
            let lease =
                manager.acquire_timeout(key, Duration::from_secs(10), Duration::from_secs(60))?;
            let value: u64 = connection.get::<_, Option<u64>>(counter)?.unwrap_or(0);
            let () = connection.set(counter, value + 1)?;
            let _: u64 = connection.rpush(log, lease.fence())?;
            // The release's outcome is not this run's question; the counter is. A release the
            // backend could not confirm (a node timed out) is no loss: the key is deleted, or
            // expires. A loss reported here is no lost update either: with Redlock, a lease
            // granted by exactly a majority loses it when one of those nodes dies, yet no one
            // else can get a majority while its other keys live, and the run's check of the
            // counter catches any update an overlapping holder would have lost.
            let _ = lease.release();
        }
        Ok(())
    })?;
    println!("done");
    Ok(())
}

fn fenced_count(locks: &str, data: &str, key: &str, threads: usize, resource: &str) -> Result {
    let stop = Arc::new(AtomicBool::new(false));
    let [accepted, refused, lost] = [(); 3].map(|()| Arc::new(AtomicU64::new(0)));
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().lock().lines().next();
            stop.store(true, Ordering::Relaxed);
        })
    };
    on_threads(locks, data, threads, |manager, connection| {
        while !stop.load(Ordering::Relaxed) {
            let lease =
                manager.acquire_timeout(key, Duration::from_secs(2), Duration::from_secs(60))?;
            let fence = lease.fence();
            let incremented = match lock_tests::fenced::fenced_read(connection, resource, fence)? {
                Some(value) => {
                    let next = value.parse::<u64>().unwrap_or(0) + 1;
                    lock_tests::fenced_write(connection, resource, fence, &next.to_string())?
                }
                None => false,
            };
            let outcome = if incremented { &accepted } else { &refused };
            outcome.fetch_add(1, Ordering::Relaxed);
            if lease.release().is_err_and(|error| error.is_lost()) {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    })?;
    stopper.join().map_err(|_| "the stdin thread panicked")?;
    for (name, count) in [("accepted", accepted), ("refused", refused), ("lost", lost)] {
        println!("{name} {}", count.load(Ordering::Relaxed));
    }
    Ok(())
}

/// Runs `work` on `threads` threads sharing one manager on `locks`, each with its own
/// connection to `data`; the first error of any thread is the result.
fn on_threads(
    locks: &str,
    data: &str,
    threads: usize,
    work: impl Fn(&LockManager, &mut redis::Connection) -> Result + Sync,
) -> Result {
    let manager = manager(locks)?;
    let client = redis::Client::open(data)?;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (manager, client, work) = (&manager, &client, &work);
                scope.spawn(move || work(manager, &mut client.get_connection()?))
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a worker thread panicked")??;
        }
        Ok(())
    })
}
