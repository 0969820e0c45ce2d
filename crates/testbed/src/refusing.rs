//! A loopback port that refuses connections for as long as its handle lives.

use socket2::{Domain, Socket, Type};
use std::net::{Ipv4Addr, SocketAddr};

/// A TCP socket bound to a port on 127.0.0.1 but never listening: a connection to the port is
/// refused (RST), and no other process or test can take the port while this handle is held.
/// (A port that was bound, released and reused could be picked up by a parallel test; a bound
/// listener would accept into its backlog instead of refusing.)
pub struct RefusingPort {
    port: u16,
    _socket: Socket,
}

impl RefusingPort {
    /// Binds a fresh port.
    pub fn bind() -> Result<RefusingPort, String> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)
            .map_err(|e| format!("cannot create a TCP socket: {e}"))?;
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        socket
            .bind(&any.into())
            .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .ok_or_else(|| "bound socket has no IPv4 address".to_string())?;
        Ok(RefusingPort {
            port,
            _socket: socket,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}
