//! Leases on a Redis Cluster: every call goes to the master that owns its key's slot.
//!
//! **Who owns what.** The `redis` crate's cluster client ([`ClusterClient`]) finds the layout
//! of the cluster (`CLUSTER SLOTS`, from the first seed that answers) and follows `MOVED` and
//! `ASK` redirections. Each time one of its connections learns the layout, it hands it to a
//! [`ReadRoutingStrategy`] (its hook for that); this backend's strategy only records it (and
//! routes every read to the primary, which no call of this backend makes anyway). The recorded
//! layout says which master owns each slot.
//!
//! **The fast path.** Each master gets a single-server [`RedisBackend`] of its own (its own
//! pool, with every call bounded in time, drained after a timeout, retried on a closed
//! connection), to which calls for its slots go directly: a script call is one round trip, and
//! a renewal batch is split per master and sent to every master at once, from one thread per
//! master, as one pipeline per master of one script call per 128 leases, whatever their slots:
//! `renew.lua` takes its keys as arguments and carries the flag `allow-cross-slot-keys`, so one
//! call may touch every slot its node serves. A key the node does not serve (any more) is
//! refused alone, and asked for again through the cluster's routing (see below).
//!
//! **When the layout changed.** A call that a master answers with `MOVED`, `ASK`, `TRYAGAIN` or
//! `CLUSTERDOWN`, or whose master refuses or drops connections, goes once more through a pooled
//! cluster connection of the `redis` crate, which follows the redirection (refreshing its slot
//! map after `MOVED`, which also updates the recorded layout). A master that refuses or drops
//! connections also makes the backend open a fresh cluster connection in the background (at
//! most every [`REFRESH_INTERVAL`]), whose layout names the replica that took over once the
//! cluster has promoted it. Pooled cluster connections that failed are discarded, never reused: the
//! crate's synchronous cluster connection keeps its slot map after a master dies, and would
//! retry the dead address forever.

pub(crate) mod spec;
mod subscriber;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use lock_core::{BackendError, BackendErrorKind, LeaseBackend, LeaseRequest, Ownership};
use parking_lot::{Mutex, RwLock};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection, NodeAddress};
use redis::cluster_read_routing::{
    ClusterTopology, ReadCandidates, ReadRoutingStrategy, ReadRoutingStrategyFactory,
};
use redis::{Cmd, ConnectionLike, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::backend::builder::Config;
use crate::backend::{renew_call, Answer, RedisBackend, ScriptCall};
use crate::connection::connector::Connector;
use crate::connection::deadline::Deadline;
use crate::connection::sentinel::spec::Address;
use crate::errors::{is_retryable_elsewhere, CallFailure, RedisOperation};
use crate::scripts::keys::lock_key;
use crate::scripts::{parse_renewals, ScriptBy, Scripts};
use crate::RedisBackendError;
use spec::ClusterSpec;
use subscriber::{ClusterSubscriber, Settings};

/// The number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The least time between two fresh looks at the cluster's layout.
const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// Times the `redis` crate's cluster connection retries one command itself (to follow a
/// redirection, or after `TRYAGAIN`); each try gets an equal share of the call's time.
const CRATE_RETRIES: u32 = 2;

/// The slot of a Redis key: CRC16 of its hash tag (the text between its first `{` and the first
/// `}` after it, if not empty), else of the whole key, modulo 16384.
pub(crate) fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&byte| byte == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&byte| byte == b'}')?;
            (close > 0).then(|| &rest[..close])
        });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % SLOTS
}

/// The leases of one backend on one cluster.
pub(crate) struct ClusterLeases {
    spec: ClusterSpec,
    /// The settings of the per-master backends (and of the whole backend).
    config: Config,
    /// The redacted URL, for logs.
    target: String,
    /// Cluster connections, for calls whose master's answer says the layout changed.
    sessions: r2d2::Pool<Sessions>,
    layout: Arc<Layout>,
    /// A single-server backend per master address, made when first needed.
    nodes: Mutex<HashMap<NodeAddress, RedisBackend>>,
    scripts: Scripts,
    subscriber: ClusterSubscriber,
}

impl fmt::Debug for ClusterLeases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.nodes.lock().keys().map(ToString::to_string).collect();
        f.debug_struct("ClusterLeases")
            .field("seeds", &self.spec.seeds)
            .field("masters_in_use", &nodes)
            .finish_non_exhaustive()
    }
}

/// The last layout a cluster connection learned, and when it was last asked for anew.
#[derive(Default)]
struct Layout {
    topology: RwLock<Option<ClusterTopology>>,
    /// When the last fresh look started; `None` before the first.
    refreshed_at: Mutex<Option<Instant>>,
    /// The client whose new connections look (set once it is built), and the redacted URL.
    client: OnceLock<(ClusterClient, String)>,
}

impl Layout {
    /// Has a fresh cluster connection opened in the background (`lock-redis-cluster-layout`,
    /// a short-lived thread), which learns (and records) the layout anew; at most every
    /// [`REFRESH_INTERVAL`]. Never blocks: opening a connection to a cluster whose nodes are
    /// silent takes a connect timeout per node, far longer than a call may wait.
    fn refresh_now(&self) {
        let Some((client, target)) = self.client.get() else {
            return;
        };
        {
            let mut refreshed_at = self.refreshed_at.lock();
            if refreshed_at.is_some_and(|at| at.elapsed() < REFRESH_INTERVAL) {
                return;
            }
            *refreshed_at = Some(Instant::now());
        }
        let (client, target) = (client.clone(), target.clone());
        let spawned = std::thread::Builder::new()
            .name("lock-redis-cluster-layout".to_owned())
            .spawn(move || {
                if let Err(error) = client.get_connection() {
                    tracing::debug!(redis = %target, %error, "could not look at the Redis Cluster's layout");
                }
            });
        if let Err(error) = spawned {
            tracing::debug!(%error, "could not start a thread to look at the Redis Cluster's layout");
        }
    }

    /// The master that owns `slot`, as last learned.
    fn master_of(&self, slot: u16) -> Option<NodeAddress> {
        let topology = self.topology.read();
        Some(topology.as_ref()?.shard_for_slot(slot)?.primary().clone())
    }
}

/// Records every layout a cluster connection learns; routes reads (none are made) to primaries.
/// Holds the layout weakly: the layout holds the client, which holds this.
struct LayoutRecorder(Weak<Layout>);

impl ReadRoutingStrategy for LayoutRecorder {
    fn on_topology_changed(&self, topology: ClusterTopology) {
        if let Some(layout) = self.0.upgrade() {
            *layout.topology.write() = Some(topology);
        }
    }

    fn route_read<'a>(&self, candidates: &ReadCandidates<'a>) -> &'a NodeAddress {
        match candidates {
            ReadCandidates::AnyNode(candidates) => candidates.primary(),
            ReadCandidates::ReplicasOnly(candidates) => candidates.replicas().first(),
        }
    }
}

/// Gives each cluster connection a [`LayoutRecorder`] of the backend's [`Layout`].
struct RecorderFactory(Weak<Layout>);

impl ReadRoutingStrategyFactory for RecorderFactory {
    fn create_strategy(&self) -> Box<dyn ReadRoutingStrategy> {
        Box::new(LayoutRecorder(Weak::clone(&self.0)))
    }
}

/// The r2d2 manager of cluster connections: the `redis` crate's own (`ClusterClient` implements
/// `ManageConnection`) cannot be told to drop a connection whose slot map went stale.
struct Sessions {
    client: ClusterClient,
}

/// A pooled cluster connection, dropped instead of pooled again once a call on it failed in a
/// way that may leave it stale.
struct Session {
    connection: ClusterConnection,
    broken: bool,
}

impl r2d2::ManageConnection for Sessions {
    type Connection = Session;
    type Error = RedisError;

    fn connect(&self) -> Result<Session, RedisError> {
        Ok(Session {
            connection: self.client.get_connection()?,
            broken: false,
        })
    }

    fn is_valid(&self, _session: &mut Session) -> Result<(), RedisError> {
        Ok(())
    }

    fn has_broken(&self, session: &mut Session) -> bool {
        session.broken || !session.connection.is_open()
    }
}

/// Logs failed attempts to open a cluster connection through `tracing`.
#[derive(Debug)]
struct SessionErrorLogger {
    target: String,
}

impl r2d2::HandleError<RedisError> for SessionErrorLogger {
    fn handle_error(&self, error: RedisError) {
        tracing::debug!(redis = %self.target, %error, "could not open a Redis Cluster connection");
    }
}

/// What a failed call on a master says about where to send it.
enum Verdict {
    /// A real answer (or a timeout): report it.
    Final,
    /// The master says another node serves the slot now, or the cluster is changing.
    Redirected,
    /// The master refuses or drops connections: it may be dead, and a replica about to take
    /// over. `unanswered`: a request may have run without its reply coming back.
    NodeGone { unanswered: bool },
}

impl Verdict {
    fn of(error: &BackendError) -> Verdict {
        let cause = error.cause().downcast_ref::<RedisBackendError>();
        if let Some(RedisBackendError::Command { source, .. }) = cause {
            if is_redirection(source) {
                // MOVED is permanent on one server (a URL naming a cluster node), not here.
                return Verdict::Redirected;
            }
        }
        if !error.is_transient() {
            // A wrong password, a missing permission, a script error: the same anywhere.
            return Verdict::Final;
        }
        match cause {
            Some(RedisBackendError::Command { source, .. }) => {
                if source.is_connection_refusal() {
                    Verdict::NodeGone { unanswered: false }
                } else if is_retryable_elsewhere(source) {
                    Verdict::NodeGone { unanswered: true }
                } else {
                    Verdict::Final
                }
            }
            Some(RedisBackendError::NoConnection { .. }) => Verdict::NodeGone { unanswered: false },
            _ => Verdict::Final,
        }
    }
}

/// Whether `error` is the server's reply refusing the call (or one key of it), not a lost
/// connection or a timeout.
fn is_refusal(error: &BackendError) -> bool {
    matches!(
        error.cause().downcast_ref::<RedisBackendError>(),
        Some(RedisBackendError::Command { source, .. })
            if matches!(source.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
    )
}

/// `MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`: the cluster's layout is changing.
fn is_redirection(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
        )
    )
}

impl ClusterLeases {
    /// The leases of a cluster; nothing is connected until a call needs it.
    ///
    /// # Errors
    ///
    /// [`RedisBackendError::InvalidUrl`] when the `redis` crate refuses the seeds.
    pub(crate) fn new(
        spec: ClusterSpec,
        target: String,
        config: Config,
    ) -> Result<ClusterLeases, RedisBackendError> {
        let invalid = |error: RedisError| RedisBackendError::InvalidUrl {
            url: target.clone(),
            reason: error.to_string(),
        };
        let seeds = spec
            .seeds
            .iter()
            .map(|seed| spec.node_info(seed))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let layout = Arc::new(Layout::default());
        let mut builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.command_timeout)
            .retries(CRATE_RETRIES)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .read_routing_strategy(RecorderFactory(Arc::downgrade(&layout)));
        if let Some(username) = &spec.username {
            builder = builder.username(username);
        }
        if let Some(password) = &spec.password {
            builder = builder.password(password);
        }
        let client = builder.build().map_err(invalid)?;
        // Set once, here.
        let _ = layout.client.set((client.clone(), target.clone()));
        let subscriber = ClusterSubscriber::new(Settings {
            spec: spec.clone(),
            layout: Arc::clone(&layout),
            key_prefix: config.key_prefix.clone(),
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            target: target.clone(),
        });
        let sessions = r2d2::Pool::builder()
            .max_size(config.pool_size)
            .min_idle(Some(0))
            .test_on_check_out(false)
            .connection_timeout(config.checkout_timeout)
            .error_handler(Box::new(SessionErrorLogger {
                target: target.clone(),
            }))
            .build_unchecked(Sessions {
                client: client.clone(),
            });
        Ok(ClusterLeases {
            spec,
            config,
            target,
            sessions,
            layout,
            nodes: Mutex::new(HashMap::new()),
            scripts: Scripts::new(),
            subscriber,
        })
    }

    /// The master that owns `slot`, as far as the layout says; `None` (and a look at the
    /// layout, in the background) when none has been learned yet.
    fn master_of(&self, slot: u16) -> Option<NodeAddress> {
        let master = self.layout.master_of(slot);
        if master.is_none() {
            self.refresh();
        }
        master
    }

    /// The backend of the master at `address`, made on first use; `None` for an address that
    /// makes no client (its calls then go through cluster connections).
    fn node(&self, address: &NodeAddress) -> Option<RedisBackend> {
        let mut nodes = self.nodes.lock();
        if let Some(node) = nodes.get(address) {
            return Some(node.clone());
        }
        let client = self
            .spec
            .node_info(&Address::new(address.host(), address.port()))
            .and_then(redis::Client::open);
        let client = match client {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(redis = %self.target, %address, %error, "Redis Cluster node address not usable");
                return None;
            }
        };
        let node = RedisBackend::from_parts(
            Connector::Server(Box::new(client)),
            format!("{} (master {address})", self.target),
            self.config.clone(),
        );
        nodes.insert(address.clone(), node.clone());
        Some(node)
    }

    /// Looks at the cluster's layout anew (see [`Layout::refresh_now`]).
    fn refresh(&self) {
        self.layout.refresh_now();
    }

    /// Runs one script on the master of its keys' slot, or through a cluster connection if that
    /// master's answer says the layout changed.
    pub(crate) fn run_script<T>(
        &self,
        call: ScriptCall<'_>,
        timeout: Duration,
        parse: &dyn Fn(Value) -> Result<T, CallFailure>,
    ) -> Result<Answer<T>, BackendError> {
        let deadline = Deadline::after(timeout);
        let slot = slot_of(call.keys.first().copied().unwrap_or(call.key));
        let mut after_unanswered_attempt = false;
        let address = self.master_of(slot);
        if let Some(master) = address.as_ref().and_then(|address| self.node(address)) {
            match master.run_script(call, timeout, parse) {
                Err(error) => match Verdict::of(&error) {
                    Verdict::Final => return Err(error),
                    Verdict::Redirected => {}
                    Verdict::NodeGone { unanswered } => {
                        after_unanswered_attempt = unanswered;
                        self.refresh();
                        let moved = self
                            .master_of(slot)
                            .filter(|new| Some(new) != address.as_ref())
                            .and_then(|new| self.node(&new));
                        if let Some(moved) = moved {
                            return moved.run_script(call, remaining(&deadline), parse).map(
                                |answer| Answer {
                                    after_unanswered_attempt: answer.after_unanswered_attempt
                                        || after_unanswered_attempt,
                                    ..answer
                                },
                            );
                        }
                    }
                },
                answer => return answer,
            }
        }
        let script = call.script;
        let value = self
            .routed(
                &script.evalsha(call.keys, call.args),
                &script.eval(call.keys, call.args),
                &deadline,
            )
            .and_then(parse)
            .map_err(|failure| failure.into_backend_error(call.operation, call.key))?;
        Ok(Answer {
            value,
            after_unanswered_attempt,
        })
    }

    /// Sends `evalsha` (then `eval` if the node lost the script) through a pooled cluster
    /// connection, which follows redirections; on a connection that fails, tries another
    /// while time is left.
    fn routed(&self, evalsha: &Cmd, eval: &Cmd, deadline: &Deadline) -> Result<Value, CallFailure> {
        let deadline = deadline.narrowed(
            self.config
                .checkout_timeout
                .saturating_add(self.config.command_timeout),
        );
        let mut last = None;
        for _ in 0..3 {
            let left = remaining(&deadline);
            if left.is_zero() {
                break;
            }
            let mut session = match self
                .sessions
                .get_timeout(left.min(self.config.checkout_timeout))
            {
                Ok(session) => session,
                Err(error) => {
                    return Err(last.unwrap_or(CallFailure::NoConnection {
                        waited: deadline.elapsed(),
                        reason: format!("no Redis Cluster connection: {error}"),
                        kind: BackendErrorKind::Transient,
                    }))
                }
            };
            let commands = deadline.narrowed(self.config.command_timeout);
            let per_try =
                (remaining(&commands) / (CRATE_RETRIES + 1)).max(Duration::from_millis(1));
            let connection = &mut session.connection;
            let mut reply = connection
                .set_read_timeout(Some(per_try))
                .and_then(|()| connection.set_write_timeout(Some(per_try)))
                .and_then(|()| connection.req_command(evalsha));
            if matches!(&reply, Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
            {
                reply = connection.req_command(eval);
            }
            let error = match reply {
                Ok(value) => return Ok(value),
                // A script's own error (WRONGTYPE, say) is its answer.
                Err(error)
                    if matches!(error.kind(), ErrorKind::Server(_)) && !is_redirection(&error) =>
                {
                    return Err(CallFailure::Redis(error))
                }
                Err(error) => error,
            };
            session.broken = true;
            let again = is_redirection(&error) || is_retryable_elsewhere(&error);
            tracing::debug!(redis = %self.target, %error, "Redis Cluster call failed; its connection is dropped");
            last = Some(if error.is_timeout() {
                deadline.timed_out()
            } else if is_redirection(&error) {
                CallFailure::Redirected(error)
            } else {
                CallFailure::Redis(error)
            });
            if !again {
                break;
            }
        }
        Err(last.unwrap_or_else(|| deadline.timed_out()))
    }

    /// Renews every lease of `requests`: one pipeline per master, all masters at once; leases
    /// whose master's answer says the layout changed, or that the master refused alone, go once
    /// more through a cluster connection, one script call each.
    pub(crate) fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        let deadline = Deadline::after(timeout);
        let prefix = &self.config.key_prefix;
        // Per master, its requests.
        let mut per_master: Vec<(RedisBackend, Vec<usize>)> = Vec::new();
        let mut groups: HashMap<NodeAddress, usize> = HashMap::new();
        // Leases of slots whose master is not known (yet): through the cluster.
        let mut again = Vec::new();
        for (index, request) in requests.iter().enumerate() {
            let Some(address) = self.master_of(slot_of(&lock_key(prefix, request.key))) else {
                again.push(index);
                continue;
            };
            let group = match groups.get(&address) {
                Some(&group) => group,
                None => {
                    let Some(master) = self.node(&address) else {
                        again.push(index);
                        continue;
                    };
                    per_master.push((master, Vec::new()));
                    groups.insert(address, per_master.len() - 1);
                    per_master.len() - 1
                }
            };
            per_master[group].1.push(index);
        }
        let mut results: Vec<Option<Result<Ownership, BackendError>>> =
            requests.iter().map(|_| None).collect();
        let renew_on = |master: &RedisBackend, indexes: &[usize]| {
            let group: Vec<LeaseRequest<'_>> =
                indexes.iter().map(|&index| requests[index]).collect();
            master.renew_batch(&group, timeout)
        };
        let answers: Vec<Vec<Result<Ownership, BackendError>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = per_master
                .iter()
                .skip(1)
                .map(|(master, indexes)| scope.spawn(move || renew_on(master, indexes)))
                .collect();
            let first = per_master
                .first()
                .map(|(master, indexes)| renew_on(master, indexes))
                .unwrap_or_default();
            std::iter::once(first)
                .chain(
                    handles
                        .into_iter()
                        .map(|handle| handle.join().unwrap_or_default()),
                )
                .collect()
        });
        let mut node_gone = false;
        for ((_, indexes), answers) in per_master.iter().zip(answers) {
            let mut answers = answers.into_iter();
            for &index in indexes {
                match answers.next() {
                    Some(Err(error)) => match Verdict::of(&error) {
                        // A key's own refusal inside the call: Redis refuses a key its node
                        // does not serve (another node's slot, or missing here while its slot
                        // migrates away); asked alone, the cluster routes it (MOVED, ASK). A
                        // real refusal (a wrong type) comes back the same, and is reported.
                        Verdict::Final if is_refusal(&error) => again.push(index),
                        Verdict::Final => results[index] = Some(Err(error)),
                        Verdict::Redirected => again.push(index),
                        Verdict::NodeGone { .. } => {
                            node_gone = true;
                            results[index] = Some(Err(error));
                        }
                    },
                    Some(answer) => results[index] = Some(answer),
                    // Its master's thread failed: through the cluster.
                    None => again.push(index),
                }
            }
        }
        if node_gone {
            self.refresh();
        }
        self.renew_routed(requests, &again, &deadline, &mut results);
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(deadline
                        .timed_out()
                        .into_backend_error(RedisOperation::Renew, ""))
                })
            })
            .collect()
    }

    /// Renews `indexes` of `requests` through cluster connections, one script call per lease:
    /// while a slot moves, a call whose keys are split between the two masters gets `TRYAGAIN`,
    /// where each key alone is renewed where it is (with `ASK`).
    fn renew_routed(
        &self,
        requests: &[LeaseRequest<'_>],
        indexes: &[usize],
        deadline: &Deadline,
        results: &mut [Option<Result<Ownership, BackendError>>],
    ) {
        let prefix = &self.config.key_prefix;
        let script = &self.scripts.renew;
        for &index in indexes {
            let request = std::slice::from_ref(&requests[index]);
            // Declared, so that the connection routes the call to the key's node.
            let lock = lock_key(prefix, requests[index].key);
            let declared = [lock.as_str()];
            let reply = self.routed(
                &renew_call(script, ScriptBy::Hash, prefix, request, &declared),
                &renew_call(script, ScriptBy::Source, prefix, request, &declared),
                deadline,
            );
            results[index] = parse_renewals(reply, 1).pop().map(|result| {
                result.map_err(|failure| {
                    failure.into_backend_error(RedisOperation::Renew, requests[index].key)
                })
            });
        }
    }

    /// The eviction policy of every master the layout names: the first that is not
    /// `noeviction`, else `noeviction` (`None` when no master tells).
    pub(crate) fn eviction_policy(&self) -> Result<Option<String>, RedisBackendError> {
        if self.layout.topology.read().is_none() {
            // A pooled cluster connection learns the layout as it opens (within the checkout
            // timeout); if none opens, no master is known and the answer is `None`.
            let _ = self.sessions.get_timeout(self.config.checkout_timeout);
        }
        let addresses: Vec<NodeAddress> = {
            let topology = self.layout.topology.read();
            topology
                .iter()
                .flat_map(|topology| topology.shards().map(|shard| shard.primary().clone()))
                .collect()
        };
        let mut answer = None;
        for node in addresses.iter().filter_map(|address| self.node(address)) {
            match node.eviction_policy()? {
                Some(policy) if policy != "noeviction" => return Ok(Some(policy)),
                Some(policy) => answer = Some(policy),
                None => {}
            }
        }
        Ok(answer)
    }

    /// A watch woken when `key` is released (sharded pub/sub, on the master of its slot).
    pub(crate) fn watch(&self, key: &str) -> Option<lock_core::ReleaseWatch> {
        self.subscriber.watch(key)
    }
}

/// What is left of `deadline` (an hour when it has no end).
fn remaining(deadline: &Deadline) -> Duration {
    deadline.remaining().unwrap_or(Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    fn failed_with(reply: &str) -> BackendError {
        let value = redis::parse_redis_value(format!("-{reply}\r\n").as_bytes()).unwrap();
        let error = value.extract_error().unwrap_err();
        CallFailure::Redis(error).into_backend_error(RedisOperation::Acquire, "k")
    }

    #[test]
    fn a_masters_answer_says_where_to_send_the_call() {
        for reply in [
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
        ] {
            assert!(
                matches!(Verdict::of(&failed_with(reply)), Verdict::Redirected),
                "{reply}"
            );
        }
        for reply in ["WRONGTYPE wrong kind", "NOPERM no", "BUSY running a script"] {
            assert!(
                matches!(Verdict::of(&failed_with(reply)), Verdict::Final),
                "{reply}"
            );
        }
        let refused = CallFailure::NoConnection {
            waited: Duration::ZERO,
            reason: "refused".to_owned(),
            kind: BackendErrorKind::Transient,
        }
        .into_backend_error(RedisOperation::Renew, "k");
        assert!(matches!(
            Verdict::of(&refused),
            Verdict::NodeGone { unanswered: false }
        ));
        let wrong_password = CallFailure::NoConnection {
            waited: Duration::ZERO,
            reason: "WRONGPASS".to_owned(),
            kind: BackendErrorKind::Permanent,
        }
        .into_backend_error(RedisOperation::Renew, "k");
        assert!(matches!(Verdict::of(&wrong_password), Verdict::Final));
        // On a cluster, a redirection that did not settle is transient.
        let moved = redis::parse_redis_value(b"-MOVED 1 127.0.0.1:1\r\n")
            .unwrap()
            .extract_error()
            .unwrap_err();
        assert!(CallFailure::Redirected(moved)
            .into_backend_error(RedisOperation::Renew, "k")
            .is_transient());
    }

    #[test]
    fn slots_are_those_of_redis() {
        // `CLUSTER KEYSLOT` of Redis 7.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
        assert_eq!(slot_of("foo{}{bar}"), slot_of("foo{}{bar}"));
        for (a, b) in [("a{b}c", "{b}"), ("x{}y", "x{}z"), ("{a}}", "{a}b")] {
            assert_eq!(
                slot_of(a) == slot_of(b),
                Slot::for_key(a) == Slot::for_key(b),
                "{a} {b}"
            );
        }
    }
}
