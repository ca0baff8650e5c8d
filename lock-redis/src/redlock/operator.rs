//! The operators' calls on a Redlock: [`inspect`](lock_core::LeaseBackend::inspect) and
//! [`force_release`](lock_core::LeaseBackend::force_release) ask every node, and the answers
//! combine by the majority rule that acquires follow.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{BackendError, KeyState};

use super::node::Job;
use super::quorum::Quorum;
use super::{RedlockBackend, REPLY_GRACE};
use crate::connection::deadline::Deadline;

impl RedlockBackend {
    /// Inspects `key` on every node at once, waits for every answer (each within the node
    /// timeout), and combines them with [`combine_inspections`].
    pub(super) fn inspect_everywhere(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<KeyState, BackendError> {
        let key: Arc<str> = key.into();
        let node_timeout = self.node_budget(timeout);
        let answers = self.gather_until(
            self.all_nodes(),
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::Inspect {
                key: key.clone(),
                deadline: Deadline::after(node_timeout),
                reply,
            },
            // Every answer counts: the fence is the highest of all nodes.
            |_| false,
        );
        combine_inspections(self.shared.quorum, answers)
    }

    /// Deletes `key` on every node at once, whatever its token; `Ok(true)` when any node held
    /// it. Succeeds once a majority of nodes answered (a majority is then free, so an acquire
    /// can succeed); a node that missed it keeps its copy until its TTL.
    pub(super) fn force_release_everywhere(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<bool, BackendError> {
        let key: Arc<str> = key.into();
        let node_timeout = self.node_budget(timeout);
        let answers = self.gather_until(
            self.all_nodes(),
            node_timeout.saturating_add(REPLY_GRACE),
            |reply| Job::ForceRelease {
                key: key.clone(),
                deadline: Deadline::after(node_timeout),
                reply,
            },
            |_| false,
        );
        let quorum = self.shared.quorum;
        let (mut done, mut deleted, mut failures) = (0, false, Vec::new());
        for answer in answers {
            match answer {
                Some(Ok(held)) => {
                    done += 1;
                    deleted |= held;
                }
                Some(Err(error)) => failures.push(Some(error)),
                None => failures.push(None),
            }
        }
        if quorum.reached_by(done) {
            Ok(deleted)
        } else {
            Err(quorum.failure("force release", done, failures))
        }
    }
}

/// What the nodes' answers to an inspection say about the key as a whole, by node index
/// (`None`: no answer in time):
///
/// - **held** when the nodes that hold it (by any token) leave too few free nodes for a
///   majority: no acquire can succeed now. Its remaining TTL is how long until enough of them
///   expire for a majority to be free: the `N - quorum + 1`-th longest of their TTLs;
/// - **free** when a majority of nodes answered that it is free;
/// - otherwise (too many nodes failed to tell) a [`NoQuorum`](super::NoQuorum) error,
///   transient unless permanent refusals alone leave too few nodes.
///
/// The fence is the highest that any answering node reports.
pub(super) fn combine_inspections(
    quorum: Quorum,
    answers: Vec<Option<Result<KeyState, BackendError>>>,
) -> Result<KeyState, BackendError> {
    let mut held: Vec<Option<Duration>> = Vec::new();
    let mut free = 0;
    let mut fence = None;
    let mut failures = Vec::new();
    for answer in answers {
        match answer {
            Some(Ok(state)) => {
                fence = fence.max(state.fence());
                if state.is_held() {
                    held.push(state.remaining());
                } else {
                    free += 1;
                }
            }
            Some(Err(error)) => failures.push(Some(error)),
            None => failures.push(None),
        }
    }
    if quorum.ruled_out_by(held.len()) {
        // Longest first; a key without TTL (`None`) outlasts every other.
        held.sort_by(|a, b| match (a, b) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(a), Some(b)) => b.cmp(a),
        });
        let remaining = held
            .get(quorum.nodes() - quorum.needed())
            .copied()
            .flatten();
        return Ok(KeyState::Held { remaining, fence });
    }
    if quorum.reached_by(free) {
        return Ok(KeyState::Free { last_fence: fence });
    }
    Err(quorum.failure("inspect", free.max(held.len()), failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(ms: u64, fence: u64) -> Option<Result<KeyState, BackendError>> {
        Some(Ok(KeyState::Held {
            remaining: Some(Duration::from_millis(ms)),
            fence: Some(fence),
        }))
    }

    fn free(fence: u64) -> Option<Result<KeyState, BackendError>> {
        Some(Ok(KeyState::Free {
            last_fence: Some(fence),
        }))
    }

    fn failed() -> Option<Result<KeyState, BackendError>> {
        Some(Err(BackendError::transient("down")))
    }

    #[test]
    fn a_majority_decides_and_the_highest_fence_wins() {
        let three = Quorum::of(3);
        assert_eq!(
            combine_inspections(three, vec![held(900, 5), held(700, 7), free(4)]).unwrap(),
            KeyState::Held {
                remaining: Some(Duration::from_millis(700)),
                fence: Some(7)
            },
            "held until the second longest TTL ends"
        );
        assert_eq!(
            combine_inspections(three, vec![held(900, 5), free(6), free(4)]).unwrap(),
            KeyState::Free {
                last_fence: Some(6)
            },
            "one node's leftover does not make a lock"
        );
        assert_eq!(
            combine_inspections(three, vec![held(900, 5), held(800, 5), None]).unwrap(),
            KeyState::Held {
                remaining: Some(Duration::from_millis(800)),
                fence: Some(5)
            }
        );
        let unknown = combine_inspections(three, vec![held(900, 5), free(5), failed()]);
        assert!(
            unknown.unwrap_err().is_transient(),
            "one held, one free, one silent"
        );
    }

    #[test]
    fn with_an_even_count_fewer_holders_block_a_majority() {
        // Four nodes, three needed: two holders leave only two free.
        let four = Quorum::of(4);
        assert_eq!(
            combine_inspections(four, vec![held(300, 1), held(500, 1), free(1), free(1)]).unwrap(),
            KeyState::Held {
                remaining: Some(Duration::from_millis(300)),
                fence: Some(1)
            },
            "free once the shorter of the two expires"
        );
    }

    #[test]
    fn a_key_without_ttl_outlasts_the_others() {
        let no_ttl = Some(Ok(KeyState::Held {
            remaining: None,
            fence: None,
        }));
        let state = combine_inspections(Quorum::of(3), vec![no_ttl.clone(), no_ttl, held(5, 2)]);
        assert_eq!(
            state.unwrap(),
            KeyState::Held {
                remaining: None,
                fence: Some(2)
            }
        );
    }
}
