//! placeholder while the crate is written
mod backend;
mod clock;
mod error;
pub use backend::{AcquireOutcome, LeaseBackend, LeaseRequest, Ownership, ReleaseWatch};
pub use clock::{Clock, ManualClock};
pub use error::{BackendError, BackendErrorKind, Error, LostReason};
/// The longest TTL a lease may have: 365 days (Redis keeps TTLs in milliseconds).
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
