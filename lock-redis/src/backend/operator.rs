//! The operators' calls on one server: [`RedisBackend::inspect_lock`] and
//! [`RedisBackend::force_release_lock`], behind [`LeaseBackend::inspect`] and
//! [`LeaseBackend::force_release`](lock_core::LeaseBackend::force_release).

use std::time::Duration;

use lock_core::{BackendError, KeyState};

use super::{RedisBackend, ScriptCall};
use crate::errors::RedisOperation;
use crate::scripts::keys::{fence_key, lock_key};
use crate::scripts::operator::{parse_force_release, parse_inspect};

impl RedisBackend {
    /// `inspect.lua`: the lock's remaining TTL (`PTTL`) and its fence counter (`GET`), read at
    /// one instant by one script.
    pub(crate) fn inspect_lock(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<KeyState, BackendError> {
        let prefix = &self.inner.config.key_prefix;
        let (lock, fence) = (lock_key(prefix, key), fence_key(prefix, key));
        let call = ScriptCall {
            operation: RedisOperation::Inspect,
            key,
            script: &self.inner.scripts.inspect,
            keys: &[&lock, &fence],
            args: &[],
        };
        self.run_script(call, timeout, parse_inspect)
            .map(|answer| answer.value)
    }

    /// `force_release.lua`: deletes the lock key whatever its token and publishes the release;
    /// the fence counter stays. A call retried after a lost reply may say `false` for a key its
    /// first attempt deleted.
    pub(crate) fn force_release_lock(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<bool, BackendError> {
        let lock = lock_key(&self.inner.config.key_prefix, key);
        let call = ScriptCall {
            operation: RedisOperation::ForceRelease,
            key,
            script: &self.inner.scripts.force_release,
            keys: &[&lock],
            args: &[self.inner.config.publish_command()],
        };
        self.run_script(call, timeout, parse_force_release)
            .map(|answer| answer.value)
    }
}
