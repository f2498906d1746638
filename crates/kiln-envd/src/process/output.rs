//! Reading a child's output. Each output fd gets a plain thread doing
//! `poll(2)` + blocking reads: tokio's reactor is avoided on purpose, since
//! epoll registrations may not survive a sandbox checkpoint/restore.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::spawn::OutputKind;
use super::stream::data_event;
use super::table::Proc;

/// Largest chunk read from a stdout/stderr pipe.
const PIPE_CHUNK: usize = 32 * 1024;
/// Largest chunk read from a PTY master.
const PTY_CHUNK: usize = 16 * 1024;
/// After the process exited, stop once an output stays quiet this long: a
/// background grandchild may hold the pipe open forever.
const EXIT_GRACE: Duration = Duration::from_millis(100);
/// ...and stop after this long even if such a grandchild keeps writing.
const EXIT_MAX_DRAIN: Duration = Duration::from_secs(10);

/// Starts a thread forwarding everything readable from `fd` to the
/// process's subscribers. `exited` is the read end of a pipe whose write
/// end is closed when the process exits. The returned receiver resolves
/// when the thread is done.
pub fn start_reader(
    proc: Arc<Proc>,
    kind: OutputKind,
    fd: OwnedFd,
    exited: Arc<OwnedFd>,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("envd-output-{}", proc.pid))
        .spawn(move || {
            read_loop(&proc, kind, fd, &exited);
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

fn read_loop(proc: &Proc, kind: OutputKind, fd: OwnedFd, exited: &OwnedFd) {
    let mut file = File::from(fd);
    let mut buf = vec![
        0u8;
        if kind == OutputKind::Pty {
            PTY_CHUNK
        } else {
            PIPE_CHUNK
        }
    ];
    let mut exited_at: Option<Instant> = None;
    loop {
        if exited_at.is_some_and(|t| t.elapsed() >= EXIT_MAX_DRAIN) {
            tracing::debug!(
                pid = proc.pid,
                ?kind,
                "output still open after exit, stopping"
            );
            break;
        }
        let mut fds = [
            libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: exited.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let (count, timeout) = match exited_at {
            Some(_) => (1, EXIT_GRACE.as_millis() as libc::c_int),
            None => (2, -1),
        };
        // SAFETY: `fds` is a live array of at least `count` pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), count as libc::nfds_t, timeout) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(pid = proc.pid, ?kind, %err, "polling output failed");
            break;
        }
        if rc == 0 {
            // Quiet since the process exited.
            break;
        }
        if fds[0].revents != 0 {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => proc.publish_blocking(data_event(kind, buf[..n].to_vec())),
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
                // EIO from a PTY master: every slave fd is closed.
                Err(_) => break,
            }
        }
        if count == 2 && fds[1].revents != 0 {
            exited_at = Some(Instant::now());
        }
    }
}
