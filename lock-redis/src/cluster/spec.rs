//! What a Cluster backend is told: seed nodes and how to log in, from a `redis+cluster://` URL or
//! from [`RedisBackend::cluster_builder`](crate::RedisBackend::cluster_builder).
//!
//! ```text
//! redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/]
//! ```
//!
//! A seed's port is 6379 unless given; reserved characters in the user and the password are
//! percent-encoded. A cluster has only database 0, so the URL names none.

use redis::{ConnectionInfo, RedisError};

use crate::connection::sentinel::spec::{percent_decode, tcp_info, Address};
use crate::connection::url::redact_url;
use crate::RedisBackendError;

/// The scheme of Cluster URLs.
pub(crate) const CLUSTER_SCHEME: &str = "redis+cluster";

/// The port a seed listens on when its address names none.
const DEFAULT_PORT: u16 = 6379;

/// The seed nodes of a cluster and how to log in to its nodes.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ClusterSpec {
    /// Asked in turn for the cluster's layout.
    pub(crate) seeds: Vec<Address>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl std::fmt::Debug for ClusterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSpec")
            .field("seeds", &self.seeds)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Whether `url` is a `redis+cluster://` URL.
pub(crate) fn is_cluster_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case(CLUSTER_SCHEME))
}

/// The URL of a cluster given by its seeds' addresses.
pub(crate) fn cluster_url(seeds: &[&str]) -> String {
    format!("{CLUSTER_SCHEME}://{}", seeds.join(","))
}

impl ClusterSpec {
    /// Parses a `redis+cluster://` URL.
    ///
    /// # Errors
    ///
    /// [`RedisBackendError::InvalidUrl`], without the password.
    pub(crate) fn parse_url(url: &str) -> Result<ClusterSpec, RedisBackendError> {
        parse(url).map_err(|reason| RedisBackendError::InvalidUrl {
            url: redact_url(url),
            reason,
        })
    }

    /// How to connect to the node at `address`: plain TCP, logged in as the URL says.
    pub(crate) fn node_info(&self, address: &Address) -> Result<ConnectionInfo, RedisError> {
        let info = tcp_info(address)?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        Ok(info.set_redis_settings(settings))
    }
}

fn parse(url: &str) -> Result<ClusterSpec, String> {
    let rest = url
        .split_once("://")
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(CLUSTER_SCHEME))
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("a Cluster URL starts with {CLUSTER_SCHEME}://"))?;
    if rest.contains(['#', '?']) {
        return Err("a Cluster URL has no ?query or #fragment".to_owned());
    }
    let authority = match rest.split_once('/') {
        Some((authority, "" | "0")) => authority,
        Some(_) => return Err("a cluster has only database 0: the URL names none".to_owned()),
        None => rest,
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let seeds = hosts
        .split(',')
        .map(|seed| Address::parse(seed, DEFAULT_PORT))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut username, mut password) = (None, None);
    if let Some(userinfo) = userinfo {
        let (user, secret) = match userinfo.split_once(':') {
            Some((user, secret)) => (user, Some(secret)),
            None => (userinfo, None),
        };
        username = Some(percent_decode(user)?).filter(|name| !name.is_empty());
        password = secret.map(percent_decode).transpose()?;
    }
    Ok(ClusterSpec {
        seeds,
        username,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seeds_and_credentials() {
        let spec =
            ClusterSpec::parse_url("redis+cluster://app:p%40ss@10.0.0.1:7000,node-b,[::1]:7001/")
                .unwrap();
        assert_eq!(
            spec.seeds,
            [
                Address::new("10.0.0.1", 7000),
                Address::new("node-b", 6379),
                Address::new("::1", 7001)
            ]
        );
        assert_eq!(spec.username.as_deref(), Some("app"));
        assert_eq!(spec.password.as_deref(), Some("p@ss"));
        let info = spec.node_info(&spec.seeds[0]).unwrap();
        assert_eq!(info.redis_settings().password(), Some("p@ss"));
        let plain = ClusterSpec::parse_url("REDIS+CLUSTER://h:1").unwrap();
        assert_eq!((plain.username, plain.password), (None, None));
        assert!(is_cluster_url("redis+cluster://h"));
        assert_eq!(cluster_url(&["a:1", "b:2"]), "redis+cluster://a:1,b:2");
    }

    #[test]
    fn malformed_urls_are_typed_errors_without_passwords() {
        for url in [
            "redis+cluster://:hunter2@",
            "redis+cluster://:hunter2@h:0",
            "redis+cluster://:hunter2@h:1/2",
            "redis+cluster://:hunter2@h:1?x=1",
            "redis+cluster://:hunter2@h:1,,h:2",
            "redis://:hunter2@h:1",
        ] {
            let error = ClusterSpec::parse_url(url).unwrap_err();
            assert!(
                matches!(error, RedisBackendError::InvalidUrl { .. }),
                "{url}: {error:?}"
            );
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
    }
}
