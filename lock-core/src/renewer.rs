//! The renewer: one named thread per manager that renews every tracked lease when it is due.
//!
//! It owns a [`Schedule`] and reads [`Command`]s from a crossbeam channel. The loop only waits,
//! applies commands, and hands due leases to the backend in batches; every timing decision is the
//! schedule's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::event::{EventHook, LeaseEvent};
use crate::lease::LeaseShared;
use crate::schedule::{AfterFailure, Schedule};
use crate::{BackendError, Clock, LeaseBackend, LeaseRequest, LostReason, Ownership};

/// The longest the renewer lets `Track` and `Untrack` messages gather before reading them.
const COALESCE_WINDOW: Duration = Duration::from_millis(1);

/// A message to the renewer thread.
pub(crate) enum Command {
    /// Start renewing a lease acquired by a request sent at `sent_at`.
    Track {
        lease: Arc<LeaseShared>,
        sent_at: Instant,
    },
    /// Stop renewing a lease (it is being released).
    Untrack(u64),
    /// Reply once every earlier command is applied and every lease due now has been handled.
    Settle(Sender<()>),
    /// Stop the thread.
    Shutdown,
}

pub(crate) struct Renewer {
    pub(crate) backend: Arc<dyn LeaseBackend>,
    pub(crate) clock: Clock,
    pub(crate) hook: Arc<dyn EventHook>,
    pub(crate) schedule: Schedule<Arc<LeaseShared>>,
    pub(crate) batch_size: usize,
}

impl Renewer {
    /// Runs until `Shutdown`, or until every sender is gone.
    pub(crate) fn run(mut self, commands: Receiver<Command>) {
        let mut settled = Vec::new();
        loop {
            let mut churned = false;
            let first = match self.clock.recv_until(&commands, self.schedule.next_due()) {
                Ok(command) => Some(command),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            for command in first.into_iter().chain(commands.try_iter()) {
                match command {
                    Command::Track { lease, sent_at } => {
                        churned = true;
                        let (id, ttl) = (lease.id, lease.ttl);
                        self.schedule.track(id, lease, ttl, sent_at);
                    }
                    Command::Untrack(id) => {
                        churned = true;
                        self.schedule.remove(id);
                    }
                    Command::Settle(reply) => settled.push(reply),
                    Command::Shutdown => return,
                }
            }
            self.renew_due();
            for reply in settled.drain(..) {
                let _ = reply.send(());
            }
            if churned {
                self.coalesce();
            }
        }
    }

    /// After a wake-up caused by leases coming and going, pauses briefly (never past the next
    /// due renewal) so that the next burst of `Track`/`Untrack` messages is read in one go.
    /// Without it, every acquire and release would wake this thread, and waking a thread costs
    /// more than the rest of an in-memory acquire. A virtual clock never pauses.
    fn coalesce(&self) {
        if let Clock::System = self.clock {
            let now = Instant::now();
            let pause = self
                .schedule
                .next_due()
                .map_or(COALESCE_WINDOW, |due| due.saturating_duration_since(now))
                .min(COALESCE_WINDOW);
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Renews every lease due now, one backend call per batch.
    fn renew_due(&mut self) {
        loop {
            let now = self.clock.now();
            let due = self.schedule.pop_due(now, self.batch_size);
            for (_, lease) in &due.expired {
                lease.lose(LostReason::Expired, &*self.hook);
            }
            if due.renew.is_empty() {
                return;
            }
            // The call must end before the first of these leases would be lost.
            let timeout = due
                .renew
                .iter()
                .map(|(_, _, valid_until)| valid_until.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::ZERO);
            let requests: Vec<LeaseRequest<'_>> = due
                .renew
                .iter()
                .map(|(_, lease, _)| LeaseRequest {
                    key: &lease.key,
                    token: lease.token.as_str(),
                    ttl: lease.ttl,
                })
                .collect();
            let mut results = self.backend.renew_batch(&requests, timeout).into_iter();
            let answered = self.clock.now();
            for (id, lease, _) in &due.renew {
                let result = results.next().unwrap_or_else(|| {
                    Err(BackendError::transient(
                        "the backend returned fewer renewal results than requests",
                    ))
                });
                self.apply_renewal(*id, lease, now, answered, result);
            }
        }
    }

    fn apply_renewal(
        &mut self,
        id: u64,
        lease: &LeaseShared,
        sent_at: Instant,
        answered: Instant,
        result: Result<Ownership, BackendError>,
    ) {
        let hook = &*self.hook;
        if lease.is_released() {
            self.schedule.remove(id);
            return;
        }
        match result {
            Ok(Ownership::Owned) => {
                let extended = self
                    .schedule
                    .renewed(id, sent_at)
                    .is_some_and(|valid_until| lease.extend(answered, valid_until, hook));
                if !extended {
                    self.schedule.remove(id);
                }
            }
            Ok(Ownership::NotOwned) => {
                self.schedule.remove(id);
                lease.lose(LostReason::TakenOver, hook);
            }
            Err(error) if !error.is_transient() => {
                self.schedule.remove(id);
                lease.lose(LostReason::Rejected(error), hook);
            }
            Err(error) => {
                hook.on_event(&LeaseEvent::RenewalFailed {
                    key: &lease.key,
                    fence: lease.fence,
                    error: &error,
                });
                match self.schedule.failed(id, answered) {
                    AfterFailure::RetryAt(_) => lease.suspect(answered, hook),
                    AfterFailure::Expired(_) => lease.lose(LostReason::Expired, hook),
                    AfterFailure::Unknown => {}
                }
            }
        }
    }
}
