//! The renewer: one named thread per manager that renews every tracked lease when it is due.
//!
//! It owns a [`Schedule`] and reads [`Command`]s from a crossbeam channel. The loop only waits,
//! applies commands, and hands due leases to the backend in batches; every timing decision is the
//! schedule's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::clock::saturating_add;
use crate::event::{EventHook, LeaseEvent};
use crate::lease::{LeaseShared, TokenText};
use crate::schedule::{nanos, AfterFailure, InFlight, Schedule};
use crate::{BackendError, Clock, LeaseBackend, LeaseRequest, LostReason, Ownership};

/// A message to the renewer thread.
pub(crate) enum Command {
    /// Start renewing a lease acquired by a request sent at `sent_at`.
    Track {
        lease: Arc<LeaseShared>,
        sent_at: Instant,
    },
    /// Stop renewing a lease (it is being released).
    Untrack(Arc<LeaseShared>),
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

/// How many commands may wait before the renewer is woken to read them, whatever their due
/// times: this bounds the memory held by released leases that the renewer has not forgotten yet.
const QUEUE_WAKE_LEN: usize = 1024;

/// The longest the renewer sleeps with no lease scheduled.
const IDLE_WAKE_INTERVAL: Duration = Duration::from_secs(1);

/// The renewer's mailbox: commands, a doorbell, and when the renewer plans to wake up.
///
/// Commands go into an unbounded channel that the renewer does not block on; it blocks on the
/// doorbell. A sender rings only when the renewer must act before it would wake anyway (a lease
/// due earlier than its planned wake-up, a `Settle`, a `Shutdown`) or when the queue grows long.
/// Waking a thread costs more than an in-memory acquire, so most acquires and releases ring
/// nothing.
pub(crate) struct Mailbox {
    commands: Sender<Command>,
    doorbell: Sender<()>,
    plan: Arc<WakePlan>,
}

/// The renewer's side of a [`Mailbox`]: it ends when the manager drops the mailbox.
pub(crate) struct Inbox {
    commands: Receiver<Command>,
    doorbell: Receiver<()>,
    plan: Arc<WakePlan>,
}

/// When a command needs the renewer awake.
pub(crate) enum Wake {
    /// At once.
    Now,
    /// By this time: ring only if the renewer plans to sleep past it.
    Before(Instant),
    /// Whenever it next wakes (a released lease that comes due first is skipped anyway).
    Lazily,
}

/// When the renewer plans to wake up, shared by the mailbox and the inbox.
struct WakePlan {
    /// Nanoseconds after `epoch`.
    wakes_at: AtomicU64,
    epoch: Instant,
}

impl WakePlan {
    fn nanos(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch))
    }
}

impl Mailbox {
    /// A mailbox whose times count from `epoch` (the manager clock's time at its start).
    pub(crate) fn new(epoch: Instant) -> (Mailbox, Inbox) {
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (doorbell, doorbell_rx) = crossbeam_channel::bounded(1);
        let plan = Arc::new(WakePlan {
            wakes_at: AtomicU64::new(0),
            epoch,
        });
        let mailbox = Mailbox {
            commands,
            doorbell,
            plan: plan.clone(),
        };
        let inbox = Inbox {
            commands: command_rx,
            doorbell: doorbell_rx,
            plan,
        };
        (mailbox, inbox)
    }

    /// Sends `command`, ringing the doorbell as `wake` says, or when the queue is long.
    pub(crate) fn send(&self, command: Command, wake: Wake) {
        if self.commands.send(command).is_err() {
            return; // the renewer is gone
        }
        let plan = &self.plan;
        let urgent = match wake {
            Wake::Now => true,
            Wake::Before(due) => plan.nanos(due) < plan.wakes_at.load(Ordering::SeqCst),
            Wake::Lazily => false,
        };
        if urgent || self.commands.len() >= QUEUE_WAKE_LEN {
            // Full means already rung: one ring wakes the renewer for every queued command.
            let _ = self.doorbell.try_send(());
        }
    }
}

impl Inbox {
    /// Waits until the doorbell rings or the clock reaches `next_due` (with nothing due,
    /// [`IDLE_WAKE_INTERVAL`] from now); false once the manager is gone.
    fn wait(&self, clock: &Clock, next_due: Option<Instant>) -> bool {
        // With nothing scheduled, still wake within `IDLE_WAKE_INTERVAL`: a lease tracked
        // meanwhile then rings only if it falls due sooner. Sleeping until rung instead would
        // make the first acquire after every drain ring (a system call) when leases come and go
        // quickly, as they do in a loop of acquire and release.
        let wake_at = next_due.unwrap_or_else(|| saturating_add(clock.now(), IDLE_WAKE_INTERVAL));
        self.plan
            .wakes_at
            .store(self.plan.nanos(wake_at), Ordering::SeqCst);
        // A sender that read the old wake-up time before the store above may not have rung:
        // whatever it sent is in the queue by now, so look before sleeping.
        if !self.commands.is_empty() {
            return true;
        }
        !matches!(
            clock.recv_until(&self.doorbell, Some(wake_at)),
            Err(RecvTimeoutError::Disconnected)
        )
    }
}

impl Renewer {
    /// Runs until `Shutdown`, or until the manager is gone.
    pub(crate) fn run(mut self, inbox: Inbox) {
        let mut settled = Vec::new();
        loop {
            for command in inbox.commands.try_iter() {
                match command {
                    Command::Track { lease, sent_at } => self.schedule.track(lease, sent_at),
                    Command::Untrack(lease) => {
                        self.schedule.remove(&lease);
                    }
                    Command::Settle(reply) => settled.push(reply),
                    Command::Shutdown => return,
                }
            }
            self.renew_due();
            for reply in settled.drain(..) {
                let _ = reply.send(());
            }
            if !inbox.wait(&self.clock, self.schedule.next_due()) {
                return;
            }
        }
    }
    /// Renews every lease due now, one backend call per batch.
    fn renew_due(&mut self) {
        loop {
            let now = self.clock.now();
            let due = self.schedule.pop_due(now, self.batch_size);
            for lease in &due.expired {
                lease.lose(LostReason::Expired, &*self.hook);
            }
            if due.renew.is_empty() {
                return;
            }
            // The call must end before the first of these leases would be lost.
            let timeout = due
                .renew
                .iter()
                .map(|lease| lease.valid_until.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::ZERO);
            let tokens: Vec<TokenText> = due
                .renew
                .iter()
                .map(|lease| lease.item.token.text())
                .collect();
            let requests: Vec<LeaseRequest<'_>> = due
                .renew
                .iter()
                .zip(&tokens)
                .map(|(lease, token)| LeaseRequest {
                    key: &lease.item.key,
                    token: token.as_str(),
                    ttl: lease.item.ttl(),
                })
                .collect();
            let mut results = self.backend.renew_batch(&requests, timeout).into_iter();
            let answered = self.clock.now();
            for lease in due.renew {
                let result = results.next().unwrap_or_else(|| {
                    Err(BackendError::transient(
                        "the backend returned fewer renewal results than requests",
                    ))
                });
                self.apply_renewal(lease, now, answered, result);
            }
        }
    }

    fn apply_renewal(
        &mut self,
        in_flight: InFlight<Arc<LeaseShared>>,
        sent_at: Instant,
        answered: Instant,
        result: Result<Ownership, BackendError>,
    ) {
        let hook = &*self.hook;
        let lease = Arc::clone(&in_flight.item);
        if lease.is_released() {
            self.schedule.remove(&lease);
            return;
        }
        match result {
            Ok(Ownership::Owned) => {
                let extended = self
                    .schedule
                    .renewed(in_flight, sent_at)
                    .is_some_and(|valid_until| lease.extend(answered, valid_until, hook));
                if !extended {
                    self.schedule.remove(&lease);
                }
            }
            Ok(Ownership::NotOwned) => {
                self.schedule.remove(&lease);
                lease.lose(LostReason::TakenOver, hook);
            }
            Err(error) if !error.is_transient() => {
                self.schedule.remove(&lease);
                lease.lose(LostReason::Rejected(error), hook);
            }
            Err(error) => {
                hook.on_event(&LeaseEvent::RenewalFailed {
                    key: &lease.key,
                    fence: lease.fence,
                    error: &error,
                });
                match self.schedule.failed(in_flight, answered) {
                    AfterFailure::RetryAt(_) => lease.suspect(answered, hook),
                    AfterFailure::Expired => lease.lose(LostReason::Expired, hook),
                    AfterFailure::Unknown => {}
                }
            }
        }
    }
}
