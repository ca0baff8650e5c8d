//! Counting the nodes' answers: when a majority decides, and which error a call without one
//! returns.

use lock_core::{BackendError, BackendErrorKind, Ownership};

/// How many nodes there are and how many must agree (`N/2 + 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Quorum {
    nodes: usize,
    needed: usize,
}

impl Quorum {
    pub(super) fn of(nodes: usize) -> Quorum {
        Quorum {
            nodes,
            needed: nodes / 2 + 1,
        }
    }

    pub(super) fn nodes(self) -> usize {
        self.nodes
    }

    pub(super) fn needed(self) -> usize {
        self.needed
    }

    /// The fewest answers that can decide a call: a majority agreeing, or enough nodes that
    /// will not agree to rule one out.
    pub(super) fn first_decision(self) -> usize {
        self.needed.min(self.nodes - self.needed + 1)
    }

    /// Whether `agreed` nodes are a majority.
    pub(super) fn reached_by(self, agreed: usize) -> bool {
        agreed >= self.needed
    }

    /// Whether `count` nodes that will not agree leave too few for a majority.
    pub(super) fn ruled_out_by(self, count: usize) -> bool {
        count > self.nodes - self.needed
    }

    /// Whether the permanent errors among `failures` alone leave too few nodes for a majority:
    /// then no retry can succeed. Fewer permanent errors cost what as many dead nodes cost.
    pub(super) fn refused_by(self, failures: &[Option<BackendError>]) -> bool {
        self.ruled_out_by(permanent(failures))
    }

    /// The error of a call that reached no majority with `agreed` nodes: permanent when the
    /// permanent `failures` alone rule a majority out (see [`refused_by`](Self::refused_by)),
    /// transient otherwise, so that the caller retries.
    pub(super) fn failure(
        self,
        operation: &'static str,
        agreed: usize,
        failures: Vec<Option<BackendError>>,
    ) -> BackendError {
        let permanent = permanent(&failures);
        let refused = self.ruled_out_by(permanent);
        let failed = failures.len();
        let mut errors = failures.into_iter().flatten();
        // The error that explains the verdict comes first: a permanent one if that is the kind.
        let first_error = if refused {
            errors.find(|error| !error.is_transient())
        } else {
            errors.next()
        };
        let kind = if refused {
            BackendErrorKind::Permanent
        } else {
            BackendErrorKind::Transient
        };
        BackendError::new(
            kind,
            NoQuorum {
                operation,
                agreed,
                failed,
                permanent,
                nodes: self.nodes,
                quorum: self.needed,
                first_error,
            },
        )
    }
}

/// How many of `failures` are permanent errors.
fn permanent(failures: &[Option<BackendError>]) -> usize {
    failures
        .iter()
        .flatten()
        .filter(|error| !error.is_transient())
        .count()
}

/// Why a Redlock call reached no decision: too few nodes agreed, and the rest failed or did not
/// answer in time. The cause of the [`BackendError`] such a call returns; the error is
/// permanent only when nodes that refused the call for good leave too few for a majority.
#[derive(Debug, thiserror::Error)]
#[error(
    "Redlock {operation}: {agreed} of {nodes} nodes agreed, {quorum} needed ({failed} failed, {permanent} of them permanently)"
)]
pub struct NoQuorum {
    operation: &'static str,
    agreed: usize,
    failed: usize,
    permanent: usize,
    nodes: usize,
    quorum: usize,
    /// The error that explains the verdict (a permanent one for a permanent verdict): the
    /// `source`, so it is not repeated in the message.
    #[source]
    first_error: Option<BackendError>,
}

/// The nodes' answers to one renewal or release.
pub(super) struct Tally {
    pub(super) owned: usize,
    pub(super) not_owned: usize,
    /// An error, or `None` for a node that did not answer in time.
    pub(super) failures: Vec<Option<BackendError>>,
}

impl Tally {
    pub(super) fn of<'a>(
        answers: impl Iterator<Item = Option<&'a Result<Ownership, BackendError>>>,
    ) -> Tally {
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
    /// can bring the token back on enough nodes), `None` otherwise.
    pub(super) fn verdict(&self, quorum: Quorum) -> Option<Ownership> {
        if quorum.reached_by(self.owned) {
            Some(Ownership::Owned)
        } else if quorum.ruled_out_by(self.not_owned) {
            Some(Ownership::NotOwned)
        } else {
            None
        }
    }

    /// Whether the answers still missing cannot change the call's result.
    pub(super) fn settled(&self, quorum: Quorum) -> bool {
        self.verdict(quorum).is_some() || quorum.refused_by(&self.failures)
    }

    /// The call's result: the majority's verdict, or else an error (see [`Quorum::failure`]).
    pub(super) fn decide(
        self,
        quorum: Quorum,
        operation: &'static str,
    ) -> Result<Ownership, BackendError> {
        match self.verdict(quorum) {
            Some(ownership) => Ok(ownership),
            None => Err(quorum.failure(operation, self.owned, self.failures)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = Result<Ownership, BackendError>;

    fn decide(quorum: Quorum, answers: &[Option<&Answer>]) -> Result<Ownership, BackendError> {
        Tally::of(answers.iter().copied()).decide(quorum, "renew")
    }

    #[test]
    fn no_call_is_decided_by_fewer_answers_than_the_first_decision() {
        for nodes in 1..=7 {
            let quorum = Quorum::of(nodes);
            let first = quorum.first_decision();
            assert!(quorum.reached_by(first) || quorum.ruled_out_by(first));
            assert!(!quorum.reached_by(first - 1) && !quorum.ruled_out_by(first - 1));
        }
        assert_eq!(Quorum::of(3).first_decision(), 2);
        assert_eq!(Quorum::of(4).first_decision(), 2);
        assert_eq!(Quorum::of(5).first_decision(), 3);
    }

    #[test]
    fn tally_decides_by_majority() {
        let owned: Answer = Ok(Ownership::Owned);
        let gone: Answer = Ok(Ownership::NotOwned);
        let failed: Answer = Err(BackendError::transient("down"));
        let (o, g, f) = (Some(&owned), Some(&gone), Some(&failed));
        let five = Quorum::of(5);
        assert_eq!(decide(five, &[o, o, o, f, None]).unwrap(), Ownership::Owned);
        assert_eq!(decide(five, &[g, g, g, o, o]).unwrap(), Ownership::NotOwned);
        let undecided = decide(five, &[o, o, g, f, None]).unwrap_err();
        assert!(
            undecided.is_transient(),
            "a retry may still reach a majority"
        );
    }

    use crate::errors::tests::chain;

    #[test]
    fn permanent_errors_count_as_failed_nodes_until_they_rule_out_a_majority() {
        let owned: Answer = Ok(Ownership::Owned);
        let gone: Answer = Ok(Ownership::NotOwned);
        let refused: Answer = Err(BackendError::permanent("WRONGTYPE"));
        let failed: Answer = Err(BackendError::transient("down"));
        let (o, g, r, f) = (Some(&owned), Some(&gone), Some(&refused), Some(&failed));
        let three = Quorum::of(3);
        assert_eq!(decide(three, &[r, o, o]).unwrap(), Ownership::Owned);
        assert_eq!(decide(three, &[r, g, g]).unwrap(), Ownership::NotOwned);
        assert!(decide(three, &[r, o, f]).unwrap_err().is_transient());
        assert!(decide(three, &[r, o, None]).unwrap_err().is_transient());
        let refusal = decide(three, &[r, r, o]).unwrap_err();
        assert!(!refusal.is_transient());
        let shown = chain(&refusal);
        assert!(shown.contains("2 failed, 2 of them permanently"), "{shown}");
        assert!(shown.contains("WRONGTYPE"), "{shown}");
        // The first permanent error explains a permanent verdict, even after a transient one.
        let five = Quorum::of(5);
        let refusal = decide(five, &[f, r, r, r, o]).unwrap_err();
        assert!(!refusal.is_transient());
        assert!(chain(&refusal).contains("WRONGTYPE"), "{refusal}");
        assert!(Tally::of([r, r, None].into_iter()).settled(three));
        assert!(!Tally::of([r, o, None].into_iter()).settled(three));
    }
}
