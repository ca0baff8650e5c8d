//! Talking to the server that takes the writes: URLs (parsed, checked and redacted), TLS
//! (certificates, crypto provider, handshake failures), how to open a connection to that server
//! whatever the topology (one server, or the master of a Sentinel group), the deadline every call
//! runs under, and the pool of connections whose every call is bounded in time. Every topology
//! sends its commands through here.

pub(crate) mod connector;
pub(crate) mod deadline;
pub(crate) mod pool;
pub(crate) mod sentinel;
pub(crate) mod tls;
pub(crate) mod url;
