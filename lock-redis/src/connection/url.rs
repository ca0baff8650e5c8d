//! Redis URLs: parsing them into a [`redis::Client`] with typed errors, and redacting their
//! secrets for `Debug`, `Display`, errors and logs.

use crate::RedisBackendError;

/// What replaces a secret in a redacted URL.
const REDACTED: &str = "***";

/// Query parameters that carry a password (`unix://` URLs use `?pass=`, `redis+sentinel://`
/// URLs `?sentinel_password=`).
const SECRET_QUERY_KEYS: &[&str] = &["pass", "password", "sentinel_password"];

/// Returns `url` with its password replaced by `***`, for logs and error messages.
///
/// The redaction is lexical, so it works on URLs that do not parse as well: everything between
/// `://` and the **last** `@` is the user information, and the part after its first `:` is the
/// password (a password may contain unescaped `@`, `/` or `:`). User information without a `:`
/// is redacted whole, since it is sometimes a password written in the wrong place. The values
/// of `pass=` and `password=` query parameters (used by `unix://` URLs) and of
/// `sentinel_password=` (used by `redis+sentinel://` URLs) are redacted too.
///
/// ```
/// use lock_redis::redact_url;
///
/// assert_eq!(redact_url("redis://app:s3cret@cache:6379/2"), "redis://app:***@cache:6379/2");
/// assert_eq!(redact_url("redis://:s3cret@cache"), "redis://:***@cache");
/// assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
/// assert_eq!(redact_url("unix:///run/redis.sock?db=1&pass=s3cret"), "unix:///run/redis.sock?db=1&pass=***");
/// assert_eq!(
///     redact_url("redis+sentinel://:s3cret@s1:26379,s2:26379/locks?sentinel_password=s3cret"),
///     "redis+sentinel://:***@s1:26379,s2:26379/locks?sentinel_password=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let rest = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host_and_more) = rest.split_at(at);
            let redacted_userinfo = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:{REDACTED}"),
                None if userinfo.is_empty() => String::new(),
                None => REDACTED.to_owned(),
            };
            format!("{redacted_userinfo}{host_and_more}")
        }
        None => rest.to_owned(),
    };
    format!("{scheme}{}", redact_query(&rest))
}

/// Redacts the values of secret-bearing query parameters.
fn redact_query(rest: &str) -> String {
    let Some((before, query)) = rest.split_once('?') else {
        return rest.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _value))
                if SECRET_QUERY_KEYS
                    .iter()
                    .any(|secret| name.eq_ignore_ascii_case(secret)) =>
            {
                format!("{name}={REDACTED}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    let mut redacted = format!("{before}?{}", pairs.join("&"));
    if let Some(fragment) = fragment {
        redacted.push('#');
        redacted.push_str(fragment);
    }
    redacted
}

/// The lower-cased scheme of `url`, if it has one.
fn scheme_of(url: &str) -> Option<String> {
    url.split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
}

/// Parses `url` into a client without touching the network.
///
/// A URL that does not parse is [`RedisBackendError::InvalidUrl`]. A `rediss://` client gets its
/// TLS settings from [`TlsSettings::apply`](super::tls::TlsSettings::apply).
pub(crate) fn open_client(url: &str) -> Result<redis::Client, RedisBackendError> {
    let scheme = scheme_of(url);
    match scheme.as_deref() {
        Some("redis" | "rediss" | "valkey" | "valkeys" | "unix" | "redis+unix" | "valkey+unix") => {
        }
        Some(_) => {
            return Err(RedisBackendError::InvalidUrl {
                url: redact_url(url),
                reason: "the scheme must be redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"
                    .to_owned(),
            })
        }
        None => {
            return Err(RedisBackendError::InvalidUrl {
                url: redact_url(url),
                reason: "expected a URL such as redis://host:6379/0".to_owned(),
            })
        }
    }
    redis::Client::open(url).map_err(|error| RedisBackendError::InvalidUrl {
        url: redact_url(url),
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_and_keeps_user() {
        assert_eq!(
            redact_url("redis://user:password@host:6379/3"),
            "redis://user:***@host:6379/3"
        );
        assert_eq!(
            redact_url("rediss://:pw@host"),
            "rediss://:***@host",
            "an empty user keeps its colon"
        );
    }

    #[test]
    fn redacts_passwords_with_special_characters() {
        for url in [
            "redis://u:p@ss@host:1/0",
            "redis://u:pa/ss@host",
            "redis://u:pa:ss@host",
            "redis://u:pa?ss@host",
            "redis://u:pa#ss@host",
            "redis://u:pa%40ss@host",
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains("ss"), "{url} became {redacted}");
            assert!(redacted.ends_with("@host") || redacted.ends_with("@host:1/0"));
        }
    }

    #[test]
    fn redacts_userinfo_without_colon_whole() {
        assert_eq!(redact_url("redis://secret@host"), "redis://***@host");
    }

    #[test]
    fn leaves_urls_without_secrets_alone() {
        for url in [
            "redis://host",
            "redis://host:6379/0",
            "redis://[::1]:6379",
            "not a url",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn redacts_sentinel_urls() {
        assert_eq!(
            redact_url(
                "redis+sentinel://app:pw@a:1,b:2/m/1?sentinel_username=s&sentinel_password=spw"
            ),
            "redis+sentinel://app:***@a:1,b:2/m/1?sentinel_username=s&sentinel_password=***"
        );
    }

    #[test]
    fn redacts_query_passwords() {
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?pass=secret&db=2"),
            "redis+unix:///tmp/r.sock?pass=***&db=2"
        );
        assert_eq!(
            redact_url("unix:///tmp/r.sock?PASSWORD=secret#frag"),
            "unix:///tmp/r.sock?PASSWORD=***#frag"
        );
    }

    #[test]
    fn open_client_accepts_redis_urls() {
        for url in [
            "redis://127.0.0.1",
            "redis://127.0.0.1:6380/2",
            "redis://user:password@localhost:6379/0",
            "redis://:password@localhost",
            "REDIS://localhost",
        ] {
            assert!(open_client(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn open_client_rejects_malformed_urls_without_leaking_passwords() {
        for url in [
            "http://user:hunter2@localhost",
            "localhost:6379",
            "redis://user:hunter2@localhost/notanumber",
            "redis://user:hunter2@:6379",
            "redis://user:hunter2@0.0.0.0:6379",
            "redis://",
            "redis://[::1",
            "",
        ] {
            let error = open_client(url).unwrap_err();
            assert!(
                matches!(error, RedisBackendError::InvalidUrl { .. }),
                "{url}: {error:?}"
            );
            assert!(!error.to_string().contains("hunter2"), "{error}");
            assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");
        }
    }

    #[test]
    fn open_client_accepts_tls_urls() {
        for url in [
            "rediss://user:hunter2@localhost:6380",
            "rediss://127.0.0.1:6380/1",
            "rediss://localhost/#insecure",
            "valkeys://localhost",
        ] {
            let client = open_client(url).unwrap();
            assert!(
                matches!(
                    client.get_connection_info().addr(),
                    redis::ConnectionAddr::TcpTls { .. }
                ),
                "{url}"
            );
        }
        let error = open_client("rediss://user:hunter2@localhost/#bogus").unwrap_err();
        assert!(matches!(error, RedisBackendError::InvalidUrl { .. }));
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
}
