//! Accepting connections on a plain thread.
//!
//! After a gVisor checkpoint/restore, epoll registrations made before the
//! checkpoint can be lost (google/gvisor#13920), which would leave a tokio
//! listener deaf forever. A blocking `accept(2)` on its own thread has no such
//! state; each accepted socket is registered with tokio afresh.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// An `axum::serve` listener fed by a blocking accept thread.
pub struct ThreadListener {
    local_addr: SocketAddr,
    incoming: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
}

impl ThreadListener {
    pub fn new(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(false)?;
        let local_addr = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        std::thread::Builder::new()
            .name("envd-accept".into())
            .spawn(move || {
                loop {
                    match listener.accept() {
                        Ok(conn) => {
                            if tx.blocking_send(conn).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                    }
                }
            })?;
        Ok(Self {
            local_addr,
            incoming,
        })
    }
}

impl axum::serve::Listener for ThreadListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some((stream, addr)) = self.incoming.recv().await else {
                // The accept thread never stops on its own; park forever.
                std::future::pending::<()>().await;
                unreachable!();
            };
            let _ = stream.set_nodelay(true);
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            match TcpStream::from_std(stream) {
                Ok(s) => return (s, addr),
                Err(e) => tracing::warn!(error = %e, "registering connection"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
