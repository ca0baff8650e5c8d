//! A lock manager on the servers the command line names: one Redis, or a Redlock.

use lock_core::LockManager;
use lock_redis::{redact_url, RedisBackend, RedisBackendError, RedlockBackend};

use crate::cli::{ServerArgs, DEFAULT_REDIS_URL, REDIS_URL_ENV};
use crate::exit;
use crate::report::{chain, code_of, Failure};

/// A manager, and what to call its servers in messages (passwords redacted).
pub(crate) struct Connection {
    pub(crate) manager: LockManager,
    target: String,
}

impl Connection {
    /// A failure of `what` (`"cannot acquire lock"`) on `key`, naming the servers and the
    /// error's whole chain.
    pub(crate) fn failure(&self, what: &str, key: &str, error: &lock_core::Error) -> Failure {
        Failure::new(
            code_of(error),
            format!("{what} {key:?} on {}: {}", self.target, chain(error)),
        )
    }
}

/// Builds the backend and the manager. Connects to nothing yet: the first call does, and
/// reports an unreachable server.
pub(crate) fn connect(server: &ServerArgs) -> Result<Connection, Failure> {
    let bad_setting = |error: RedisBackendError| Failure::new(exit::USAGE, chain(&error));
    let (builder, target) = if server.redlock.is_empty() {
        let url = server
            .redis
            .clone()
            .or_else(|| {
                std::env::var(REDIS_URL_ENV)
                    .ok()
                    .filter(|url| !url.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
        let mut builder = RedisBackend::builder(&url).key_prefix(server.prefix.clone());
        if let Some(timeout) = server.timeout {
            builder = builder
                .connect_timeout(timeout)
                .checkout_timeout(timeout)
                .command_timeout(timeout);
        }
        let backend = builder.build().map_err(bad_setting)?;
        (LockManager::builder(backend), redact_url(&url))
    } else {
        let urls: Vec<&str> = server.redlock.iter().map(String::as_str).collect();
        let mut builder = RedlockBackend::builder(&urls).key_prefix(server.prefix.clone());
        if let Some(timeout) = server.timeout {
            builder = builder.node_timeout(timeout);
        }
        let backend = builder.build().map_err(bad_setting)?;
        let shown: Vec<String> = urls.iter().map(|url| redact_url(url)).collect();
        let target = format!("Redlock of {} nodes ({})", urls.len(), shown.join(", "));
        (LockManager::builder(backend), target)
    };
    let manager = builder
        .build()
        .map_err(|error| Failure::new(exit::OS_ERROR, chain(&error)))?;
    Ok(Connection { manager, target })
}
