//! [`Connector`]: how to open a connection to the server that takes the writes, whatever the
//! topology. The pool's connection manager and the release subscriber both open their
//! connections here, and both ask it whether a connection still leads to that server, so
//! commands take one code path on one server and behind Sentinel alike.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use redis::{Connection, ConnectionLike, RedisError};

use crate::connection::sentinel::SentinelMaster;

/// How to open a connection to the server that takes the writes.
#[derive(Clone)]
pub(crate) enum Connector {
    /// One server at a fixed address (`redis://`, `unix://`).
    Server(Box<redis::Client>),
    /// The master of a Sentinel group, asked of its sentinels (`redis+sentinel://`).
    Sentinel(SentinelMaster),
}

impl Connector {
    /// Whether connections are made over TLS (`rediss://`), so a failed attempt may be a TLS
    /// failure.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Connector::Server(client) if crate::connection::tls::is_tls(client))
    }

    /// Opens a connection (TCP, handshake and, behind Sentinel, asking the sentinels and
    /// checking `ROLE`) within `timeout`. Its socket has no read or write timeout set for
    /// certain: the caller sets its own.
    pub(crate) fn open(&self, timeout: Duration) -> Result<OpenConnection, RedisError> {
        let (connection, generation) = match self {
            Connector::Server(client) => (client.get_connection_with_timeout(timeout)?, 0),
            Connector::Sentinel(master) => master.open(timeout)?,
        };
        Ok(OpenConnection {
            connection,
            generation: Generation(generation),
            refused_write: false,
        })
    }

    /// Whether a connection of `generation` still leads to the server that takes the writes, as
    /// far as is known without asking anyone (cheap: an atomic load).
    pub(crate) fn is_current(&self, generation: Generation) -> bool {
        match self {
            Connector::Server(_) => true,
            Connector::Sentinel(master) => master.is_current(generation.0),
        }
    }

    /// Whether the pool must drop `connection` rather than keep it: it is closed, its server
    /// refused a write (and so is no master now), or a failover made it stale. A refused
    /// write also makes the next connection look for the master anew.
    pub(crate) fn must_drop(&self, connection: &OpenConnection) -> bool {
        if connection.refused_write {
            if let Connector::Sentinel(master) = self {
                master.refused_write(connection.generation.0);
            }
            return true;
        }
        !connection.is_open() || !self.is_current(connection.generation)
    }
}

/// Which server a connection was opened to, as far as its [`Connector`] tells them apart:
/// behind Sentinel, the generation of the master address; always the same for one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generation(u64);

/// A connection opened by a [`Connector`], with what is known of its server.
pub(crate) struct OpenConnection {
    connection: Connection,
    generation: Generation,
    /// Its server answered `READONLY`: it is a replica now.
    refused_write: bool,
}

impl OpenConnection {
    /// Which server it was opened to.
    pub(crate) fn generation(&self) -> Generation {
        self.generation
    }

    /// Records that the server refused a write (`READONLY`): the connection is not to be used
    /// again.
    pub(crate) fn mark_refused_write(&mut self) {
        self.refused_write = true;
    }
}

impl Deref for OpenConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl DerefMut for OpenConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.connection
    }
}
