//! A TCP proxy in front of a server, for fault injection.
//!
//! [`TcpProxy`] listens on a free port of `127.0.0.1` and forwards every accepted connection to a
//! target address. Its [`ProxyMode`] can be changed at any time and applies at once to new and
//! existing connections, so a test can make a healthy server look slow, silent or broken to
//! exactly the clients that go through the proxy.
//!
//! It is built on `std::net` and plain threads: one that accepts, and two per connection (one
//! per direction). Every blocking read, write and accept gives up after at most 50 ms, so all
//! threads notice a mode change or the proxy's `Drop` within that time (connecting to the target
//! may take up to 2 s), and `Drop` joins them all.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::SockRef;

/// The longest any proxy thread blocks before it checks the mode and the stop flag again.
const POLL: Duration = Duration::from_millis(50);
/// How often the accepting thread polls its non-blocking listener.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How often a blackholed connection checks whether its mode changed.
const BLACKHOLE_POLL: Duration = Duration::from_millis(5);
/// How long connecting to the target may take before the client connection is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Size of the buffer of one forwarding direction.
const BUFFER_SIZE: usize = 16 * 1024;

/// What a [`TcpProxy`] does with the traffic, for new and existing connections alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways as soon as they arrive.
    Pass,
    /// Forward each chunk of bytes once it has been held for this long, in each direction,
    /// keeping the order (a round trip through the proxy therefore takes at least twice this).
    Delay(Duration),
    /// Keep connections open (and accept new ones) but stop reading from either side: nothing is
    /// forwarded, so the peers' reads time out. Data already sent stays in the socket buffers and
    /// flows again when the mode goes back to [`Pass`](ProxyMode::Pass) or
    /// [`Delay`](ProxyMode::Delay). Since nothing is read, a peer closing its end is only noticed
    /// then.
    Blackhole,
    /// Reset every existing connection now (both sides, with `SO_LINGER` 0 so the peers get an
    /// `RST`), and every new connection as soon as it is accepted.
    Reset,
    /// Forward requests, but reset (as [`Reset`](ProxyMode::Reset) does) the first connection on
    /// which a reply comes back, instead of forwarding the reply; then switch to
    /// [`Pass`](ProxyMode::Pass). The server has run the request, and the client only sees its
    /// connection reset: a reply lost with its connection.
    ResetOnNextReply,
}

/// Which way a forwarding thread copies bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to target.
    Requests,
    /// Target to client.
    Replies,
}

/// A thread-based TCP proxy on `127.0.0.1` in front of one target address.
///
/// Dropping it stops accepting, closes every connection and joins all its threads (within about
/// 50 ms plus the time to connect to a slow target).
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .field("connections", &self.connections())
            .finish()
    }
}

impl TcpProxy {
    /// Starts a proxy to `target`, listening on a free port of `127.0.0.1`, in
    /// [`ProxyMode::Pass`].
    ///
    /// The target is only connected to when a client connects; if it refuses, that client's
    /// connection is reset.
    ///
    /// # Panics
    ///
    /// If no port can be bound or the accepting thread cannot be spawned.
    pub fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("binding 127.0.0.1:0 for the TCP proxy");
        let addr = listener
            .local_addr()
            .expect("reading the TCP proxy's local address");
        listener
            .set_nonblocking(true)
            .expect("making the TCP proxy's listener non-blocking");
        let shared = Arc::new(Shared {
            target,
            mode: Mutex::new(ProxyMode::Pass),
            stopped: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            reply_bytes: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("tcp-proxy-{}-accept", addr.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawning the TCP proxy's accepting thread")
        };
        TcpProxy {
            addr,
            target,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address the proxy listens on: `127.0.0.1:`[`port`](TcpProxy::port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT` for the proxy's port (add credentials yourself if the target
    /// needs them).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// Switches the mode for new and existing connections. With [`ProxyMode::Reset`], every
    /// existing connection is shut down before this returns.
    pub fn set_mode(&self, mode: ProxyMode) {
        *self.shared.mode.lock() = mode;
        if mode == ProxyMode::Reset {
            let connections: Vec<_> = self.shared.connections.lock().values().cloned().collect();
            for connection in connections {
                connection.close(true);
            }
        }
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }

    /// How many bytes the target has sent to the proxy's clients so far, over all connections:
    /// what the clients received (or will, once the mode lets it through).
    pub fn reply_bytes(&self) -> u64 {
        self.shared.reply_bytes.load(Ordering::Relaxed)
    }

    /// How many proxied connections are currently open (a connection counts until both of its
    /// directions have finished, which takes up to 50 ms after a reset).
    pub fn connections(&self) -> usize {
        self.shared.connections.lock().len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // First stop accepting, so that no connection is added after the ones closed below.
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections: Vec<_> = self.shared.connections.lock().values().cloned().collect();
        for connection in connections {
            connection.close(false);
        }
        // A connection thread may still register its second direction while we join it, so
        // drain until no thread is left.
        loop {
            let threads = std::mem::take(&mut *self.shared.threads.lock());
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

/// State shared by the proxy handle and its threads.
struct Shared {
    target: SocketAddr,
    mode: Mutex<ProxyMode>,
    stopped: AtomicBool,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    /// Every connection thread ever spawned and not yet joined (finished ones are pruned).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Bytes read from the target, over all connections.
    reply_bytes: AtomicU64,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.lock()
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// In [`ProxyMode::ResetOnNextReply`], switches to [`ProxyMode::Pass`] and returns true:
    /// the caller resets its connection. False in any other mode.
    fn take_reset_on_next_reply(&self) -> bool {
        let mut mode = self.mode.lock();
        let armed = *mode == ProxyMode::ResetOnNextReply;
        if armed {
            *mode = ProxyMode::Pass;
        }
        armed
    }

    fn spawn(&self, name: String, body: impl FnOnce() + Send + 'static) {
        let handle = thread::Builder::new()
            .name(name)
            .spawn(body)
            .expect("spawning a TCP proxy connection thread");
        let mut threads = self.threads.lock();
        threads.retain(|thread| !thread.is_finished());
        threads.push(handle);
    }
}

/// One proxied connection: the accepted client socket and the socket to the target.
struct Connection {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
    /// Directions still forwarding; the last one to finish unregisters the connection.
    live_directions: AtomicUsize,
}

impl Connection {
    /// Shuts down both sockets; with `reset`, sets `SO_LINGER` 0 first so that closing them
    /// sends an `RST` instead of a `FIN`.
    fn close(&self, reset: bool) {
        for stream in [&self.client, &self.upstream] {
            if reset {
                let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
            }
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stopped() {
        match listener.accept() {
            Ok((client, _)) => {
                if shared.mode() == ProxyMode::Reset {
                    reset(client);
                    continue;
                }
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let port = listener.local_addr().map_or(0, |addr| addr.port());
                let thread_shared = Arc::clone(shared);
                shared.spawn(format!("tcp-proxy-{port}-conn-{id}-up"), move || {
                    open_connection(id, port, client, &thread_shared);
                });
            }
            // WouldBlock: nothing to accept. Anything else (say, out of file descriptors) is
            // transient from the proxy's point of view: the client sees a refused or stuck
            // connection, which is the kind of fault tests expect anyway.
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Connects `client` to the target, then forwards client → target on this thread and target →
/// client on a new one.
fn open_connection(id: u64, port: u16, client: TcpStream, shared: &Arc<Shared>) {
    let upstream = match TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(_) => {
            reset(client);
            return;
        }
    };
    let streams = (|| -> io::Result<_> {
        client.set_nonblocking(false)?;
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        Ok((client.try_clone()?, upstream.try_clone()?))
    })();
    let Ok((client_writer, upstream_writer)) = streams else {
        reset(client);
        reset(upstream);
        return;
    };
    let connection = Arc::new(Connection {
        id,
        client,
        upstream,
        live_directions: AtomicUsize::new(2),
    });
    shared
        .connections
        .lock()
        .insert(id, Arc::clone(&connection));
    {
        let connection = Arc::clone(&connection);
        let thread_shared = Arc::clone(shared);
        shared.spawn(format!("tcp-proxy-{port}-conn-{id}-down"), move || {
            forward(
                (&connection.upstream, &client_writer),
                Direction::Replies,
                &connection,
                &thread_shared,
            );
        });
    }
    forward(
        (&connection.client, &upstream_writer),
        Direction::Requests,
        &connection,
        shared,
    );
}

/// Forwards one direction of `connection`, `from` → `to`, following the proxy's mode, until
/// `from` ends, a socket fails, the mode is [`ProxyMode::Reset`] or the proxy stops.
fn forward(
    (from, to): (&TcpStream, &TcpStream),
    direction: Direction,
    connection: &Connection,
    shared: &Shared,
) {
    match forward_until_done(from, to, direction, shared) {
        Ok(Ending::Eof) => {
            // Half-close: tell the other side this one is finished; the other direction goes
            // on until its own end.
            let _ = to.shutdown(Shutdown::Write);
        }
        Ok(Ending::Reset) => connection.close(true),
        Ok(Ending::Stopped) | Err(_) => connection.close(false),
    }
    if connection.live_directions.fetch_sub(1, Ordering::SeqCst) == 1 {
        shared.connections.lock().remove(&connection.id);
    }
}

/// How one direction of a connection ended.
enum Ending {
    /// The sending side closed its end and everything was forwarded.
    Eof,
    /// The mode became [`ProxyMode::Reset`], or a reply came in
    /// [`ProxyMode::ResetOnNextReply`].
    Reset,
    /// The proxy is being dropped.
    Stopped,
}

fn forward_until_done(
    from: &TcpStream,
    to: &TcpStream,
    direction: Direction,
    shared: &Shared,
) -> io::Result<Ending> {
    let mut from = from;
    let mut buffer = vec![0; BUFFER_SIZE];
    // Chunks read but not yet written, with the instant each one is due.
    let mut pending: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut reading = true;
    to.set_write_timeout(Some(POLL))?;
    loop {
        if shared.stopped() {
            return Ok(Ending::Stopped);
        }
        match shared.mode() {
            ProxyMode::Reset => return Ok(Ending::Reset),
            ProxyMode::Blackhole => {
                thread::sleep(BLACKHOLE_POLL);
                continue;
            }
            ProxyMode::Pass | ProxyMode::Delay(_) | ProxyMode::ResetOnNextReply => {}
        }

        let now = Instant::now();
        while let Some((due, _)) = pending.front() {
            if *due > now {
                break;
            }
            let (_, chunk) = pending.pop_front().expect("the front chunk was just seen");
            if !write_chunk(to, &chunk, shared)? {
                return Ok(Ending::Stopped);
            }
        }

        // Wait for new bytes, but no longer than until the next pending chunk is due.
        let wait = pending
            .front()
            .map_or(POLL, |(due, _)| due.saturating_duration_since(now))
            .clamp(Duration::from_millis(1), POLL);
        if !reading {
            if pending.is_empty() {
                return Ok(Ending::Eof);
            }
            thread::sleep(wait);
            continue;
        }
        from.set_read_timeout(Some(wait))?;
        match from.read(&mut buffer) {
            Ok(0) => reading = false,
            Ok(read) => {
                if direction == Direction::Replies {
                    shared.reply_bytes.fetch_add(read as u64, Ordering::Relaxed);
                }
                let chunk = buffer[..read].to_vec();
                if direction == Direction::Replies && shared.take_reset_on_next_reply() {
                    return Ok(Ending::Reset);
                }
                // The mode may have changed while this thread was blocked in `read`: bytes a peer
                // sent after `set_mode` returned must obey the new mode, so look again.
                match shared.mode() {
                    ProxyMode::Pass | ProxyMode::ResetOnNextReply if pending.is_empty() => {
                        if !write_chunk(to, &chunk, shared)? {
                            return Ok(Ending::Stopped);
                        }
                    }
                    ProxyMode::Delay(delay) => pending.push_back((Instant::now() + delay, chunk)),
                    // Blackhole holds the chunk, Reset drops it: the next turn of the loop acts.
                    _ => pending.push_back((Instant::now(), chunk)),
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `chunk` to `to`; `Ok(false)` if the proxy stopped first.
fn write_chunk(mut to: &TcpStream, chunk: &[u8], shared: &Shared) -> io::Result<bool> {
    let mut written = 0;
    while written < chunk.len() {
        if shared.stopped() {
            return Ok(false);
        }
        match to.write(&chunk[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Closes `stream` with an `RST` (best effort: this is already the failure path).
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
