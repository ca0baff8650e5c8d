//! [`RedisBackendBuilder`] and the backend's settings, with their defaults in one place.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::spec::{is_cluster_url, ClusterSpec};
use crate::cluster::ClusterLeases;
use crate::connection::connector::Connector;
use crate::connection::sentinel::spec::{Credentials, SentinelOptions};
use crate::connection::sentinel::SentinelMaster;
use crate::connection::tls::TlsSettings;
use crate::connection::url::{open_client, redact_url};
use crate::{RedisBackend, RedisBackendError};

/// The largest pool a builder accepts.
const MAX_POOL_SIZE: u32 = 1024;

/// The shortest timeout a builder accepts.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// The longest timeout a builder accepts.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The settings of a [`RedisBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    /// The most pooled connections.
    pub(crate) pool_size: u32,
    /// The longest a call waits for a pooled connection.
    pub(crate) checkout_timeout: Duration,
    /// The longest a new connection may take (TCP connect and handshake).
    pub(crate) connect_timeout: Duration,
    /// The longest a call's commands may take, reads and writes together.
    pub(crate) command_timeout: Duration,
    /// Prepended to every Redis key and to the release channel.
    pub(crate) key_prefix: String,
    /// Replicas that must acknowledge an acquire, and how long to wait for them.
    pub(crate) min_replicas: Option<(u32, Duration)>,
    /// On a Redis Cluster: releases are announced with sharded pub/sub (`SPUBLISH`).
    pub(crate) sharded: bool,
}

impl Config {
    /// The command that announces a release: `SPUBLISH` on a cluster (to the subscribers of
    /// the key's shard only), else `PUBLISH`.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// How long a release marker lives: longer than any call's retries can last (a checkout,
    /// a resync and a command, twice over), and at least ten seconds.
    pub(crate) fn release_marker_ttl(&self) -> Duration {
        let call = self
            .checkout_timeout
            .saturating_add(self.command_timeout.saturating_mul(2));
        call.saturating_mul(2)
            .clamp(Duration::from_secs(10), lock_core::MAX_TTL)
    }
}

/// The defaults, documented on [`RedisBackendBuilder`]: keep the two in step.
impl Default for Config {
    fn default() -> Config {
        Config {
            pool_size: 16,
            checkout_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            key_prefix: "lock:".to_owned(),
            min_replicas: None,
            sharded: false,
        }
    }
}

impl Config {
    /// Checks every setting.
    fn validate(&self) -> Result<(), RedisBackendError> {
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return Err(invalid(format!(
                "pool_size must be between 1 and {MAX_POOL_SIZE}, not {}",
                self.pool_size
            )));
        }
        for (name, value) in [
            ("checkout_timeout", self.checkout_timeout),
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
        ] {
            if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&value) {
                return Err(invalid(format!(
                    "{name} must be between {MIN_TIMEOUT:?} and {MAX_TIMEOUT:?}, not {value:?}"
                )));
            }
        }
        if let Some((replicas, timeout)) = self.min_replicas {
            if replicas == 0 || !(MIN_TIMEOUT..self.command_timeout).contains(&timeout) {
                return Err(invalid(format!(
                    "min_replicas needs at least 1 replica and a timeout from {MIN_TIMEOUT:?} to \
                     less than command_timeout ({:?}), not {replicas} and {timeout:?}",
                    self.command_timeout
                )));
            }
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(invalid(format!(
                "key_prefix {:?} must not contain '{{' or '}}': the lock key's {{…}} hash tag \
                 must be the first in every key",
                self.key_prefix
            )));
        }
        Ok(())
    }
}

fn invalid(reason: String) -> RedisBackendError {
    RedisBackendError::InvalidConfig { reason }
}

/// Configures a [`RedisBackend`]; made by [`RedisBackend::builder`].
///
/// Every setting has a default, chosen so that an unreachable, silent or refusing server is
/// reported within a few seconds:
///
/// | setting | default | what it bounds |
/// |---|---|---|
/// | [`pool_size`](Self::pool_size) | 16 | pooled connections (opened on demand) |
/// | [`checkout_timeout`](Self::checkout_timeout) | 2 s | waiting for a pooled connection |
/// | [`connect_timeout`](Self::connect_timeout) | 2 s | opening one connection (TCP and handshake) |
/// | [`command_timeout`](Self::command_timeout) | 2 s | one call's round trips, reads and writes |
/// | [`key_prefix`](Self::key_prefix) | `"lock:"` | the namespace of keys and of the release channel |
///
/// Each call is also bounded by the `timeout` the lock manager passes: a call waits at most the
/// smaller of that and the checkout timeout for a connection, then at most the smaller of what
/// is left and the command timeout for its commands.
///
/// [`build`](Self::build) checks every setting:
///
/// ```
/// use std::time::Duration;
/// use lock_redis::{RedisBackend, RedisBackendError};
///
/// let backend = RedisBackend::builder("redis://127.0.0.1:6379/0")
///     .pool_size(4)
///     .command_timeout(Duration::from_millis(500))
///     .key_prefix("billing:lock:")
///     .build()?;
/// assert!(format!("{backend:?}").contains("billing:lock:"));
///
/// let error = RedisBackend::builder("redis://127.0.0.1")
///     .key_prefix("{tenant}:")
///     .build()
///     .unwrap_err();
/// assert!(matches!(error, RedisBackendError::InvalidConfig { .. }));
/// # Ok::<(), RedisBackendError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct RedisBackendBuilder {
    url: String,
    config: Config,
    /// An ACL user and its password, given apart from the URL.
    credentials: Option<(String, String)>,
    tls: TlsSettings,
    /// The Sentinel group, when it is not (only) in the URL.
    sentinel: SentinelOptions,
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.config.pool_size)
            .field("checkout_timeout", &self.config.checkout_timeout)
            .field("connect_timeout", &self.config.connect_timeout)
            .field("command_timeout", &self.config.command_timeout)
            .field("key_prefix", &self.config.key_prefix)
            .field("min_replicas", &self.config.min_replicas)
            .field(
                "user",
                &self.credentials.as_ref().map(|(user, _password)| user),
            )
            .field("tls", &self.tls)
            .field("sentinel", &self.sentinel)
            .finish()
    }
}

impl RedisBackendBuilder {
    pub(crate) fn new(url: &str) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.to_owned(),
            config: Config::default(),
            credentials: None,
            tls: TlsSettings::default(),
            sentinel: SentinelOptions::default(),
        }
    }

    pub(crate) fn sentinel(sentinels: &[&str], master_name: &str) -> RedisBackendBuilder {
        let sentinel = SentinelOptions::group(sentinels, master_name);
        RedisBackendBuilder {
            url: sentinel.url().unwrap_or_default(),
            config: Config::default(),
            credentials: None,
            tls: TlsSettings::default(),
            sentinel,
        }
    }

    /// The most connections the pool opens, from 1 to 1024 (default 16). Connections are
    /// opened when calls need them, and closed after 10 minutes idle.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// assert!(RedisBackend::builder("redis://localhost").pool_size(0).build().is_err());
    /// assert!(RedisBackend::builder("redis://localhost").pool_size(1).build().is_ok());
    /// ```
    pub fn pool_size(mut self, size: u32) -> RedisBackendBuilder {
        self.config.pool_size = size;
        self
    }

    /// The longest a call waits for a pooled connection (default 2 s; 1 ms to 1 hour). When
    /// every connection is busy, or none can be opened, the call fails with a transient error
    /// after this long; with a permanent one as soon as connecting fails for good (a wrong
    /// password).
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::builder("redis://localhost")
    ///     .checkout_timeout(Duration::from_millis(250))
    ///     .build()?;
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn checkout_timeout(mut self, timeout: Duration) -> RedisBackendBuilder {
        self.config.checkout_timeout = timeout;
        self
    }

    /// The longest opening one connection may take: the TCP connect and the handshake
    /// (`AUTH`, `SELECT`, `CLIENT SETINFO`). Default 2 s; 1 ms to 1 hour.
    ///
    /// Connections are opened in the background by the pool while a call waits up to its
    /// checkout timeout, so a connect timeout longer than the checkout timeout only delays
    /// when the pool gives up on an attempt.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_redis::RedisBackend;
    ///
    /// let error = RedisBackend::builder("redis://localhost")
    ///     .connect_timeout(Duration::ZERO)
    ///     .build()
    ///     .unwrap_err();
    /// assert!(error.to_string().contains("connect_timeout"));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> RedisBackendBuilder {
        self.config.connect_timeout = timeout;
        self
    }

    /// The longest one call's commands may take once it has a connection, reads and writes
    /// together (default 2 s; 1 ms to 1 hour). A paused or silent server fails the call with a
    /// transient timeout after this long.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::builder("redis://localhost")
    ///     .command_timeout(Duration::from_millis(300))
    ///     .build()?;
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn command_timeout(mut self, timeout: Duration) -> RedisBackendBuilder {
        self.config.command_timeout = timeout;
        self
    }

    /// Logs in as the ACL user `user` with `password`, instead of (or overriding) the user and
    /// password in the URL: for secrets kept apart from configuration. The password never
    /// appears in `Debug`, errors or logs. [`acl_rules`](crate::acl_rules) gives the rules such
    /// a user needs, and no more.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// let builder = RedisBackend::builder("redis://cache.internal:6379/0")
    ///     .credentials("locker", "s3cret");
    /// assert!(format!("{builder:?}").contains("locker"));
    /// assert!(!format!("{builder:?}").contains("s3cret"));
    /// let backend = builder.build()?;
    /// assert!(!format!("{backend:?}").contains("s3cret"));
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> RedisBackendBuilder {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// Makes every acquire wait until `replicas` replicas of the server have acknowledged it
    /// (`WAIT replicas timeout`, on the connection that took the lock), for at most `timeout`,
    /// which must be shorter than the [command timeout](Self::command_timeout). Off by
    /// default.
    ///
    /// An acquire that fewer replicas acknowledged in time fails with the transient
    /// [`RedisBackendError::NotReplicated`]: the lock manager counts the attempt as failed,
    /// gives the key back (best effort) and tries again within its wait. A granted lease was
    /// then on `replicas` replicas when it was granted; renewals and releases do not wait.
    ///
    /// What it does not do: `WAIT` does not make Redis strongly consistent. The write is in
    /// the replicas' memory, not necessarily on disk; a failover may still promote a replica
    /// that had not received it (Sentinel and Cluster prefer the most up to date one, but do not
    /// promise it); and a lock whose `WAIT` timed out may still reach the replicas later. It
    /// narrows the window in which a failover loses a fresh lock; fences are what keeps a
    /// resource safe when it happens anyway. It costs each acquire the replication round trip.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::builder("redis://localhost")
    ///     .min_replicas(1, Duration::from_millis(100))
    ///     .build()?;
    /// assert!(RedisBackend::builder("redis://localhost")
    ///     .min_replicas(1, Duration::from_secs(5)) // longer than the 2 s command timeout
    ///     .build()
    ///     .is_err());
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn min_replicas(mut self, replicas: u32, timeout: Duration) -> RedisBackendBuilder {
        self.config.min_replicas = Some((replicas, timeout));
        self
    }

    /// Prepended to every key this backend writes (default `"lock:"`): the lock `jobs:42` is
    /// stored at `lock:{jobs:42}`, its fence counter at `lock:{jobs:42}:fence`, and its releases are
    /// published on the channel `lock:{jobs:42}`. Backends that share a prefix share locks.
    ///
    /// The prefix must not contain `{` or `}`: the braces around the user key are a Redis
    /// Cluster hash tag that keeps a lock's keys in one slot, and must be the first in the key.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// assert!(RedisBackend::builder("redis://localhost").key_prefix("app1:").build().is_ok());
    /// assert!(RedisBackend::builder("redis://localhost").key_prefix("a{b}").build().is_err());
    /// ```
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> RedisBackendBuilder {
        self.config.key_prefix = prefix.into();
        self
    }

    /// Trusts the certificate authorities in the PEM file at `path` (instead of the system's)
    /// to sign the server's certificate, for a `rediss://` URL: what `redis-cli --cacert` takes.
    /// The file is read, and checked, by [`build`](Self::build).
    ///
    /// Without a CA, a `rediss://` backend trusts the system's certificate store (read on each
    /// new connection). With one, it trusts only the CAs in the file.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// # let dir = std::env::temp_dir().join(format!("lock-redis-doc-ca-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let ca = rcgen::generate_simple_self_signed(vec!["redis.internal".to_owned()])?;
    /// # std::fs::write(dir.join("ca.pem"), ca.cert.pem())?;
    /// let backend = RedisBackend::builder("rediss://:secret@redis.internal:6380/0")
    ///     .tls_ca_file(dir.join("ca.pem")) // say, /etc/redis/tls/ca.crt
    ///     .build()?;
    ///
    /// let error = RedisBackend::builder("rediss://redis.internal:6380")
    ///     .tls_ca_file("/nonexistent/ca.pem")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(error.to_string().contains("cannot read the TLS CA file /nonexistent/ca.pem"));
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> RedisBackendBuilder {
        self.tls.ca_file(path.into());
        self
    }

    /// Trusts the certificate authorities in `pem` (one or more `-----BEGIN CERTIFICATE-----`
    /// sections), instead of the system's, to sign the server's certificate: as
    /// [`tls_ca_file`](Self::tls_ca_file), with the PEM in memory.
    ///
    /// ```
    /// use lock_redis::{RedisBackend, RedisBackendError};
    ///
    /// # let ca = rcgen::generate_simple_self_signed(vec!["redis.internal".to_owned()])?;
    /// let ca_pem: String = ca.cert.pem(); // from your secret store, say
    /// let backend = RedisBackend::builder("rediss://redis.internal:6380")
    ///     .tls_ca_pem(ca_pem)
    ///     .build()?;
    ///
    /// let error = RedisBackend::builder("rediss://redis.internal:6380")
    ///     .tls_ca_pem("not a certificate")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(matches!(error, RedisBackendError::InvalidConfig { .. }));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> RedisBackendBuilder {
        self.tls.ca_pem(pem.into());
        self
    }

    /// Presents the client certificate (chain) in the PEM file `cert` with the private key in
    /// the PEM file `key` (PKCS#8, PKCS#1 or SEC1): mutual TLS, for a server run with
    /// `tls-auth-clients yes`. Both files are read, and checked (the key must match the
    /// certificate), by [`build`](Self::build). The key never shows in `Debug`, errors or logs.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// # let dir = std::env::temp_dir().join(format!("lock-redis-doc-client-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let client = rcgen::generate_simple_self_signed(vec!["app".to_owned()])?;
    /// # std::fs::write(dir.join("client.crt"), client.cert.pem())?;
    /// # std::fs::write(dir.join("client.key"), client.signing_key.serialize_pem())?;
    /// let backend = RedisBackend::builder("rediss://redis.internal:6380")
    ///     .tls_client_cert_files(dir.join("client.crt"), dir.join("client.key"))
    ///     .build()?;
    /// assert!(format!("{backend:?}").contains("rediss://redis.internal:6380"));
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tls_client_cert_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> RedisBackendBuilder {
        self.tls.client_cert_files(cert.into(), key.into());
        self
    }

    /// Presents the client certificate (chain) `cert_pem` with the private key `key_pem`:
    /// mutual TLS, as [`tls_client_cert_files`](Self::tls_client_cert_files), with the PEM in
    /// memory. The key never shows in `Debug`, errors or logs.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// # let client = rcgen::generate_simple_self_signed(vec!["app".to_owned()])?;
    /// # let other = rcgen::generate_simple_self_signed(vec!["other".to_owned()])?;
    /// let (cert_pem, key_pem) = (client.cert.pem(), client.signing_key.serialize_pem());
    /// let builder = RedisBackend::builder("rediss://redis.internal:6380")
    ///     .tls_client_cert_pem(cert_pem.clone(), key_pem.clone());
    /// assert!(!format!("{builder:?}").contains(&key_pem));
    /// let backend = builder.build()?;
    ///
    /// // A key that does not match the certificate is refused at once.
    /// let error = RedisBackend::builder("rediss://redis.internal:6380")
    ///     .tls_client_cert_pem(cert_pem, other.signing_key.serialize_pem())
    ///     .build()
    ///     .unwrap_err();
    /// assert!(error.to_string().contains("client certificate and key"), "{error}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tls_client_cert_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> RedisBackendBuilder {
        self.tls.client_cert_pem(cert_pem.into(), key_pem.into());
        self
    }

    /// **For development only**: accepts any server certificate, expired, self-signed or made
    /// out to another host, so the connection is encrypted but the server is not
    /// authenticated: anyone on the network path can impersonate it, read the password and
    /// grant or steal locks. [`build`](Self::build) logs a warning (`tracing`) for every
    /// backend built with it, and so it does for a URL ending in `#insecure`, which the
    /// `redis` crate reads the same way. A client certificate, if given, is still presented.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::builder("rediss://127.0.0.1:6380")
    ///     .danger_accept_invalid_certificates()
    ///     .build()?;
    ///
    /// // A TLS setting on a plain-text URL is a mistake, and an error.
    /// assert!(RedisBackend::builder("redis://127.0.0.1:6379")
    ///     .danger_accept_invalid_certificates()
    ///     .build()
    ///     .is_err());
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn danger_accept_invalid_certificates(mut self) -> RedisBackendBuilder {
        self.tls.accept_invalid_certificates();
        self
    }

    /// Replaces the TLS settings (Redlock gives its own to each node).
    pub(crate) fn tls_settings(mut self, tls: TlsSettings) -> RedisBackendBuilder {
        self.tls = tls;
        self
    }

    /// Sentinel backends only: the user (`None` for `default`) and password to log in to the
    /// master with, in place of those of a `redis+sentinel://` URL.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::sentinel_builder(&["10.0.0.1:26379", "10.0.0.2"], "locks")
    ///     .master_auth(Some("locker"), "hunter2")
    ///     .build()?;
    /// assert!(!format!("{backend:?}").contains("hunter2"));
    /// // A server's password belongs in its URL.
    /// assert!(RedisBackend::builder("redis://localhost").master_auth(None, "pw").build().is_err());
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn master_auth(mut self, username: Option<&str>, password: &str) -> RedisBackendBuilder {
        self.sentinel
            .set_master_auth(Credentials::new(username, password));
        self
    }

    /// Sentinel backends only: the user (`None` for `default`) and password to log in to the
    /// sentinels with (sentinels configured with `requirepass` or ACL users), in place of the
    /// `sentinel_username` and `sentinel_password` of a `redis+sentinel://` URL. Without them,
    /// the sentinels are asked without logging in.
    ///
    /// ```
    /// use lock_redis::RedisBackend;
    ///
    /// let backend = RedisBackend::sentinel_builder(&["10.0.0.1:26379"], "locks")
    ///     .sentinel_auth(None, "sentinel-secret")
    ///     .master_auth(None, "master-secret")
    ///     .build()?;
    /// # Ok::<(), lock_redis::RedisBackendError>(())
    /// ```
    pub fn sentinel_auth(mut self, username: Option<&str>, password: &str) -> RedisBackendBuilder {
        self.sentinel
            .set_sentinel_auth(Credentials::new(username, password));
        self
    }

    /// Checks the URL and every setting, and makes the backend.
    ///
    /// Does not connect: the pool opens connections when calls need them, so a backend can be
    /// built while its server is down, and a server that is down (or a wrong password) is
    /// reported by the calls, as errors the lock manager can retry or report.
    ///
    /// # Errors
    ///
    /// [`RedisBackendError::InvalidUrl`] for a URL that does not parse, and
    /// [`RedisBackendError::InvalidConfig`] for a setting out of range, a TLS setting on a URL
    /// that is not `rediss://`, a CA, client certificate or key that cannot be read or used
    /// (the message names the file or the problem, never the key's contents), a Sentinel group
    /// without sentinels or with a malformed address or master name, Sentinel credentials on a
    /// backend for one server, or TLS settings on a Sentinel backend (not supported yet).
    ///
    /// ```
    /// use lock_redis::{RedisBackend, RedisBackendError};
    ///
    /// let error = RedisBackend::builder("redis://:hunter2@localhost/not-a-db").build().unwrap_err();
    /// assert!(matches!(error, RedisBackendError::InvalidUrl { .. }));
    /// assert!(!error.to_string().contains("hunter2"));
    /// ```
    pub fn build(self) -> Result<RedisBackend, RedisBackendError> {
        self.config.validate()?;
        let target = redact_url(&self.url);
        if is_cluster_url(&self.url) {
            return self.build_cluster(target);
        }
        let connector = match self.sentinel.into_spec(&self.url)? {
            Some(mut group) => {
                if self.tls.is_set() {
                    return Err(RedisBackendError::InvalidConfig {
                        reason: "TLS settings on a Sentinel backend: Sentinel connections are \
                                 plain TCP in this version"
                            .to_owned(),
                    });
                }
                if let Some((user, password)) = &self.credentials {
                    group.master_auth = Credentials::new(Some(user), password);
                }
                Connector::Sentinel(SentinelMaster::new(
                    group,
                    self.config.connect_timeout,
                    target.clone(),
                ))
            }
            None => {
                let mut client = open_client(&self.url)?;
                if let Some((user, password)) = &self.credentials {
                    let info = client.get_connection_info().clone();
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_username(user)
                        .set_password(password);
                    client = redis::Client::open(info.set_redis_settings(settings)).map_err(
                        |error| RedisBackendError::InvalidUrl {
                            url: target.clone(),
                            reason: error.to_string(),
                        },
                    )?;
                }
                Connector::Server(Box::new(self.tls.apply(client, &target)?))
            }
        };
        Ok(RedisBackend::from_parts(connector, target, self.config))
    }

    /// The backend of a `redis+cluster://` URL.
    fn build_cluster(self, target: String) -> Result<RedisBackend, RedisBackendError> {
        let unsupported = |what: &str| {
            Err(RedisBackendError::InvalidConfig {
                reason: format!("{what} on a Cluster backend: not supported in this version"),
            })
        };
        if self.tls.is_set() {
            return unsupported("TLS settings");
        }
        if self.config.min_replicas.is_some() {
            return unsupported("min_replicas");
        }
        // Refuses Sentinel credentials on a backend that is not a Sentinel one.
        self.sentinel.into_spec(&self.url)?;
        let mut spec = ClusterSpec::parse_url(&self.url)?;
        if let Some((user, password)) = self.credentials {
            spec.username = Some(user);
            spec.password = Some(password);
        }
        let invalid = |reason: String| RedisBackendError::InvalidUrl {
            url: target.clone(),
            reason,
        };
        let seed = spec
            .seeds
            .first()
            .ok_or_else(|| invalid("no seed node".to_owned()))?;
        let seed = spec
            .node_info(seed)
            .and_then(redis::Client::open)
            .map_err(|error| invalid(error.to_string()))?;
        let config = Config {
            sharded: true,
            ..self.config
        };
        let cluster = ClusterLeases::new(spec, target.clone(), config.clone())?;
        Ok(RedisBackend::on_cluster(
            cluster,
            Connector::Server(Box::new(seed)),
            target,
            config,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let config = Config::default();
        assert_eq!(config.pool_size, 16);
        assert_eq!(config.checkout_timeout, Duration::from_secs(2));
        assert_eq!(config.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.command_timeout, Duration::from_secs(2));
        assert_eq!(config.key_prefix, "lock:");
        assert!(config.validate().is_ok());
        // Worst case for one call with the defaults: checkout, then commands.
        assert!(config.checkout_timeout + config.command_timeout < Duration::from_secs(10));
    }

    #[test]
    fn settings_out_of_range_are_rejected() {
        let url = "redis://localhost";
        let cases = [
            RedisBackendBuilder::new(url).pool_size(0),
            RedisBackendBuilder::new(url).pool_size(MAX_POOL_SIZE + 1),
            RedisBackendBuilder::new(url).checkout_timeout(Duration::ZERO),
            RedisBackendBuilder::new(url).connect_timeout(Duration::from_micros(999)),
            RedisBackendBuilder::new(url).command_timeout(Duration::MAX),
            RedisBackendBuilder::new(url).key_prefix("{"),
            RedisBackendBuilder::new(url).key_prefix("a}"),
        ];
        for builder in cases {
            let shown = format!("{builder:?}");
            let error = builder.build().unwrap_err();
            assert!(
                matches!(error, RedisBackendError::InvalidConfig { .. }),
                "{shown}: {error:?}"
            );
        }
    }

    #[test]
    fn settings_in_range_are_kept() {
        let backend = RedisBackendBuilder::new("redis://localhost")
            .pool_size(MAX_POOL_SIZE)
            .checkout_timeout(MIN_TIMEOUT)
            .connect_timeout(MAX_TIMEOUT)
            .command_timeout(Duration::from_millis(250))
            .key_prefix("")
            .build()
            .unwrap();
        let shown = format!("{backend:?}");
        assert!(shown.contains("pool_size: 1024"), "{shown}");
        assert!(shown.contains("command_timeout: 250ms"), "{shown}");
    }

    #[test]
    fn builder_debug_redacts_the_password() {
        let builder = RedisBackendBuilder::new("redis://app:hunter2@db:6379/1");
        let shown = format!("{builder:?}");
        assert!(shown.contains("redis://app:***@db:6379/1"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
