//! TLS (`rediss://`) against real `redis-server` processes with `rcgen` certificates: the
//! conformance suite, mutual TLS, Redlock and release wake-ups over TLS; each failure (unknown
//! CA, wrong host, expired certificate, plain-text port, client certificate missing or refused,
//! silent or dropping server) a typed error within the timeouts; no password or key in `Debug`,
//! errors or logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::time::{Duration, Instant};

use lock_core::{BackendError, LeaseBackend, LockManager, Ownership, RetryPolicy};
use lock_redis::{
    RedisBackend, RedisBackendBuilder, RedisBackendError, RedlockBackend, TlsFailure,
};
use lock_tests::direct::{acquire, fence_of, redis_cause, request, CALL};
use lock_tests::tls::{ClientAuth, PemIdentity, TestPki};
use lock_tests::{
    captured_logs, error_chain, spawn_waiter, wait_until, ProxyMode, RedisServer, ServerOptions,
    TcpProxy,
};

/// The connect and command timeouts of most backends here.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Their checkout timeout: long, so that a permanent failure that comes back within [`SLACK`]
/// shows it was reported at once, not after waiting it out.
const PATIENT_CHECKOUT: Duration = Duration::from_secs(10);
/// How much later than its timeout a failing call may return (the machine is shared).
const SLACK: Duration = Duration::from_millis(1500);
/// Deadline of `wait_until`.
const WAIT: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(30);
/// The connect timeout of the tests of silent servers, and their checkout timeout: long enough
/// for a TCP connect on a loaded machine, short enough for attempts to end before the call does.
const SILENT_CONNECT: Duration = Duration::from_millis(700);
const SILENT_CHECKOUT: Duration = Duration::from_secs(2);

/// A server presenting `identity` (one of `pki`'s server certificates).
fn tls_server(pki: &TestPki, identity: &PemIdentity, client_auth: ClientAuth) -> RedisServer {
    RedisServer::start_with(ServerOptions {
        tls: Some(pki.server_tls(identity, client_auth)),
        ..ServerOptions::default()
    })
}

/// A builder for `url` with the timeouts above, trusting `pki`'s CA.
fn builder(url: &str, pki: &TestPki) -> RedisBackendBuilder {
    RedisBackend::builder(url)
        .connect_timeout(TIMEOUT)
        .checkout_timeout(PATIENT_CHECKOUT)
        .command_timeout(TIMEOUT)
        .tls_ca_pem(pki.ca_pem.clone())
}

/// The [`RedisBackendError::Tls`] of a failed call, checked: permanent or transient as its
/// failure says, returned within `limit` + [`SLACK`] of `started`, naming the acquire of `k`.
fn tls_error(
    result: Result<impl std::fmt::Debug, BackendError>,
    started: Instant,
    limit: Duration,
) -> (TlsFailure, BackendError) {
    let elapsed = started.elapsed();
    let error = result.expect_err("the call succeeded over a TLS connection that must fail");
    assert!(
        elapsed < limit + SLACK,
        "took {elapsed:?} (limit {limit:?}): {}",
        error_chain(&error)
    );
    let cause = redis_cause(&error);
    let failure = cause
        .tls_failure()
        .unwrap_or_else(|| panic!("not a TLS error: {}", error_chain(&error)));
    assert_eq!(
        error.is_transient(),
        failure.is_transient(),
        "{}",
        error_chain(&error)
    );
    assert_eq!(cause.key(), Some("k"));
    (failure, error)
}

/// One acquire of `k` on `backend`, expected to fail with a TLS error, within `limit`.
fn failed_acquire(backend: &RedisBackend, limit: Duration) -> (TlsFailure, BackendError) {
    let started = Instant::now();
    let result = backend.try_acquire(&request("k", "t", TTL), CALL);
    tls_error(result, started, limit)
}

/// Asserts that a certificate problem is reported as `expected`: permanent, at once (within
/// [`SLACK`], not after the checkout timeout), saying `phrase`, with the rustls error as the
/// source.
fn assert_refused_at_once(backend: &RedisBackend, expected: TlsFailure, phrase: &str) {
    let (failure, error) = failed_acquire(backend, Duration::ZERO);
    let message = error_chain(&error);
    assert_eq!(failure, expected, "{message}");
    assert!(!error.is_transient(), "{message}");
    assert!(message.contains(phrase), "{message}");
    let source = std::error::Error::source(redis_cause(&error)).expect("a source");
    assert!(
        source.downcast_ref::<lock_redis::rustls::Error>().is_some(),
        "the source is not the rustls error: {source:?}"
    );
}

/// Starts a server presenting the certificate `pick` chooses, asking clients for theirs as
/// `client_auth` says, and asserts that a backend trusting the CA (without a client
/// certificate) is refused as `expected`, saying `phrase`.
fn assert_server_refuses(
    pick: fn(&TestPki) -> &PemIdentity,
    client_auth: ClientAuth,
    expected: TlsFailure,
    phrase: &str,
) -> (TestPki, RedisServer) {
    let pki = TestPki::generate();
    let server = tls_server(&pki, pick(&pki), client_auth);
    let backend = builder(&server.url(), &pki).build().unwrap();
    assert_refused_at_once(&backend, expected, phrase);
    (pki, server)
}

// ---------------------------------------------------------------------------------------------
// Working connections
// ---------------------------------------------------------------------------------------------

/// The lock-core conformance suite over TLS, against one TLS server per check.
mod conformance {
    use super::*;
    use lock_tests::conformance::RedisTarget;

    fn tls_redis() -> RedisTarget<RedisServer> {
        let pki = TestPki::generate();
        let server = tls_server(&pki, &pki.server, ClientAuth::No);
        let backend = RedisBackend::builder(&server.url())
            .tls_ca_pem(pki.ca_pem.clone())
            .command_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        RedisTarget {
            servers: server,
            backend,
        }
    }

    lock_core::conformance_tests!(tls_redis());
}

#[test]
fn a_certificate_is_checked_against_the_ip_address_or_the_host_name_of_the_url() {
    let pki = TestPki::generate();
    let server = tls_server(&pki, &pki.server, ClientAuth::No);
    let mut backends = Vec::new();
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("rediss://{host}:{}", server.tls_port());
        let backend = builder(&url, &pki).build().unwrap();
        fence_of(acquire(&backend, "k", host, TTL));
        assert_eq!(backend.release("k", host, CALL).unwrap(), Ownership::Owned);
        backends.push(backend);
    }
    // The backends' pooled connections are on the TLS port.
    let tls_port = format!("laddr=127.0.0.1:{} ", server.tls_port());
    assert!(server.clients_where(|line| line.contains(&tls_port)) >= 2);
}

/// The README's example: a password, the CA and the client certificate from files.
#[test]
fn mutual_tls_works_with_certificates_from_files_as_in_the_readme_or_from_memory() {
    let pki = TestPki::generate();
    let server = RedisServer::start_with(ServerOptions {
        password: Some("password".to_owned()),
        tls: Some(pki.server_tls(&pki.server, ClientAuth::Required)),
        ..ServerOptions::default()
    });
    let dir = std::env::temp_dir().join(format!("lock-tests-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        ("ca.crt", &pki.ca_pem),
        ("redis.crt", &pki.client.cert_pem),
        ("redis.key", &pki.client.key_pem),
    ];
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    let url = format!("rediss://:password@127.0.0.1:{}/0", server.tls_port());
    let from_files = RedisBackend::builder(&url)
        .tls_ca_file(dir.join("ca.crt"))
        .tls_client_cert_files(dir.join("redis.crt"), dir.join("redis.key"))
        .build();
    std::fs::remove_dir_all(&dir).unwrap();
    let from_files = from_files.unwrap();
    fence_of(acquire(&from_files, "files", "t", TTL));
    assert_eq!(
        from_files.release("files", "t", CALL).unwrap(),
        Ownership::Owned
    );

    let from_memory = builder(&url, &pki)
        .tls_client_cert_pem(pki.client.cert_pem.clone(), pki.client.key_pem.clone())
        .build()
        .unwrap();
    fence_of(acquire(&from_memory, "memory", "t", TTL));
}

#[test]
fn a_release_wakes_a_waiter_over_tls_long_before_its_backoff() {
    let pki = TestPki::generate();
    let server = tls_server(&pki, &pki.server, ClientAuth::Required);
    let backend = builder(&server.url(), &pki)
        .tls_client_cert_pem(pki.client.cert_pem.clone(), pki.client.key_pem.clone())
        .build()
        .unwrap();
    // A backoff so long that only a wake-up explains a quick acquire.
    let sleepy = RetryPolicy::new(Duration::from_secs(30), Duration::from_secs(30));
    let manager = LockManager::builder(backend).retry(sleepy).build().unwrap();
    let lease = manager.acquire("handoff", TTL).unwrap();
    let waiter = spawn_waiter(&manager, "handoff", TTL);
    // The subscriber's connection is TLS (with the client certificate): the server requires it.
    wait_until("the waiter subscribed over TLS", WAIT, || {
        server.subscribers("lock:{handoff}") == 1
    });
    let released = Instant::now();
    lease.release().unwrap();
    let acquired = waiter.join().unwrap();
    assert!(
        acquired - released < Duration::from_secs(5),
        "woken {:?} after the release: slept on its 30 s backoff",
        acquired - released
    );
}

#[test]
fn redlock_takes_leases_on_tls_nodes_with_one_ca_and_client_certificate() {
    let pki = TestPki::generate();
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| tls_server(&pki, &pki.server, ClientAuth::Required))
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    assert!(urls.iter().all(|url| url.starts_with("rediss://")));
    let redlock = RedlockBackend::builder(&urls)
        .node_timeout(Duration::from_secs(1))
        .tls_ca_pem(pki.ca_pem.clone())
        .tls_client_cert_pem(pki.client.cert_pem.clone(), pki.client.key_pem.clone())
        .build()
        .unwrap();
    let manager = LockManager::new(redlock);
    let lease = manager.acquire("k", TTL).unwrap();
    // A majority holds it (the acquire does not wait for the slowest node).
    let holders = servers
        .iter()
        .filter(|server| {
            let holder: Option<String> = redis::cmd("GET")
                .arg("lock:{k}")
                .query(&mut server.connection())
                .unwrap();
            holder.is_some()
        })
        .count();
    assert!(holders >= 2, "{holders} of 3 nodes hold the lock");
    lease.release().unwrap();
}

#[test]
fn accepting_invalid_certificates_connects_to_any_server_and_warns() {
    let logs = captured_logs();
    let pki = TestPki::generate();
    for identity in [&pki.expired, &pki.wrong_host, &pki.unknown_ca_server] {
        let server = tls_server(&pki, identity, ClientAuth::No);
        let backend = RedisBackend::builder(&server.url())
            .danger_accept_invalid_certificates()
            .build()
            .unwrap();
        fence_of(acquire(&backend, "k", "t", TTL));
        // The `redis` crate's own `#insecure` does the same, and is warned about the same way.
        let fragment = format!("{}/#insecure", server.url());
        fence_of(acquire(
            &builder(&fragment, &pki).build().unwrap(),
            "f",
            "t",
            TTL,
        ));
        let url = format!("127.0.0.1:{}", server.tls_port());
        let warnings: Vec<String> = logs
            .lines_containing("verification is OFF")
            .into_iter()
            .filter(|line| {
                line.contains("WARN") && (line.ends_with(&url) || line.contains(&format!("{url}/")))
            })
            .collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Each failure, named, permanent or transient, within the timeouts
// ---------------------------------------------------------------------------------------------

#[test]
fn a_server_certificate_from_an_unknown_ca_is_refused_as_unknown_issuer() {
    let (_pki, server) = assert_server_refuses(
        |pki| &pki.unknown_ca_server,
        ClientAuth::No,
        TlsFailure::UnknownIssuer,
        "not signed by a trusted certificate authority",
    );
    // Without a CA, the system's store is trusted, which knows no test CA either.
    let system = RedisBackend::builder(&server.url())
        .checkout_timeout(PATIENT_CHECKOUT)
        .build()
        .unwrap();
    assert_refused_at_once(
        &system,
        TlsFailure::UnknownIssuer,
        "trusted certificate authority",
    );
}

#[test]
fn a_server_certificate_for_another_host_is_a_name_mismatch() {
    assert_server_refuses(
        |pki| &pki.wrong_host,
        ClientAuth::No,
        TlsFailure::NameMismatch,
        "not valid for the host name",
    );
}

#[test]
fn an_expired_server_certificate_is_named() {
    assert_server_refuses(
        |pki| &pki.expired,
        ClientAuth::No,
        TlsFailure::Expired,
        "has expired",
    );
}

#[test]
fn a_missing_client_certificate_is_refused_when_the_server_requires_one() {
    assert_server_refuses(
        |pki| &pki.server,
        ClientAuth::Required,
        TlsFailure::ClientCertificateRequired,
        "requires a client certificate",
    );
}

#[test]
fn a_client_certificate_from_a_ca_the_server_does_not_trust_is_refused() {
    let pki = TestPki::generate();
    for client_auth in [ClientAuth::Required, ClientAuth::Optional] {
        let server = tls_server(&pki, &pki.server, client_auth);
        let backend = builder(&server.url(), &pki)
            .tls_client_cert_pem(
                pki.unknown_ca_client.cert_pem.clone(),
                pki.unknown_ca_client.key_pem.clone(),
            )
            .build()
            .unwrap();
        assert_refused_at_once(
            &backend,
            TlsFailure::ClientCertificateRefused,
            "refused the client certificate",
        );
    }
}

/// A backend for `url` with the silent-server timeouts, whose acquire fails with the
/// transient `expected` within its checkout timeout; returns the backend, and the error as a
/// user reads it.
fn assert_fails_transiently(
    url: &str,
    pki: &TestPki,
    expected: TlsFailure,
) -> (RedisBackend, String) {
    let backend = builder(url, pki)
        .connect_timeout(SILENT_CONNECT)
        .checkout_timeout(SILENT_CHECKOUT)
        .build()
        .unwrap();
    let (failure, error) = failed_acquire(&backend, SILENT_CHECKOUT);
    let message = error_chain(&error);
    assert_eq!(failure, expected, "{message}");
    assert!(error.is_transient(), "{message}");
    (backend, message)
}

/// A proxy in `mode` in front of `server`'s TLS port, and the `rediss://` URL through it.
fn behind_proxy(server: &RedisServer, mode: ProxyMode) -> (TcpProxy, String) {
    let proxy = TcpProxy::start(server.tls_addr());
    proxy.set_mode(mode);
    let url = format!("rediss://127.0.0.1:{}", proxy.addr().port());
    (proxy, url)
}

#[test]
fn a_plain_text_port_is_a_handshake_timeout_within_the_timeouts() {
    let pki = TestPki::generate();
    let server = RedisServer::start();
    // A plain Redis server waits silently for the end of a command: the TLS hello has none.
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let (_, message) = assert_fails_transiently(&url, &pki, TlsFailure::HandshakeTimeout);
    assert!(message.contains("plain-text port"), "{message}");
}

/// With the default timeouts (connect and checkout 2 s each), the attempt under way may not
/// have failed when the call gives up: the error still says TLS may be why.
#[test]
fn with_the_default_timeouts_a_plain_text_port_is_still_reported_as_a_tls_problem() {
    let pki = TestPki::generate();
    let server = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let backend = RedisBackend::builder(&url)
        .tls_ca_pem(pki.ca_pem.clone())
        .build()
        .unwrap();
    let started = Instant::now();
    let error = backend
        .try_acquire(&request("k", "t", TTL), CALL)
        .unwrap_err();
    let message = error_chain(&error);
    assert!(
        started.elapsed() < Duration::from_secs(2) + SLACK,
        "{message}"
    );
    assert!(error.is_transient(), "{message}");
    assert!(message.contains("TLS handshake"), "{message}");
}

#[test]
fn a_silent_server_fails_the_tls_handshake_within_the_connect_timeout() {
    let pki = TestPki::generate();
    let server = tls_server(&pki, &pki.server, ClientAuth::No);
    let (proxy, url) = behind_proxy(&server, ProxyMode::Blackhole);
    // The call waits its checkout timeout (the failure is transient), and says why: an
    // attempt whose handshake went unanswered ended, bounded by the connect timeout.
    let (backend, _) = assert_fails_transiently(&url, &pki, TlsFailure::HandshakeTimeout);

    // One attempt, by itself, ends within the connect timeout.
    let client = lock_redis::redis::Client::build_with_tls(
        url.as_str(),
        lock_redis::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.ca_pem.clone().into_bytes()),
        },
    )
    .unwrap();
    let started = Instant::now();
    assert!(client.get_connection_with_timeout(SILENT_CONNECT).is_err());
    assert!(
        started.elapsed() < SILENT_CONNECT + SLACK,
        "one TLS connection attempt took {:?}",
        started.elapsed()
    );

    // Once the server answers again, the same backend works.
    proxy.set_mode(ProxyMode::Pass);
    fence_of(acquire(&backend, "k", "t", TTL));
}

#[test]
fn a_server_that_drops_the_handshake_is_a_transient_failure() {
    let pki = TestPki::generate();
    let server = tls_server(&pki, &pki.server, ClientAuth::No);
    let (_proxy, url) = behind_proxy(&server, ProxyMode::Reset);
    assert_fails_transiently(&url, &pki, TlsFailure::HandshakeInterrupted);
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[test]
fn no_password_or_key_shows_in_debug_errors_or_logs() {
    const PASSWORD: &str = "hunter2-tls-secret";
    let logs = captured_logs();
    let pki = TestPki::generate();
    let server = RedisServer::start_with(ServerOptions {
        password: Some("another-password".to_owned()),
        tls: Some(pki.server_tls(&pki.server, ClientAuth::Required)),
        ..ServerOptions::default()
    });
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", server.tls_port());
    let key = &pki.client;
    let mut secrets = key.key_traces();
    secrets.push(PASSWORD.to_owned());
    let assert_hidden = |what: &str, text: &str| {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows a secret: {text}"
            );
        }
    };

    let tls_builder =
        || builder(&url, &pki).tls_client_cert_pem(key.cert_pem.clone(), key.key_pem.clone());
    assert_hidden("the builder's Debug", &format!("{:?}", tls_builder()));
    let backend = tls_builder().build().unwrap();
    assert_hidden("the backend's Debug", &format!("{backend:?}"));

    // A wrong password, over a working mutual TLS connection: permanent, and nothing shows.
    let error = backend
        .try_acquire(&request("k", "t", TTL), CALL)
        .unwrap_err();
    assert!(!error.is_transient(), "{}", error_chain(&error));
    assert_hidden(
        "a refused password",
        &format!("{} {error:?}", error_chain(&error)),
    );

    // TLS failures, with the password and the key in hand.
    let untrusted = RedisBackend::builder(&url)
        .tls_client_cert_pem(key.cert_pem.clone(), key.key_pem.clone())
        .build()
        .unwrap();
    let (_, error) = failed_acquire(&untrusted, Duration::ZERO);
    assert_hidden(
        "a TLS failure",
        &format!("{} {error:?}", error_chain(&error)),
    );
    // The subscriber's failure is logged, once (it retries every minute, quietly).
    let port = server.tls_port().to_string();
    let _watch = untrusted.watch_release("k");
    let subscriber_warnings = || {
        logs.lines_containing(&port)
            .iter()
            .filter(|line| line.contains("WARN") && line.contains("cannot connect over TLS"))
            .count()
    };
    wait_until("the subscriber logged its TLS failure", WAIT, || {
        subscriber_warnings() > 0
    });
    assert_eq!(subscriber_warnings(), 1);

    // A damaged key: a build error that quotes none of it.
    let damaged = key.key_pem.replacen("MI", "M!", 1);
    let error = builder(&url, &pki)
        .tls_client_cert_pem(key.cert_pem.clone(), damaged)
        .build()
        .unwrap_err();
    assert!(matches!(error, RedisBackendError::InvalidConfig { .. }));
    assert_hidden("a bad key", &format!("{} {error:?}", error_chain(&error)));

    assert_hidden("the logs", &logs.lines_containing(&port).join("\n"));
    assert_hidden("the logs", &logs.lines_containing("lock-redis").join("\n"));
}
