//! [`RedlockBackend`]: one lease on a majority of independent Redis masters.

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use lock_core::{
    AcquireOutcome, BackendError, DriftRule, LeaseBackend, LeaseRequest, Ownership, ReleaseWatch,
};
use parking_lot::Mutex;

use crate::pool::Deadline;
use crate::{RedisBackend, RedisBackendError};

/// Defaults of [`RedlockBuilder`], in one place.
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(250);
const DEFAULT_DRIFT_FACTOR: f64 = 0.01;
const DEFAULT_WORKERS_PER_NODE: usize = 4;
/// The most nodes a Redlock may have.
const MAX_NODES: usize = 31;

/// A [`LeaseBackend`] that holds each lease on a majority of independent Redis masters
/// (the Redlock algorithm), so that one node's failure neither loses the lock nor blocks
/// everyone.
///
/// - **Acquire** asks every node at once (each node has persistent worker threads fed by a
///   channel) and succeeds only when a majority (`N/2 + 1`) granted the key and validity is left:
///   `ttl - elapsed - (ttl * drift_factor + 2 ms) > 0`. Otherwise it releases the key on
///   **every** node, including those that seemed to fail, so no node keeps our token.
/// - **Renew** succeeds when a majority renews within the lease's remaining validity; the lease
///   is reported taken over once a majority can no longer be reached with our token.
/// - **Release** goes to every node.
/// - **Fence**: the maximum of the fences issued by the granting majority, written back (without
///   waiting) to the granting nodes whose counters were behind, so that the next majority, which
///   shares at least one node with this one, issues a larger fence.
///
/// # What Redlock does and does not promise
///
/// It tolerates the crash or partition of a minority of nodes. It does **not** make fences
/// strictly increasing under every failure: if a node of the granting majority restarts without
/// persistence before the next acquire, and the write-back of the maximum had not reached the
/// other node shared by the two majorities, the next fence may be lower. Fences are therefore
/// *best effort* here; a single Redis with fencing is the stronger choice when the resource can
/// check fences. Like every lease, Redlock also assumes bounded clock drift and process pauses
/// shorter than the validity (see the `lock-core` docs).
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
    quorum: usize,
    node_timeout: Duration,
    drift: DriftRule,
}

/// One master: its backend, and the workers that call it.
struct Node {
    backend: RedisBackend,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

/// How often idle workers retry the releases their node missed.
const CLEANUP_INTERVAL: Duration = Duration::from_millis(100);
/// How long a missed release is retried when the lease's TTL is unknown.
const CLEANUP_UNKNOWN_TTL: Duration = Duration::from_secs(600);
/// The most missed releases a node remembers; the oldest are forgotten first (their keys
/// expire by their TTL anyway).
const CLEANUP_CAPACITY: usize = 10_000;

/// Releases a node missed (it was down or slow), retried by its idle workers until they
/// succeed or the key must have expired.
#[derive(Default)]
struct Cleanup {
    missed: Mutex<Vec<MissedRelease>>,
}

struct MissedRelease {
    key: Arc<str>,
    token: Arc<str>,
    /// After this the key has expired by its TTL, and the release is moot.
    until: Instant,
}

impl Cleanup {
    fn remember(&self, key: Arc<str>, token: Arc<str>, ttl: Duration) {
        let until = Instant::now().checked_add(ttl).unwrap_or_else(Instant::now);
        let mut missed = self.missed.lock();
        if missed.len() >= CLEANUP_CAPACITY {
            missed.remove(0);
        }
        missed.push(MissedRelease { key, token, until });
    }

    /// Retries every missed release once; keeps those that failed again.
    fn retry(&self, backend: &RedisBackend, timeout: Duration) {
        let now = Instant::now();
        let pending: Vec<MissedRelease> = std::mem::take(&mut *self.missed.lock())
            .into_iter()
            .filter(|missed| missed.until > now)
            .collect();
        let mut failed = Vec::new();
        let mut failing = false;
        for missed in pending {
            // Once the node fails, keep the rest for the next round without trying them.
            if failing
                || backend
                    .release(&missed.key, &missed.token, timeout)
                    .is_err()
            {
                failing = true;
                failed.push(missed);
            }
        }
        if !failed.is_empty() {
            self.missed.lock().extend(failed);
        }
    }
}

/// What is left of a job's deadline (`Duration::MAX`: no limit); `None` once it has passed.
fn time_left(deadline: &Deadline) -> Option<Duration> {
    match deadline.remaining() {
        Some(left) if left.is_zero() => None,
        Some(left) => Some(left),
        None => Some(Duration::MAX),
    }
}

/// A renewal request owned by a job: key, token and TTL.
type OwnedRequest = (Box<str>, Box<str>, Duration);

/// A call for one node's workers; the answer goes to `reply` tagged with the node's index.
enum Job {
    Acquire {
        key: Arc<str>,
        token: Arc<str>,
        ttl: Duration,
        /// The caller stops listening then: a job still queued at that time is dropped.
        deadline: Deadline,
        reply: Sender<(usize, Result<AcquireOutcome, BackendError>)>,
    },
    Renew {
        batch: Arc<[OwnedRequest]>,
        deadline: Deadline,
        reply: Sender<(usize, Vec<Result<Ownership, BackendError>>)>,
    },
    Release {
        key: Arc<str>,
        token: Arc<str>,
        /// How long the key can live: a release that fails is retried until then.
        ttl: Option<Duration>,
        timeout: Duration,
        reply: Sender<(usize, Result<Ownership, BackendError>)>,
    },
    RaiseFence {
        key: Arc<str>,
        fence: u64,
        timeout: Duration,
    },
}

impl Job {
    fn run(self, index: usize, backend: &RedisBackend, cleanup: &Cleanup) {
        // A caller that gave up no longer listens: its replies are dropped.
        match self {
            Job::Acquire {
                key,
                token,
                ttl,
                deadline,
                reply,
            } => {
                let Some(timeout) = time_left(&deadline) else {
                    return;
                };
                let request = LeaseRequest {
                    key: &key,
                    token: &token,
                    ttl,
                };
                let _ = reply.send((index, backend.try_acquire(&request, timeout)));
            }
            Job::Renew {
                batch,
                deadline,
                reply,
            } => {
                let Some(timeout) = time_left(&deadline) else {
                    return;
                };
                let requests: Vec<LeaseRequest<'_>> = batch
                    .iter()
                    .map(|(key, token, ttl)| LeaseRequest {
                        key,
                        token,
                        ttl: *ttl,
                    })
                    .collect();
                let _ = reply.send((index, backend.renew_batch(&requests, timeout)));
            }
            Job::Release {
                key,
                token,
                ttl,
                timeout,
                reply,
            } => {
                let result = backend.release(&key, &token, timeout);
                if matches!(&result, Err(error) if error.is_transient()) {
                    cleanup.remember(key, token, ttl.unwrap_or(CLEANUP_UNKNOWN_TTL));
                }
                let _ = reply.send((index, result));
            }
            Job::RaiseFence {
                key,
                fence,
                timeout,
            } => {
                if let Err(error) = backend.raise_fence(&key, fence, timeout) {
                    tracing::debug!(node = index, key = &*key, fence, %error, "Redlock fence write-back failed");
                }
            }
        }
    }
}

/// Configures a [`RedlockBackend`]; made by [`RedlockBackend::builder`].
///
/// ```
/// use std::time::Duration;
/// use lock_redis::RedlockBackend;
///
/// let redlock = RedlockBackend::builder(&["redis://127.0.0.1:7001", "redis://127.0.0.1:7002", "redis://127.0.0.1:7003"])
///     .node_timeout(Duration::from_millis(100))
///     .drift_factor(0.02)
///     .build()?;
/// # drop(redlock);
///
/// // Passwords are redacted from `Debug`, here as everywhere.
/// let builder = RedlockBackend::builder(&["redis://:hunter2@127.0.0.1:7001"]);
/// assert!(!format!("{builder:?}").contains("hunter2"));
/// # Ok::<(), lock_redis::RedisBackendError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct RedlockBuilder {
    urls: Vec<String>,
    node_timeout: Duration,
    drift_factor: f64,
    workers_per_node: usize,
    key_prefix: Option<String>,
}

impl fmt::Debug for RedlockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|url| crate::redact_url(url)).collect();
        f.debug_struct("RedlockBuilder")
            .field("urls", &urls)
            .field("node_timeout", &self.node_timeout)
            .field("drift_factor", &self.drift_factor)
            .field("workers_per_node", &self.workers_per_node)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl RedlockBuilder {
    /// The longest one node may take to answer one call (connect, pool checkout and command
    /// each). A node slower than this counts as failed for that call. Default: 250 ms.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// The clock drift allowance, as a fraction of the TTL (plus 2 ms), subtracted from the
    /// validity of each acquire. Default: 0.01.
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// How many calls each node may serve at once: its worker threads and pooled connections.
    /// Default: 4.
    pub fn workers_per_node(mut self, workers: usize) -> Self {
        self.workers_per_node = workers;
        self
    }

    /// The key prefix on every node, as [`RedisBackendBuilder::key_prefix`](crate::RedisBackendBuilder::key_prefix).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Some(prefix.into());
        self
    }

    /// Checks the settings, and starts each node's workers. Connects to nothing.
    pub fn build(self) -> Result<RedlockBackend, RedisBackendError> {
        let invalid = |reason: String| Err(RedisBackendError::InvalidConfig { reason });
        if self.urls.is_empty() || self.urls.len() > MAX_NODES {
            return invalid(format!(
                "a Redlock needs between 1 and {MAX_NODES} nodes, not {}",
                self.urls.len()
            ));
        }
        let drift = match DriftRule::new(self.drift_factor, Duration::from_millis(2)) {
            Some(rule) if self.drift_factor < 0.5 => rule,
            _ => {
                return invalid(format!(
                    "drift_factor must be in [0, 0.5), not {}",
                    self.drift_factor
                ))
            }
        };
        if !(1..=64).contains(&self.workers_per_node) {
            return invalid(format!(
                "workers_per_node must be between 1 and 64, not {}",
                self.workers_per_node
            ));
        }
        let workers = u32::try_from(self.workers_per_node).unwrap_or(1);
        let mut nodes = Vec::with_capacity(self.urls.len());
        for (index, url) in self.urls.iter().enumerate() {
            let mut builder = RedisBackend::builder(url)
                .pool_size(workers)
                .connect_timeout(self.node_timeout)
                .checkout_timeout(self.node_timeout)
                .command_timeout(self.node_timeout);
            if let Some(prefix) = &self.key_prefix {
                builder = builder.key_prefix(prefix.clone());
            }
            let backend = builder.build()?;
            nodes.push(Node::start(
                index,
                backend,
                self.workers_per_node,
                self.node_timeout,
            )?);
        }
        Ok(RedlockBackend {
            shared: Arc::new(Shared {
                quorum: nodes.len() / 2 + 1,
                nodes,
                node_timeout: self.node_timeout,
                drift,
            }),
        })
    }
}

impl Node {
    fn start(
        index: usize,
        backend: RedisBackend,
        workers: usize,
        node_timeout: Duration,
    ) -> Result<Node, RedisBackendError> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let cleanup = Arc::new(Cleanup::default());
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (queue, backend, cleanup) = (queue.clone(), backend.clone(), cleanup.clone());
            let handle = std::thread::Builder::new()
                .name(format!("redlock-node-{index}"))
                .spawn(move || loop {
                    match queue.recv_timeout(CLEANUP_INTERVAL) {
                        Ok(job) => job.run(index, &backend, &cleanup),
                        Err(RecvTimeoutError::Timeout) => cleanup.retry(&backend, node_timeout),
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                })
                .map_err(|error| RedisBackendError::InvalidConfig {
                    reason: format!("cannot start a Redlock worker thread: {error}"),
                })?;
            handles.push(handle);
        }
        Ok(Node {
            backend,
            jobs: Some(jobs),
            workers: handles,
        })
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queues ends the workers once their current call returns.
        for node in &mut self.nodes {
            node.jobs = None;
        }
        for node in &mut self.nodes {
            for worker in node.workers.drain(..) {
                if worker.thread().id() != std::thread::current().id() {
                    let _ = worker.join();
                }
            }
        }
    }
}

impl fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<&RedisBackend> =
            self.shared.nodes.iter().map(|node| &node.backend).collect();
        f.debug_struct("RedlockBackend")
            .field("quorum", &self.shared.quorum)
            .field("node_timeout", &self.shared.node_timeout)
            .field("drift", &self.shared.drift)
            .field("nodes", &nodes)
            .finish()
    }
}

/// Why a Redlock call could not reach a decision.
#[derive(Debug, thiserror::Error)]
#[error("Redlock {operation}: {granted} of {nodes} nodes agreed, {quorum} needed ({failed} failed{})", first_error.as_ref().map(|e| format!("; first error: {e}")).unwrap_or_default())]
pub struct NoQuorum {
    operation: &'static str,
    granted: usize,
    failed: usize,
    nodes: usize,
    quorum: usize,
    first_error: Option<BackendError>,
}

impl RedlockBackend {
    /// A Redlock over the masters at `urls`, with the default settings of [`RedlockBuilder`].
    ///
    /// # Errors
    ///
    /// A malformed URL, or no URL at all. Unreachable nodes are no error here.
    pub fn connect(urls: &[&str]) -> Result<RedlockBackend, RedisBackendError> {
        RedlockBackend::builder(urls).build()
    }

    /// A builder, to change the defaults.
    pub fn builder(urls: &[&str]) -> RedlockBuilder {
        RedlockBuilder {
            urls: urls.iter().map(|url| (*url).to_owned()).collect(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
            drift_factor: DEFAULT_DRIFT_FACTOR,
            workers_per_node: DEFAULT_WORKERS_PER_NODE,
            key_prefix: None,
        }
    }

    /// How many nodes must agree: `N/2 + 1`.
    pub fn quorum(&self) -> usize {
        self.shared.quorum
    }

    /// The single-node backends, in the order of the URLs: to inspect one node's keys.
    pub fn nodes(&self) -> impl Iterator<Item = &RedisBackend> {
        self.shared.nodes.iter().map(|node| &node.backend)
    }

    fn node_budget(&self, timeout: Duration) -> Duration {
        timeout.min(self.shared.node_timeout)
    }

    /// Sends one job per node and gathers answers until `decided` says the rest cannot change
    /// the outcome, every node has answered, or `wait` has passed.
    fn gather_until<T>(
        &self,
        wait: Duration,
        make: impl Fn(Sender<(usize, T)>) -> Job,
        mut decided: impl FnMut(&[Option<T>]) -> bool,
    ) -> Vec<Option<T>> {
        let nodes = self.shared.nodes.len();
        let (reply, answers) = crossbeam_channel::bounded(nodes);
        for node in &self.shared.nodes {
            node.send(make(reply.clone()));
        }
        drop(reply);
        let mut slots: Vec<Option<T>> = (0..nodes).map(|_| None).collect();
        let deadline = Instant::now().checked_add(wait);
        for _ in 0..nodes {
            let answer = match deadline {
                Some(deadline) => answers.recv_deadline(deadline).ok(),
                None => answers.recv().ok(),
            };
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
        let (nodes, quorum) = (self.shared.nodes.len(), self.shared.quorum);
        self.gather_until(
            timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Release {
                key: key.clone(),
                token: token.clone(),
                ttl,
                timeout,
                reply,
            },
            // Stragglers finish in the background, and retry later if they fail.
            |answers| {
                Tally::of(answers.iter().map(Option::as_ref))
                    .verdict(nodes, quorum)
                    .is_some()
            },
        )
    }

    /// Turns a tally into the call's result: a majority either way decides; otherwise a
    /// transient error, so the caller retries.
    fn decide(&self, operation: &'static str, tally: Tally) -> Result<Ownership, BackendError> {
        let (nodes, quorum) = (self.shared.nodes.len(), self.shared.quorum);
        match tally.verdict(nodes, quorum) {
            Some(ownership) => Ok(ownership),
            None => Err(self.no_quorum(operation, tally.owned, tally.failures)),
        }
    }

    fn no_quorum(
        &self,
        operation: &'static str,
        granted: usize,
        failures: Vec<Option<BackendError>>,
    ) -> BackendError {
        let failed = failures.len();
        BackendError::transient(NoQuorum {
            operation,
            granted,
            failed,
            nodes: self.shared.nodes.len(),
            quorum: self.shared.quorum,
            first_error: failures.into_iter().flatten().next(),
        })
    }
}

/// The nodes' answers to one renewal or release.
struct Tally {
    owned: usize,
    not_owned: usize,
    /// An error, or `None` for a node that did not answer in time.
    failures: Vec<Option<BackendError>>,
}

impl Tally {
    fn of<'a>(answers: impl Iterator<Item = Option<&'a Result<Ownership, BackendError>>>) -> Tally {
        let mut tally = Tally {
            owned: 0,
            not_owned: 0,
            failures: Vec::new(),
        };
        for answer in answers {
            match answer {
                Some(Ok(Ownership::Owned)) => tally.owned += 1,
                Some(Ok(Ownership::NotOwned)) => tally.not_owned += 1,
                Some(Err(error)) => tally.failures.push(Some(error.clone())),
                None => tally.failures.push(None),
            }
        }
        tally
    }

    /// `Owned` once a majority applied the call, `NotOwned` once a majority cannot (no retry
    /// can bring the token back on enough nodes), `None` while undecided.
    fn verdict(&self, nodes: usize, quorum: usize) -> Option<Ownership> {
        if self.owned >= quorum {
            Some(Ownership::Owned)
        } else if self.not_owned > nodes - quorum {
            Some(Ownership::NotOwned)
        } else {
            None
        }
    }
}

/// Grace for a worker to hand back an answer after its node call timed out.
const REPLY_GRACE: Duration = Duration::from_millis(50);

impl LeaseBackend for RedlockBackend {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        let started = Instant::now();
        let key: Arc<str> = request.key.into();
        let token: Arc<str> = request.token.into();
        let node_timeout = self.node_budget(timeout);
        let quorum = self.shared.quorum;
        // Latency follows the quorum's slowest node: stop listening once a majority granted.
        let answers = self.gather_until(
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Acquire {
                key: key.clone(),
                token: token.clone(),
                ttl: request.ttl,
                deadline: Deadline::after(node_timeout),
                reply,
            },
            |answers| {
                let granted = answers
                    .iter()
                    .filter(|answer| matches!(answer, Some(Ok(AcquireOutcome::Acquired { .. }))))
                    .count();
                granted >= quorum
            },
        );
        let mut fences = Vec::new();
        let mut held = Vec::new();
        let mut failures = Vec::new();
        for (node, answer) in answers.into_iter().enumerate() {
            match answer {
                Some(Ok(AcquireOutcome::Acquired { fence })) => fences.push((node, fence)),
                Some(Ok(AcquireOutcome::Held { remaining })) => held.push(remaining),
                Some(Err(error)) if !error.is_transient() => {
                    let _ = self.release_everywhere(&key, &token, Some(request.ttl), node_timeout);
                    return Err(error);
                }
                Some(Err(error)) => failures.push(Some(error)),
                None => failures.push(None),
            }
        }
        // The same rule the manager applies to the lease (see `drift`), so the two agree.
        let validity_left = self
            .shared
            .drift
            .validity(request.ttl)
            .is_some_and(|validity| started.elapsed() < validity);
        if fences.len() >= self.shared.quorum && validity_left {
            let fence = fences.iter().map(|(_, fence)| *fence).max().unwrap_or(0);
            let behind = fences
                .iter()
                .filter(|(_, issued)| *issued < fence)
                .map(|(node, _)| *node);
            self.write_back_fence(behind, &key, fence, node_timeout);
            return Ok(AcquireOutcome::Acquired { fence });
        }
        // No majority (or no validity left): leave no trace of our token on any node.
        let granted = fences.len();
        let _ = self.release_everywhere(&key, &token, Some(request.ttl), node_timeout);
        if !held.is_empty() {
            let remaining = held.into_iter().flatten().min();
            return Ok(AcquireOutcome::Held { remaining });
        }
        Err(self.no_quorum("acquire", granted, failures))
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
        let (nodes, quorum) = (self.shared.nodes.len(), self.shared.quorum);
        let tally = |answers: &[Option<Vec<Result<Ownership, BackendError>>>], index: usize| {
            Tally::of(
                answers
                    .iter()
                    .map(|answer| answer.as_ref().and_then(|results| results.get(index))),
            )
        };
        let answers = self.gather_until(
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Renew {
                batch: batch.clone(),
                deadline: Deadline::after(node_timeout),
                reply,
            },
            |answers| {
                (0..requests.len())
                    .all(|index| tally(answers, index).verdict(nodes, quorum).is_some())
            },
        );
        (0..requests.len())
            .map(|index| self.decide("renew", tally(&answers, index)))
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
        let could_have_held = tally.owned + tally.failures.len() >= self.shared.quorum;
        if tally.owned > 0 && could_have_held {
            return Ok(Ownership::Owned);
        }
        self.decide("release", tally)
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
}

impl RedlockBackend {
    /// Raises the fence counters of the granting nodes that issued less than `fence` to
    /// `fence`, without waiting: best effort, as documented on [`RedlockBackend`]. Once every
    /// node of the majority is at `fence`, any later majority, which shares a node with this one,
    /// issues more. In the steady state all counters agree and nothing is written.
    fn write_back_fence(
        &self,
        behind: impl Iterator<Item = usize>,
        key: &Arc<str>,
        fence: u64,
        timeout: Duration,
    ) {
        for node in behind.filter_map(|index| self.shared.nodes.get(index)) {
            node.send(Job::RaiseFence {
                key: key.clone(),
                fence,
                timeout,
            });
        }
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

    #[test]
    fn bad_settings_are_typed_errors() {
        let urls = [
            "redis://127.0.0.1:1",
            "redis://127.0.0.1:2",
            "redis://127.0.0.1:3",
        ];
        assert!(RedlockBackend::connect(&[]).is_err());
        assert!(RedlockBackend::builder(&urls)
            .drift_factor(0.7)
            .build()
            .is_err());
        assert!(RedlockBackend::builder(&urls)
            .workers_per_node(0)
            .build()
            .is_err());
        assert!(RedlockBackend::builder(&urls)
            .node_timeout(Duration::ZERO)
            .build()
            .is_err());
        assert!(RedlockBackend::connect(&["http://nope"]).is_err());
    }

    #[test]
    fn tally_decides_by_majority() {
        let owned: Result<Ownership, BackendError> = Ok(Ownership::Owned);
        let gone: Result<Ownership, BackendError> = Ok(Ownership::NotOwned);
        let failed: Result<Ownership, BackendError> = Err(BackendError::transient("down"));
        let tally = |answers: &[Option<&Result<Ownership, BackendError>>]| {
            Tally::of(answers.iter().copied()).verdict(5, 3)
        };
        let (o, g, f) = (Some(&owned), Some(&gone), Some(&failed));
        assert_eq!(tally(&[o, o, o, f, None]), Some(Ownership::Owned));
        assert_eq!(tally(&[g, g, g, o, o]), Some(Ownership::NotOwned));
        assert_eq!(
            tally(&[o, o, g, f, None]),
            None,
            "undecided: a retry may still reach a majority"
        );
    }
}
