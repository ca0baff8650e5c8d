//! [`RedisBackend`]: leases in one Redis server, over an r2d2 pool and three Lua scripts.

pub(crate) mod builder;
pub(crate) mod eviction;
mod operator;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    AcquireOutcome, BackendError, LeaseBackend, LeaseRequest, Ownership, ReleaseWatch,
};
use redis::{Cmd, Value};

use crate::backend::builder::Config;
use crate::backend::eviction::{read_eviction_policy, EvictionCheck};
use crate::cluster::ClusterLeases;
use crate::connection::connector::Connector;
use crate::connection::deadline::Deadline;
use crate::connection::pool::{
    pipeline_round_trip, round_trip, ConnectionPool, PoolSettings, PooledConnection,
};
use crate::errors::{closed_unread, is_retryable_elsewhere, CallFailure, RedisOperation};
use crate::scripts::keys::{fence_key, lock_key, push_lock_key, release_marker_key, ttl_millis};
use crate::scripts::{
    is_noscript, parse_acquire, parse_ownership, parse_renewals, LuaScript, Room, ScriptBy, Scripts,
};
use crate::subscriber::{Subscriber, SubscriberSettings};
use crate::{RedisBackendBuilder, RedisBackendError};

/// Leases renewed by one call of `renew.lua`: enough to spread the script's fixed cost, few
/// enough that no call keeps the server busy for long (well under a millisecond).
const RENEW_CHUNK: usize = 128;

/// A [`LeaseBackend`] on one Redis server (or a Redis-compatible one: Valkey, KeyDB…).
///
/// Each operation is one Lua script, so it is atomic on the server; see the
/// [crate documentation](crate) for the keys it writes and what it guarantees. The backend is a
/// cheap [`Clone`] handle: clones share one connection pool and one release subscriber.
///
/// Make one with [`connect`](Self::connect) (defaults), [`builder`](Self::builder) (pool size,
/// timeouts, key prefix) or [`from_pool`](Self::from_pool) (your own r2d2 pool). None of them
/// connects: connections are opened when calls need them.
///
/// `Debug` shows the URL with its password redacted:
///
/// ```
/// use lock_redis::RedisBackend;
///
/// let backend = RedisBackend::connect("redis://app:hunter2@localhost:6379/0")?;
/// let shown = format!("{backend:?}");
/// assert!(shown.contains("redis://app:***@localhost:6379/0"));
/// assert!(!shown.contains("hunter2"));
/// # Ok::<(), lock_redis::RedisBackendError>(())
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: ConnectionPool,
    config: Config,
    scripts: Scripts,
    /// The redacted URL, for `Debug` and logs.
    target: String,
    /// `None` for a pool given to `from_pool`: the backend has no URL to open a dedicated
    /// connection with.
    subscriber: Option<Subscriber>,
    /// Whether the server's eviction policy has been looked at (and warned about).
    eviction: EvictionCheck,
    /// On a Redis Cluster (`redis+cluster://`), where every call goes instead; `pool` and
    /// `subscriber` are then unused.
    cluster: Option<ClusterLeases>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("RedisBackend")
            .field("url", &inner.target)
            .field("key_prefix", &inner.config.key_prefix)
            .field("pool_size", &inner.pool.max_size())
            .field("checkout_timeout", &inner.config.checkout_timeout)
            .field("connect_timeout", &inner.config.connect_timeout)
            .field("command_timeout", &inner.config.command_timeout)
            .field("pool", &inner.pool)
            .field("subscriber", &inner.subscriber)
            .field("cluster", &inner.cluster)
            .finish()
    }
}

impl RedisBackend {
    /// A backend for the server at `url`, with the default settings of
    /// [`RedisBackendBuilder`].
    ///
    /// `url` is `redis://[user][:password@]host[:port][/db]` (port 6379 and database 0 by
    /// default), `rediss://...` for TLS (trusting the system's certificate store; see
    /// [`builder`](Self::builder) for a CA of your own, a client certificate, and the
    /// [crate docs](crate#tls)), `unix:///path/to/redis.sock[?db=N&pass=P]`, or the master of a
    /// Sentinel group,
    /// `redis+sentinel://[user][:password@]host[:port][,host[:port]...]/master-name[/db]`
    /// (see [Sentinel](crate#sentinel); plain TCP only), or a Redis Cluster,
    /// `redis+cluster://[user][:password@]host[:port][,host[:port]...]` (see
    /// [Cluster](crate#cluster); plain TCP only).
    ///
    /// Checks the URL, but does not connect: a server that is down now is no error here (the
    /// calls report it, as transient errors the manager retries), and neither is a wrong
    /// password (the calls report a permanent error).
    ///
    /// # Errors
    ///
    /// [`RedisBackendError::InvalidUrl`]. The error never contains the password.
    ///
    /// ```
    /// use lock_redis::{RedisBackend, RedisBackendError};
    ///
    /// // Nothing listens on port 1, and that is not an error yet.
    /// let backend = RedisBackend::connect("redis://127.0.0.1:1/0")?;
    /// let tls = RedisBackend::connect("rediss://:hunter2@localhost:6380")?;
    ///
    /// let error = RedisBackend::connect("rediss://:hunter2@localhost/#bogus").unwrap_err();
    /// assert!(matches!(error, RedisBackendError::InvalidUrl { .. }));
    /// assert!(!error.to_string().contains("hunter2"));
    /// # Ok::<(), RedisBackendError>(())
    /// ```
    pub fn connect(url: &str) -> Result<RedisBackend, RedisBackendError> {
        RedisBackend::builder(url).build()
    }

    /// A builder for a backend on the server at `url` (see [`connect`](Self::connect) for the
    /// URL forms): pool size, timeouts, key prefix, TLS certificates.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::builder("redis://localhost:6379")
    ///     .pool_size(8)
    ///     .command_timeout(Duration::from_millis(500))
    ///     .build()?;
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn builder(url: &str) -> RedisBackendBuilder {
        RedisBackendBuilder::new(url)
    }

    /// A builder for a backend on the master of a Sentinel group: `sentinels` are the
    /// sentinels' addresses (`host:port`, `host` for port 26379, or `[ipv6]:port`), asked in
    /// turn; `master_name` is the name they monitor the master under. The same as
    /// [`builder`](Self::builder) with a `redis+sentinel://` URL; credentials come from
    /// [`master_auth`](RedisBackendBuilder::master_auth) and
    /// [`sentinel_auth`](RedisBackendBuilder::sentinel_auth). See [Sentinel](crate#sentinel)
    /// for how a failover is followed.
    ///
    /// Like every builder, it does not connect: the sentinels are first asked when a call
    /// needs a connection.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_redis::{RedisBackend, RedisBackendError};
    ///
    /// let backend = RedisBackend::sentinel_builder(
    ///     &["10.0.0.1:26379", "10.0.0.2:26379", "10.0.0.3:26379"],
    ///     "locks",
    /// )
    /// .master_auth(Some("locker"), "hunter2")
    /// .command_timeout(Duration::from_millis(500))
    /// .build()?;
    /// assert!(format!("{backend:?}").contains("redis+sentinel://10.0.0.1:26379,"));
    ///
    /// let error = RedisBackend::sentinel_builder(&[], "locks").build().unwrap_err();
    /// assert!(matches!(error, RedisBackendError::InvalidConfig { .. }));
    /// # Ok::<(), RedisBackendError>(())
    /// ```
    pub fn sentinel_builder(sentinels: &[&str], master_name: &str) -> RedisBackendBuilder {
        RedisBackendBuilder::sentinel(sentinels, master_name)
    }

    /// A builder for a backend on a Redis Cluster: `seeds` are the addresses (`host:port`,
    /// `host` for port 6379, or `[ipv6]:port`) of some of its nodes, asked in turn for the
    /// cluster's layout. The same as [`builder`](Self::builder) with a
    /// `redis+cluster://host:port,host:port` URL; credentials come from
    /// [`credentials`](RedisBackendBuilder::credentials). See [Cluster](crate#cluster) for
    /// where calls go and what a failover does to a lease.
    ///
    /// Like every builder, it does not connect.
    ///
    /// ```
    /// use lock_redis::{RedisBackend, RedisBackendError};
    ///
    /// let backend = RedisBackend::cluster_builder(&["10.0.0.1:7000", "10.0.0.2:7000"])
    ///     .credentials("locker", "hunter2")
    ///     .build()?;
    /// assert!(format!("{backend:?}").contains("redis+cluster://10.0.0.1:7000,10.0.0.2:7000"));
    /// assert!(!format!("{backend:?}").contains("hunter2"));
    ///
    /// let error = RedisBackend::cluster_builder(&[]).build().unwrap_err();
    /// assert!(matches!(error, RedisBackendError::InvalidUrl { .. }));
    /// # Ok::<(), RedisBackendError>(())
    /// ```
    pub fn cluster_builder(seeds: &[&str]) -> RedisBackendBuilder {
        RedisBackendBuilder::new(&crate::cluster::spec::cluster_url(seeds))
    }

    /// A backend over your own r2d2 pool, with the default timeouts and key prefix.
    ///
    /// Differences from a backend made by [`builder`](Self::builder):
    ///
    /// - **No release notifications**: [`watch_release`](LeaseBackend::watch_release) returns
    ///   `None`, because an r2d2 pool does not reveal its client and the subscriber needs a
    ///   connection of its own; waiters rely on the manager's backoff alone.
    /// - **Connecting is as bounded as your pool makes it**: r2d2 opens connections with
    ///   `redis::Client::get_connection`, which has no timeout, so a silent server can hold the
    ///   pool's connecting threads. Calls stay bounded (they wait at most the checkout timeout
    ///   for a connection), but the pool may not recover until the server answers again.
    /// - The pool's `test_on_check_out` (on by default) pings each connection before use; the
    ///   ping runs with the socket timeouts of that connection's last call.
    /// - TLS failures of a pool of `rediss://` clients are not classified
    ///   ([`RedisBackendError::Tls`]): r2d2 keeps only their text. Such a pool also needs a
    ///   process-default rustls crypto provider (see the [crate docs](crate#tls)).
    ///
    /// ```no_run
    /// use lock_redis::RedisBackend;
    ///
    /// let client = redis::Client::open("redis://localhost:6379")?;
    /// let pool = r2d2::Pool::builder().max_size(4).build(client)?;
    /// let backend = RedisBackend::from_pool(pool);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_pool(pool: r2d2::Pool<redis::Client>) -> RedisBackend {
        let config = Config {
            pool_size: pool.max_size(),
            ..Config::default()
        };
        RedisBackend::new(
            ConnectionPool::Given(pool),
            "<r2d2 pool given to from_pool>".to_owned(),
            config,
            None,
            None,
        )
    }

    /// The Redis key that holds the lock `key`: `<prefix>{<key>}`, a string holding the owner's
    /// token, with a TTL. For inspecting locks from outside, in tests or operations.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::builder("redis://localhost").key_prefix("app:").build()?;
    /// assert_eq!(backend.lock_key("jobs:42"), "app:{jobs:42}");
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn lock_key(&self, key: &str) -> String {
        lock_key(&self.inner.config.key_prefix, key)
    }

    /// The Redis key of the fence counter of the lock `key`: `<prefix>{<key>}:fence`, an
    /// integer without TTL holding the last fence issued.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::connect("redis://localhost")?;
    /// assert_eq!(backend.fence_key("jobs:42"), "lock:{jobs:42}:fence");
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn fence_key(&self, key: &str) -> String {
        fence_key(&self.inner.config.key_prefix, key)
    }

    /// The server's `maxmemory-policy`, read now: `Some("noeviction")` is what a lock server
    /// should say. `None` when the server does not tell (the user may run neither `INFO` nor
    /// `CONFIG GET`, or the server is not Redis).
    ///
    /// Under any other policy, a server that reaches its `maxmemory` evicts keys, and held lock
    /// keys are among the candidates (`volatile-*` policies evict keys with a TTL, as lock keys
    /// are; `allkeys-*` any key, fence counters included). The backend also reads the policy
    /// once by itself, after its first successful call, and logs a warning (`tracing`) if it
    /// is not `noeviction`.
    ///
    /// ```no_run
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::connect("redis://localhost:6379")?;
    /// if backend.eviction_policy()?.is_some_and(|policy| policy != "noeviction") {
    ///     eprintln!("this server may evict held locks: set maxmemory-policy noeviction");
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A [`RedisBackendError`] about [`RedisOperation::EvictionPolicy`] when the server cannot
    /// be reached or does not answer within the configured timeouts.
    pub fn eviction_policy(&self) -> Result<Option<String>, RedisBackendError> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.eviction_policy();
        }
        let operation = RedisOperation::EvictionPolicy;
        let answer = self
            .call(operation, "", Duration::MAX, read_eviction_policy)
            .map_err(|failure| failure.into_error(operation, ""))?;
        self.inner.eviction.record(answer.value.as_deref());
        Ok(answer.value)
    }

    /// [`try_acquire`](LeaseBackend::try_acquire), issuing a fence of at least `proposed` if it
    /// is granted (Redlock proposes one ahead of its nodes' clocks, so that the nodes of a
    /// majority issue the same fence). `proposed` must be below 2^53.
    pub(crate) fn acquire_proposing(
        &self,
        request: &LeaseRequest<'_>,
        proposed: Option<u64>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        let prefix = &self.inner.config.key_prefix;
        let lock = lock_key(prefix, request.key);
        let fence = fence_key(prefix, request.key);
        let ttl = ttl_millis(request.ttl).to_string();
        let proposed = proposed.map(|fence| fence.to_string());
        let keys = [lock.as_str(), &fence];
        let given = [request.token, &ttl, proposed.as_deref().unwrap_or_default()];
        // The proposal, the third argument, only when there is one.
        let args = &given[..if proposed.is_some() { 3 } else { 2 }];
        let script = &self.inner.scripts.acquire;
        let operation = RedisOperation::Acquire;
        if self.inner.config.min_replicas.is_none() {
            let call = ScriptCall {
                operation,
                key: request.key,
                script,
                keys: &keys,
                args,
            };
            return self
                .run_script(call, timeout, parse_acquire)
                .map(|answer| answer.value);
        }
        self.call(operation, request.key, timeout, |connection, deadline| {
            let outcome = parse_acquire(Self::eval(connection, deadline, script, &keys, args)?)?;
            if let (AcquireOutcome::Acquired { .. }, Some(replicas)) =
                (&outcome, self.inner.config.min_replicas)
            {
                wait_for_replicas(connection, deadline, replicas)?;
            }
            Ok(outcome)
        })
        .map(|answer| answer.value)
        .map_err(|failure| failure.into_backend_error(operation, request.key))
    }

    /// Raises the fence counter of `key` to at least `fence` (Redlock's write-back).
    pub(crate) fn raise_fence(
        &self,
        key: &str,
        fence: u64,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let counter = fence_key(&self.inner.config.key_prefix, key);
        let fence = fence.to_string();
        let script = &self.inner.scripts.raise_fence;
        // 1: raised, 0: already at least as high; both are fine.
        let parse = |reply| parse_ownership(reply).map(drop);
        let call = ScriptCall {
            operation: RedisOperation::RaiseFence,
            key,
            script,
            keys: &[&counter],
            args: &[&fence],
        };
        self.run_script(call, timeout, parse)
            .map(|answer| answer.value)
    }

    /// Runs one script as one call (see [`call`](Self::call)), and names the operation and the
    /// key in its error. On a cluster, on the master of the keys' slot.
    pub(crate) fn run_script<T>(
        &self,
        call: ScriptCall<'_>,
        timeout: Duration,
        parse: impl Fn(Value) -> Result<T, CallFailure>,
    ) -> Result<Answer<T>, BackendError> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.run_script(call, timeout, &parse);
        }
        let ScriptCall {
            operation,
            key,
            script,
            keys,
            args,
        } = call;
        self.call(operation, key, timeout, |connection, deadline| {
            parse(Self::eval(connection, deadline, script, keys, args)?)
        })
        .map_err(|failure| failure.into_backend_error(operation, key))
    }

    /// A backend with a pool of its own; `config` is valid.
    pub(crate) fn from_parts(connector: Connector, target: String, config: Config) -> RedisBackend {
        let pool = ConnectionPool::build(PoolSettings {
            connector: connector.clone(),
            size: config.pool_size,
            connect_timeout: config.connect_timeout,
            target: &target,
        });
        let subscriber = Subscriber::new(SubscriberSettings {
            tls: connector.is_tls(),
            connector,
            key_prefix: config.key_prefix.clone(),
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            target: target.clone(),
        });
        RedisBackend::new(pool, target, config, Some(subscriber), None)
    }

    /// A backend on a cluster: every call goes to `cluster`. `seed` is a connector to one seed
    /// node, for a pool that stays empty.
    pub(crate) fn on_cluster(
        cluster: ClusterLeases,
        seed: Connector,
        target: String,
        config: Config,
    ) -> RedisBackend {
        let pool = ConnectionPool::build(PoolSettings {
            connector: seed,
            size: 1,
            connect_timeout: config.connect_timeout,
            target: &target,
        });
        RedisBackend::new(pool, target, config, None, Some(cluster))
    }

    fn new(
        pool: ConnectionPool,
        target: String,
        config: Config,
        subscriber: Option<Subscriber>,
        cluster: Option<ClusterLeases>,
    ) -> RedisBackend {
        RedisBackend {
            inner: Arc::new(Inner {
                pool,
                config,
                scripts: Scripts::new(),
                eviction: EvictionCheck::new(target.clone()),
                target,
                subscriber,
                cluster,
            }),
        }
    }

    /// Runs `run` on a pooled connection, within `timeout` and the configured timeouts: at most
    /// the checkout timeout for a connection, at most the command timeout for the commands, and
    /// at most their sum in all.
    ///
    /// A connection that an earlier call left with replies due (it timed out, or a read was
    /// interrupted) is first drained (see [`PooledConnection::resync`]), once per call with a
    /// budget of its own: up to one more command timeout, never past `timeout`. That is the
    /// earlier call's debt, and charging it to this one would fail every call on the connection
    /// while the round trip lies between half the command timeout and the command timeout.
    ///
    /// An idle pooled connection may have been closed by the server since it was opened (a
    /// restart, a proxy, an idle timeout), and a blocking read returns `EINTR` when the process
    /// is resumed after `SIGSTOP`: then the call is retried on another connection (at most once
    /// per pooled connection, and while time is left). The scripts are safe to run twice: a
    /// retried acquire finds its own token and returns the fence it issued, and a retried
    /// renewal renews again. A retried release cannot tell whether it was the first attempt
    /// that deleted the key: the answer says whether an attempt went unanswered
    /// ([`Answer::after_unanswered_attempt`]).
    fn call<T>(
        &self,
        operation: RedisOperation,
        key: &str,
        timeout: Duration,
        mut run: impl FnMut(&mut PooledConnection, &Deadline) -> Result<T, CallFailure>,
    ) -> Result<Answer<T>, CallFailure> {
        let config = &self.inner.config;
        let caller = Deadline::after(timeout);
        // Retries on other connections share one budget: apart from one resync, a call never
        // outlasts one checkout and one command timeout, whatever the caller allows.
        let mut deadline = caller.narrowed(
            config
                .checkout_timeout
                .saturating_add(config.command_timeout),
        );
        let attempts = self.inner.pool.max_size().saturating_add(1);
        let mut attempt = 0;
        let mut resync_budget_left = true;
        let mut after_unanswered_attempt = false;
        loop {
            attempt += 1;
            if deadline.remaining().is_some_and(|left| left.is_zero()) {
                return Err(deadline.timed_out());
            }
            let mut connection = self
                .inner
                .pool
                .checkout(&deadline, config.checkout_timeout)?;
            let mut result = Ok(());
            if connection.needs_resync() {
                if resync_budget_left {
                    resync_budget_left = false;
                    let left = deadline.remaining();
                    result = connection.resync(&caller.narrowed(config.command_timeout));
                    // The time the drain took is not this call's.
                    if let Some(left) = left {
                        deadline = caller.narrowed(left);
                    }
                } else {
                    result = connection.resync(&deadline.narrowed(config.command_timeout));
                }
            }
            let commands = deadline.narrowed(config.command_timeout);
            let failure = match result.and_then(|()| run(&mut connection, &commands)) {
                Ok(value) => {
                    if operation != RedisOperation::EvictionPolicy {
                        self.inner.eviction.check_once(&mut connection, &commands);
                    }
                    return Ok(Answer {
                        value,
                        after_unanswered_attempt,
                    });
                }
                Err(failure) => failure,
            };
            after_unanswered_attempt |= connection.request_sent() && !closed_unread(&failure);
            let retry_elsewhere =
                matches!(&failure, CallFailure::Redis(error) if is_retryable_elsewhere(error));
            let time_left = deadline.remaining().is_none_or(|left| !left.is_zero());
            if retry_elsewhere && attempt < attempts && time_left {
                tracing::debug!(%operation, key, error = ?failure, "pooled Redis connection was closed or interrupted; retrying on another");
                continue;
            }
            return Err(failure);
        }
    }

    /// Runs a script: `EVALSHA`, and `EVAL` if the server does not have it cached.
    fn eval(
        connection: &mut PooledConnection,
        deadline: &Deadline,
        script: &LuaScript,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, CallFailure> {
        let reply = round_trip(connection, &script.evalsha(keys, args), deadline)?;
        if is_noscript(&reply) {
            tracing::debug!("Redis does not have the script cached (restarted?); sending it");
            return round_trip(connection, &script.eval(keys, args), deadline);
        }
        Ok(reply)
    }

    /// All renewals in one pipelined round trip (two if the server lost the script).
    fn renew_pipeline(
        &self,
        connection: &mut PooledConnection,
        deadline: &Deadline,
        requests: &[LeaseRequest<'_>],
    ) -> Result<Vec<Result<Ownership, CallFailure>>, CallFailure> {
        let prefix = &self.inner.config.key_prefix;
        let script = &self.inner.scripts.renew;
        let chunks: Vec<&[LeaseRequest<'_>]> = requests.chunks(RENEW_CHUNK).collect();
        let mut cmds = Vec::with_capacity(chunks.len());
        let sent = pipeline_round_trip(
            connection,
            chunks
                .iter()
                .map(|chunk| renew_call(script, ScriptBy::Hash, prefix, chunk, &[])),
            &mut cmds,
            deadline,
        );
        if sent.replies.is_empty() {
            if let Some(failure) = sent.failure {
                // Nothing came back: let `call` decide whether another connection may help.
                return Err(failure);
            }
        }
        let mut replies = fill(sent.replies, sent.failure, chunks.len(), deadline);

        let missing: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, reply)| reply.as_ref().is_ok_and(is_noscript))
            .map(|(index, _)| index)
            .collect();
        if !missing.is_empty() {
            tracing::debug!("Redis does not have the renew script cached (restarted?); loading it");
            let retry = std::iter::once(script.load())
                .chain(missing.iter().map(|&index| cmds[index].clone()));
            let resent = pipeline_round_trip(connection, retry, &mut Vec::new(), deadline);
            let mut again =
                fill(resent.replies, resent.failure, missing.len() + 1, deadline).into_iter();
            // The first reply is SCRIPT LOAD's. If it was refused (a user without
            // `script|load`), the EVALSHAs say NOSCRIPT again: the refusal is the answer.
            let refused = again
                .next()
                .filter(|load| !matches!(load, Ok(value) if value.clone().extract_error().is_ok()));
            for (&index, reply) in missing.iter().zip(again) {
                replies[index] = match &refused {
                    Some(load) if reply.as_ref().is_ok_and(is_noscript) => load.clone(),
                    _ => reply,
                };
            }
        }
        Ok(chunks
            .iter()
            .zip(replies)
            .flat_map(|(chunk, reply)| parse_renewals(reply, chunk.len()))
            .collect())
    }

    fn watch(&self, key: &str) -> Option<ReleaseWatch> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.watch(key);
        }
        self.inner.subscriber.as_ref()?.watch(key)
    }
}

/// `WAIT replicas timeout` on the connection that just wrote: fails unless at least `replicas`
/// replicas acknowledged every write it made.
fn wait_for_replicas(
    connection: &mut PooledConnection,
    deadline: &Deadline,
    (replicas, timeout): (u32, Duration),
) -> Result<(), CallFailure> {
    let mut wait = redis::cmd("WAIT");
    wait.arg(replicas).arg(ttl_millis(timeout));
    let started = std::time::Instant::now();
    let reply = round_trip(connection, &wait, deadline)?.extract_error()?;
    let acknowledged = match reply {
        Value::Int(count) => u32::try_from(count).unwrap_or(0),
        other => return Err(CallFailure::UnexpectedReply(format!("{other:?}"))),
    };
    if acknowledged >= replicas {
        return Ok(());
    }
    Err(CallFailure::NotReplicated {
        acknowledged,
        wanted: replicas,
        waited: started.elapsed(),
    })
}

/// One `renew.lua` call renewing every lease of `chunk`: a lock key, a token and a TTL per
/// lease, as arguments. `declared` are the keys it declares: none, or the one key a Redis
/// Cluster connection routes the call by. `by` says whether the call names the script by its
/// hash (`EVALSHA`) or sends its source (`EVAL`, for a node that lost it).
pub(crate) fn renew_call(
    script: &LuaScript,
    by: ScriptBy,
    prefix: &str,
    chunk: &[LeaseRequest<'_>],
    declared: &[&str],
) -> Cmd {
    let room = Room {
        arguments: 3 * chunk.len(),
        bytes: chunk
            .iter()
            .map(|request| prefix.len() + request.key.len() + request.token.len() + 24)
            .sum(),
    };
    let mut cmd = script.call(by, declared, &[], room);
    let mut key = String::new();
    for request in chunk {
        key.clear();
        push_lock_key(&mut key, prefix, request.key);
        cmd.arg(key.as_str())
            .arg(request.token)
            .arg(ttl_millis(request.ttl));
    }
    cmd
}

/// `replies`, then `failure` for each of the `expected` replies that did not come.
fn fill(
    replies: Vec<Value>,
    failure: Option<CallFailure>,
    expected: usize,
    deadline: &Deadline,
) -> Vec<Result<Value, CallFailure>> {
    let received = replies.len();
    let failure = failure.unwrap_or_else(|| deadline.timed_out());
    replies
        .into_iter()
        .map(Ok)
        .chain((received..expected).map(|_| Err(failure.clone())))
        .collect()
}

/// What a successful [`RedisBackend::call`] brought back.
pub(crate) struct Answer<T> {
    pub(crate) value: T,
    /// An earlier attempt of the call wrote its request, then lost its connection before the
    /// reply: the server may have run it.
    pub(crate) after_unanswered_attempt: bool,
}

/// One script run: what it is for, on which user key, and its keys and arguments.
#[derive(Clone, Copy)]
pub(crate) struct ScriptCall<'a> {
    pub(crate) operation: RedisOperation,
    pub(crate) key: &'a str,
    pub(crate) script: &'a LuaScript,
    pub(crate) keys: &'a [&'a str],
    pub(crate) args: &'a [&'a str],
}

impl LeaseBackend for RedisBackend {
    fn try_acquire(
        &self,
        request: &LeaseRequest<'_>,
        timeout: Duration,
    ) -> Result<AcquireOutcome, BackendError> {
        self.acquire_proposing(request, None, timeout)
    }

    /// Sends every renewal in one pipelined round trip: one script call per chunk of 128
    /// leases.
    fn renew_batch(
        &self,
        requests: &[LeaseRequest<'_>],
        timeout: Duration,
    ) -> Vec<Result<Ownership, BackendError>> {
        let Some(first) = requests.first() else {
            return Vec::new();
        };
        if let Some(cluster) = &self.inner.cluster {
            return cluster.renew_batch(requests, timeout);
        }
        let outcome = self.call(
            RedisOperation::Renew,
            first.key,
            timeout,
            |connection, deadline| self.renew_pipeline(connection, deadline, requests),
        );
        match outcome.map(|answer| answer.value) {
            Ok(results) => requests
                .iter()
                .zip(results)
                .map(|(request, result)| {
                    result.map_err(|failure| {
                        failure.into_backend_error(RedisOperation::Renew, request.key)
                    })
                })
                .collect(),
            Err(failure) => requests
                .iter()
                .map(|request| {
                    Err(failure
                        .clone()
                        .into_backend_error(RedisOperation::Renew, request.key))
                })
                .collect(),
        }
    }

    fn release(
        &self,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Ownership, BackendError> {
        let prefix = &self.inner.config.key_prefix;
        let lock = lock_key(prefix, key);
        let marker = release_marker_key(prefix, key);
        let marker_ttl = ttl_millis(self.inner.config.release_marker_ttl()).to_string();
        let call = ScriptCall {
            operation: RedisOperation::Release,
            key,
            script: &self.inner.scripts.release,
            keys: &[&lock, &marker],
            args: &[token, &marker_ttl, self.inner.config.publish_command()],
        };
        match self.run_script(call, timeout, parse_ownership)? {
            // The key is gone and no marker says our token deleted it, yet an attempt whose
            // reply was lost may have (the marker was overwritten by a later holder's release):
            // saying `NotOwned` would report a successful release as a loss.
            Answer {
                value: Ownership::NotOwned,
                after_unanswered_attempt: true,
            } => {
                Err(CallFailure::ReleaseOutcomeUnknown
                    .into_backend_error(RedisOperation::Release, key))
            }
            answer => Ok(answer.value),
        }
    }

    /// A watch woken when `key` is released through any backend with the same key prefix on the
    /// same server, and also once whenever the key's subscription takes effect (at first, and
    /// after the shared subscriber reconnects: releases may have been missed before). The
    /// subscriber subscribes to the key's channel in the background, while the key has a watch.
    /// `None` for a backend made by [`from_pool`](RedisBackend::from_pool).
    fn watch_release(&self, key: &str) -> Option<ReleaseWatch> {
        self.watch(key)
    }

    /// One script reads the lock's `PTTL` and its fence counter at one instant.
    fn inspect(&self, key: &str, timeout: Duration) -> Result<lock_core::KeyState, BackendError> {
        self.inspect_lock(key, timeout)
    }

    /// One script deletes the lock key (not its fence counter) and publishes the release.
    fn force_release(&self, key: &str, timeout: Duration) -> Result<bool, BackendError> {
        self.force_release_lock(key, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn backend_is_send_sync_and_object_safe() {
        assert_send_sync::<RedisBackend>();
        let backend = RedisBackend::connect("redis://127.0.0.1:1").unwrap();
        let _shared: Arc<dyn LeaseBackend> = Arc::new(backend);
    }

    #[test]
    fn debug_shows_settings_but_never_the_password() {
        let backend = RedisBackend::builder("redis://user:hunter2@db.internal:6380/3")
            .key_prefix("svc:")
            .pool_size(3)
            .build()
            .unwrap();
        let shown = format!("{backend:?}");
        for expected in [
            "redis://user:***@db.internal:6380/3",
            "key_prefix: \"svc:\"",
            "pool_size: 3",
        ] {
            assert!(shown.contains(expected), "{expected} not in {shown}");
        }
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_zero_timeout_fails_at_once_without_touching_the_network() {
        // Port 1 is closed, but the call must not even try.
        let backend = RedisBackend::connect("redis://127.0.0.1:1").unwrap();
        let request = LeaseRequest {
            key: "k",
            token: "t",
            ttl: Duration::from_secs(1),
        };
        let error = backend.try_acquire(&request, Duration::ZERO).unwrap_err();
        assert!(error.is_transient());
        let cause = error.cause().downcast_ref::<RedisBackendError>().unwrap();
        assert!(
            matches!(cause, RedisBackendError::Timeout { .. }),
            "{cause:?}"
        );
        assert!(backend.renew_batch(&[], Duration::ZERO).is_empty());
    }

    #[test]
    fn a_closed_port_is_a_transient_error_within_the_checkout_timeout() {
        let backend = RedisBackend::builder("redis://127.0.0.1:1")
            .checkout_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let error = backend.release("k", "t", Duration::MAX).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(error.is_transient(), "{error}");
        let message = crate::errors::tests::chain(&error);
        assert!(message.contains("release of lock \"k\""), "{message}");
    }

    #[test]
    fn from_pool_backends_have_no_release_watch() {
        let client = redis::Client::open("redis://127.0.0.1:1").unwrap();
        let pool = r2d2::Pool::builder()
            .max_size(2)
            .min_idle(Some(0))
            .build_unchecked(client);
        let backend = RedisBackend::from_pool(pool);
        assert!(backend.watch_release("k").is_none());
        assert!(format!("{backend:?}").contains("pool_size: 2"));
    }
}
