//! The connection pool and the bounded round trips every call is made of.
//!
//! Pools built by [`RedisBackendBuilder`](crate::RedisBackendBuilder) use [`BoundedClient`], a
//! connection manager that opens connections through a [`Connector`] with a timeout (the
//! `redis::Client` manager of r2d2 has none, so a silent server would hold r2d2's connecting
//! threads forever), and drops those that no longer lead to the server that takes the writes
//! (behind Sentinel, after a failover) or whose server answered `READONLY`. Pools given to
//! [`RedisBackend::from_pool`](crate::RedisBackend::from_pool) are used as they are.
//!
//! Every round trip sets the socket's read and write timeouts to what is left of the call's
//! [`Deadline`], so no call outlives its budget. A connection whose round trip failed half-way
//! (a timeout, an interrupted read, with replies still due) is marked [`NeedsResync`] and, before
//! its next use, drained up to a `PING` with a unique payload, so a late reply is never taken for
//! the answer to another command. The drain has a budget of its own (see
//! [`PooledConnection::resync`]): it pays for an earlier call's failure, not for the next
//! call's command.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lock_core::BackendErrorKind;
use parking_lot::Mutex;
use redis::{Cmd, Connection, ConnectionLike, RedisError, ServerErrorKind, Value};

use crate::connection::connector::{Connector, OpenConnection};
use crate::connection::deadline::Deadline;
use crate::errors::{connect_failure, CallFailure};

/// How long one slice of a pool checkout waits before the backend looks at the last connection
/// error again (to fail fast on a wrong password instead of waiting out the whole timeout).
const CHECKOUT_SLICE: Duration = Duration::from_millis(100);

/// What r2d2 says when a checkout times out and no connection attempt failed meanwhile.
const NO_CONNECTION_YET: &str = "timed out waiting for connection";

/// r2d2's own connection timeout. The backend always passes its own timeouts to
/// `get_timeout`, so r2d2 only uses this to cap the pause between its background attempts to
/// open a connection (at half of it): long enough not to hammer a server that is down, short
/// enough to notice soon that it is back.
const R2D2_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// The r2d2 connection manager of pools this crate builds: a [`Connector`] that opens
/// connections within `connect_timeout`, and remembers its last failure so a checkout timeout
/// can say why.
pub(crate) struct BoundedClient {
    connector: Connector,
    connect_timeout: Duration,
    last_error: Arc<Mutex<Option<(Instant, RedisError)>>>,
}

impl fmt::Debug for BoundedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedClient")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl r2d2::ManageConnection for BoundedClient {
    type Connection = OpenConnection;
    type Error = RedisError;

    fn connect(&self) -> Result<OpenConnection, RedisError> {
        match self.connector.open(self.connect_timeout) {
            Ok(connection) => {
                *self.last_error.lock() = None;
                Ok(connection)
            }
            Err(error) => {
                *self.last_error.lock() = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    fn is_valid(&self, connection: &mut OpenConnection) -> Result<(), RedisError> {
        redis::cmd("PING").query::<()>(&mut **connection)
    }

    fn has_broken(&self, connection: &mut OpenConnection) -> bool {
        self.connector.must_drop(connection)
    }
}

/// Logs failed connection attempts of a built pool through `tracing` (r2d2 would use `log`).
#[derive(Debug)]
struct ConnectErrorLogger {
    target: String,
}

impl r2d2::HandleError<RedisError> for ConnectErrorLogger {
    fn handle_error(&self, error: RedisError) {
        tracing::debug!(redis = %self.target, %error, "redis connection attempt failed");
    }
}

/// Settings of a pool this crate builds.
pub(crate) struct PoolSettings<'a> {
    pub(crate) connector: Connector,
    pub(crate) size: u32,
    pub(crate) connect_timeout: Duration,
    /// The redacted URL, for logs.
    pub(crate) target: &'a str,
}

/// A pool of connections: built here, or given by the user.
pub(crate) enum ConnectionPool {
    Bounded {
        pool: r2d2::Pool<BoundedClient>,
        last_error: Arc<Mutex<Option<(Instant, RedisError)>>>,
        /// Whether connections are made over TLS (`rediss://`), so a failed attempt may be a
        /// TLS failure.
        tls: bool,
        /// The pool's connector, which says whether a pooled connection is stale.
        connector: Connector,
    },
    Given(r2d2::Pool<redis::Client>),
}

impl fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, state) = match self {
            ConnectionPool::Bounded { pool, .. } => ("built", pool.state()),
            ConnectionPool::Given(pool) => ("given", pool.state()),
        };
        f.debug_struct("ConnectionPool")
            .field("kind", &kind)
            .field("max_size", &self.max_size())
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl ConnectionPool {
    /// A lazy pool: no connection is made until the first call needs one.
    pub(crate) fn build(settings: PoolSettings<'_>) -> ConnectionPool {
        let last_error = Arc::new(Mutex::new(None));
        let tls = settings.connector.is_tls();
        let manager = BoundedClient {
            connector: settings.connector.clone(),
            connect_timeout: settings.connect_timeout,
            last_error: Arc::clone(&last_error),
        };
        let pool = r2d2::Pool::builder()
            .max_size(settings.size)
            .min_idle(Some(0))
            // Checked on use instead, within the call's deadline (see `NeedsResync`).
            .test_on_check_out(false)
            .connection_timeout(R2D2_CONNECTION_TIMEOUT)
            .error_handler(Box::new(ConnectErrorLogger {
                target: settings.target.to_owned(),
            }))
            .build_unchecked(manager);
        ConnectionPool::Bounded {
            pool,
            last_error,
            tls,
            connector: settings.connector,
        }
    }

    /// The most connections the pool opens.
    pub(crate) fn max_size(&self) -> u32 {
        match self {
            ConnectionPool::Bounded { pool, .. } => pool.max_size(),
            ConnectionPool::Given(pool) => pool.max_size(),
        }
    }

    /// A connection, within `deadline` and at most `limit`. A pooled connection that no longer
    /// leads to the server that takes the writes (behind Sentinel, the master changed) is
    /// dropped, and another is taken or opened.
    pub(crate) fn checkout(
        &self,
        deadline: &Deadline,
        limit: Duration,
    ) -> Result<PooledConnection, CallFailure> {
        let checkout = deadline.narrowed(limit);
        let started = Instant::now();
        // What r2d2 said of its last failed connection attempt (it says it only once).
        let mut pool_error = None;
        loop {
            let left = checkout.remaining().unwrap_or(limit);
            if left.is_zero() {
                return Err(self.no_connection(started, pool_error));
            }
            let slice = left.min(CHECKOUT_SLICE);
            let result = match self {
                ConnectionPool::Bounded {
                    pool, connector, ..
                } => match pool.get_timeout(slice) {
                    // Back to the pool, which drops it (`has_broken`).
                    Ok(stale) if !connector.is_current(stale.generation()) => continue,
                    result => result.map(Pooled::Bounded),
                },
                ConnectionPool::Given(pool) => pool.get_timeout(slice).map(Pooled::Given),
            };
            let result = result.map(|pooled| PooledConnection {
                pooled,
                request_sent: false,
            });
            match result {
                Ok(connection) => return Ok(connection),
                Err(error) => {
                    if let Some(failure) = self.permanent_connect_failure(started, &error) {
                        return Err(failure);
                    }
                    let text = error.to_string();
                    if text != NO_CONNECTION_YET {
                        pool_error = Some(text);
                    }
                }
            }
        }
    }

    /// The failure to report when no connection came in time.
    fn no_connection(&self, started: Instant, pool_error: Option<String>) -> CallFailure {
        let waited = started.elapsed();
        let state = match self {
            ConnectionPool::Bounded { pool, .. } => pool.state(),
            ConnectionPool::Given(pool) => pool.state(),
        };
        if let ConnectionPool::Bounded {
            last_error, tls, ..
        } = self
        {
            if let Some((at, error)) = &*last_error.lock() {
                if *at >= started {
                    return connect_failure(waited, error, *tls);
                }
            }
        }
        let reason = if let Some(pool_error) = pool_error {
            pool_error
        } else if state.connections >= self.max_size() && state.idle_connections == 0 {
            format!("all {} pooled connections are in use", self.max_size())
        } else if matches!(self, ConnectionPool::Bounded { tls: true, .. }) {
            // With a connect timeout as long as the checkout's, the attempt under way may not
            // have failed yet: over TLS, a silent handshake is as likely as a silent connect.
            "the server did not accept a connection, or did not complete the TLS handshake, in \
             time"
                .to_owned()
        } else {
            "the server did not accept a connection in time".to_owned()
        };
        CallFailure::NoConnection {
            waited,
            reason,
            kind: BackendErrorKind::Transient,
        }
    }

    /// A failure to report at once, if the pool's connection attempts fail in a way that
    /// waiting cannot cure (a wrong password, for example).
    fn permanent_connect_failure(
        &self,
        started: Instant,
        error: &r2d2::Error,
    ) -> Option<CallFailure> {
        let failure = match self {
            ConnectionPool::Bounded {
                last_error, tls, ..
            } => {
                let last = last_error.lock();
                let (at, error) = last.as_ref()?;
                if *at < started {
                    return None;
                }
                connect_failure(started.elapsed(), error, *tls)
            }
            ConnectionPool::Given(_) => {
                // r2d2 keeps only the text of the error: recognise the permanent ones by it.
                let text = error.to_string();
                let permanent = ["AuthenticationFailed", "WRONGPASS", "NOAUTH", "NOPERM"]
                    .iter()
                    .any(|marker| text.contains(marker));
                if !permanent {
                    return None;
                }
                CallFailure::NoConnection {
                    waited: started.elapsed(),
                    reason: text,
                    kind: BackendErrorKind::Permanent,
                }
            }
        };
        (failure.kind() == BackendErrorKind::Permanent).then_some(failure)
    }
}

/// A connection checked out of a [`ConnectionPool`] for one attempt of a call; back to the pool
/// on drop.
pub(crate) struct PooledConnection {
    pooled: Pooled,
    /// Whether a request of this attempt was written in full: the server may have run it,
    /// whatever became of its reply.
    request_sent: bool,
}

/// The r2d2 connection, from either kind of pool.
enum Pooled {
    Bounded(r2d2::PooledConnection<BoundedClient>),
    Given(r2d2::PooledConnection<redis::Client>),
}

/// Marks a connection on which replies may still be due.
struct NeedsResync;

impl PooledConnection {
    fn extensions_mut(&mut self) -> &mut r2d2::Extensions {
        match &mut self.pooled {
            Pooled::Bounded(connection) => r2d2::PooledConnection::extensions_mut(connection),
            Pooled::Given(connection) => r2d2::PooledConnection::extensions_mut(connection),
        }
    }

    /// Whether a request was written in full on this checkout, so the server may have run it
    /// even if its reply never came.
    pub(crate) fn request_sent(&self) -> bool {
        self.request_sent
    }

    /// Records that replies may still be due on this connection, if it is still open.
    fn mark_needs_resync(&mut self) {
        if self.is_open() {
            self.extensions_mut().insert(NeedsResync);
        }
    }

    /// Whether an earlier call left replies due on this connection.
    pub(crate) fn needs_resync(&mut self) -> bool {
        self.extensions_mut().get::<NeedsResync>().is_some()
    }

    /// Drains the replies an earlier, failed call left due, within `deadline`: sends a `PING`
    /// with a unique payload and reads until its answer. Nothing else is sent, so a failure
    /// here never leaves a request of this call half-done.
    ///
    /// The caller gives the drain a budget of its own, not a share of the next command's: the
    /// late reply and the `PING` take up to two round trips, and charging them to the command
    /// would fail every call on this connection while the round trip lies between half the
    /// command timeout and the command timeout.
    pub(crate) fn resync(&mut self, deadline: &Deadline) -> Result<(), CallFailure> {
        static NEXT_NONCE: AtomicU64 = AtomicU64::new(0);
        let nonce = format!(
            "lock-redis-resync-{}-{}",
            std::process::id(),
            NEXT_NONCE.fetch_add(1, Ordering::Relaxed)
        );
        set_timeouts(self, deadline)?;
        let ping = redis::cmd("PING").arg(&nonce).get_packed_command();
        self.send_packed_command(&ping)
            .map_err(|error| deadline.failure(error))?;
        loop {
            set_timeouts(self, deadline)?;
            match self.recv_response() {
                Ok(Value::BulkString(bytes)) if bytes == nonce.as_bytes() => break,
                Ok(_late_reply) => {}
                Err(error) => return Err(deadline.failure(error)),
            }
        }
        self.extensions_mut().remove::<NeedsResync>();
        Ok(())
    }

    /// Writes a request (one command or a pipeline) within `deadline`. On failure, part of it
    /// may have gone out: the connection is marked for a resync.
    fn send(&mut self, packed: &[u8], deadline: &Deadline) -> Result<(), CallFailure> {
        set_timeouts(self, deadline)?;
        match self.send_packed_command(packed) {
            Ok(()) => {
                self.request_sent = true;
                Ok(())
            }
            Err(error) => {
                self.mark_needs_resync();
                Err(deadline.failure(error))
            }
        }
    }

    /// Reads one reply within `deadline`. On failure, replies may still be due: the connection
    /// is marked for a resync. A `READONLY` reply (the server is a replica now: it was demoted
    /// by a failover) marks the connection to be dropped when it goes back to the pool.
    fn receive(&mut self, deadline: &Deadline) -> Result<Value, CallFailure> {
        let reply = set_timeouts(self, deadline).and_then(|()| {
            self.recv_response()
                .map_err(|error| deadline.failure(error))
        });
        match &reply {
            Err(_) => self.mark_needs_resync(),
            Ok(Value::ServerError(error)) if error.kind() == Some(ServerErrorKind::ReadOnly) => {
                if let Pooled::Bounded(connection) = &mut self.pooled {
                    connection.mark_refused_write();
                }
            }
            Ok(_) => {}
        }
        reply
    }
}

impl Deref for PooledConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match &self.pooled {
            Pooled::Bounded(connection) => connection,
            Pooled::Given(connection) => connection,
        }
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        match &mut self.pooled {
            Pooled::Bounded(connection) => connection,
            Pooled::Given(connection) => connection,
        }
    }
}

/// The read and write timeout last set on a pooled connection's socket.
struct SocketTimeout(Duration);

/// How much longer than what is left of a deadline a socket timeout may be and still be kept.
const SOCKET_TIMEOUT_SLACK: Duration = Duration::from_millis(10);

/// Whether a socket whose timeout is `current` can be used as it is when `left` is what is left
/// of the deadline: never shorter (a read would time out before the deadline, and a round trip
/// the call has time for would fail), at most [`SOCKET_TIMEOUT_SLACK`] longer.
fn socket_timeout_fits(current: Duration, left: Duration) -> bool {
    current >= left && current <= left.saturating_add(SOCKET_TIMEOUT_SLACK)
}

/// Bounds the socket reads and writes of `connection` by what is left before `deadline`.
///
/// The socket keeps the timeout it has when that [fits](socket_timeout_fits): a read or write
/// may end up to 10 ms after the deadline, never before it, and most calls (which start with
/// the same command timeout left) cost no system call here. No time left is a timeout failure,
/// never a zero socket timeout (which `std` rejects).
fn set_timeouts(connection: &mut PooledConnection, deadline: &Deadline) -> Result<(), CallFailure> {
    let left = match deadline.remaining() {
        Some(left) if left.is_zero() => return Err(deadline.timed_out()),
        Some(left) => left,
        // Never happens for round trips (they run under the command timeout); stay bounded.
        None => Duration::from_secs(3600),
    };
    let current = connection
        .extensions_mut()
        .get::<SocketTimeout>()
        .map(|set| set.0);
    if current.is_some_and(|current| socket_timeout_fits(current, left)) {
        return Ok(());
    }
    connection
        .set_read_timeout(Some(left))
        .and_then(|()| connection.set_write_timeout(Some(left)))
        .map_err(|error| deadline.failure(error))?;
    connection.extensions_mut().insert(SocketTimeout(left));
    Ok(())
}

/// Sends `cmd` and reads its reply, within `deadline`. Server errors come back as
/// [`Value::ServerError`].
pub(crate) fn round_trip(
    connection: &mut PooledConnection,
    cmd: &Cmd,
    deadline: &Deadline,
) -> Result<Value, CallFailure> {
    connection.send(&cmd.get_packed_command(), deadline)?;
    connection.receive(deadline)
}

/// What a pipelined round trip brought back.
pub(crate) struct PipelineReplies {
    /// The replies read, in order: maybe fewer than the commands sent.
    pub(crate) replies: Vec<Value>,
    /// Why the rest were not read.
    pub(crate) failure: Option<CallFailure>,
}

/// Sends each of `cmds` as soon as the iterator yields it, keeping it in `sent`, then reads
/// their replies, each read bounded by what is left before `deadline`. A lazy iterator that
/// builds its commands lets the server run the first while the next is built. Stops at the
/// first failure; the connection is then marked for a resync, as replies may still be due.
pub(crate) fn pipeline_round_trip(
    connection: &mut PooledConnection,
    cmds: impl IntoIterator<Item = Cmd>,
    sent: &mut Vec<Cmd>,
    deadline: &Deadline,
) -> PipelineReplies {
    let first = sent.len();
    let mut packed = Vec::new();
    let mut outcome = Ok(());
    for cmd in cmds {
        packed.clear();
        cmd.write_packed_command(&mut packed);
        outcome = connection.send(&packed, deadline);
        sent.push(cmd);
        if outcome.is_err() {
            break;
        }
    }
    let expected = sent.len() - first;
    let mut replies = Vec::with_capacity(expected);
    while outcome.is_ok() && replies.len() < expected {
        outcome = connection
            .receive(deadline)
            .map(|reply| replies.push(reply));
    }
    PipelineReplies {
        replies,
        failure: outcome.err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket timeout shorter than what is left would fail a read the call has time for:
    /// kept, say, at 300 ms from an earlier call, it would fail every call of a 400 ms budget
    /// while the round trip lies between the two.
    #[test]
    fn a_socket_timeout_is_kept_only_if_no_read_can_end_before_the_deadline() {
        let ms = Duration::from_millis;
        assert!(socket_timeout_fits(ms(400), ms(400)));
        assert!(
            socket_timeout_fits(ms(400), ms(395)),
            "the usual start of a call"
        );
        assert!(
            !socket_timeout_fits(ms(300), ms(400)),
            "it would end 100 ms early"
        );
        assert!(!socket_timeout_fits(ms(399), ms(400)));
        assert!(
            !socket_timeout_fits(ms(400), ms(100)),
            "it would end 300 ms late"
        );
    }
}
