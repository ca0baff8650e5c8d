//! Acquiring on a majority: ask every node, take the majority's highest fence, and make every
//! node of that majority hold it before the acquire returns.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lock_core::{AcquireOutcome, BackendError, LeaseRequest};

use super::node::Job;
use super::quorum::Quorum;
use super::{RedlockBackend, REPLY_GRACE};
use crate::connection::deadline::Deadline;

/// How far ahead of this machine's clock an acquire proposes its fence: more than the nodes'
/// clocks are expected to run ahead of it, with a call's time in flight.
const PROPOSAL_LEAD: Duration = Duration::from_secs(1);

/// The fence an acquire proposes to every node: this machine's clock in microseconds plus
/// [`PROPOSAL_LEAD`]. A node issues `max(its counter + 1, its clock, the proposal)`, so while
/// the proposal is ahead of the nodes' clocks and of the key's counters (the steady state:
/// every grant of the majority leaves the counters equal), the nodes of a majority issue the
/// same fence and the acquire needs no write-back round trip. The proposal only ever raises a
/// fence, so a wrong clock costs that round trip, never a fence's order. `None` for a clock
/// before 1970 or past 2^53 microseconds (the year 2255).
fn proposed_fence() -> Option<u64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let micros = u64::try_from(now.saturating_add(PROPOSAL_LEAD).as_micros()).ok()?;
    (micros < 1 << 53).then_some(micros)
}

/// The nodes' answers to one acquire, as they stood when a majority granted or the rest failed.
struct Votes {
    /// The granting nodes and the fence each issued. Once they are a majority, no later grant
    /// is seen: the acquire has stopped listening, so it counts only the nodes it confirms.
    granted: Vec<(usize, u64)>,
    /// The remaining TTL of the other holder, for each node that answered "held".
    held: Vec<Option<Duration>>,
    /// An error, or `None` for a node that did not answer in time.
    failures: Vec<Option<BackendError>>,
}

impl RedlockBackend {
    /// See [`RedlockBackend`]'s documentation for the algorithm and its promises.
    pub(super) fn acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        let started = Instant::now();
        let key: Arc<str> = request.key.into();
        let token: Arc<str> = request.token.into();
        let node_timeout = self.node_budget(timeout);
        let quorum = self.shared.quorum;
        let votes = self.ask_for_grants(&key, &token, request.ttl, node_timeout);
        let outcome = if quorum.reached_by(votes.granted.len()) {
            self.confirm_majority(votes, &key, request.ttl, started, node_timeout)
        } else {
            votes.refusal(quorum)
        };
        if !matches!(outcome, Ok(AcquireOutcome::Acquired { .. })) {
            // No majority: leave no trace of our token on any node, including those that
            // granted late or seemed to fail.
            let _ = self.release_everywhere(&key, &token, Some(request.ttl), node_timeout);
        }
        outcome
    }

    /// Asks every node for the key, until a majority granted it or every node answered or
    /// timed out. Latency follows the majority's slowest node.
    fn ask_for_grants(
        &self,
        key: &Arc<str>,
        token: &Arc<str>,
        ttl: Duration,
        node_timeout: Duration,
    ) -> Votes {
        let quorum = self.shared.quorum;
        let proposed = proposed_fence();
        let answers = self.gather_until(
            self.all_nodes(),
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Acquire {
                key: key.clone(),
                token: token.clone(),
                ttl,
                proposed,
                deadline: Deadline::after(node_timeout),
                reply,
            },
            |answers| {
                let granted = answers
                    .iter()
                    .filter(|answer| matches!(answer, Some(Ok(AcquireOutcome::Acquired { .. }))))
                    .count();
                quorum.reached_by(granted)
            },
        );
        let mut votes = Votes {
            granted: Vec::new(),
            held: Vec::new(),
            failures: Vec::new(),
        };
        for (node, answer) in answers.into_iter().enumerate() {
            match answer {
                Some(Ok(AcquireOutcome::Acquired { fence })) => votes.granted.push((node, fence)),
                Some(Ok(AcquireOutcome::Held { remaining })) => votes.held.push(remaining),
                Some(Err(error)) => votes.failures.push(Some(error)),
                None => votes.failures.push(None),
            }
        }
        votes
    }

    /// A majority granted the key: its fence is the highest they issued. Every node of the
    /// majority whose counter is behind is raised to it, and only the nodes that then hold it
    /// are counted; the lease is ours if they are still a majority and validity is left.
    fn confirm_majority(
        &self,
        votes: Votes,
        key: &Arc<str>,
        ttl: Duration,
        started: Instant,
        node_timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        let quorum = self.shared.quorum;
        let fence = votes
            .granted
            .iter()
            .map(|&(_, fence)| fence)
            .max()
            .unwrap_or(0);
        // A node's counter holds the fence it just issued, so only those that issued less are
        // behind. In the steady state every counter agrees and nothing is written.
        let behind: Vec<usize> = votes
            .granted
            .iter()
            .filter(|&&(_, issued)| issued < fence)
            .map(|&(node, _)| node)
            .collect();
        let unconfirmed = self.raise_fences(&behind, key, fence, node_timeout);
        let confirmed = votes.granted.len() - unconfirmed.len();
        if !quorum.reached_by(confirmed) {
            let mut failures = votes.failures;
            failures.extend(unconfirmed);
            return Err(quorum.failure("acquire", confirmed, failures));
        }
        // The same rule the manager applies to the lease (see `drift`), so the two agree.
        let validity_left = self
            .shared
            .drift
            .validity(ttl)
            .is_some_and(|validity| started.elapsed() < validity);
        if !validity_left {
            return Err(BackendError::transient(
                "Redlock acquire: the majority answered after the lease's whole validity had passed",
            ));
        }
        Ok(AcquireOutcome::Acquired { fence })
    }

    /// Raises the fence counters of `nodes` to at least `fence`, and waits for them: the
    /// failure of each node that did not confirm in time (`None` if it did not answer).
    fn raise_fences(
        &self,
        nodes: &[usize],
        key: &Arc<str>,
        fence: u64,
        node_timeout: Duration,
    ) -> Vec<Option<BackendError>> {
        if nodes.is_empty() {
            return Vec::new();
        }
        let mut answers = self.gather_until(
            nodes.iter().copied(),
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::RaiseFence {
                key: key.clone(),
                fence,
                deadline: Deadline::after(node_timeout),
                reply,
            },
            // Every node must confirm.
            |_| false,
        );
        nodes
            .iter()
            .filter_map(|&node| match answers.get_mut(node).and_then(Option::take) {
                Some(Ok(())) => None,
                Some(Err(error)) => Some(Some(error)),
                None => Some(None),
            })
            .collect()
    }
}

impl Votes {
    /// The outcome of an acquire that no majority granted: a permanent error if nodes refusing
    /// for good rule a majority out, else `Held` if another holder has the key somewhere, else
    /// a transient error.
    fn refusal(self, quorum: Quorum) -> Result<AcquireOutcome, BackendError> {
        if !self.held.is_empty() && !quorum.refused_by(&self.failures) {
            let remaining = self.held.into_iter().flatten().min();
            return Ok(AcquireOutcome::Held { remaining });
        }
        Err(quorum.failure("acquire", self.granted.len(), self.failures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn votes(held: usize, failures: Vec<Option<BackendError>>) -> Votes {
        Votes {
            granted: vec![(0, 7)],
            held: (0..held).map(|_| Some(Duration::from_secs(1))).collect(),
            failures,
        }
    }

    #[test]
    fn a_refusing_minority_does_not_hide_another_holder() {
        let three = Quorum::of(3);
        let refused = || Some(BackendError::permanent("WRONGTYPE"));
        let outcome = votes(1, vec![refused()]).refusal(three).unwrap();
        assert!(
            matches!(outcome, AcquireOutcome::Held { .. }),
            "{outcome:?}"
        );
        let error = votes(0, vec![refused(), None]).refusal(three).unwrap_err();
        assert!(
            error.is_transient(),
            "the silent node may come back: {error}"
        );
    }

    #[test]
    fn a_refusing_majority_is_a_permanent_error_even_with_another_holder() {
        let five = Quorum::of(5);
        let refused = || Some(BackendError::permanent("NOAUTH"));
        let error = votes(1, vec![refused(), refused(), refused()])
            .refusal(five)
            .unwrap_err();
        assert!(!error.is_transient(), "{error}");
    }
}
