//! The renewer: one named thread per manager that keeps every tracked lease's time, and its
//! I/O worker, which makes the backend calls.
//!
//! The renewer owns a [`Schedule`] and reads [`Command`]s from a crossbeam channel; new leases
//! reach it through a [`Handoff`], which a release takes them back from if the renewer has not
//! taken them yet. It never blocks on the backend: it hands due leases to its worker in batches
//! (one `renew_batch` call each) and, while a batch is in flight, watches the end of each of its
//! leases' validity, so a loss is reported on time however long another call takes. The loop only waits, applies
//! commands and answers, and sends batches; the due times come from the schedule's rules, the
//! validity from each lease's state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::clock::saturating_add;
use crate::event::{EventHook, LeaseEvent};
use crate::handoff::Handoff;
use crate::schedule::{nanos, renewal_due, retry_due, Schedule};
use crate::state::{LeaseShared, Token, TokenText};
use crate::stats::Counters;
use crate::{BackendError, Clock, LeaseBackend, LeaseRequest, LostReason, Ownership};

/// The name of the renewer's I/O worker thread (Linux shows its first 15 bytes).
pub(crate) const WORKER_THREAD_NAME: &str = "lease-renew-io";

/// A message to the renewer thread.
pub(crate) enum Command {
    /// Stop renewing a lease that the renewer took from the hand-off (it is being released).
    Untrack(Arc<LeaseShared>),
    /// The worker's answer to a batch.
    Answered(Answer),
    /// Give back, best effort, a key that a failed acquire may have taken for `token`.
    CleanUp(CleanUp),
    /// Set a lease's TTL now: [`Lease::extend`](crate::Lease::extend).
    Extend(Extension),
    /// The worker's answer to an extend, whose request was sent at the instant given.
    Extended(Extension, Instant, Result<Ownership, BackendError>),
    /// The worker has tried a clean-up: `Some` when it failed and may be tried again.
    CleanedUp(Option<CleanUp>),
    /// Answer whether `key` is held by a lease of this manager stamped `holder`, neither
    /// released nor lost nor past its validity: once the leases handed off before are taken.
    HeldBy {
        key: Box<str>,
        holder: u64,
        reply: Sender<bool>,
    },
    /// Reply once every earlier command is applied, every lease due now has been handled (its
    /// renewal answered), and every clean-up asked for is done.
    Settle(Sender<()>),
    /// Stop the thread.
    Shutdown,
}

/// What the worker does: one backend call each.
enum Job {
    Renew(Batch),
    CleanUp(CleanUp),
    Extend(Extension),
}

/// A lease to renew at once with a new TTL, and where to say how it went (once the lease's
/// validity and its place on the schedule follow the new TTL).
pub(crate) struct Extension {
    pub(crate) lease: Arc<LeaseShared>,
    pub(crate) ttl: Duration,
    /// What the backend's drift rule leaves of `ttl`.
    pub(crate) validity: Duration,
    /// The call must end before the lease would be lost.
    pub(crate) timeout: Duration,
    pub(crate) reply: Sender<Result<Ownership, BackendError>>,
}

/// A key to give back for a token, with the backend's own timeouts, until `until` (when the
/// key has expired by itself anyway).
pub(crate) struct CleanUp {
    pub(crate) key: Box<str>,
    pub(crate) token: Token,
    pub(crate) until: Instant,
    /// Attempts made so far.
    pub(crate) attempts: u32,
}

/// The pause before the clean-up attempt after `attempts` failed ones: 50 ms, doubling, at most
/// 2 s.
fn clean_up_delay(attempts: u32) -> Duration {
    Duration::from_millis(50)
        .saturating_mul(1 << attempts.min(6))
        .min(Duration::from_secs(2))
}

/// Leases whose renewal goes to the backend in one call, sent at `sent_at`.
struct Batch {
    leases: Vec<Arc<LeaseShared>>,
    sent_at: Instant,
    /// The call must end before the first of these leases would be lost.
    timeout: Duration,
}

/// A batch and the backend's results, one per lease.
pub(crate) struct Answer {
    leases: Vec<Arc<LeaseShared>>,
    /// The validity of the TTL each lease's request asked for.
    validities: Vec<Duration>,
    sent_at: Instant,
    results: Vec<Result<Ownership, BackendError>>,
}

/// What a renewer needs; see [`start`].
pub(crate) struct RenewerSettings {
    pub(crate) backend: Arc<dyn LeaseBackend>,
    pub(crate) clock: Clock,
    pub(crate) hook: Arc<dyn EventHook>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) renew_fraction: f64,
    pub(crate) batch_size: usize,
    pub(crate) thread_name: &'static str,
}

/// Starts a renewer thread and its worker; returns the renewer's mailbox and its handle.
pub(crate) fn start(settings: RenewerSettings) -> std::io::Result<(Mailbox, JoinHandle<()>)> {
    let epoch = settings.clock.now();
    let (mailbox, inbox) = Mailbox::new(epoch);
    let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
    let worker = {
        let (backend, mailbox) = (settings.backend.clone(), mailbox.clone());
        let clock = settings.clock.clone();
        std::thread::Builder::new()
            .name(WORKER_THREAD_NAME.into())
            .spawn(move || work(&*backend, &clock, &queue, &mailbox))?
    };
    let renewer = Renewer {
        backend_jobs: jobs,
        clock: settings.clock,
        hook: settings.hook,
        counters: settings.counters,
        schedule: Schedule::new(epoch),
        renew_fraction: settings.renew_fraction,
        batch_size: settings.batch_size,
        in_flight: 0,
        renewing: 0,
        waiting: VecDeque::new(),
        clean_ups: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name(settings.thread_name.into())
        .spawn(move || {
            renewer.run(&inbox);
            // The worker ends once its last batch is answered: the renewer dropped its sender.
            let _ = worker.join();
        })?;
    Ok((mailbox, thread))
}

/// The worker's loop: one backend call per job, answered through the mailbox.
fn work(backend: &dyn LeaseBackend, clock: &Clock, jobs: &Receiver<Job>, mailbox: &Mailbox) {
    for job in jobs {
        let answer = match job {
            Job::Renew(batch) => Command::Answered(renew(backend, batch)),
            Job::Extend(extension) => {
                let sent_at = clock.now();
                let result = extend(backend, &extension);
                if let Ok(Ownership::Owned) = result {
                    // Before the next call: every renewal from now on asks for the new TTL.
                    extension.lease.set_ttl(extension.ttl);
                }
                Command::Extended(extension, sent_at, result)
            }
            Job::CleanUp(mut clean_up) => {
                let token = clean_up.token.text();
                clean_up.attempts += 1;
                match backend.release(&clean_up.key, token.as_str(), Duration::MAX) {
                    Err(error) if error.is_transient() => {
                        tracing::debug!(key = &*clean_up.key, %error, "clean-up after a failed acquire failed; trying again");
                        Command::CleanedUp(Some(clean_up))
                    }
                    Err(error) => {
                        tracing::debug!(key = &*clean_up.key, %error, "could not clean up after a failed acquire; the key expires after its TTL");
                        Command::CleanedUp(None)
                    }
                    Ok(_) => Command::CleanedUp(None),
                }
            }
        };
        mailbox.send(answer, Wake::Now);
    }
}

/// Renews one lease with a new TTL: a batch of one.
fn extend(backend: &dyn LeaseBackend, extension: &Extension) -> Result<Ownership, BackendError> {
    let token = extension.lease.token.text();
    let request = LeaseRequest {
        key: &extension.lease.key,
        token: token.as_str(),
        ttl: extension.ttl,
    };
    backend
        .renew_batch(std::slice::from_ref(&request), extension.timeout)
        .pop()
        .unwrap_or_else(|| {
            Err(BackendError::transient(
                "the backend returned no renewal result for a batch of one",
            ))
        })
}

/// Renews a batch in one `renew_batch` call.
fn renew(backend: &dyn LeaseBackend, batch: Batch) -> Answer {
    let tokens: Vec<TokenText> = batch
        .leases
        .iter()
        .map(|lease| lease.token.text())
        .collect();
    let requests: Vec<LeaseRequest<'_>> = batch
        .leases
        .iter()
        .zip(&tokens)
        .map(|(lease, token)| LeaseRequest {
            key: &lease.key,
            token: token.as_str(),
            ttl: lease.ttl(),
        })
        .collect();
    // On this thread, which alone changes a lease's TTL: each matches its request's.
    let drift = backend.drift();
    let validities = requests
        .iter()
        .map(|request| drift.validity(request.ttl).unwrap_or_default())
        .collect();
    let results = backend.renew_batch(&requests, batch.timeout);
    Answer {
        leases: batch.leases,
        validities,
        sent_at: batch.sent_at,
        results,
    }
}

struct Renewer {
    backend_jobs: Sender<Job>,
    clock: Clock,
    hook: Arc<dyn EventHook>,
    counters: Arc<Counters>,
    schedule: Schedule<Arc<LeaseShared>>,
    renew_fraction: f64,
    batch_size: usize,
    /// Jobs sent to the worker and not answered yet.
    in_flight: usize,
    /// Renewal batches with the worker.
    renewing: usize,
    /// Leases due for renewal, in due order, each with the end of its validity (and watched
    /// until then), waiting for a batch: see [`Renewer::send_due`].
    waiting: VecDeque<(Arc<LeaseShared>, Instant)>,
    /// Clean-ups that failed, and when to try each again (few: one per failed acquire).
    clean_ups: Vec<(Instant, CleanUp)>,
}

/// How many commands, or new leases, may wait before the renewer is woken to take them,
/// whatever their due times: this bounds the memory held by released leases that the renewer
/// has not forgotten yet.
const QUEUE_WAKE_LEN: usize = 1024;

/// The most renewal batches with the worker at once: one in its call, and a full one ready.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// The longest the renewer sleeps with no lease scheduled.
const IDLE_WAKE_INTERVAL: Duration = Duration::from_secs(1);

/// The renewer's mailbox: commands, new leases, a doorbell, and when the renewer plans to wake
/// up.
///
/// Commands go into an unbounded channel and new leases into a [`Handoff`], neither of which
/// the renewer blocks on; it blocks on the doorbell, and takes both whenever it wakes. A sender
/// rings only when the renewer must act before it would wake anyway (a lease due earlier than
/// its planned wake-up, a `Settle`, a `Shutdown`) or when the queue grows long. Waking a thread
/// costs more than an in-memory acquire, so most acquires and releases ring nothing, and a
/// lease released before the renewer wakes sends nothing at all.
#[derive(Clone)]
pub(crate) struct Mailbox {
    commands: Sender<Command>,
    doorbell: Sender<()>,
    shared: Arc<MailboxShared>,
}

/// The renewer's side of a [`Mailbox`]: it ends when the manager drops the mailbox.
pub(crate) struct Inbox {
    commands: Receiver<Command>,
    doorbell: Receiver<()>,
    shared: Arc<MailboxShared>,
}

/// When a command needs the renewer awake.
pub(crate) enum Wake {
    /// At once.
    Now,
    /// Whenever it next wakes (a released lease that comes due first is skipped anyway).
    Lazily,
}

/// What the mailbox and the inbox share: new leases, and when the renewer plans to wake up.
struct MailboxShared {
    new_leases: Handoff<Arc<LeaseShared>>,
    /// Nanoseconds after `epoch`.
    wakes_at: AtomicU64,
    epoch: Instant,
}

impl MailboxShared {
    fn nanos(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch))
    }
}

impl Mailbox {
    /// A mailbox whose times count from `epoch` (the manager clock's time at its start).
    fn new(epoch: Instant) -> (Mailbox, Inbox) {
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (doorbell, doorbell_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(MailboxShared {
            new_leases: Handoff::new(),
            wakes_at: AtomicU64::new(0),
            epoch,
        });
        let mailbox = Mailbox {
            commands,
            doorbell,
            shared: shared.clone(),
        };
        let inbox = Inbox {
            commands: command_rx,
            doorbell: doorbell_rx,
            shared,
        };
        (mailbox, inbox)
    }

    /// Sends `command`, ringing the doorbell as `wake` says, or when the queue is long.
    pub(crate) fn send(&self, command: Command, wake: Wake) {
        if self.commands.send(command).is_err() {
            return; // the renewer is gone
        }
        let urgent = match wake {
            Wake::Now => true,
            Wake::Lazily => false,
        };
        self.ring_if(urgent || self.commands.len() >= QUEUE_WAKE_LEN);
    }

    /// Hands a new lease to the renewer, to be renewed first at `due`; rings the doorbell only
    /// if the renewer plans to sleep past `due`, or when many leases wait.
    pub(crate) fn track(&self, lease: Arc<LeaseShared>, due: Instant) {
        let shared = &*self.shared;
        let waiting = shared.new_leases.push(lease, due);
        // Read after the push: a renewer that found the hand-off empty before sleeping had
        // published its plan first, so this reads that plan or a later one (see
        // `Handoff::is_empty`).
        let late = shared.nanos(due) < shared.wakes_at.load(Ordering::SeqCst);
        self.ring_if(late || waiting >= QUEUE_WAKE_LEN);
    }

    /// Stops renewing a lease that is being released: takes it back from the hand-off, or, if
    /// the renewer has taken it, tells the renewer to forget it whenever it next wakes.
    pub(crate) fn untrack(&self, lease: &Arc<LeaseShared>) {
        if !self.shared.new_leases.take_back(lease) {
            self.send(Command::Untrack(lease.clone()), Wake::Lazily);
        }
    }

    fn ring_if(&self, ring: bool) {
        if ring {
            // Full means already rung: one ring wakes the renewer for everything queued.
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
        let shared = &*self.shared;
        shared
            .wakes_at
            .store(shared.nanos(wake_at), Ordering::SeqCst);
        // A sender that read the old wake-up time before the store above may not have rung:
        // whatever it sent is queued or handed off by now, so look before sleeping.
        if !self.commands.is_empty() || !shared.new_leases.is_empty() {
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
    fn run(mut self, inbox: &Inbox) {
        let mut settled = Vec::new();
        let mut new_leases = Vec::new();
        let mut held_by = Vec::new();
        loop {
            for command in inbox.commands.try_iter() {
                match command {
                    Command::Untrack(lease) => {
                        self.schedule.remove(&lease);
                    }
                    Command::Answered(answer) => {
                        self.in_flight = self.in_flight.saturating_sub(1);
                        self.renewing = self.renewing.saturating_sub(1);
                        self.apply(answer);
                    }
                    Command::CleanUp(clean_up) => self.send_clean_up(clean_up),
                    Command::Extend(extension) => {
                        if let Err(error) = self.backend_jobs.send(Job::Extend(extension)) {
                            if let Job::Extend(extension) = error.into_inner() {
                                let _ = extension.reply.send(Err(BackendError::transient(
                                    "the renewer's worker has stopped",
                                )));
                            }
                        } else {
                            self.in_flight += 1;
                        }
                    }
                    Command::Extended(extension, sent_at, result) => {
                        self.in_flight = self.in_flight.saturating_sub(1);
                        self.apply_extension(extension, sent_at, result);
                    }
                    Command::CleanedUp(again) => {
                        self.in_flight = self.in_flight.saturating_sub(1);
                        if let Some(clean_up) = again {
                            let at =
                                saturating_add(self.clock.now(), clean_up_delay(clean_up.attempts));
                            if at < clean_up.until {
                                self.clean_ups.push((at, clean_up));
                            }
                        }
                    }
                    Command::Settle(reply) => settled.push(reply),
                    Command::HeldBy { key, holder, reply } => held_by.push((key, holder, reply)),
                    Command::Shutdown => return,
                }
            }
            // After the commands: a lease handed off before a `Settle` was sent is taken before
            // it is answered. An `Untrack` only comes for a lease taken (and tracked) before.
            inbox.shared.new_leases.take_all(&mut new_leases);
            for (lease, due) in new_leases.drain(..) {
                self.schedule.track(lease, due);
            }
            if !held_by.is_empty() {
                let now = self.clock.now();
                for (key, holder, reply) in held_by.drain(..) {
                    let held = self.schedule.items().any(|lease| {
                        lease.holder == holder && lease.key == key && lease.is_valid_at(now)
                    });
                    let _ = reply.send(held);
                }
            }
            self.send_due();
            self.retry_clean_ups();
            if self.in_flight == 0 && self.waiting.is_empty() {
                for reply in settled.drain(..) {
                    let _ = reply.send(());
                }
            }
            let retry = self.clean_ups.iter().map(|(at, _)| *at).min();
            let next = match (self.schedule.next_due(), retry) {
                (Some(due), Some(retry)) => Some(due.min(retry)),
                (due, retry) => due.or(retry),
            };
            if !inbox.wait(&self.clock, next) {
                return;
            }
        }
    }

    /// Hands a clean-up to the worker.
    fn send_clean_up(&mut self, clean_up: CleanUp) {
        if self.backend_jobs.send(Job::CleanUp(clean_up)).is_ok() {
            self.in_flight += 1;
        }
    }

    /// Sends the clean-ups whose next attempt is due.
    fn retry_clean_ups(&mut self) {
        if self.clean_ups.is_empty() {
            return;
        }
        let now = self.clock.now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.clean_ups)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.clean_ups = later;
        for (_, clean_up) in due {
            self.send_clean_up(clean_up);
        }
    }

    /// Reports the in-flight leases whose validity ran out, watches every lease due now until
    /// the end of its validity, and sends batches of them to the worker.
    ///
    /// A batch goes when none is with the worker, and a second one only when it is full: the
    /// worker makes one call at a time, so under load the leases that come due while a call
    /// runs go together in the next, instead of in many small calls queued behind it, and a
    /// full batch waiting behind the call keeps the worker busy.
    fn send_due(&mut self) {
        let hook = &*self.hook;
        let now = self.clock.now();
        loop {
            let due = self.schedule.pop_due(now, self.batch_size);
            for lease in &due.overdue {
                lease.expire_if_due(now, hook);
            }
            if due.renew.is_empty() && due.overdue.is_empty() {
                break;
            }
            for lease in due.renew {
                // Lost and released leases leave the schedule here.
                let Some(valid_until) = lease.renewable_until(now, hook) else {
                    continue;
                };
                self.schedule.watch_in_flight(lease.clone(), valid_until);
                self.waiting.push_back((lease, valid_until));
            }
        }
        while self.renewing == 0
            || (self.renewing < MAX_BATCHES_IN_FLIGHT && self.waiting.len() >= self.batch_size)
        {
            if !self.send_waiting(now) {
                return;
            }
        }
    }

    /// Sends the first `batch_size` waiting leases to the worker in one batch; false if none
    /// was sent.
    fn send_waiting(&mut self, now: Instant) -> bool {
        let mut leases = Vec::with_capacity(self.batch_size.min(self.waiting.len()));
        let mut timeout = Duration::MAX;
        while leases.len() < self.batch_size {
            let Some((lease, valid_until)) = self.waiting.pop_front() else {
                break;
            };
            // Released, or reported lost when its validity ended, while it waited.
            if !self.schedule.is_in_flight(&lease) {
                continue;
            }
            timeout = timeout.min(valid_until.saturating_duration_since(now));
            leases.push(lease);
        }
        if leases.is_empty() {
            return false;
        }
        let batch = Batch {
            leases,
            sent_at: now,
            timeout,
        };
        // A worker that is gone cannot answer: the leases are reported lost when their
        // validity ends, as in-flight leases whose answer never came.
        if self.backend_jobs.send(Job::Renew(batch)).is_err() {
            return false;
        }
        self.in_flight += 1;
        self.renewing += 1;
        true
    }

    /// Applies the backend's answer to an extend sent at `sent_at`: the lease's validity and
    /// its next renewal follow the new TTL, or the lease is lost; then the caller hears.
    fn apply_extension(
        &mut self,
        extension: Extension,
        sent_at: Instant,
        result: Result<Ownership, BackendError>,
    ) {
        let hook = &*self.hook;
        let lease = extension.lease;
        match &result {
            Ok(Ownership::Owned) => {
                let now = self.clock.now();
                if let Some(valid_until) = lease.renewed(sent_at, extension.validity, now, hook) {
                    if self.schedule.is_in_flight(&lease) {
                        // Its renewal (sent with the new TTL) re-schedules it when answered;
                        // until then, watch the new end of its validity.
                        self.schedule.watch_in_flight(lease, valid_until);
                    } else {
                        let due = renewal_due(
                            self.renew_fraction,
                            sent_at,
                            extension.validity,
                            valid_until,
                        );
                        self.schedule.track(lease, due);
                    }
                }
            }
            Ok(Ownership::NotOwned) => lease.lose(LostReason::TakenOver, hook),
            Err(error) if !error.is_transient() => {
                lease.lose(LostReason::Rejected(error.clone()), hook);
            }
            // No loss: the lease keeps its TTL and its renewals.
            Err(_) => {}
        }
        let _ = extension.reply.send(result);
    }

    /// Applies the backend's answer to a batch.
    fn apply(&mut self, answer: Answer) {
        let hook = &*self.hook;
        let now = self.clock.now();
        self.counters
            .batch_answered(now.saturating_duration_since(answer.sent_at));
        let mut results = answer.results.into_iter();
        for (lease, validity) in answer.leases.into_iter().zip(answer.validities) {
            let result = results.next().unwrap_or_else(|| {
                Err(BackendError::transient(
                    "the backend returned fewer renewal results than requests",
                ))
            });
            // Released, or reported lost when its validity ended, while the call ran.
            if !self.schedule.is_in_flight(&lease) {
                continue;
            }
            self.schedule.remove(&lease);
            match result {
                Ok(Ownership::Owned) => {
                    if let Some(valid_until) = lease.renewed(answer.sent_at, validity, now, hook) {
                        let due =
                            renewal_due(self.renew_fraction, answer.sent_at, validity, valid_until);
                        self.schedule.track(lease, due);
                    }
                }
                Ok(Ownership::NotOwned) => lease.lose(LostReason::TakenOver, hook),
                Err(error) if !error.is_transient() => {
                    lease.lose(LostReason::Rejected(error), hook);
                }
                Err(error) => {
                    hook.on_event(&LeaseEvent::RenewalFailed {
                        key: &lease.key,
                        fence: lease.fence,
                        error: &error,
                    });
                    if let Some(valid_until) = lease.renewal_failed(now, hook) {
                        let due = retry_due(now, validity, valid_until);
                        self.schedule.track(lease, due);
                    }
                }
            }
        }
    }
}
