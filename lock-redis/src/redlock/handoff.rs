//! The queues between a Redlock's calling threads and its nodes' workers: jobs go to a node's
//! workers, answers come back to the caller.
//!
//! A thread that waits on one sleeps at once. A crossbeam channel first spins, then yields its
//! CPU a few times, before it sleeps: cheap when every thread has a CPU of its own, but a
//! Redlock cycle wakes a worker per node and waits for their answers, and when these threads
//! share a CPU each yield hands it to another of them. Measured with 3 nodes, on one CPU for
//! the client (`cargo bench -p lock-tests --bench leases -- redlock split`): 54 thread switches
//! and 270 µs of CPU per acquire + release through crossbeam channels.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// An unbounded queue of `T`, with senders and receivers that may be cloned.
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item arrives and when the last sender leaves.
    changed: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    /// How many items a receiver waits for (see [`Receiver::wait_for`]); 1 otherwise.
    wanted: usize,
    /// Live [`Sender`]s: when none is left and the queue is empty, receivers stop waiting.
    senders: usize,
}

/// The sending side of a queue made by [`queue`].
pub(super) struct Sender<T>(Arc<Shared<T>>);

/// The receiving side of a queue made by [`queue`].
pub(super) struct Receiver<T>(Arc<Shared<T>>);

/// Why [`Receiver::recv_until`] returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Empty {
    /// The deadline passed.
    TimedOut,
    /// Every sender is gone, and so is every item.
    Closed,
}

/// A new queue.
pub(super) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            wanted: 1,
            senders: 1,
        }),
        changed: Condvar::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item` and wakes one waiting receiver (if any). Items nobody receives are
    /// dropped with the queue.
    pub(super) fn send(&self, item: T) {
        let mut state = self.0.state.lock();
        state.items.push_back(item);
        // A receiver waiting for more items than are queued sleeps on: waking it would only
        // cost a thread switch.
        if state.items.len() >= state.wanted {
            drop(state);
            self.0.changed.notify_one();
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.state.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.senders -= 1;
        if state.senders == 0 {
            drop(state);
            self.0.changed.notify_all();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one until `deadline` (`None`: no deadline).
    pub(super) fn recv_until(&self, deadline: Option<Instant>) -> Result<T, Empty> {
        let mut state = self.0.state.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Ok(item);
            }
            if state.senders == 0 {
                return Err(Empty::Closed);
            }
            match deadline {
                Some(deadline) => {
                    if self.0.changed.wait_until(&mut state, deadline).timed_out()
                        && state.items.is_empty()
                    {
                        return Err(Empty::TimedOut);
                    }
                }
                None => self.0.changed.wait(&mut state),
            }
        }
    }

    /// Waits until `count` items are queued, every sender is gone, or `deadline` (`None`: no
    /// deadline) has passed, so that a caller who needs several answers before it can decide
    /// anything is woken once, not once per answer. One receiver of a queue at a time may wait
    /// here.
    pub(super) fn wait_for(&self, count: usize, deadline: Option<Instant>) {
        let mut state = self.0.state.lock();
        state.wanted = count.max(1);
        while state.items.len() < state.wanted && state.senders > 0 {
            match deadline {
                Some(deadline) => {
                    if self.0.changed.wait_until(&mut state, deadline).timed_out() {
                        break;
                    }
                }
                None => self.0.changed.wait(&mut state),
            }
        }
        state.wanted = 1;
    }

    /// The next item, waiting for one up to `timeout`.
    pub(super) fn recv_timeout(&self, timeout: Duration) -> Result<T, Empty> {
        self.recv_until(Instant::now().checked_add(timeout))
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        Receiver(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_out_in_order_then_the_queue_closes_with_its_last_sender() {
        let (sender, receiver) = queue();
        let other = sender.clone();
        sender.send(1);
        other.send(2);
        drop(sender);
        assert_eq!(receiver.recv_until(None), Ok(1));
        assert_eq!(receiver.recv_until(None), Ok(2));
        assert_eq!(
            receiver.recv_timeout(Duration::from_millis(1)),
            Err(Empty::TimedOut),
            "a sender is left"
        );
        drop(other);
        assert_eq!(receiver.recv_until(None), Err(Empty::Closed));
    }

    #[test]
    fn a_waiting_receiver_wakes_for_an_item_and_for_the_last_sender_leaving() {
        let (sender, receiver) = queue();
        let waiter = {
            let receiver = receiver.clone();
            std::thread::spawn(move || receiver.recv_until(None))
        };
        sender.send("job");
        assert_eq!(waiter.join().unwrap(), Ok("job"));
        let waiter = std::thread::spawn(move || receiver.recv_until(None));
        drop(sender);
        assert_eq!(waiter.join().unwrap(), Err(Empty::Closed));
    }

    #[test]
    fn a_receiver_waiting_for_several_items_wakes_once_they_are_all_queued() {
        let (sender, receiver) = queue();
        let waiter = {
            let receiver = receiver.clone();
            std::thread::spawn(move || {
                receiver.wait_for(3, None);
                (0..3)
                    .map(|_| receiver.recv_until(None))
                    .collect::<Vec<_>>()
            })
        };
        for item in 1..=3 {
            sender.send(item);
        }
        assert_eq!(waiter.join().unwrap(), vec![Ok(1), Ok(2), Ok(3)]);
        // Fewer than wanted: the deadline ends the wait, and the last sender leaving does too.
        sender.send(4);
        let started = Instant::now();
        receiver.wait_for(2, started.checked_add(Duration::from_millis(20)));
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(receiver.recv_until(None), Ok(4));
        let waiter = {
            let receiver = receiver.clone();
            std::thread::spawn(move || receiver.wait_for(2, None))
        };
        drop(sender);
        waiter.join().unwrap();
        assert_eq!(receiver.recv_until(None), Err(Empty::Closed));
    }

    #[test]
    fn a_deadline_that_cannot_be_represented_means_no_deadline() {
        let (sender, receiver) = queue::<u8>();
        sender.send(7);
        assert_eq!(receiver.recv_timeout(Duration::MAX), Ok(7));
    }
}
