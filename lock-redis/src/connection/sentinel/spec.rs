//! What a Sentinel backend is told: the sentinels' addresses, the master's name, and how to log
//! in to the master and to the sentinels; from a `redis+sentinel://` URL or from
//! [`RedisBackend::sentinel_builder`](crate::RedisBackend::sentinel_builder).
//!
//! ```text
//! redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB][?sentinel_username=U&sentinel_password=P]
//! ```
//!
//! The user information logs in to the master (and is what the pool's connections use); the
//! sentinels are asked without logging in unless `sentinel_password` is given. A sentinel's port
//! is 26379 unless said. Reserved characters in names and passwords are percent-encoded, as in
//! any URL.

use std::fmt;

use redis::{ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, RedisError};

use crate::connection::url::redact_url;
use crate::RedisBackendError;

/// The scheme of Sentinel URLs.
pub(crate) const SENTINEL_SCHEME: &str = "redis+sentinel";

/// The port a sentinel listens on when its address names none.
pub(crate) const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// The query parameters a Sentinel URL understands.
const SENTINEL_USERNAME: &str = "sentinel_username";
const SENTINEL_PASSWORD: &str = "sentinel_password";

/// Where a sentinel or a master listens: a host name or IP address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Address {
    host: String,
    port: u16,
}

impl Address {
    pub(crate) fn new(host: impl Into<String>, port: u16) -> Address {
        Address {
            host: host.into(),
            port,
        }
    }

    /// `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults to `default_port`.
    pub(crate) fn parse(text: &str, default_port: u16) -> Result<Address, String> {
        let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{text:?} opens a '[' it does not close"))?;
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("{text:?}: expected ':PORT' after the bracketed address")
                })?),
            };
            (host, port)
        } else {
            match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "/?#@,[]".contains(c)) {
            return Err(format!("{text:?} is not a host[:port] address"));
        }
        let port = match port {
            None => default_port,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| format!("{text:?}: the port must be a number from 1 to 65535"))?,
        };
        Ok(Address::new(host, port))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A user name and password to log in with (`AUTH`).
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Credentials {
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    pub(crate) fn new(username: Option<&str>, password: &str) -> Credentials {
        Credentials {
            username: username.map(str::to_owned),
            password: Some(password.to_owned()),
        }
    }

    /// The handshake settings that log in with these credentials.
    fn apply(&self, mut settings: RedisConnectionInfo) -> RedisConnectionInfo {
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        settings
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A Sentinel group and how to reach its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelSpec {
    /// The sentinels, asked in turn.
    pub(crate) sentinels: Vec<Address>,
    /// The name the sentinels monitor the master under.
    pub(crate) master_name: String,
    /// How to log in to the master.
    pub(crate) master_auth: Credentials,
    /// How to log in to the sentinels.
    sentinel_auth: Credentials,
    /// The master's database.
    db: i64,
}

impl SentinelSpec {
    /// Connection settings for the sentinel at `address`.
    pub(crate) fn sentinel_info(&self, address: &Address) -> Result<ConnectionInfo, RedisError> {
        Ok(tcp_info(address)?
            .set_redis_settings(self.sentinel_auth.apply(RedisConnectionInfo::default())))
    }

    /// Connection settings for the master at `address`.
    pub(crate) fn master_info(&self, address: &Address) -> Result<ConnectionInfo, RedisError> {
        let settings = RedisConnectionInfo::default().set_db(self.db);
        Ok(tcp_info(address)?.set_redis_settings(self.master_auth.apply(settings)))
    }

    /// Parses a `redis+sentinel://` URL (see the module documentation).
    pub(crate) fn parse_url(url: &str) -> Result<SentinelSpec, RedisBackendError> {
        parse(url).map_err(|reason| RedisBackendError::InvalidUrl {
            url: redact_url(url),
            reason,
        })
    }

    /// The group of [`RedisBackend::sentinel_builder`](crate::RedisBackend::sentinel_builder).
    fn from_parts(sentinels: &[String], master_name: &str) -> Result<SentinelSpec, String> {
        if sentinels.is_empty() {
            return Err("a Sentinel backend needs at least one sentinel address".to_owned());
        }
        let sentinels = sentinels
            .iter()
            .map(|sentinel| Address::parse(sentinel, DEFAULT_SENTINEL_PORT))
            .collect::<Result<_, _>>()?;
        Ok(SentinelSpec {
            sentinels,
            master_name: checked_master_name(master_name.to_owned())?,
            master_auth: Credentials::default(),
            sentinel_auth: Credentials::default(),
            db: 0,
        })
    }
}

pub(crate) fn tcp_info(address: &Address) -> Result<ConnectionInfo, RedisError> {
    (address.host.clone(), address.port).into_connection_info()
}

fn checked_master_name(name: String) -> Result<String, String> {
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{name:?} is not a master name (one word, as in `sentinel monitor NAME ...`)"
        ));
    }
    Ok(name)
}

/// Whether `url` is a Sentinel URL.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case(SENTINEL_SCHEME))
}

fn parse(url: &str) -> Result<SentinelSpec, String> {
    let rest = url
        .split_once("://")
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(SENTINEL_SCHEME))
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("a Sentinel URL starts with {SENTINEL_SCHEME}://"))?;
    if rest.contains('#') {
        return Err("a Sentinel URL has no #fragment".to_owned());
    }
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let sentinels: Vec<String> = hosts.split(',').map(str::to_owned).collect();
    let mut segments = path
        .split('/')
        .skip(1)
        .filter(|segment| !segment.is_empty());
    let master_name = segments
        .next()
        .ok_or("expected the master's name after the sentinels: redis+sentinel://HOST:PORT/NAME")?;
    let mut spec = SentinelSpec::from_parts(&sentinels, &percent_decode(master_name)?)?;
    if let Some(db) = segments.next() {
        spec.db = db
            .parse::<u32>()
            .map_err(|_| format!("the database {db:?} is not a number"))?
            .into();
    }
    if segments.next().is_some() {
        return Err("expected /NAME or /NAME/DB after the sentinels".to_owned());
    }
    if let Some(userinfo) = userinfo {
        let (username, password) = match userinfo.split_once(':') {
            Some((username, password)) => (username, Some(password)),
            None => (userinfo, None),
        };
        spec.master_auth = Credentials {
            username: Some(percent_decode(username)?).filter(|name| !name.is_empty()),
            password: password.map(percent_decode).transpose()?,
        };
    }
    for pair in query.into_iter().flat_map(|query| query.split('&')) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = Some(percent_decode(value)?);
        match name {
            "" => {}
            SENTINEL_USERNAME => spec.sentinel_auth.username = value,
            SENTINEL_PASSWORD => spec.sentinel_auth.password = value,
            _ => {
                return Err(format!(
                    "unknown parameter {name:?}: a Sentinel URL takes {SENTINEL_USERNAME} and \
                     {SENTINEL_PASSWORD}"
                ))
            }
        }
    }
    Ok(spec)
}

/// Decodes `%XX` escapes.
pub(crate) fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("a '%' that is not followed by two hexadecimal digits")?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(byte);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "percent-escapes that are not UTF-8".to_owned())
}

/// The Sentinel part of a [`RedisBackendBuilder`](crate::RedisBackendBuilder): the group given
/// by [`RedisBackend::sentinel_builder`](crate::RedisBackend::sentinel_builder), and credentials
/// that replace those of a URL.
#[derive(Debug, Clone, Default)]
pub(crate) struct SentinelOptions {
    /// The sentinels' addresses and the master's name, as given.
    group: Option<(Vec<String>, String)>,
    master_auth: Option<Credentials>,
    sentinel_auth: Option<Credentials>,
}

impl SentinelOptions {
    /// A group given piece by piece.
    pub(crate) fn group(sentinels: &[&str], master_name: &str) -> SentinelOptions {
        SentinelOptions {
            group: Some((
                sentinels
                    .iter()
                    .map(|&sentinel| sentinel.to_owned())
                    .collect(),
                master_name.to_owned(),
            )),
            ..SentinelOptions::default()
        }
    }

    /// The URL that names this group, for `Debug` and logs (it holds no credentials).
    pub(crate) fn url(&self) -> Option<String> {
        let (sentinels, master_name) = self.group.as_ref()?;
        Some(format!(
            "{SENTINEL_SCHEME}://{}/{master_name}",
            sentinels.join(",")
        ))
    }

    pub(crate) fn set_master_auth(&mut self, credentials: Credentials) {
        self.master_auth = Some(credentials);
    }

    pub(crate) fn set_sentinel_auth(&mut self, credentials: Credentials) {
        self.sentinel_auth = Some(credentials);
    }

    /// The Sentinel group of a builder whose URL is `url`: `None` when it names one server.
    ///
    /// # Errors
    ///
    /// [`RedisBackendError::InvalidUrl`] for a Sentinel URL that does not parse, and
    /// [`RedisBackendError::InvalidConfig`] for a group that does not, or Sentinel credentials
    /// given to a backend on one server.
    pub(crate) fn into_spec(self, url: &str) -> Result<Option<SentinelSpec>, RedisBackendError> {
        let mut spec = match self.group {
            Some((sentinels, master_name)) => SentinelSpec::from_parts(&sentinels, &master_name)
                .map_err(|reason| RedisBackendError::InvalidConfig { reason })?,
            None if is_sentinel_url(url) => SentinelSpec::parse_url(url)?,
            None if self.master_auth.is_some() || self.sentinel_auth.is_some() => {
                return Err(RedisBackendError::InvalidConfig {
                    reason: "master_auth and sentinel_auth are for Sentinel backends; a \
                             server's password goes in its URL"
                        .to_owned(),
                })
            }
            None => return Ok(None),
        };
        if let Some(credentials) = self.master_auth {
            spec.master_auth = credentials;
        }
        if let Some(credentials) = self.sentinel_auth {
            spec.sentinel_auth = credentials;
        }
        Ok(Some(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> SentinelSpec {
        SentinelSpec::parse_url(url).unwrap_or_else(|error| panic!("{url}: {error}"))
    }

    #[test]
    fn parses_sentinels_name_database_and_credentials() {
        let parsed = spec(
            "redis+sentinel://app:p%40ss@10.0.0.1:26380,sentinel-b,[::1]:5000/orders/3\
             ?sentinel_password=s%3Acret&sentinel_username=watcher",
        );
        assert_eq!(
            parsed.sentinels,
            [
                Address::new("10.0.0.1", 26380),
                Address::new("sentinel-b", DEFAULT_SENTINEL_PORT),
                Address::new("::1", 5000),
            ]
        );
        assert_eq!(parsed.master_name, "orders");
        assert_eq!(parsed.db, 3);
        assert_eq!(parsed.master_auth, Credentials::new(Some("app"), "p@ss"));
        assert_eq!(
            parsed.sentinel_auth,
            Credentials::new(Some("watcher"), "s:cret")
        );
        assert_eq!(parsed.sentinels[2].to_string(), "[::1]:5000");

        let plain = spec("REDIS+SENTINEL://127.0.0.1:26379/mymaster/");
        assert_eq!(plain.db, 0);
        assert_eq!(plain.master_auth, Credentials::default());
        assert_eq!(plain.sentinel_auth, Credentials::default());
        let password_only = spec("redis+sentinel://:pw@h/m");
        assert_eq!(password_only.master_auth, Credentials::new(None, "pw"));
    }

    #[test]
    fn credentials_reach_the_handshake_of_their_own_server() {
        let parsed = spec("redis+sentinel://app:pw@h:1/m/2?sentinel_password=sp");
        let address = Address::new("10.1.1.1", 6379);
        let master = parsed.master_info(&address).unwrap();
        assert_eq!(master.redis_settings().username(), Some("app"));
        assert_eq!(master.redis_settings().password(), Some("pw"));
        assert_eq!(master.redis_settings().db(), 2);
        let sentinel = parsed.sentinel_info(&address).unwrap();
        assert_eq!(sentinel.redis_settings().username(), None);
        assert_eq!(sentinel.redis_settings().password(), Some("sp"));
        assert_eq!(sentinel.redis_settings().db(), 0);
    }

    #[test]
    fn malformed_urls_are_typed_errors_without_passwords() {
        for url in [
            "redis+sentinel://:hunter2@h:1",
            "redis+sentinel://:hunter2@h:1/",
            "redis+sentinel://:hunter2@/m",
            "redis+sentinel://:hunter2@h:1,,h:2/m",
            "redis+sentinel://:hunter2@h:0/m",
            "redis+sentinel://:hunter2@h:99999/m",
            "redis+sentinel://:hunter2@[::1/m",
            "redis+sentinel://:hunter2@[::1]x/m",
            "redis+sentinel://:hunter2@h/m/notadb",
            "redis+sentinel://:hunter2@h/m/1/2",
            "redis+sentinel://:hunter2@h/m?sentinel_pasword=x",
            "redis+sentinel://:hunter2@h/m#frag",
            "redis+sentinel://:hunter2%zz@h/m",
            "redis+sentinel://:hunter2@h/m%20x",
            "redis://:hunter2@h/m",
        ] {
            let error = SentinelSpec::parse_url(url).unwrap_err();
            assert!(
                matches!(error, RedisBackendError::InvalidUrl { .. }),
                "{url}: {error:?}"
            );
            assert!(!format!("{error} {error:?}").contains("hunter2"), "{error}");
        }
        let error = SentinelSpec::parse_url("redis+sentinel://h/m?sentinel_password=hunter2&x=1")
            .unwrap_err();
        assert!(!format!("{error} {error:?}").contains("hunter2"), "{error}");
    }

    #[test]
    fn builder_groups_are_checked_and_credentials_replace_the_urls() {
        let mut options = SentinelOptions::group(&["a:1", "b"], "m");
        assert_eq!(options.url().as_deref(), Some("redis+sentinel://a:1,b/m"));
        options.set_master_auth(Credentials::new(None, "master-pw"));
        let parsed = options.into_spec("ignored").unwrap().unwrap();
        assert_eq!(
            parsed.sentinels[1],
            Address::new("b", DEFAULT_SENTINEL_PORT)
        );
        assert_eq!(parsed.master_auth, Credentials::new(None, "master-pw"));

        let mut options = SentinelOptions::default();
        options.set_sentinel_auth(Credentials::new(Some("s"), "sentinel-pw"));
        let parsed = options
            .into_spec("redis+sentinel://:url-pw@h/m")
            .unwrap()
            .unwrap();
        assert_eq!(parsed.master_auth, Credentials::new(None, "url-pw"));
        assert_eq!(
            parsed.sentinel_auth,
            Credentials::new(Some("s"), "sentinel-pw")
        );

        assert!(SentinelOptions::default()
            .into_spec("redis://h")
            .unwrap()
            .is_none());
        for options in [
            SentinelOptions::group(&[], "m"),
            SentinelOptions::group(&["h:1"], ""),
            SentinelOptions::group(&["h:1"], "two words"),
            SentinelOptions::group(&["h:x"], "m"),
        ] {
            let error = options.into_spec("").unwrap_err();
            assert!(
                matches!(error, RedisBackendError::InvalidConfig { .. }),
                "{error:?}"
            );
        }
        let mut direct = SentinelOptions::default();
        direct.set_master_auth(Credentials::new(None, "pw"));
        assert!(matches!(
            direct.into_spec("redis://h"),
            Err(RedisBackendError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn debug_never_shows_a_password() {
        let shown = format!(
            "{:?}",
            spec("redis+sentinel://u:hunter2@h/m?sentinel_password=hunter3")
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
    }
}
