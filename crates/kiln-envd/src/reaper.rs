//! Waiting for children, and reaping orphans when envd is PID 1.
//!
//! One thread waits for *every* child (`waitpid(-1)`): inside a sandbox envd
//! is init, so orphaned grandchildren are re-parented to it and must be
//! reaped, and a second waiter for specific pids would race with it and
//! steal exit statuses. Processes envd starts are registered with
//! [`spawn_registered`], which holds the registry lock across the spawn, so
//! the reaper cannot reap a new child before its waiter is in place.

use std::collections::HashMap;
use std::sync::{Condvar, LazyLock, Mutex, Once};
use std::time::Duration;

use tokio::sync::oneshot;

/// A raw wait status, as `waitpid(2)` reports it.
pub type RawWaitStatus = i32;

struct Registry {
    waiters: HashMap<u32, oneshot::Sender<RawWaitStatus>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        waiters: HashMap::new(),
    })
});
static CHILDREN: Condvar = Condvar::new();
static START: Once = Once::new();

/// Starts the reaper thread (idempotent). Must run before any
/// [`spawn_registered`] call whose exit is awaited.
pub fn start() {
    START.call_once(|| {
        std::thread::Builder::new()
            .name("envd-reaper".into())
            .spawn(reap_forever)
            .expect("spawning the reaper thread");
    });
}

/// Runs `spawn` (which starts a child and returns its pid) with the registry
/// locked, and returns a receiver for the child's wait status.
pub fn spawn_registered<T>(
    spawn: impl FnOnce() -> std::io::Result<(T, u32)>,
) -> std::io::Result<(T, oneshot::Receiver<RawWaitStatus>)> {
    start();
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let (value, pid) = spawn()?;
    let (tx, rx) = oneshot::channel();
    registry.waiters.insert(pid, tx);
    drop(registry);
    CHILDREN.notify_all();
    Ok((value, rx))
}

fn reap_forever() {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid with a valid pointer to a local c_int.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let waiter = REGISTRY
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .waiters
                .remove(&(pid as u32));
            match waiter {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => tracing::debug!(pid, status, "reaped orphan"),
            }
            continue;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        // ECHILD: no children now; sleep until one is spawned.
        let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        let _ = CHILDREN.wait_timeout(registry, Duration::from_millis(500));
    }
}

/// Decodes a raw wait status into (exit code or -1, exited normally, Go-style
/// status string like `exit status 1` or `signal: killed`).
pub fn describe(status: RawWaitStatus) -> (i32, bool, String) {
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        (code, true, format!("exit status {code}"))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let mut text = format!("signal: {}", signal_name(sig));
        if libc::WCOREDUMP(status) {
            text.push_str(" (core dumped)");
        }
        (-1, false, text)
    } else {
        (-1, false, format!("unknown wait status {status:#x}"))
    }
}

/// Go's `syscall.Signal.String()` texts, which E2B's envd reports.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGCHLD => "child exited",
        libc::SIGCONT => "continued",
        libc::SIGSTOP => "stopped (signal)",
        libc::SIGTSTP => "stopped",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_like_go() {
        assert_eq!(describe(0), (0, true, "exit status 0".into()));
        assert_eq!(describe(3 << 8), (3, true, "exit status 3".into()));
        assert_eq!(
            describe(libc::SIGKILL),
            (-1, false, "signal: killed".into())
        );
        assert_eq!(
            describe(libc::SIGTERM),
            (-1, false, "signal: terminated".into())
        );
    }

    #[test]
    fn waits_for_registered_child() {
        let (_, rx) = spawn_registered(|| {
            let child = std::process::Command::new("sh")
                .args(["-c", "exit 7"])
                .spawn()?;
            let pid = child.id();
            Ok((child, pid))
        })
        .unwrap();
        let status = rx.blocking_recv().unwrap();
        assert_eq!(describe(status).0, 7);
    }
}
