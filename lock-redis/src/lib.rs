//! Redis lease backend for [`lock_core`]: locks with a TTL in one Redis server (or the master of
//! a [Sentinel](#sentinel) group, or the masters of a [Cluster](#cluster)), taken, renewed and released by atomic Lua scripts, over an
//! [r2d2] pool of synchronous connections. Needs Redis 7.0 or later.
//!
//! # Getting started
//!
//! Make a [`RedisBackend`] and hand it to a [`LockManager`](lock_core::LockManager); the manager
//! does the waiting, the renewing and the loss reporting:
//!
//! ```no_run
//! use std::time::Duration;
//! use lock_core::LockManager;
//! use lock_redis::RedisBackend;
//!
//! let backend = RedisBackend::connect("redis://:secret@cache.internal:6379/0")?;
//! let manager = LockManager::new(backend);
//! let lease = manager.acquire("reports:daily", Duration::from_secs(30))?;
//! println!("writing with fence {}", lease.fence());
//! lease.release()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Building a backend checks the URL and the settings, but does not connect (connections are
//! opened when calls need them), so it works without a server:
//!
//! ```
//! use std::time::Duration;
//! use lock_redis::{RedisBackend, RedisBackendError};
//!
//! let backend = RedisBackend::builder("redis://app:secret@localhost:6379/2")
//!     .pool_size(8)
//!     .command_timeout(Duration::from_millis(500))
//!     .key_prefix("billing:lock:")
//!     .build()?;
//! // Passwords never show: not in Debug, not in errors, not in logs.
//! assert!(!format!("{backend:?}").contains("secret"));
//!
//! let error = RedisBackend::connect("localhost:6379").unwrap_err();
//! assert!(matches!(error, RedisBackendError::InvalidUrl { .. }));
//! # Ok::<(), RedisBackendError>(())
//! ```
//!
//! # TLS
//!
//! A `rediss://` URL connects over TLS (rustls, through the `redis` crate's `tls-rustls`):
//! Redis 6 or later started with `--tls-port`. The builder takes the CA that signed the server's
//! certificate and, for a server run with `tls-auth-clients yes`, a client certificate and key
//! (mutual TLS); [`RedlockBuilder`] takes the same, for every node:
//!
//! ```
//! use lock_redis::RedisBackend;
//!
//! # let ca = rcgen::generate_simple_self_signed(vec!["redis.internal".to_owned()])?;
//! # let client = rcgen::generate_simple_self_signed(vec!["app".to_owned()])?;
//! # let (ca_pem, cert_pem, key_pem) = (ca.cert.pem(), client.cert.pem(), client.signing_key.serialize_pem());
//! let backend = RedisBackend::builder("rediss://:secret@redis.internal:6380/0")
//!     .tls_ca_pem(ca_pem) // or .tls_ca_file("/etc/redis/tls/ca.crt")
//!     .tls_client_cert_pem(cert_pem, key_pem.clone()) // or .tls_client_cert_files(cert, key)
//!     .build()?;
//! let shown = format!("{backend:?}");
//! assert!(!shown.contains("secret") && !shown.contains(&key_pem));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - **Trust**: without a CA, the system's certificate store (read on each new connection);
//!   with one, only the CAs given. The certificate must name the URL's host: its DNS name, or
//!   its IP address for a URL such as `rediss://10.0.0.5:6380`.
//! - **Checked when built**: the CA, certificate and key files are read by `build`, which fails
//!   with [`RedisBackendError::InvalidConfig`] for a file it cannot read, PEM without a
//!   certificate or key, or a key that does not match its certificate, and for TLS settings on a
//!   URL that is not `rediss://`. Messages name files and problems, never a key's contents.
//! - **Failures are typed**: a call that cannot set up TLS fails with
//!   [`RedisBackendError::Tls`], whose [`TlsFailure`] says what went wrong and whose source is
//!   the [`rustls::Error`] (or the socket's error). Certificate problems (unknown CA, a name
//!   mismatch, an expired certificate, a client certificate missing or refused) and a server
//!   that answers in plain text are permanent, reported at once. A server that stays silent
//!   during the handshake (paused, unreachable behind a proxy, or a plain-text Redis port,
//!   which waits silently for the end of a command) or closes the connection in its middle is
//!   transient: each attempt ends within the connect timeout, and the call within its checkout
//!   timeout, as for plain TCP.
//! - **Development only**: [`danger_accept_invalid_certificates`](RedisBackendBuilder::danger_accept_invalid_certificates)
//!   (or a URL ending in `#insecure`) accepts any certificate, and logs a warning for every
//!   backend built with it.
//! - **Crypto provider**: the `redis` crate builds its rustls configuration with rustls'
//!   *process-wide default* crypto provider and cannot be given one. Building a `rediss://`
//!   backend therefore installs rustls' ring provider as that default **if the program has
//!   installed none** (a program that installs its own, say aws-lc-rs, before building the
//!   backend keeps it; one that installs its own later gets an error from rustls, as the default
//!   is set once per process). Certificates are checked at build time with ring, passed
//!   explicitly. A [`from_pool`](RedisBackend::from_pool) pool of `rediss://` clients needs a
//!   default provider too: install one, or build any TLS backend first.
//! - **Cost**: a TLS handshake per new pooled connection (connections are reused), and rustls'
//!   encryption per command.
//!
//! # What is stored
//!
//! With the default key prefix `lock:`, the lock `jobs:42` is the string key `lock:{jobs:42}`,
//! holding the owner's token with a millisecond TTL (rounded up from the lease's TTL). Its fence
//! counter is `lock:{jobs:42}:fence`, a key without TTL. Its releases are published on the
//! channel named like its key, `lock:{jobs:42}`. The braces are a Redis Cluster hash tag,
//! so every key of a lock shares one slot (see [Cluster](#cluster) for user keys with braces).
//!
//! - **acquire** sets the key if it is free and issues its fence in the same script: every
//!   grant issues `max(counter + 1, server TIME in microseconds)` and stores it in the counter.
//!   So fences keep increasing when the counter comes back missing or stale: a restart without
//!   persistence, a restore from an older snapshot, a failover to a replica that had not received
//!   the last grants (as long as the server's clock does not step back, and fewer than one lock
//!   per microsecond is taken on average). A counter that is not a whole number below 2^53 (fences
//!   are exact in Lua's doubles only up to there), or not a string at all, fails the acquire with a
//!   permanent error naming it, before anything is written. When another token holds the key, the
//!   holder's remaining TTL comes back, so waiters sleep no longer than useful.
//! - **renew** sets the TTL only if the key holds the token; it never recreates a missing key.
//!   The manager's renewer sends all due renewals in one pipelined round trip, one script call
//!   per 128 leases (the script's fixed cost is paid per call, not per lease).
//! - **release** deletes the key only if it holds the token, and publishes the release (a
//!   publish the server refuses does not fail the release). It also leaves a marker,
//!   `lock:{jobs:42}:released`, holding the token for a few seconds (twice the longest a call
//!   can retry, at least 10 s): a release retried after its reply was lost finds it and knows its
//!   first attempt deleted the key, so a release is never reported as a loss for a lost reply.
//!   When the marker is gone too (a later holder released since), the release fails with
//!   [`RedisBackendError::ReleaseOutcomeUnknown`], a transient error that is no loss.
//!
//! - **inspect** (for operators: `lockctl status`) reads the lock key's `PTTL` and its fence
//!   counter in one script, changing nothing.
//! - **force release** (for operators: `lockctl release --force`) deletes the lock key whatever
//!   its token and publishes the release; the fence counter stays, so the next holder's fence
//!   is still higher, and the holder finds its key gone at its next renewal.
//!
//! Calls send `EVALSHA`, falling back to `EVAL` when the server's script cache is empty (after
//! a restart).
//!
//! # Time limits
//!
//! Every call is bounded: it waits at most the smaller of the manager's timeout and the
//! [checkout timeout](RedisBackendBuilder::checkout_timeout) for a connection, then at most the
//! smaller of what is left and the [command timeout](RedisBackendBuilder::command_timeout) for
//! its round trips; new connections must connect within the
//! [connect timeout](RedisBackendBuilder::connect_timeout) (behind Sentinel, asking the
//! sentinels and checking the server's `ROLE` included). With the defaults (2 s each) an
//! unreachable, paused or refusing server is reported within 4 seconds. A pooled connection
//! found closed (the server restarted), or a read interrupted by a signal (`EINTR`), makes the
//! call retry on another connection while time is left. A connection left with replies due by
//! a timed-out call is drained (up to a `PING`) before its next use, within one more command
//! timeout of its own (so such a call may take up to 6 s with the defaults), and socket
//! timeouts never end a read before the call's deadline: a server that answers within the
//! command timeout is served again as soon as a latency spike has passed.
//!
//! # Sentinel
//!
//! A backend can follow the master of a Sentinel group: give it the sentinels' addresses and the
//! name they monitor the master under, as a URL or to a builder.
//!
//! ```text
//! redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?sentinel_username=U&sentinel_password=P]
//! ```
//!
//! The user and password log in to the master; the sentinels are asked without logging in
//! unless `sentinel_password` (and `sentinel_username`) say otherwise. A sentinel's port is 26379
//! unless given; reserved characters are percent-encoded. Passwords never show in `Debug`,
//! errors or logs.
//!
//! ```
//! use std::time::Duration;
//! use lock_redis::RedisBackend;
//!
//! let backend = RedisBackend::connect(
//!     "redis+sentinel://:hunter2@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/locks",
//! )?;
//! assert!(!format!("{backend:?}").contains("hunter2"));
//!
//! // The same, piece by piece.
//! let backend = RedisBackend::sentinel_builder(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], "locks")
//!     .master_auth(None, "hunter2")
//!     .sentinel_auth(None, "sentinel-secret")
//!     .command_timeout(Duration::from_millis(500))
//!     .build()?;
//! # Ok::<(), lock_redis::RedisBackendError>(())
//! ```
//!
//! **Finding the master.** Every new connection (of the pool, and the release subscriber's)
//! asks the sentinels in turn, starting with the one that answered last, for
//! `SENTINEL GET-MASTER-ADDR-BY-NAME`, connects to the address the first one names, and asks
//! that server `ROLE`: a server that is not a master is refused. Discovery is part of opening a
//! connection, so it is bounded by the [connect timeout](RedisBackendBuilder::connect_timeout);
//! each sentinel gets a fair share of what is left of it, so a silent sentinel cannot use it
//! all. (The `redis` crate's own Sentinel client is not used: it reads `SENTINEL MASTERS`, which
//! keeps naming the old master for about a second after `GET-MASTER-ADDR-BY-NAME` names the new
//! one, and connects without a timeout.)
//!
//! **Following a failover.** A thread per backend (`lock-redis-sentinel`, started with its
//! first connection, ended when the backend is dropped) asks a sentinel every 250 ms where the
//! master is. When the answer changes, pooled connections to the old master are dropped
//! instead of used, and the release subscriber subscribes again on the new master (waking
//! every waiter once, in case a release went unheard). A call whose server answers
//! `READONLY` (the old master, once Sentinel has made it a replica) fails as a transient error,
//! so the manager retries it; its connection is dropped, not pooled again, and the next one
//! asks the sentinels anew. While no sentinel answers, the backend keeps to the master they
//! named last: its connections stay in use, and a new one goes there (if its `ROLE` still says
//! master) after half the connect timeout spent asking.
//!
//! Measured on one shared two-core machine with `down-after-milliseconds` 1000, twelve times
//! each: after `SENTINEL FAILOVER`, every sentinel named the new master 1.1 to 1.8 s later, and
//! after the master was killed, 2.2 to 2.9 s later; in both cases the first acquire on the new
//! master succeeded within 250 ms of that (`tests/tests/redis_sentinel.rs` checks within 2 s).
//!
//! **What a lease granted by a demoted master means.** Redis replicates asynchronously, and a
//! demoted master does not know it yet: after `SENTINEL FAILOVER`, or when a paused master
//! resumes, the old master keeps accepting writes for about 10 s, until Sentinel turns it into
//! a replica (and closes its connections). From the replica's promotion until the sentinels
//! name it (about a second) and this backend asks them (up to 250 ms more), and for a call
//! already in flight on the old master, acquires and renewals may still be granted by the old
//! master. The new master never sees those writes:
//!
//! - a lock acquired there is not held on the new master, so another client can acquire it
//!   too; the first holder learns that it lost it at its next renewal, which reaches the new
//!   master (at a third of the TTL), and is told then (`lost()`, `is_held()` false);
//! - a renewal granted there extends the lease's `valid_until`, while the new master keeps the
//!   key's older expiry: if that comes first, the key can be taken before the holder's next
//!   renewal reports the loss. A lease whose TTL is at least three times the time to follow a
//!   failover (about 1.5 s after a forced one: a TTL of 5 s or more) is renewed on the new
//!   master before that; `tests/tests/redis_sentinel.rs` checks it with 6 s.
//!
//! During that window two holders can each believe they hold the lock. **Fences are what keeps
//! the protected resource safe**: the new master issues `max(counter + 1, server TIME in µs)`,
//! above every fence the old master issued before the promotion (with the servers' clocks in
//! step, for the grants replication had not carried over yet), and a resource that refuses
//! writes with a lower fence than it has seen refuses whichever of the two wrote with the
//! lower one once the other has written. Setting `min-replicas-to-write 1` (with a short
//! `min-replicas-max-lag`) on the masters makes an old master that lost its replicas refuse
//! writes sooner (`NOREPLICAS`, a transient error here).
//!
//! **ACL.** Besides the rules of [ACL](#acl), the master's user needs `+role` (the check of
//! each new connection; without it, connections fail with a permanent `NOPERM` error). On
//! sentinels with ACL users, the sentinel user needs `+sentinel|get-master-addr-by-name`.
//! Connections opened through the sentinels log in (`AUTH`) and select their database
//! (`SELECT`) in round trips of their own, each bounded by what is left of the connect timeout,
//! and send no `CLIENT SETINFO`.
//!
//! # Cluster
//!
//! A backend can keep its locks on a Redis Cluster (Redis 7 or later): give it some of the
//! nodes, as a URL or to a builder; TLS and `min_replicas` are not supported there yet.
//!
//! ```text
//! redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]
//! ```
//!
//! ```
//! use lock_redis::RedisBackend;
//!
//! let backend = RedisBackend::connect("redis+cluster://:hunter2@10.0.0.1:7000,10.0.0.2:7000")?;
//! assert!(!format!("{backend:?}").contains("hunter2"));
//! let backend = RedisBackend::cluster_builder(&["10.0.0.1:7000", "10.0.0.2:7000"])
//!     .credentials("locker", "hunter2")
//!     .build()?;
//! # Ok::<(), lock_redis::RedisBackendError>(())
//! ```
//!
//! - **One slot per lease, by construction.** The prefix has no braces, so the hash tag of every
//!   key of a lock runs from the `{` after the prefix to the first `}` after it: the same text
//!   in all of them, whatever braces the user key holds. A user key starting with `}` (which
//!   would leave the tag empty, so each key would be hashed whole) is written with a `\` in
//!   front, as is one starting with `\`, which keeps the mapping one to one.
//! - **Where calls go.** The `redis` crate's cluster client learns which master owns which slot
//!   and follows `MOVED` and `ASK`. Each call goes to the master of its key's slot, through a
//!   bounded single-server pool per master (every timeout above applies); a renewal batch is
//!   split per master and sent to all of them at once, one pipelined round trip each, with one
//!   script call per 128 leases whatever their slots (the renewal script takes its keys as
//!   arguments, with the flag `allow-cross-slot-keys`; a key the node does not serve is refused
//!   alone, and that lease asked again through the cluster's routing). A call that a master answers
//!   with `MOVED`, `ASK`, `TRYAGAIN` or `CLUSTERDOWN` goes once more through a pooled cluster
//!   connection of the crate, which follows the redirection (and refreshes the layout); a master
//!   that refuses connections makes the backend look at the layout anew. Failed cluster connections
//!   are dropped, never pooled again (the crate's synchronous connection would keep a dead master's
//!   address).
//! - **Wake-ups** use sharded pub/sub: releases are announced with `SPUBLISH`, and one thread
//!   per backend (`lock-redis-cluster-subscriber`) listens with `SSUBSCRIBE` on the master of
//!   each waited key's slot, following failovers and slot moves.
//! - **Failover.** A master's failure touches only its own slots' leases: they are held on the
//!   promoted replica if replication carried their keys and a renewal reaches it before they
//!   expire, else reported lost; fences stay higher than any issued before (the server's
//!   clock). While a slot moves, a lock whose keys are split between two masters cannot be
//!   acquired (`TRYAGAIN`, transient).
//! - **ACL**: [`cluster_acl_rules`]: [`acl_rules`] and `+spublish +ssubscribe +sunsubscribe
//!   +readonly +cluster|slots`, on every node.
//! - [`RedisBackend::eviction_policy`] asks every master, and names the first policy that is
//!   not `noeviction`.
//!
//! # Errors
//!
//! Construction fails with a [`RedisBackendError`]. Calls fail with a
//! [`BackendError`](lock_core::BackendError) that is
//! [transient](lock_core::BackendError::transient) when retrying may help (connection refused,
//! reset or timed out, a server that is loading, busy, read-only or failing over) and
//! [permanent](lock_core::BackendError::permanent) when it cannot (`WRONGTYPE` on a lock key,
//! missing ACL permissions, a wrong password, a script error). Its
//! [`cause`](lock_core::BackendError::cause) is a [`RedisBackendError`] naming the operation
//! and the key; what Redis said is that error's [`source`](std::error::Error::source) (messages
//! do not repeat their source: print the chain).
//!
//! A release whose reply is lost with its connection is retried; if the retry finds the key
//! gone, the first attempt may have deleted it, so the release fails with the transient
//! [`RedisBackendError::ReleaseOutcomeUnknown`] rather than reporting a loss.
//!
//! # Waking waiters
//!
//! A caller that finds a lock taken waits for its release: the backend's one subscriber thread
//! subscribes, over one dedicated connection, to the channel of each key that a thread of this
//! process waits for, only while one does, and wakes a waiter as soon as the key is released.
//! An uncontended acquire and release subscribe to nothing, and their release reaches no other
//! process. The thread starts with the first wait, reconnects with backoff when its connection
//! dies, and ends soon after the backend is dropped (dropping does not wait for it). A new
//! key's subscription takes effect within about 10 ms plus a round trip; its waiters are woken
//! once when it does, in case the key was released meanwhile. Waiters also retry on the
//! manager's backoff, so a missed message only costs latency.
//!
//! # ACL
//!
//! A Redis user needs these rules to hold leases under the default key prefix `lock:`, and no
//! more ([`acl_rules`] gives them for any prefix):
//!
//! ```text
//! ACL SETUSER locker on >PASSWORD resetkeys ~lock:* resetchannels &lock:* -@all +evalsha +eval +script|load +get +set +pexpire +pttl +del +publish +time +ping +subscribe +unsubscribe +punsubscribe +info
//! ```
//!
//! Log in as that user in the URL (`redis://locker:PASSWORD@host`) or with
//! [`RedisBackendBuilder::credentials`].
//!
//! - `~lock:*`: the lock keys `lock:{KEY}`, the fence counters `lock:{KEY}:fence` and the
//!   release markers `lock:{KEY}:released`.
//! - `&lock:*`: the release channels, one per lock, named like its key. Redis 7 gives new users no channel
//!   (`acl-pubsub-default resetchannels`); without it, releases still work (the script ignores a
//!   refused `PUBLISH`), but waiters are not woken early: the subscriber logs one warning and
//!   tries again every minute, and waiters rely on the manager's backoff.
//! - `+evalsha +eval +script|load`: the scripts (`EVAL` and `SCRIPT LOAD` when the server's
//!   script cache is empty).
//! - `+get +set +pexpire +pttl +del +publish +time`: what the scripts run. Scripts run with the
//!   caller's permissions.
//! - `+ping`: draining a connection after a timeout, and the subscriber's health check.
//! - `+subscribe +unsubscribe +punsubscribe`: the release subscriber, which subscribes to a
//!   key's channel while a thread waits for it (the `redis` crate also unsubscribes from
//!   patterns before it closes the connection).
//! - `+info`: the eviction policy check (`INFO memory`); without it the check is skipped, with a
//!   debug log. `CONFIG GET` is tried after a refused `INFO`; it is not in the rules because it
//!   also shows secrets such as `requirepass`.
//! - Add `+wait` with [`RedisBackendBuilder::min_replicas`].
//! - Add `+select` when the URL names a database other than 0, and on Redis 7.2 or later
//!   `+client|setinfo` (the connection handshake sends it; a refusal is ignored, but shows in
//!   `ACL LOG`).
//!
//! A missing key or command permission fails calls with a permanent error whose source is what
//! Redis said (`NOPERM ...`; for a command a script runs, Redis 7.0 only says `The user
//! executing the script can't run this command or subcommand`, and `ACL LOG` names it).
//!
//! # Eviction
//!
//! Set `maxmemory-policy noeviction` on lock servers. Under any other policy, a server that
//! reaches its `maxmemory` evicts keys: `volatile-*` policies evict keys with a TTL, which lock
//! keys are, so a held lock can vanish and a second holder get it; `allkeys-*` policies evict
//! fence counters too. A backend reads the policy once, after its first successful call
//! (`INFO memory`, else `CONFIG GET maxmemory-policy`), and logs a warning (`tracing`) if it is
//! not `noeviction`; a user who may not read it gets a debug log instead.
//! [`RedisBackend::eviction_policy`] reads it on demand.
//!
//! # What it does not promise
//!
//! - One Redis server is a single point of failure, and Redis replication is asynchronous: a
//!   failover can lose a lock that was just acquired. Fences make that safe for resources that
//!   check them; use Redlock over independent masters to survive a node failure. Behind
//!   Sentinel, the lock stays available through a failover, but for a few seconds around it a
//!   lock may be held twice (see [Sentinel](#sentinel)); a sentinel partitioned away with the
//!   old master keeps naming it to clients on its side until the partition heals.
//! - A lease's validity is measured on the client's monotonic clock, with the drift allowance
//!   of the manager; a server whose clock runs fast can expire keys early.
//! - Sentinel connections are plain TCP (no TLS to the sentinels or the master yet), and
//!   replicas are never read from.
//!
//! [r2d2]: https://docs.rs/r2d2

// The crate's layout, by job:
// - `connection`: URLs, deadlines, how to open a connection to the server that takes the writes
//   (`connector`: one server, or the master a Sentinel group names, in `sentinel`), and the pool
//   of connections whose calls are bounded in time;
// - `backend`: the single-server backend, its builder and its eviction-policy check;
// - `scripts`: what is stored where (`keys`), and the Lua scripts that change it;
// - `cluster`: the same leases on a Redis Cluster, each call on the master of its slot;
// - `subscriber`: release wake-ups over pub/sub;
// - `redlock`: the same leases over a majority of independent servers;
// - `errors` and `acl`: what goes wrong, and the rights a Redis user needs.
mod acl;
mod backend;
mod cluster;
mod connection;
mod errors;
mod redlock;
mod scripts;
mod subscriber;

pub use acl::{acl_rules, cluster_acl_rules};
pub use backend::builder::RedisBackendBuilder;
pub use backend::RedisBackend;
pub use connection::tls::TlsFailure;
pub use connection::url::redact_url;
pub use errors::{RedisBackendError, RedisOperation};
pub use redlock::{NoQuorum, RedlockBackend, RedlockBuilder};

/// The `r2d2` crate this backend's pool comes from, for
/// [`RedisBackend::from_pool`] without a version mismatch.
pub use r2d2;
/// The `redis` crate this backend speaks through, for [`RedisBackend::from_pool`] and for
/// downcasting [`RedisBackendError::Command`]'s source.
pub use redis;
/// The `rustls` crate that does this backend's TLS, for downcasting the source of a
/// [`RedisBackendError::Tls`] to a `rustls::Error`.
pub use rustls;
