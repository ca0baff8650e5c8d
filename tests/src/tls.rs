//! Certificates for TLS tests, made fresh by `rcgen` for each [`TestPki`], and the TLS settings
//! of a [`RedisServer`](crate::RedisServer) ([`ServerTls`]).
//!
//! A [`TestPki`] is a certificate authority and, signed by it unless said otherwise, the server
//! and client certificates that the TLS tests need: a good server certificate for `127.0.0.1`
//! and `localhost`, one for another host, an expired one, one signed by an unknown CA, a client
//! certificate, and a client certificate signed by the unknown CA. All keys are ECDSA P-256.
//!
//! ```no_run
//! use lock_tests::tls::{ClientAuth, TestPki};
//! use lock_tests::{RedisServer, ServerOptions};
//!
//! let pki = TestPki::generate();
//! let server = RedisServer::start_with(ServerOptions {
//!     tls: Some(pki.server_tls(&pki.server, ClientAuth::Required)),
//!     ..ServerOptions::default()
//! });
//! assert!(server.url().starts_with("rediss://127.0.0.1:"));
//! ```

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate (PEM) and its private key (PEM, PKCS#8).
#[derive(Clone)]
pub struct PemIdentity {
    /// The certificate, `-----BEGIN CERTIFICATE-----`.
    pub cert_pem: String,
    /// Its private key, `-----BEGIN PRIVATE KEY-----`.
    pub key_pem: String,
}

impl fmt::Debug for PemIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl PemIdentity {
    /// What must never be seen in `Debug`, errors or logs, to show that the private key is not:
    /// each base64 line of its PEM, and the start of its first line as `Debug` prints bytes
    /// (`45, 45, 45, …`).
    pub fn key_traces(&self) -> Vec<String> {
        let mut traces: Vec<String> = self
            .key_pem
            .lines()
            .filter(|line| !line.starts_with("-----") && !line.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(first) = traces.first() {
            let bytes = format!("{:?}", &first.as_bytes()[..16.min(first.len())]);
            traces.push(bytes.trim_matches(['[', ']']).to_owned());
        }
        traces
    }
}

/// Whether a TLS server asks clients for a certificate (`--tls-auth-clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `no`: clients present no certificate.
    No,
    /// `yes`: a client without a certificate signed by the server's CA is refused.
    Required,
    /// `optional`: a certificate is checked if presented.
    Optional,
}

impl ClientAuth {
    /// The value of `--tls-auth-clients`.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            ClientAuth::No => "no",
            ClientAuth::Required => "yes",
            ClientAuth::Optional => "optional",
        }
    }
}

/// The TLS settings of a [`RedisServer`](crate::RedisServer): it listens with TLS on a second
/// port (see [`RedisServer::tls_port`](crate::RedisServer::tls_port)).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate and key (`--tls-cert-file`, `--tls-key-file`).
    pub identity: PemIdentity,
    /// The CA the server trusts for client certificates (`--tls-ca-cert-file`).
    pub ca_pem: String,
    /// `--tls-auth-clients`.
    pub client_auth: ClientAuth,
}

/// A certificate authority and the certificates TLS tests need, generated in memory.
pub struct TestPki {
    /// The CA certificate (PEM) that clients should trust.
    pub ca_pem: String,
    /// A server certificate for `127.0.0.1` and `localhost`, signed by the CA.
    pub server: PemIdentity,
    /// A server certificate for `redis.other.invalid` only, signed by the CA.
    pub wrong_host: PemIdentity,
    /// A server certificate for `127.0.0.1` and `localhost` that expired in 2001.
    pub expired: PemIdentity,
    /// A server certificate for `127.0.0.1` and `localhost` signed by another CA, which clients
    /// do not trust.
    pub unknown_ca_server: PemIdentity,
    /// A client certificate (`lock-tests-client`), signed by the CA.
    pub client: PemIdentity,
    /// A client certificate signed by the other CA, which the server does not trust.
    pub unknown_ca_client: PemIdentity,
}

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

/// What a certificate is for.
enum Role {
    Server,
    Client,
}

impl TestPki {
    /// Generates the CA, the other CA and every certificate.
    ///
    /// # Panics
    ///
    /// If `rcgen` fails (a bug in this harness).
    pub fn generate() -> TestPki {
        let ca = certificate_authority("lock-tests CA");
        let other_ca = certificate_authority("lock-tests unknown CA");
        let local = ["127.0.0.1", "localhost"];
        let mut expired = params(&local, Role::Server);
        expired.not_before = rcgen::date_time_ymd(2000, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2001, 1, 1);
        TestPki {
            ca_pem: ca.pem(),
            server: sign(params(&local, Role::Server), &ca),
            wrong_host: sign(params(&["redis.other.invalid"], Role::Server), &ca),
            expired: sign(expired, &ca),
            unknown_ca_server: sign(params(&local, Role::Server), &other_ca),
            client: sign(params(&["lock-tests-client"], Role::Client), &ca),
            unknown_ca_client: sign(params(&["lock-tests-client"], Role::Client), &other_ca),
        }
    }

    /// TLS settings for a server presenting `identity` (one of this PKI's server
    /// certificates) and trusting this PKI's CA for client certificates.
    pub fn server_tls(&self, identity: &PemIdentity, client_auth: ClientAuth) -> ServerTls {
        ServerTls {
            identity: identity.clone(),
            ca_pem: self.ca_pem.clone(),
            client_auth,
        }
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("generating a CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-signing a CA certificate")
}

/// Parameters of a leaf certificate for `names` (IP addresses or DNS names).
fn params(names: &[&str], role: Role) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*name).try_into().expect("a valid DNS name")),
        })
        .collect();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params
}

fn sign(params: CertificateParams, issuer: &CertifiedIssuer<'static, KeyPair>) -> PemIdentity {
    let key = KeyPair::generate().expect("generating a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("signing a certificate");
    PemIdentity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}
