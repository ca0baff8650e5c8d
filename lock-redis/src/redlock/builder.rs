//! [`RedlockBuilder`]: the settings of a [`RedlockBackend`], checked once.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lock_core::DriftRule;

use super::node::Node;
use super::quorum::Quorum;
use super::{RedlockBackend, Shared};
use crate::connection::tls::TlsSettings;
use crate::{RedisBackend, RedisBackendError};

/// Defaults of [`RedlockBuilder`], in one place.
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(250);
const DEFAULT_DRIFT_FACTOR: f64 = 0.01;
const DEFAULT_WORKERS_PER_NODE: usize = 4;
/// The fixed part of the drift allowance, as in the Redlock paper.
const DRIFT_FIXED: Duration = Duration::from_millis(2);
/// The most nodes a Redlock may have.
const MAX_NODES: usize = 31;

/// Configures a [`RedlockBackend`]; made by [`RedlockBackend::builder`].
///
/// ```
/// use std::time::Duration;
/// use lock_redis::RedlockBackend;
///
/// let redlock = RedlockBackend::builder(&["redis://127.0.0.1:7001", "redis://127.0.0.1:7002", "redis://127.0.0.1:7003"])
///     .node_timeout(Duration::from_millis(100))
///     .drift_factor(0.02)
///     .build()?;
/// # drop(redlock);
///
/// // Passwords are redacted from `Debug`, here as everywhere.
/// let builder = RedlockBackend::builder(&["redis://:hunter2@127.0.0.1:7001"]);
/// assert!(!format!("{builder:?}").contains("hunter2"));
/// # Ok::<(), lock_redis::RedisBackendError>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct RedlockBuilder {
    urls: Vec<String>,
    node_timeout: Duration,
    drift_factor: f64,
    workers_per_node: usize,
    key_prefix: Option<String>,
    tls: TlsSettings,
}

impl fmt::Debug for RedlockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|url| crate::redact_url(url)).collect();
        f.debug_struct("RedlockBuilder")
            .field("urls", &urls)
            .field("node_timeout", &self.node_timeout)
            .field("drift_factor", &self.drift_factor)
            .field("workers_per_node", &self.workers_per_node)
            .field("key_prefix", &self.key_prefix)
            .field("tls", &self.tls)
            .finish()
    }
}

impl RedlockBuilder {
    pub(super) fn new(urls: &[&str]) -> RedlockBuilder {
        RedlockBuilder {
            urls: urls.iter().map(|url| (*url).to_owned()).collect(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
            drift_factor: DEFAULT_DRIFT_FACTOR,
            workers_per_node: DEFAULT_WORKERS_PER_NODE,
            key_prefix: None,
            tls: TlsSettings::default(),
        }
    }

    /// The longest one node may take to answer one call (connect, pool checkout and command
    /// each). A node slower than this counts as failed for that call. Default: 250 ms.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// The clock drift allowance, as a fraction of the TTL (plus 2 ms), subtracted from the
    /// validity of each acquire and renewal: the Redlock's own check and the lease's
    /// [`valid_until`](lock_core::Lease::valid_until) follow the same
    /// [`DriftRule`]. Default: 0.01.
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// How many calls each node may serve at once: its worker threads and pooled connections.
    /// Default: 4.
    pub fn workers_per_node(mut self, workers: usize) -> Self {
        self.workers_per_node = workers;
        self
    }

    /// The key prefix on every node, as [`RedisBackendBuilder::key_prefix`](crate::RedisBackendBuilder::key_prefix).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Some(prefix.into());
        self
    }

    /// Trusts the CAs in the PEM file at `path` on every node, as
    /// [`RedisBackendBuilder::tls_ca_file`](crate::RedisBackendBuilder::tls_ca_file). Every URL
    /// must then be `rediss://`.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file(path.into());
        self
    }

    /// Trusts the CAs in `pem` on every node, as
    /// [`RedisBackendBuilder::tls_ca_pem`](crate::RedisBackendBuilder::tls_ca_pem). Every URL
    /// must then be `rediss://`.
    ///
    /// ```
    /// use lock_redis::RedlockBackend;
    ///
    /// # let ca = rcgen::generate_simple_self_signed(vec!["redis.internal".to_owned()])?;
    /// let ca_pem = ca.cert.pem();
    /// let redlock = RedlockBackend::builder(&[
    ///     "rediss://:secret@redis-a.internal:6380",
    ///     "rediss://:secret@redis-b.internal:6380",
    ///     "rediss://:secret@redis-c.internal:6380",
    /// ])
    /// .tls_ca_pem(ca_pem)
    /// .build()?;
    /// # drop(redlock);
    ///
    /// // TLS settings with a plain-text node are refused.
    /// let error = RedlockBackend::builder(&["rediss://redis-a.internal:6380", "redis://redis-b.internal"])
    ///     .danger_accept_invalid_certificates()
    ///     .build()
    ///     .unwrap_err();
    /// assert!(error.to_string().contains("rediss://"), "{error}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca_pem(pem.into());
        self
    }

    /// Presents the client certificate and key in these PEM files to every node (mutual TLS),
    /// as [`RedisBackendBuilder::tls_client_cert_files`](crate::RedisBackendBuilder::tls_client_cert_files).
    pub fn tls_client_cert_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls.client_cert_files(cert.into(), key.into());
        self
    }

    /// Presents this client certificate and key to every node (mutual TLS), as
    /// [`RedisBackendBuilder::tls_client_cert_pem`](crate::RedisBackendBuilder::tls_client_cert_pem).
    pub fn tls_client_cert_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_cert_pem(cert_pem.into(), key_pem.into());
        self
    }

    /// **For development only**: accepts any certificate from every node, as
    /// [`RedisBackendBuilder::danger_accept_invalid_certificates`](crate::RedisBackendBuilder::danger_accept_invalid_certificates)
    /// (one warning per node is logged).
    pub fn danger_accept_invalid_certificates(mut self) -> Self {
        self.tls.accept_invalid_certificates();
        self
    }

    /// Checks the settings, and starts each node's workers. Connects to nothing.
    ///
    /// # Errors
    ///
    /// [`RedisBackendError::InvalidConfig`] for no URL or more than 31, a drift factor outside
    /// `[0, 0.5)`, a worker count outside `1..=64`, a zero node timeout, TLS settings with a URL
    /// that is not `rediss://`, TLS certificates that cannot be read or used, or a worker thread
    /// that cannot start; [`RedisBackendError::InvalidUrl`] for a URL [`RedisBackend::connect`]
    /// refuses.
    pub fn build(self) -> Result<RedlockBackend, RedisBackendError> {
        let invalid = |reason: String| Err(RedisBackendError::InvalidConfig { reason });
        if self.urls.is_empty() || self.urls.len() > MAX_NODES {
            return invalid(format!(
                "a Redlock needs between 1 and {MAX_NODES} nodes, not {}",
                self.urls.len()
            ));
        }
        let drift = match DriftRule::new(self.drift_factor, DRIFT_FIXED) {
            Some(rule) if self.drift_factor < 0.5 => rule,
            _ => {
                return invalid(format!(
                    "drift_factor must be in [0, 0.5), not {}",
                    self.drift_factor
                ))
            }
        };
        if !(1..=64).contains(&self.workers_per_node) {
            return invalid(format!(
                "workers_per_node must be between 1 and 64, not {}",
                self.workers_per_node
            ));
        }
        let workers = u32::try_from(self.workers_per_node).unwrap_or(1);
        let mut nodes = Vec::with_capacity(self.urls.len());
        for (index, url) in self.urls.iter().enumerate() {
            let mut builder = RedisBackend::builder(url)
                .pool_size(workers)
                .connect_timeout(self.node_timeout)
                .checkout_timeout(self.node_timeout)
                .command_timeout(self.node_timeout)
                .tls_settings(self.tls.clone());
            if let Some(prefix) = &self.key_prefix {
                builder = builder.key_prefix(prefix.clone());
            }
            let backend = builder.build()?;
            nodes.push(Node::start(
                index,
                backend,
                self.workers_per_node,
                self.node_timeout,
            )?);
        }
        Ok(RedlockBackend {
            shared: Arc::new(Shared {
                quorum: Quorum::of(nodes.len()),
                nodes,
                node_timeout: self.node_timeout,
                drift,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_typed_errors() {
        let urls = [
            "redis://127.0.0.1:1",
            "redis://127.0.0.1:2",
            "redis://127.0.0.1:3",
        ];
        assert!(RedlockBackend::connect(&[]).is_err());
        assert!(RedlockBackend::builder(&urls)
            .drift_factor(0.7)
            .build()
            .is_err());
        assert!(RedlockBackend::builder(&urls)
            .workers_per_node(0)
            .build()
            .is_err());
        assert!(RedlockBackend::builder(&urls)
            .node_timeout(Duration::ZERO)
            .build()
            .is_err());
        assert!(RedlockBackend::connect(&["http://nope"]).is_err());
    }
}
