//! Pseudo-terminals for interactive processes.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Size used when a request gives none (or zeros).
const DEFAULT_COLS: u16 = 80;
const DEFAULT_ROWS: u16 = 24;

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: if rows == 0 { DEFAULT_ROWS } else { rows },
        ws_col: if cols == 0 { DEFAULT_COLS } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a PTY pair of the given size; both ends are close-on-exec so other
/// children never inherit them (a stray slave would keep the master from
/// ever reporting EOF).
pub fn open(cols: u16, rows: u16) -> nix::Result<(OwnedFd, OwnedFd)> {
    let size = winsize(cols, rows);
    let pty = nix::pty::openpty(Some(&size), None)?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    Ok((pty.master, pty.slave))
}

/// Changes the window size of the PTY whose master is `master`.
pub fn set_size(master: RawFd, cols: u16, rows: u16) -> std::io::Result<()> {
    let size = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which
    // points to a live local for the duration of the call.
    let rc = unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &size as *const libc::winsize) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
