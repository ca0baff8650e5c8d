//! Talking to one Redis server: URLs (parsed, checked and redacted), TLS (certificates, crypto
//! provider, handshake failures) and the pool of connections whose every call is bounded in
//! time. Every topology sends its commands through here.

pub(crate) mod pool;
pub(crate) mod tls;
pub(crate) mod url;
