//! [`RedisBackendBuilder`] and the backend's settings, with their defaults in one place.

use std::fmt;
use std::time::Duration;

use crate::connection::connector::Connector;
use crate::connection::sentinel::spec::{Credentials, SentinelOptions};
use crate::connection::sentinel::SentinelMaster;
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
}

impl Config {
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
            .field("sentinel", &self.sentinel)
            .finish()
    }
}

impl RedisBackendBuilder {
    pub(crate) fn new(url: &str) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.to_owned(),
            config: Config::default(),
            sentinel: SentinelOptions::default(),
        }
    }

    pub(crate) fn sentinel(sentinels: &[&str], master_name: &str) -> RedisBackendBuilder {
        let sentinel = SentinelOptions::group(sentinels, master_name);
        RedisBackendBuilder {
            url: sentinel.url().unwrap_or_default(),
            config: Config::default(),
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
    /// [`RedisBackendError::InvalidUrl`] for a URL that does not parse,
    /// [`RedisBackendError::Unsupported`] for `rediss://` (this build has no TLS), and
    /// [`RedisBackendError::InvalidConfig`] for a setting out of range, a Sentinel group
    /// without sentinels or with a malformed address or master name, or Sentinel credentials on
    /// a backend for one server.
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
        let connector = match self.sentinel.into_spec(&self.url)? {
            Some(group) => Connector::Sentinel(SentinelMaster::new(
                group,
                self.config.connect_timeout,
                target.clone(),
            )),
            None => Connector::Server(open_client(&self.url)?),
        };
        Ok(RedisBackend::from_parts(connector, target, self.config))
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
