//! TLS (`rediss://`): the certificates a builder is given, the crypto provider, and what a
//! failed TLS connection attempt means ([`TlsFailure`]).
//!
//! The `redis` crate (feature `tls-rustls`) does the handshake with rustls. It builds its rustls
//! `ClientConfig` itself, on every connection, with `ClientConfig::builder()`, which takes the
//! **process-wide default** crypto provider and offers no way to pass one. So a backend with a
//! `rediss://` URL makes sure one is installed ([`ensure_crypto_provider`]): if the program has
//! installed none, it installs rustls' ring provider as the default; if the program has
//! installed one (say aws-lc-rs), that one is used. Without this, rustls would panic at the
//! first connection whenever the program's dependencies enable two providers.
//!
//! The certificates and keys a builder is given are checked when the backend is built, against
//! a rustls configuration made with the ring provider passed explicitly (not the process
//! default): a PEM without a certificate, a key that does not match its certificate or a key
//! type rustls cannot sign with is a build error, not a connection failure.
//!
//! A failed connection attempt of a TLS client is classified by [`handshake_failure`]: rustls
//! says what it rejected (the server's certificate: unknown issuer, wrong name, expired) or what
//! the server sent (an alert refusing our client certificate, or bytes that are not TLS), and the
//! socket says when the server stayed silent or closed the connection.

use std::error::Error;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use lock_core::BackendErrorKind;
use redis::{ConnectionAddr, RedisError, TlsCertificates};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, InvalidMessage, RootCertStore};

use crate::RedisBackendError;

/// Why a TLS connection to Redis could not be set up: the
/// [`failure`](crate::RedisBackendError::Tls::failure) of a [`RedisBackendError::Tls`].
///
/// [`is_transient`](Self::is_transient) says whether retrying may help: only a server that stays
/// silent during the handshake, or closes the connection in its middle, may answer the next
/// attempt (it was restarting, paused, or overloaded). Every certificate problem, and a server
/// that does not speak TLS, fails the same way on every attempt, so they are permanent: a call
/// fails with them at once instead of waiting out its checkout timeout.
///
/// ```
/// use lock_redis::TlsFailure;
///
/// assert!(!TlsFailure::UnknownIssuer.is_transient());
/// assert!(TlsFailure::HandshakeTimeout.is_transient());
/// assert!(TlsFailure::NameMismatch.to_string().contains("not valid for the host name"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate is not signed by a trusted certificate authority (the system's,
    /// or the one given to [`tls_ca_file`](crate::RedisBackendBuilder::tls_ca_file) or
    /// [`tls_ca_pem`](crate::RedisBackendBuilder::tls_ca_pem)). Permanent.
    UnknownIssuer,
    /// The server's certificate does not name the host of the URL. Permanent.
    NameMismatch,
    /// The server's certificate has expired. Permanent.
    Expired,
    /// The server's certificate is not valid yet (or the client's clock is behind). Permanent.
    NotYetValid,
    /// The server's certificate is invalid in another way (bad signature, bad encoding,
    /// unsupported algorithm, revoked, not meant for a server). Permanent.
    BadServerCertificate,
    /// The server answered with bytes that are not TLS: a plain-text port. Permanent. (A plain
    /// Redis server mostly stays silent on a TLS hello instead, which is a
    /// [`HandshakeTimeout`](Self::HandshakeTimeout).)
    NotTls,
    /// The server requires a client certificate, and none was given (see
    /// [`tls_client_cert_pem`](crate::RedisBackendBuilder::tls_client_cert_pem)). Permanent.
    ClientCertificateRequired,
    /// The server refused the client certificate (its CA is not trusted by the server, it has
    /// expired, or it is not allowed). Permanent.
    ClientCertificateRefused,
    /// The server accepted the TCP connection but did not complete the TLS handshake and the
    /// connection setup within the connect timeout: it is paused, overloaded or unreachable
    /// behind a proxy, or it is a plain-text Redis port (which waits silently for the end of a
    /// command that never comes). Transient.
    HandshakeTimeout,
    /// The connection was closed or reset during the TLS handshake or the connection setup (a
    /// restarting server, a proxy, a server at its connection limit). Transient.
    HandshakeInterrupted,
    /// Any other TLS failure (no protocol version or cipher suite in common, a protocol
    /// violation): see the error's source. Permanent.
    Other,
}

impl TlsFailure {
    /// Whether retrying may help: true only for
    /// [`HandshakeTimeout`](Self::HandshakeTimeout) and
    /// [`HandshakeInterrupted`](Self::HandshakeInterrupted).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            TlsFailure::HandshakeTimeout | TlsFailure::HandshakeInterrupted
        )
    }

    /// The kind of [`BackendError`](lock_core::BackendError) a call fails with.
    pub(crate) fn kind(self) -> BackendErrorKind {
        if self.is_transient() {
            BackendErrorKind::Transient
        } else {
            BackendErrorKind::Permanent
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::UnknownIssuer => {
                "the server's certificate is not signed by a trusted certificate authority \
                 (give the CA that signed it to tls_ca_file or tls_ca_pem)"
            }
            TlsFailure::NameMismatch => {
                "the server's certificate is not valid for the host name (or IP address) of the URL"
            }
            TlsFailure::Expired => "the server's certificate has expired",
            TlsFailure::NotYetValid => "the server's certificate is not valid yet",
            TlsFailure::BadServerCertificate => "the server's certificate is invalid",
            TlsFailure::NotTls => {
                "the server does not speak TLS on this port (use redis:// for a plain-text port)"
            }
            TlsFailure::ClientCertificateRequired => {
                "the server requires a client certificate (give one to tls_client_cert_pem or \
                 tls_client_cert_files)"
            }
            TlsFailure::ClientCertificateRefused => "the server refused the client certificate",
            TlsFailure::HandshakeTimeout => {
                "the server accepted the connection but did not complete the TLS handshake in \
                 time (a paused or unreachable server, or a plain-text port: plain Redis stays \
                 silent on a TLS hello)"
            }
            TlsFailure::HandshakeInterrupted => {
                "the connection was closed during the TLS handshake or the connection setup"
            }
            TlsFailure::Other => "the TLS handshake failed",
        })
    }
}

/// Whether `client` connects over TLS (a `rediss://` URL).
pub(crate) fn is_tls(client: &redis::Client) -> bool {
    matches!(
        client.get_connection_info().addr(),
        ConnectionAddr::TcpTls { .. }
    )
}

/// Classifies a failed connection attempt of a TLS client, with the error to report as its
/// source: the rustls error when rustls failed, else the socket's error. `None` when the
/// failure has nothing to do with TLS (a refused TCP connection, a wrong password).
///
/// Only for errors of connection attempts: a timeout or a reset there happened during the
/// handshake or the setup commands that carry it, not during a call's commands.
pub(crate) fn handshake_failure(
    error: &RedisError,
) -> Option<(TlsFailure, Box<dyn Error + Send + Sync>)> {
    let inner = inner_error(error)?;
    let io = inner.downcast_ref::<io::Error>();
    let rustls_error = match io {
        Some(io) => io
            .get_ref()
            .and_then(|source| source.downcast_ref::<rustls::Error>()),
        None => inner.downcast_ref::<rustls::Error>(),
    };
    if let Some(rustls_error) = rustls_error {
        return Some((
            classify_rustls(rustls_error),
            Box::new(rustls_error.clone()),
        ));
    }
    let io = io?;
    let failure = match io.kind() {
        // A read timeout (`EAGAIN`): TCP was connected, the handshake or setup went unanswered.
        io::ErrorKind::WouldBlock => TlsFailure::HandshakeTimeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsFailure::HandshakeInterrupted,
        // Refused, unreachable, TCP connect timed out: not about TLS.
        _ => return None,
    };
    Some((failure, Box::new(io::Error::new(io.kind(), io.to_string()))))
}

/// The error a `RedisError` wraps, if it wraps one (the `redis` crate keeps it behind an `Arc`).
fn inner_error(error: &RedisError) -> Option<&(dyn Error + Send + Sync + 'static)> {
    type Shared = Arc<dyn Error + Send + Sync>;
    let shared = Error::source(error)?.downcast_ref::<Shared>()?;
    Some(&**shared)
}

/// What a rustls error says went wrong.
fn classify_rustls(error: &rustls::Error) -> TlsFailure {
    match error {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => TlsFailure::UnknownIssuer,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::NameMismatch
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            _ => TlsFailure::BadServerCertificate,
        },
        rustls::Error::InvalidMessage(
            InvalidMessage::InvalidContentType
            | InvalidMessage::UnknownProtocolVersion
            | InvalidMessage::MessageTooLarge,
        ) => TlsFailure::NotTls,
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => TlsFailure::ClientCertificateRequired,
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied => TlsFailure::ClientCertificateRefused,
            _ => TlsFailure::Other,
        },
        _ => TlsFailure::Other,
    }
}

/// Makes sure rustls has a process-wide default crypto provider, which the `redis` crate's TLS
/// needs (see the module docs): installs ring's if the program installed none. Cheap after the
/// first call.
pub(crate) fn ensure_crypto_provider() {
    if CryptoProvider::get_default().is_some() {
        return;
    }
    // Losing a race with another installer is fine: a provider is installed either way.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_ok()
    {
        tracing::debug!(
            "lock-redis installed rustls' ring crypto provider as the process default, for TLS"
        );
    }
}

/// PEM data: given as bytes, or read from a file when the backend is built.
#[derive(Clone)]
enum Pem {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Pem {
    /// The PEM bytes; `what` names them in errors ("the TLS CA").
    fn load(&self, what: &str) -> Result<Vec<u8>, RedisBackendError> {
        match self {
            Pem::Bytes(bytes) => Ok(bytes.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|error| {
                invalid(format!(
                    "cannot read {what} file {}: {error}",
                    path.display()
                ))
            }),
        }
    }

    /// For `Debug`: a file's path, or only the size of bytes given (`secret` for key material).
    fn describe(&self, secret: bool) -> String {
        match (self, secret) {
            (Pem::File(path), _) => format!("file {}", path.display()),
            (Pem::Bytes(_), true) => "<redacted>".to_owned(),
            (Pem::Bytes(bytes), false) => format!("PEM, {} bytes", bytes.len()),
        }
    }
}

/// The TLS settings of a builder: the CA to trust, the client certificate, and whether
/// certificates are checked at all. Shared by [`RedisBackendBuilder`](crate::RedisBackendBuilder)
/// and [`RedlockBuilder`](crate::RedlockBuilder) (which gives them to every node).
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    ca: Option<Pem>,
    client: Option<(Pem, Pem)>,
    accept_invalid_certificates: bool,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca", &self.ca.as_ref().map(|ca| ca.describe(false)))
            .field(
                "client_cert",
                &self.client.as_ref().map(|(cert, _)| cert.describe(false)),
            )
            .field(
                "client_key",
                &self.client.as_ref().map(|(_, key)| key.describe(true)),
            )
            .field(
                "accept_invalid_certificates",
                &self.accept_invalid_certificates,
            )
            .finish()
    }
}

impl TlsSettings {
    pub(crate) fn ca_file(&mut self, path: PathBuf) {
        self.ca = Some(Pem::File(path));
    }

    pub(crate) fn ca_pem(&mut self, pem: Vec<u8>) {
        self.ca = Some(Pem::Bytes(pem));
    }

    pub(crate) fn client_cert_files(&mut self, cert: PathBuf, key: PathBuf) {
        self.client = Some((Pem::File(cert), Pem::File(key)));
    }

    pub(crate) fn client_cert_pem(&mut self, cert: Vec<u8>, key: Vec<u8>) {
        self.client = Some((Pem::Bytes(cert), Pem::Bytes(key)));
    }

    pub(crate) fn accept_invalid_certificates(&mut self) {
        self.accept_invalid_certificates = true;
    }

    /// Whether any TLS setting was made.
    pub(crate) fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some() || self.accept_invalid_certificates
    }

    /// `client` (parsed from `url`, redacted as `target`) with these settings applied.
    ///
    /// For a `rediss://` URL: installs a crypto provider if none is, loads and checks the
    /// certificates, and warns (once, here) when certificates are not checked. For other URLs:
    /// the client as it is, unless TLS settings were made, which is an error.
    pub(crate) fn apply(
        &self,
        client: redis::Client,
        target: &str,
    ) -> Result<redis::Client, RedisBackendError> {
        let ConnectionAddr::TcpTls {
            host,
            port,
            insecure: insecure_url,
            ..
        } = client.get_connection_info().addr().clone()
        else {
            if self.is_set() {
                return Err(invalid(format!(
                    "TLS settings need a rediss:// URL, not {target}"
                )));
            }
            return Ok(client);
        };
        ensure_crypto_provider();
        let insecure = insecure_url || self.accept_invalid_certificates;
        if insecure {
            tracing::warn!(
                redis = %target,
                "TLS certificate verification is OFF for this Redis backend \
                 (danger_accept_invalid_certificates or #insecure): anyone on the network path \
                 can impersonate the server; use this only in development"
            );
        }
        if !self.is_set() {
            return Ok(client);
        }
        let certificates = self.load_certificates()?;
        let info = client
            .get_connection_info()
            .clone()
            .set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params: None,
            });
        // The PEM was checked above; the redis crate's own message could quote a PEM line, so
        // it is not passed on.
        redis::Client::build_with_tls(info, certificates)
            .map_err(|_| invalid("the redis crate refused the TLS certificates and key".to_owned()))
    }

    /// Reads the PEM data, and checks it with a rustls configuration that uses the ring
    /// provider explicitly.
    fn load_certificates(&self) -> Result<TlsCertificates, RedisBackendError> {
        let mut roots = RootCertStore::empty();
        let root_cert = match &self.ca {
            Some(ca) => {
                let pem = ca.load("the TLS CA")?;
                let certificates = parse_certificates(&pem, "the TLS CA")?;
                let (_added, ignored) = roots.add_parsable_certificates(certificates);
                if ignored > 0 || roots.is_empty() {
                    return Err(invalid(format!(
                        "the TLS CA has {ignored} certificate(s) that rustls cannot use as a trust \
                         anchor"
                    )));
                }
                Some(pem)
            }
            None => None,
        };
        let client_tls = match &self.client {
            Some((cert, key)) => {
                let cert = cert.load("the TLS client certificate")?;
                let key = key.load("the TLS client key")?;
                let chain = parse_certificates(&cert, "the TLS client certificate")?;
                let private_key = PrivateKeyDer::from_pem_slice(&key).map_err(|error| {
                    invalid(format!(
                        "the TLS client key holds no usable private key: {}",
                        describe_pem_error(&error)
                    ))
                })?;
                check_client_identity(roots.clone(), chain, private_key)?;
                Some(redis::ClientTlsConfig {
                    client_cert: cert,
                    client_key: key,
                })
            }
            None => None,
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// Checks that rustls (with ring) can sign with `key` and that it matches the certificate.
fn check_client_identity(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), RedisBackendError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
        })
        .map(drop)
        .map_err(|error| {
            // rustls' messages name what is wrong, never the key's bytes.
            invalid(format!(
                "the TLS client certificate and key cannot be used: {error}"
            ))
        })
}

/// Every certificate of `pem`; at least one.
fn parse_certificates(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, RedisBackendError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            invalid(format!(
                "{what} is not valid PEM: {}",
                describe_pem_error(&error)
            ))
        })?;
    if certificates.is_empty() {
        return Err(invalid(format!(
            "{what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(certificates)
}

/// What is wrong with some PEM, without quoting any of it (it may be a private key).
fn describe_pem_error(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::NoItemsFound => "no PEM section of the expected kind was found",
        _ => "it does not parse",
    }
}

fn invalid(reason: String) -> RedisBackendError {
    RedisBackendError::InvalidConfig { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_redis_error(error: io::Error) -> RedisError {
        RedisError::from(error)
    }

    fn rustls_in_io(error: rustls::Error) -> RedisError {
        io_redis_error(io::Error::new(io::ErrorKind::InvalidData, error))
    }

    #[test]
    fn certificate_problems_are_named_and_permanent() {
        let cases = [
            (CertificateError::UnknownIssuer, TlsFailure::UnknownIssuer),
            (CertificateError::NotValidForName, TlsFailure::NameMismatch),
            (CertificateError::Expired, TlsFailure::Expired),
            (CertificateError::NotValidYet, TlsFailure::NotYetValid),
            (
                CertificateError::BadSignature,
                TlsFailure::BadServerCertificate,
            ),
        ];
        for (certificate_error, expected) in cases {
            let error = rustls_in_io(rustls::Error::InvalidCertificate(certificate_error));
            let (failure, source) = handshake_failure(&error).unwrap();
            assert_eq!(failure, expected);
            assert!(!failure.is_transient());
            // The source is the rustls error itself, for downcasting.
            assert!(source.downcast_ref::<rustls::Error>().is_some());
        }
    }

    #[test]
    fn alerts_from_the_server_are_about_the_client_certificate() {
        for (alert, expected) in [
            (
                AlertDescription::CertificateRequired,
                TlsFailure::ClientCertificateRequired,
            ),
            (
                AlertDescription::UnknownCA,
                TlsFailure::ClientCertificateRefused,
            ),
            (
                AlertDescription::BadCertificate,
                TlsFailure::ClientCertificateRefused,
            ),
            (AlertDescription::HandshakeFailure, TlsFailure::Other),
        ] {
            let error = rustls_in_io(rustls::Error::AlertReceived(alert));
            assert_eq!(handshake_failure(&error).unwrap().0, expected, "{alert:?}");
        }
    }

    #[test]
    fn plain_text_replies_are_not_tls() {
        let error = rustls_in_io(rustls::Error::InvalidMessage(
            InvalidMessage::InvalidContentType,
        ));
        assert_eq!(handshake_failure(&error).unwrap().0, TlsFailure::NotTls);
    }

    #[test]
    fn silence_and_closes_are_transient_and_other_socket_errors_are_not_tls() {
        let silent = io_redis_error(io::Error::from(io::ErrorKind::WouldBlock));
        let (failure, _) = handshake_failure(&silent).unwrap();
        assert_eq!(failure, TlsFailure::HandshakeTimeout);
        assert!(failure.is_transient());
        for kind in [io::ErrorKind::UnexpectedEof, io::ErrorKind::ConnectionReset] {
            let closed = io_redis_error(io::Error::from(kind));
            let (failure, _) = handshake_failure(&closed).unwrap();
            assert_eq!(failure, TlsFailure::HandshakeInterrupted, "{kind:?}");
            assert!(failure.is_transient());
        }
        for kind in [io::ErrorKind::ConnectionRefused, io::ErrorKind::TimedOut] {
            assert!(handshake_failure(&io_redis_error(io::Error::from(kind))).is_none());
        }
        let refused = RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(handshake_failure(&refused).is_none());
    }

    #[test]
    fn settings_need_a_tls_url() {
        let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut settings = TlsSettings::default();
        assert!(settings
            .apply(client.clone(), "redis://127.0.0.1:6379")
            .is_ok());
        settings.accept_invalid_certificates();
        let error = settings
            .apply(client, "redis://127.0.0.1:6379")
            .unwrap_err();
        assert!(error.to_string().contains("rediss://"), "{error}");
    }

    #[test]
    fn bad_pem_is_a_build_error_that_quotes_none_of_it() {
        let secret_line = "c2VjcmV0LWtleS1tYXRlcmlhbA";
        let key =
            format!("-----BEGIN PRIVATE KEY-----\n{secret_line}!!\n-----END PRIVATE KEY-----\n");
        let client = redis::Client::open("rediss://127.0.0.1:6380").unwrap();
        let cases: Vec<(TlsSettings, &str)> = vec![
            (
                {
                    let mut settings = TlsSettings::default();
                    settings.ca_pem(b"not a certificate".to_vec());
                    settings
                },
                "holds no PEM certificate",
            ),
            (
                {
                    let mut settings = TlsSettings::default();
                    settings.ca_file(PathBuf::from("/nonexistent/ca.pem"));
                    settings
                },
                "cannot read the TLS CA file /nonexistent/ca.pem",
            ),
            (
                {
                    let mut settings = TlsSettings::default();
                    settings.client_cert_pem(
                        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(),
                        key.clone().into_bytes(),
                    );
                    settings
                },
                "client key",
            ),
        ];
        for (settings, expected) in cases {
            let shown = format!("{settings:?}");
            assert!(!shown.contains(secret_line), "{shown}");
            let error = settings
                .apply(client.clone(), "rediss://127.0.0.1:6380")
                .unwrap_err();
            let text = format!("{error} {error:?}");
            assert!(text.contains(expected), "{text}");
            assert!(!text.contains(secret_line), "{text}");
        }
    }
}
