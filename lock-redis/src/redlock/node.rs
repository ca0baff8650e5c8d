//! One master of a Redlock: its backend, and the worker threads that call it for the Redlock's
//! jobs and retry the releases it missed.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lock_core::{AcquireOutcome, BackendError, KeyState, LeaseBackend, LeaseRequest, Ownership};
use parking_lot::Mutex;

use super::handoff::{self, Empty, Sender};
use crate::connection::deadline::Deadline;
use crate::{RedisBackend, RedisBackendError};

/// How often idle workers retry the releases their node missed.
const CLEANUP_INTERVAL: Duration = Duration::from_millis(100);
/// How long a missed release is retried when the lease's TTL is unknown.
const CLEANUP_UNKNOWN_TTL: Duration = Duration::from_secs(600);
/// The most missed releases a node remembers; the oldest are forgotten first (their keys
/// expire by their TTL anyway).
const CLEANUP_CAPACITY: usize = 10_000;

/// One master: its backend, and the workers that call it.
pub(super) struct Node {
    pub(super) backend: RedisBackend,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts `workers` threads serving the jobs sent to node `index`.
    pub(super) fn start(
        index: usize,
        backend: RedisBackend,
        workers: usize,
        node_timeout: Duration,
    ) -> Result<Node, RedisBackendError> {
        let (jobs, queue) = handoff::queue::<Job>();
        let cleanup = Arc::new(Cleanup::default());
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (queue, backend, cleanup) = (queue.clone(), backend.clone(), cleanup.clone());
            let handle = std::thread::Builder::new()
                .name(format!("redlock-node-{index}"))
                .spawn(move || loop {
                    match queue.recv_timeout(CLEANUP_INTERVAL) {
                        Ok(job) => job.run(index, &backend, &cleanup),
                        Err(Empty::TimedOut) => cleanup.retry(&backend, node_timeout),
                        Err(Empty::Closed) => return,
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

    pub(super) fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            jobs.send(job);
        }
    }

    /// Closes the queue: the workers end once their current call returns.
    pub(super) fn close(&mut self) {
        self.jobs = None;
    }

    /// Waits for the workers to end (not for the calling thread, if it is one of them).
    pub(super) fn join(&mut self) {
        for worker in self.workers.drain(..) {
            if worker.thread().id() != std::thread::current().id() {
                let _ = worker.join();
            }
        }
    }
}

/// A renewal request owned by a job: key, token and TTL.
pub(super) type OwnedRequest = (Box<str>, Box<str>, Duration);

/// Where a job's answer goes, tagged with the node's index.
pub(super) type Reply<T> = Sender<(usize, T)>;

/// A call for one node's workers. A job still queued when its deadline passes is dropped: the
/// caller has stopped listening.
pub(super) enum Job {
    Acquire {
        key: Arc<str>,
        token: Arc<str>,
        ttl: Duration,
        /// The fence to issue at least, if granted.
        proposed: Option<u64>,
        deadline: Deadline,
        reply: Reply<Result<AcquireOutcome, BackendError>>,
    },
    /// Redlock's fence write-back: raises the node's counter to at least `fence`.
    RaiseFence {
        key: Arc<str>,
        fence: u64,
        deadline: Deadline,
        reply: Reply<Result<(), BackendError>>,
    },
    Renew {
        batch: Arc<[OwnedRequest]>,
        deadline: Deadline,
        reply: Reply<Vec<Result<Ownership, BackendError>>>,
    },
    Release {
        key: Arc<str>,
        token: Arc<str>,
        /// How long the key can live: a release that fails is retried until then.
        ttl: Option<Duration>,
        timeout: Duration,
        reply: Reply<Result<Ownership, BackendError>>,
    },
    /// An operator's look at the key on this node.
    Inspect {
        key: Arc<str>,
        deadline: Deadline,
        reply: Reply<Result<KeyState, BackendError>>,
    },
    /// An operator's deletion of the key on this node, whatever its token.
    ForceRelease {
        key: Arc<str>,
        deadline: Deadline,
        reply: Reply<Result<bool, BackendError>>,
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
                proposed,
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
                reply.send((
                    index,
                    backend.acquire_proposing(&request, proposed, timeout),
                ));
            }
            Job::RaiseFence {
                key,
                fence,
                deadline,
                reply,
            } => {
                let Some(timeout) = time_left(&deadline) else {
                    return;
                };
                reply.send((index, backend.raise_fence(&key, fence, timeout)));
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
                reply.send((index, backend.renew_batch(&requests, timeout)));
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
                reply.send((index, result));
            }
            Job::Inspect {
                key,
                deadline,
                reply,
            } => {
                let Some(timeout) = time_left(&deadline) else {
                    return;
                };
                reply.send((index, backend.inspect(&key, timeout)));
            }
            Job::ForceRelease {
                key,
                deadline,
                reply,
            } => {
                let Some(timeout) = time_left(&deadline) else {
                    return;
                };
                reply.send((index, backend.force_release(&key, timeout)));
            }
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
