//! Connections served without tokio's reactor.
//!
//! gVisor (the pinned runsc) can resurrect epoll registrations that were
//! removed shortly before a checkpoint: after the restore, epoll reports an
//! event carrying the token of a socket that tokio already freed, and tokio
//! dereferences it (seen here as a SIGSEGV in `ScheduledIo::wake` right after
//! a resume; see also google/gvisor#13920). So envd registers no sockets with
//! epoll at all: a plain thread accepts connections, and each connection is
//! read and written by two plain threads with blocking calls, bridged to
//! hyper through channels. envd serves a handful of connections, so two
//! threads each cost little.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

const READ_CHUNK: usize = 64 * 1024;
const THREAD_STACK: usize = 256 * 1024;

/// An `axum::serve` listener fed by a blocking accept thread.
pub struct ThreadListener {
    local_addr: SocketAddr,
    incoming: mpsc::Receiver<(TcpStream, SocketAddr)>,
}

impl ThreadListener {
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
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
    type Io = ThreadIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some((stream, addr)) = self.incoming.recv().await else {
                // The accept thread never stops on its own; park forever.
                std::future::pending::<()>().await;
                unreachable!();
            };
            let _ = stream.set_nodelay(true);
            match ThreadIo::new(stream) {
                Ok(io) => return (io, addr),
                Err(e) => tracing::warn!(error = %e, "starting connection threads"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

enum WriteMsg {
    Data(Bytes),
    Shutdown,
}

/// A TCP connection whose reads and writes happen on two plain threads.
pub struct ThreadIo {
    incoming: mpsc::Receiver<io::Result<Bytes>>,
    pending: Bytes,
    outgoing: PollSender<WriteMsg>,
    stream: Arc<TcpStream>,
}

impl ThreadIo {
    fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nonblocking(false)?;
        let stream = Arc::new(stream);
        let (in_tx, incoming) = mpsc::channel::<io::Result<Bytes>>(4);
        let (out_tx, mut out_rx) = mpsc::channel::<WriteMsg>(4);

        let reader = Arc::clone(&stream);
        std::thread::Builder::new()
            .name("envd-conn-read".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let mut buf = vec![0u8; READ_CHUNK];
                loop {
                    let msg = match (&*reader).read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(e),
                    };
                    let failed = msg.is_err();
                    if in_tx.blocking_send(msg).is_err() || failed {
                        return;
                    }
                }
            })?;

        let writer = Arc::clone(&stream);
        std::thread::Builder::new()
            .name("envd-conn-write".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                while let Some(msg) = out_rx.blocking_recv() {
                    match msg {
                        WriteMsg::Data(data) => {
                            if (&*writer).write_all(&data).is_err() {
                                break;
                            }
                        }
                        WriteMsg::Shutdown => {
                            let _ = writer.shutdown(Shutdown::Write);
                        }
                    }
                }
                // Everything queued is written (or the peer is gone): close
                // both directions, which also ends the reader thread.
                let _ = writer.shutdown(Shutdown::Both);
            })?;

        Ok(Self {
            incoming,
            pending: Bytes::new(),
            outgoing: PollSender::new(out_tx),
            stream,
        })
    }

    fn send(&mut self, cx: &mut Context<'_>, msg: WriteMsg) -> Poll<io::Result<()>> {
        let broken = || io::Error::new(io::ErrorKind::BrokenPipe, "connection closed");
        ready!(self.outgoing.poll_reserve(cx)).map_err(|_| broken())?;
        self.outgoing.send_item(msg).map_err(|_| broken())?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ThreadIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.incoming.poll_recv(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ThreadIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.send(cx, WriteMsg::Data(Bytes::copy_from_slice(data))))?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut joined = Vec::with_capacity(total);
        for b in bufs {
            joined.extend_from_slice(b);
        }
        ready!(self.send(cx, WriteMsg::Data(Bytes::from(joined))))?;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer thread writes everything queued as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send(cx, WriteMsg::Shutdown)
    }
}

impl Drop for ThreadIo {
    fn drop(&mut self) {
        // The writer thread closes the socket once its queue is written;
        // if it is already gone, close here so the reader thread ends.
        if self.outgoing.is_closed() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}
