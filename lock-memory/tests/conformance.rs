//! The lock-core conformance suite on the memory backend, in virtual time.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup is a failed test

use std::sync::Arc;
use std::time::Duration;

use lock_core::conformance::ConformanceTarget;
use lock_core::{Clock, LeaseBackend, LockManager, LockManagerBuilder, ManualClock};
use lock_memory::MemoryBackend;

struct VirtualTime {
    clock: ManualClock,
    backend: MemoryBackend,
}

impl ConformanceTarget for VirtualTime {
    fn builder(&self) -> LockManagerBuilder {
        LockManager::builder(self.backend.clone()).clock(self.clock.clone())
    }

    fn backend(&self) -> Arc<dyn LeaseBackend> {
        Arc::new(self.backend.clone())
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(30)
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    fn delete_key(&self, key: &str) {
        assert!(self.backend.revoke(key), "{key} was not held");
    }

    fn set_unreachable(&self, unreachable: bool) {
        self.backend.set_unreachable(unreachable);
    }

    fn clock(&self) -> Clock {
        self.clock.clone().into()
    }

    fn report_slack(&self) -> Duration {
        // Virtual time: the renewer runs at exactly the instant it is due.
        Duration::ZERO
    }
}

fn virtual_time() -> VirtualTime {
    let clock = ManualClock::new();
    VirtualTime {
        backend: MemoryBackend::with_clock(clock.clone()),
        clock,
    }
}

lock_core::conformance_tests!(virtual_time());
