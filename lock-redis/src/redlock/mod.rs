//! [`RedlockBackend`]: one lease on a majority of independent Redis masters.
//!
//! One file per job: `builder` checks the settings, `node` runs each master's workers,
//! `acquire` takes a majority and its fence, `quorum` counts answers and names failures,
//! `operator` inspects and force-releases keys for operators, `handoff` carries jobs to the
//! workers and their answers back.

mod acquire;
mod builder;
mod handoff;
mod node;
mod operator;
mod quorum;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::AcquireOutcome;
use lock_core::{BackendError, DriftRule, LeaseBackend, LeaseRequest, Ownership, ReleaseWatch};

pub use builder::RedlockBuilder;
pub use quorum::NoQuorum;

use crate::connection::deadline::Deadline;
use crate::RedisBackend;
use node::{Job, Node, OwnedRequest, Reply};
use quorum::{Quorum, Tally};

/// Grace for a worker to hand back an answer after its node call timed out.
const REPLY_GRACE: Duration = Duration::from_millis(50);

/// A [`LeaseBackend`] that holds each lease on a majority of independent Redis masters
/// (the Redlock algorithm), so that one node's failure neither loses the lock nor blocks
/// everyone.
///
/// - **Acquire** asks every node at once (each node has persistent worker threads fed by a
///   channel) and stops listening once a majority (`N/2 + 1`) granted the key: those nodes
///   are *the majority*, and a node that grants later is not counted. The fence is the highest
///   the majority issued. Each node of the majority whose counter is below it (it issued
///   less) is then raised to it, and the acquire waits for their acknowledgements (a second
///   round trip, which the steady state does without: see [Fences](#fences)): a node whose
///   write-back fails or times out is no longer counted. The acquire succeeds only if the nodes
///   counted are still a majority and validity is left, by the same [`DriftRule`] as the
///   lease's: `elapsed < ttl - (ttl * drift_factor + 2 ms)`. Otherwise it releases the key on
///   **every** node, including those that seemed to fail, so no node keeps our token, and
///   fails with a transient error (or answers that another token holds the key).
/// - **Renew** succeeds when a majority renews; the lease is reported taken over once a
///   majority can no longer be reached with our token.
/// - **Release** goes to every node.
/// - **Inspect** (for operators) asks every node and waits for all answers: the key is held
///   when the nodes holding it leave no majority free (no acquire can succeed), for as long as
///   it takes enough of their TTLs to run out; free when a majority says so; otherwise a
///   transient error. Its fence is the highest any node reports.
/// - **Force release** (for operators) deletes the key on every node, whatever its token, and
///   succeeds once a majority answered; a node that missed it keeps its copy until its TTL.
/// - **A node that refuses a call for good** (a permanent error: `WRONGTYPE`, `NOAUTH`,
///   `NOPERM`…) costs what a dead node costs: it counts as failed for that call. A call fails
///   with a permanent error only when such refusals alone leave too few nodes for a majority.
/// - **Time limits**: each node call waits at most the
///   [node timeout](RedlockBuilder::node_timeout) (or the caller's timeout if shorter; a
///   timeout of `Duration::MAX` means the node timeout), plus a short grace for the answer to
///   come back. An acquire makes up to two such rounds (the grants, then the write-back), a
///   renewal or release one.
///
/// # Fences
///
/// When an acquire returns a fence, every node it counted in its majority holds a fence
/// counter at least that high. The next holder's majority shares at least one node with this
/// one, and that node grants only once our key is gone from it (released after we returned,
/// or expired after our validity), so it issues a fence above its counter, and the next fence
/// is higher. This assumes only that a node issues fences above its counter, whatever the
/// formula.
///
/// Each acquire proposes one fence to every node: this machine's clock in microseconds plus one
/// second. A node issues `max(counter + 1, its own clock in µs, the proposal)`, so while the
/// proposal is ahead of the nodes' clocks and counters (the steady state, where each grant
/// leaves the majority's counters equal), every node of the majority issues the same fence and
/// none needs raising: an acquire is one round trip. A proposal only ever raises a fence, so a
/// client clock that is behind, or a node clock more than a second ahead of it, costs the
/// write-back round trip, never the order of fences.
///
/// # What Redlock does and does not promise
///
/// It tolerates the crash or partition of a minority of nodes. What remains best effort:
///
/// - **Fences across lost counters.** If a node of the majority loses its counter (it
///   restarts without persistence, is restored from an older snapshot, or fails over to a
///   replica that missed the write-back) before the next acquire, and it is the only node the
///   next majority shares with this one, the next fence is only as high as that node and the
///   others issue afresh, which may be lower. A single Redis with fencing is the stronger
///   choice when the resource can check fences and fences must never go back.
/// - **Timing.** Like every lease, Redlock assumes bounded clock drift (the drift allowance)
///   and process pauses shorter than the validity (see the `lock-core` docs): a node whose
///   clock runs fast can expire our key before our validity ends, and grant it again.
/// - **Cleanup.** A failed acquire's token is released everywhere, and releases a node misses
///   are retried (below); until they succeed, that node keeps the token until its TTL.
///
/// Nodes are connected lazily: `connect` succeeds while nodes are down, and a node that comes
/// back is used again at the next call. A release that a node misses (it was down or paused) is
/// retried by that node's idle workers every 100 ms until it succeeds or the key must have
/// expired, so a failed acquire leaves no token behind once the node answers again.
///
/// ```
/// use lock_redis::RedlockBackend;
///
/// // Nothing needs to listen yet: nodes are connected on first use.
/// let redlock = RedlockBackend::connect(&[
///     "redis://127.0.0.1:7001",
///     "redis://127.0.0.1:7002",
///     "redis://:secret@127.0.0.1:7003",
/// ])?;
/// assert_eq!(redlock.quorum(), 2);
/// assert!(!format!("{redlock:?}").contains("secret"));
/// # Ok::<(), lock_redis::RedisBackendError>(())
/// ```
#[derive(Clone)]
pub struct RedlockBackend {
    shared: Arc<Shared>,
}

struct Shared {
    nodes: Vec<Node>,
    quorum: Quorum,
    node_timeout: Duration,
    drift: DriftRule,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing every queue first lets all workers end at once.
        for node in &mut self.nodes {
            node.close();
        }
        for node in &mut self.nodes {
            node.join();
        }
    }
}

impl fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<&RedisBackend> =
            self.shared.nodes.iter().map(|node| &node.backend).collect();
        f.debug_struct("RedlockBackend")
            .field("quorum", &self.shared.quorum.needed())
            .field("node_timeout", &self.shared.node_timeout)
            .field("drift", &self.shared.drift)
            .field("nodes", &nodes)
            .finish()
    }
}

impl RedlockBackend {
    /// A Redlock over the masters at `urls`, with the default settings of [`RedlockBuilder`].
    ///
    /// # Errors
    ///
    /// A malformed URL, or no URL at all. Unreachable nodes are no error here.
    pub fn connect(urls: &[&str]) -> Result<RedlockBackend, crate::RedisBackendError> {
        RedlockBackend::builder(urls).build()
    }

    /// A builder, to change the defaults.
    pub fn builder(urls: &[&str]) -> RedlockBuilder {
        RedlockBuilder::new(urls)
    }

    /// How many nodes must agree: `N/2 + 1`.
    pub fn quorum(&self) -> usize {
        self.shared.quorum.needed()
    }

    /// The single-node backends, in the order of the URLs: to inspect one node's keys.
    pub fn nodes(&self) -> impl Iterator<Item = &RedisBackend> {
        self.shared.nodes.iter().map(|node| &node.backend)
    }

    /// How long one node call may take within the caller's `timeout` (`Duration::MAX` for
    /// none): never more than the node timeout.
    fn node_budget(&self, timeout: Duration) -> Duration {
        timeout.min(self.shared.node_timeout)
    }

    fn all_nodes(&self) -> std::ops::Range<usize> {
        0..self.shared.quorum.nodes()
    }

    /// Sends one job to each of `targets` and gathers answers, by node index, until `decided`
    /// says the rest cannot change the outcome, every target has answered, or `wait` has
    /// passed.
    fn gather_until<T>(
        &self,
        targets: impl IntoIterator<Item = usize>,
        wait: Duration,
        make: impl Fn(Reply<T>) -> Job,
        mut decided: impl FnMut(&[Option<T>]) -> bool,
    ) -> Vec<Option<T>> {
        let nodes = &self.shared.nodes;
        let (reply, answers) = handoff::queue();
        let mut sent = 0;
        for node in targets.into_iter().filter_map(|index| nodes.get(index)) {
            node.send(make(reply.clone()));
            sent += 1;
        }
        drop(reply);
        let mut slots: Vec<Option<T>> = nodes.iter().map(|_| None).collect();
        let deadline = Instant::now().checked_add(wait);
        // Nothing is decided before this many answers: sleep until they are in (measured with
        // 3 nodes, 21 -> 17 thread switches per acquire + release; with 5, 35 -> 27).
        answers.wait_for(self.shared.quorum.first_decision().min(sent), deadline);
        for _ in 0..sent {
            let answer = answers.recv_until(deadline).ok();
            let Some((index, value)) = answer else { break };
            if let Some(slot) = slots.get_mut(index) {
                *slot = Some(value);
            }
            if decided(&slots) {
                break;
            }
        }
        slots
    }

    /// Releases `key` for `token` on every node, waiting up to the node timeout (within
    /// `wait`) for their answers. Nodes that miss it retry it in the background until `ttl`.
    fn release_everywhere(
        &self,
        key: &Arc<str>,
        token: &Arc<str>,
        ttl: Option<Duration>,
        wait: Duration,
    ) -> Vec<Option<Result<Ownership, BackendError>>> {
        let timeout = self.node_budget(wait);
        let quorum = self.shared.quorum;
        self.gather_until(
            self.all_nodes(),
            timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Release {
                key: key.clone(),
                token: token.clone(),
                ttl,
                timeout,
                reply,
            },
            // Stragglers finish in the background, and retry later if they fail. Refusals do
            // not settle a release: one more node that released our token may make it a
            // success (see `release`).
            |answers| {
                Tally::of(answers.iter().map(Option::as_ref))
                    .verdict(quorum)
                    .is_some()
            },
        )
    }
}

impl LeaseBackend for RedlockBackend {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        self.acquire(request, timeout)
    }

    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        let batch: Arc<[OwnedRequest]> = requests
            .iter()
            .map(|request| (request.key.into(), request.token.into(), request.ttl))
            .collect();
        let node_timeout = self.node_budget(timeout);
        let quorum = self.shared.quorum;
        let tally = |answers: &[Option<Vec<Result<Ownership, BackendError>>>], index: usize| {
            Tally::of(
                answers
                    .iter()
                    .map(|answer| answer.as_ref().and_then(|results| results.get(index))),
            )
        };
        let answers = self.gather_until(
            self.all_nodes(),
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Renew {
                batch: batch.clone(),
                deadline: Deadline::after(node_timeout),
                reply,
            },
            |answers| (0..requests.len()).all(|index| tally(answers, index).settled(quorum)),
        );
        (0..requests.len())
            .map(|index| tally(&answers, index).decide(quorum, "renew"))
            .collect()
    }

    fn release(
        &self,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        let answers = self.release_everywhere(&key.into(), &token.into(), None, timeout);
        let tally = Tally::of(answers.iter().map(Option::as_ref));
        // Nodes that failed may still have held our token: if they and the nodes that released
        // it could make a majority, the lease may well have been ours to the end. Their keys
        // are released later by the cleanup, or expire.
        let could_have_held = tally.owned + tally.failures.len() >= self.shared.quorum.needed();
        if tally.owned > 0 && could_have_held {
            return Ok(Ownership::Owned);
        }
        tally.decide(self.shared.quorum, "release")
    }

    /// `ttl * drift_factor + 2 ms`: the holder trusts its lease for what Redlock itself counts
    /// as valid.
    fn drift(&self) -> DriftRule {
        self.shared.drift
    }

    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        // A release goes to every node, so one node's announcement is enough to wake waiters.
        self.shared
            .nodes
            .iter()
            .find_map(|node| node.backend.watch_release(key))
    }

    /// Asks every node; held when the nodes holding the key leave no majority free, free when
    /// a majority says so, with the highest fence of any node (see the
    /// [`KeyState`](lock_core::KeyState) docs).
    fn inspect(&self, key: &str, timeout: Duration) -> Result<lock_core::KeyState, BackendError> {
        self.inspect_everywhere(key, timeout)
    }

    /// Deletes the key on every node; succeeds once a majority answered, `true` when any node
    /// held it.
    fn force_release(&self, key: &str, timeout: Duration) -> Result<bool, BackendError> {
        self.force_release_everywhere(key, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redlock_is_send_sync_and_object_safe() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<RedlockBackend>();
        let redlock = RedlockBackend::connect(&["redis://127.0.0.1:1"]).unwrap();
        let _shared: Arc<dyn LeaseBackend> = Arc::new(redlock);
    }
}
