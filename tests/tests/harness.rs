//! Tests of the test harness itself, against real `redis-server` processes: if these fail, no
//! other integration test can be trusted.

// Test code: a failed step is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use lock_tests::{wait_until, PostgresServer, ProxyMode, RedisServer, ServerOptions, TcpProxy};

/// Timeout of the commands that are expected to time out.
const SHORT_TIMEOUT: Duration = Duration::from_millis(200);
/// Deadline of the `wait_until` calls.
const WAIT: Duration = Duration::from_secs(5);

fn ping(connection: &mut redis::Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query(connection)
}

/// A connection to `url` with 5-second connect, read and write timeouts.
fn connect(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).expect("valid URL");
    let connection = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    connection
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    connection
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    connection
}

#[test]
fn server_starts_and_answers_ping() {
    let server = RedisServer::start();
    assert_ne!(server.port(), 6379, "must never use the shared server");
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    assert_eq!(server.addr().port(), server.port());
    let mut connection = server.connection();
    assert_eq!(ping(&mut connection).unwrap(), "PONG");
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut connection)
        .unwrap();
    assert!(
        info.contains(&format!("process_id:{}\r\n", server.pid())),
        "the server answering is not our child {}: {info}",
        server.pid()
    );
}

#[test]
fn two_servers_get_different_ports() {
    let first = RedisServer::start();
    let second = RedisServer::start();
    assert_ne!(first.port(), second.port());
    assert_ne!(first.pid(), second.pid());
    let mut a = first.connection();
    let mut b = second.connection();
    redis::cmd("SET")
        .arg("k")
        .arg("first")
        .exec(&mut a)
        .unwrap();
    let on_second: Option<String> = redis::cmd("GET").arg("k").query(&mut b).unwrap();
    assert_eq!(on_second, None, "the two servers must not share data");
}

#[test]
fn pause_silences_the_server_and_resume_wakes_it() {
    let server = RedisServer::start();
    let mut connection = server.connection();
    connection.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert_eq!(ping(&mut connection).unwrap(), "PONG");

    server.pause();
    let started = Instant::now();
    let error = ping(&mut connection).expect_err("a paused server must not answer");
    assert!(error.is_timeout(), "expected a timeout, got {error:?}");
    assert!(started.elapsed() >= SHORT_TIMEOUT - Duration::from_millis(10));

    server.resume();
    // The old connection may still deliver the late PONG: use a fresh one.
    let mut fresh = server.connection();
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn kill_then_restart_answers_on_the_same_port_without_the_old_data() {
    let mut server = RedisServer::start();
    let port = server.port();
    let old_pid = server.pid();
    let mut connection = server.connection();
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .exec(&mut connection)
        .unwrap();

    server.kill();
    server.kill(); // idempotent
    assert!(
        ping(&mut connection).is_err(),
        "a killed server must not answer"
    );
    assert!(
        server.client().get_connection().is_err(),
        "a killed server must refuse connections"
    );

    server.restart();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), old_pid);
    let mut connection = server.connection();
    assert_eq!(ping(&mut connection).unwrap(), "PONG");
    let value: Option<String> = redis::cmd("GET").arg("k").query(&mut connection).unwrap();
    assert_eq!(
        value, None,
        "without persistence a restarted server is empty"
    );
}

#[test]
fn restart_loads_the_last_snapshot() {
    let mut server = RedisServer::start();
    let set = |key: &str| {
        redis::cmd("SET")
            .arg(key)
            .arg("1")
            .exec(&mut server.connection())
            .unwrap();
    };
    set("before");
    server.save_snapshot();
    set("after");
    server.restart();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(keys, ["before"]);
}

#[test]
fn a_replica_follows_its_master_until_cut_off_and_promoted() {
    let master = RedisServer::start();
    let link = TcpProxy::start(master.addr());
    let replica = RedisServer::start();
    replica.replicate(link.addr());
    let get = |server: &RedisServer, key: &str| -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query(&mut server.connection())
            .unwrap()
    };
    redis::cmd("SET")
        .arg("early")
        .arg("1")
        .exec(&mut master.connection())
        .unwrap();
    replica.wait_caught_up_with(&master);
    assert_eq!(get(&replica, "early").as_deref(), Some("1"));

    link.set_mode(ProxyMode::Blackhole);
    redis::cmd("SET")
        .arg("late")
        .arg("1")
        .exec(&mut master.connection())
        .unwrap();
    replica.promote();
    assert_eq!(
        get(&replica, "late"),
        None,
        "the cut-off replica got the late write"
    );
    redis::cmd("SET")
        .arg("own")
        .arg("1")
        .exec(&mut replica.connection())
        .expect("a promoted replica accepts writes");
}

#[test]
fn an_acl_user_has_exactly_its_rules() {
    let server = RedisServer::start();
    let url = server.add_acl_user("reader", "p@ss word", "~allowed:* +get");
    let mut connection = connect(&url);
    let value: Option<String> = redis::cmd("GET")
        .arg("allowed:x")
        .query(&mut connection)
        .unwrap();
    assert_eq!(value, None);
    let refused = redis::cmd("GET")
        .arg("other")
        .query::<Option<String>>(&mut connection);
    assert!(refused.is_err(), "a key outside the pattern was readable");
    let refused = redis::cmd("SET")
        .arg("allowed:x")
        .arg("1")
        .exec(&mut connection);
    assert!(refused.is_err(), "a command outside the rules ran");
}

#[test]
fn restart_with_persistence_keeps_the_data() {
    let mut server = RedisServer::start_with(ServerOptions {
        persistence: true,
        ..ServerOptions::default()
    });
    let mut connection = server.connection();
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .exec(&mut connection)
        .unwrap();
    server.restart();
    let mut connection = server.connection();
    let value: Option<String> = redis::cmd("GET").arg("k").query(&mut connection).unwrap();
    assert_eq!(value.as_deref(), Some("v"));
}

#[test]
fn password_is_required() {
    let server = RedisServer::start_with(ServerOptions {
        password: Some("s3cret/p@ss".to_owned()),
        ..ServerOptions::default()
    });
    assert_eq!(
        server.url(),
        format!("redis://:s3cret%2Fp%40ss@127.0.0.1:{}", server.port())
    );

    let mut anonymous = connect(&format!("redis://127.0.0.1:{}", server.port()));
    let error = ping(&mut anonymous).expect_err("no password: the server must refuse");
    assert_eq!(error.code(), Some("NOAUTH"), "got {error:?}");

    let mut authenticated = server.connection();
    assert_eq!(ping(&mut authenticated).unwrap(), "PONG");
}

#[test]
fn unix_socket_answers() {
    let server = RedisServer::start_with(ServerOptions {
        unix_socket: true,
        ..ServerOptions::default()
    });
    assert!(
        server.url().starts_with("redis+unix:///"),
        "{}",
        server.url()
    );
    let mut connection = server.connection();
    assert_eq!(ping(&mut connection).unwrap(), "PONG");
    // The TCP port still works too.
    let mut tcp = connect(&format!("redis://127.0.0.1:{}", server.port()));
    assert_eq!(ping(&mut tcp).unwrap(), "PONG");
}

#[test]
fn proxy_pass_forwards_both_ways() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    assert_ne!(proxy.port(), server.port());
    assert_eq!(proxy.url(), format!("redis://127.0.0.1:{}", proxy.port()));
    assert_eq!(proxy.mode(), ProxyMode::Pass);

    let mut through_proxy = connect(&proxy.url());
    redis::cmd("SET")
        .arg("k")
        .arg("via-proxy")
        .exec(&mut through_proxy)
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg("k")
        .query(&mut through_proxy)
        .unwrap();
    assert_eq!(value, "via-proxy");
    let direct: String = redis::cmd("GET")
        .arg("k")
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(
        direct, "via-proxy",
        "the proxy must talk to the real server"
    );

    let _second = connect(&proxy.url());
    wait_until("the proxy has 2 connections", WAIT, || {
        proxy.connections() == 2
    });
}

#[test]
fn proxy_delay_slows_every_round_trip() {
    let delay = Duration::from_millis(100);
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let mut connection = connect(&proxy.url());
    assert_eq!(ping(&mut connection).unwrap(), "PONG");

    proxy.set_mode(ProxyMode::Delay(delay));
    assert_eq!(proxy.mode(), ProxyMode::Delay(delay));
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(ping(&mut connection).unwrap(), "PONG");
        let elapsed = started.elapsed();
        // Held in each direction, so a round trip takes at least twice the delay.
        assert!(elapsed >= 2 * delay, "round trip took only {elapsed:?}");
    }

    proxy.set_mode(ProxyMode::Pass);
    let started = Instant::now();
    assert_eq!(ping(&mut connection).unwrap(), "PONG");
    assert!(
        started.elapsed() < 2 * delay,
        "back to Pass, a round trip took {:?}",
        started.elapsed()
    );
}

#[test]
fn proxy_blackhole_makes_reads_time_out() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let mut connection = connect(&proxy.url());
    connection.set_read_timeout(Some(SHORT_TIMEOUT)).unwrap();
    assert_eq!(ping(&mut connection).unwrap(), "PONG");

    proxy.set_mode(ProxyMode::Blackhole);
    let error = ping(&mut connection).expect_err("a blackholed server must not answer");
    assert!(error.is_timeout(), "expected a timeout, got {error:?}");
    assert_eq!(proxy.connections(), 1, "a blackhole keeps connections open");

    proxy.set_mode(ProxyMode::Pass);
    let mut fresh = connect(&proxy.url());
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn proxy_reset_breaks_connections_until_pass() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let mut connection = connect(&proxy.url());
    assert_eq!(ping(&mut connection).unwrap(), "PONG");

    proxy.set_mode(ProxyMode::Reset);
    let error = ping(&mut connection).expect_err("a reset connection must fail");
    assert!(error.is_io_error(), "expected an I/O error, got {error:?}");
    wait_until("the proxy has no connection left", WAIT, || {
        proxy.connections() == 0
    });
    assert!(
        redis::Client::open(proxy.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .is_err(),
        "new connections must be reset too"
    );

    proxy.set_mode(ProxyMode::Pass);
    let mut fresh = connect(&proxy.url());
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn proxy_reset_on_next_reply_runs_the_request_but_loses_its_reply_once() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let mut connection = connect(&proxy.url());
    assert_eq!(ping(&mut connection).unwrap(), "PONG");

    proxy.set_mode(ProxyMode::ResetOnNextReply);
    let error = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query::<()>(&mut connection)
        .expect_err("the reply must be lost");
    assert!(error.is_io_error(), "expected an I/O error, got {error:?}");
    let value: String = redis::cmd("GET")
        .arg("k")
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(value, "v", "the request did not reach the server");
    assert_eq!(proxy.mode(), ProxyMode::Pass, "the mode is one-shot");
    let mut fresh = connect(&proxy.url());
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn proxy_drop_closes_its_connections() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    let url = proxy.url();
    let mut connection = connect(&url);
    assert_eq!(ping(&mut connection).unwrap(), "PONG");

    drop(proxy);
    let error = ping(&mut connection).expect_err("the proxy is gone");
    assert!(error.is_io_error(), "expected an I/O error, got {error:?}");
    assert!(
        redis::Client::open(url)
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .is_err(),
        "nothing must listen on the proxy's port any more"
    );
}

#[test]
fn proxy_in_front_of_a_killed_server_resets_clients() {
    let mut server = RedisServer::start();
    let proxy = TcpProxy::start(server.addr());
    server.kill();
    let result = redis::Client::open(proxy.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5));
    assert!(result.is_err(), "the target is down: connecting must fail");
    server.restart();
    let mut connection = connect(&proxy.url());
    assert_eq!(ping(&mut connection).unwrap(), "PONG");
}

#[test]
#[should_panic(expected = "timed out after 20ms waiting until pigs fly")]
fn wait_until_panics_with_what_it_waited_for() {
    wait_until("pigs fly", Duration::from_millis(20), || false);
}

#[test]
fn wait_until_returns_once_the_condition_holds() {
    let mut calls = 0;
    wait_until("the third call", WAIT, || {
        calls += 1;
        calls == 3
    });
    assert_eq!(calls, 3);
}

#[test]
fn postgres_server_is_a_cluster_of_its_own_and_stops_on_drop() {
    let server = PostgresServer::start();
    assert_ne!(
        server.port(),
        5432,
        "must never use the machine's own PostgreSQL"
    );
    let mut client = server.client();
    let port: String = client.query_one("SHOW port", &[]).unwrap().get(0);
    assert_eq!(port, server.port().to_string());
    let url = server.url();
    drop(client);
    drop(server);
    assert!(
        postgres::Client::connect(&url, postgres::NoTls).is_err(),
        "the server still answers after the drop"
    );
}

#[test]
fn postgres_server_stops_when_its_test_panics() {
    let (urls, panicked) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let server = PostgresServer::start();
        urls.send(server.url()).unwrap();
        panic!("the test fails while the server runs");
    });
    assert!(result.is_err());
    let url = panicked.recv().unwrap();
    assert!(
        postgres::Client::connect(&url, postgres::NoTls).is_err(),
        "the server still answers after the panic"
    );
}
