//! Where leases read the time: the system's monotonic clock, or a [`ManualClock`] that tests step
//! by hand.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

/// The time source of a [`LockManager`](crate::LockManager) and of the backends that keep time
/// themselves (the memory backend).
///
/// [`Clock::System`] is the default. [`Clock::Manual`] runs leases in virtual time: expiry,
/// renewal, waiting and loss all follow [`ManualClock::advance`], so tests step time instead of
/// sleeping.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// [`Instant::now`].
    #[default]
    System,
    /// Time that only moves when [`ManualClock::advance`] is called.
    Manual(ManualClock),
}

impl From<ManualClock> for Clock {
    fn from(clock: ManualClock) -> Clock {
        Clock::Manual(clock)
    }
}

impl Clock {
    /// The current time of this clock.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_core::{Clock, ManualClock};
    ///
    /// let manual = ManualClock::new();
    /// let clock = Clock::from(manual.clone());
    /// let before = clock.now();
    /// manual.advance(Duration::from_secs(5));
    /// assert_eq!(clock.now() - before, Duration::from_secs(5));
    /// ```
    pub fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(manual) => manual.now(),
        }
    }

    /// Waits for a message on `rx` until this clock reaches `deadline` (`None`: no deadline).
    ///
    /// On a manual clock the deadline is checked each time the clock is advanced.
    pub(crate) fn recv_until<T>(
        &self,
        rx: &Receiver<T>,
        deadline: Option<Instant>,
    ) -> Result<T, RecvTimeoutError> {
        match self {
            Clock::System => match deadline {
                Some(deadline) => rx.recv_deadline(deadline),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            },
            Clock::Manual(manual) => manual.recv_until(rx, deadline),
        }
    }

    /// Blocks until this clock reaches `deadline`.
    pub(crate) fn sleep_until(&self, deadline: Instant) {
        match self {
            Clock::System => {
                let left = deadline.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    std::thread::sleep(left);
                }
            }
            Clock::Manual(manual) => {
                let (_keep_open, never) = crossbeam_channel::bounded::<()>(0);
                // Only the deadline can end this wait: the sender is never used.
                let _ = manual.recv_until(&never, Some(deadline));
            }
        }
    }
}

/// `instant + duration`, or an instant about a century later where that would overflow.
///
/// Deadlines built from user input (`Duration::MAX` means "no deadline") go through here, so no
/// addition of an `Instant` and a `Duration` can panic.
pub(crate) fn saturating_add(instant: Instant, duration: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    instant
        .checked_add(duration)
        .or_else(|| instant.checked_add(CENTURY.min(duration)))
        .unwrap_or(instant)
}

/// A clock for tests: it starts at the moment it is made and moves only when told to.
///
/// Clones share one timeline. Give the same clock to the
/// [`MemoryBackend`](https://docs.rs/lock-memory) and to the
/// [`LockManagerBuilder::clock`](crate::LockManagerBuilder::clock), and TTLs, renewals and
/// losses happen exactly when the test advances the clock.
///
/// ```
/// use std::time::Duration;
/// use lock_core::ManualClock;
///
/// let clock = ManualClock::new();
/// let start = clock.now();
/// clock.advance(Duration::from_millis(250));
/// assert_eq!(clock.now(), start + Duration::from_millis(250));
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    shared: Arc<ManualShared>,
}

struct ManualShared {
    now: Mutex<Instant>,
    /// One sender per thread blocked in `recv_until`; each is told when time moves.
    listeners: Mutex<Vec<Sender<()>>>,
}

impl Default for ManualShared {
    fn default() -> Self {
        ManualShared {
            now: Mutex::new(Instant::now()),
            listeners: Mutex::new(Vec::new()),
        }
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now", &*self.shared.now.lock())
            .finish()
    }
}

impl ManualClock {
    /// A clock standing at the current real time.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// The clock's current time.
    pub fn now(&self) -> Instant {
        *self.shared.now.lock()
    }

    /// Moves time forward by `by` and wakes every thread waiting on this clock.
    ///
    /// Time saturates about a century ahead instead of overflowing.
    pub fn advance(&self, by: Duration) {
        {
            let mut now = self.shared.now.lock();
            *now = saturating_add(*now, by);
        }
        self.shared
            .listeners
            .lock()
            .retain(|listener| match listener.try_send(()) {
                Ok(()) | Err(crossbeam_channel::TrySendError::Full(())) => true,
                Err(crossbeam_channel::TrySendError::Disconnected(())) => false,
            });
    }

    fn recv_until<T>(
        &self,
        rx: &Receiver<T>,
        deadline: Option<Instant>,
    ) -> Result<T, RecvTimeoutError> {
        let (tick_tx, ticks) = crossbeam_channel::bounded(1);
        self.shared.listeners.lock().push(tick_tx);
        loop {
            if deadline.is_some_and(|deadline| self.now() >= deadline) {
                return rx.try_recv().map_err(|error| match error {
                    crossbeam_channel::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    crossbeam_channel::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                });
            }
            crossbeam_channel::select! {
                recv(rx) -> message => return message.map_err(|_| RecvTimeoutError::Disconnected),
                recv(ticks) -> _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturating_add_never_overflows() {
        let now = Instant::now();
        assert!(saturating_add(now, Duration::MAX) > now);
        assert_eq!(
            saturating_add(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn manual_recv_until_times_out_only_when_advanced() {
        let clock = ManualClock::new();
        let deadline = clock.now() + Duration::from_secs(10);
        let (_tx, rx) = crossbeam_channel::unbounded::<()>();
        let waiter = {
            let clock = clock.clone();
            std::thread::spawn(move || (clock.recv_until(&rx, Some(deadline)), clock.now()))
        };
        clock.advance(Duration::from_secs(5));
        clock.advance(Duration::from_secs(5));
        let (result, returned_at) = waiter.join().unwrap();
        assert_eq!(result, Err(RecvTimeoutError::Timeout));
        assert!(
            returned_at >= deadline,
            "the wait ended before the clock reached its deadline"
        );
    }

    #[test]
    fn manual_recv_until_returns_messages() {
        let clock = ManualClock::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(7).unwrap();
        assert_eq!(clock.recv_until(&rx, None), Ok(7));
    }
}
