//! Starting a child process as a given user, with pipes or a PTY.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::sync::oneshot;

use crate::reaper;
use crate::users::User;

/// PATH for every process (envd's own environment is not passed on).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything needed to start one process.
pub struct SpawnConfig {
    pub cmd: String,
    pub args: Vec<String>,
    /// The complete environment, in order (later entries win).
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub user: User,
    /// PTY size (cols, rows) for interactive processes.
    pub pty: Option<(u16, u16)>,
    /// Keep a stdin pipe (ignored with a PTY: input goes to the master).
    pub stdin: bool,
}

/// Which stream an output fd carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Stdout,
    Stderr,
    Pty,
}

/// A started child.
pub struct Spawned {
    pub pid: u32,
    /// Fds to read output from.
    pub outputs: Vec<(OutputKind, OwnedFd)>,
    /// The stdin pipe or PTY master to write input to.
    pub input: Option<File>,
    /// The raw wait status, once the reaper collected the child.
    pub exit: oneshot::Receiver<reaper::RawWaitStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("error opening a PTY: {0}")]
    Pty(#[source] std::io::Error),
    #[error("error starting process '{cmd}': {source}")]
    Start {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

impl SpawnError {
    /// Whether the request itself is at fault (no such program, not
    /// executable, ...), rather than envd.
    pub fn is_client_error(&self) -> bool {
        match self {
            SpawnError::Pty(_) => false,
            SpawnError::Start { source, .. } => matches!(
                source.raw_os_error(),
                Some(
                    libc::ENOENT
                        | libc::EACCES
                        | libc::ENOEXEC
                        | libc::ENOTDIR
                        | libc::EISDIR
                        | libc::ENAMETOOLONG
                        | libc::ELOOP
                        | libc::E2BIG
                        | libc::EINVAL
                )
            ),
        }
    }
}

/// Starts the process described by `config`. It leads its own process group
/// (its own session with the PTY as controlling terminal for PTYs), so
/// signals can reach all of its children.
pub fn spawn(config: SpawnConfig) -> Result<Spawned, SpawnError> {
    let start_err = |source| SpawnError::Start {
        cmd: config.cmd.clone(),
        source,
    };
    let mut cmd = Command::new(&config.cmd);
    cmd.args(&config.args)
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&config.cwd);

    let mut pty_master = None;
    if let Some((cols, rows)) = config.pty {
        let (master, slave) =
            super::pty::open(cols, rows).map_err(|e| SpawnError::Pty(e.into()))?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(SpawnError::Pty);
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // A separate fd for writing input, so the reader thread owns its own.
        let writer = File::from(dup(&master)?);
        pty_master = Some((master, writer));
    } else {
        cmd.stdin(if config.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }

    let is_pty = config.pty.is_some();
    // SAFETY: geteuid/getuid cannot fail and have no preconditions.
    let (euid, ruid) = unsafe { (libc::geteuid(), libc::getuid()) };
    let switch_user = euid == 0 || config.user.uid != ruid;
    let (uid, gid) = (config.user.uid, config.user.gid);
    let groups: Vec<libc::gid_t> = config.user.groups.clone();
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls only raw syscalls
    // (setsid, ioctl, setpgid, setgroups, setgid, setuid) on data prepared
    // before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if is_pty {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // stdin is the PTY slave by now: make it the controlling tty.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (mut child, exit) = reaper::spawn_registered(|| {
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok((child, pid))
    })
    .map_err(start_err)?;
    // The command still holds the parent's copies of the PTY slave; they
    // must go so the master reports EOF once the child's side closes.
    drop(cmd);

    let pid = child.id();
    let mut outputs = Vec::new();
    let mut input = None;
    if let Some((master, writer)) = pty_master {
        input = Some(writer);
        outputs.push((OutputKind::Pty, master));
    } else {
        if let Some(out) = child.stdout.take() {
            outputs.push((OutputKind::Stdout, OwnedFd::from(out)));
        }
        if let Some(err) = child.stderr.take() {
            outputs.push((OutputKind::Stderr, OwnedFd::from(err)));
        }
        if let Some(stdin) = child.stdin.take() {
            input = Some(File::from(OwnedFd::from(stdin)));
        }
    }
    // Dropping `child` neither waits nor kills: the reaper owns the wait.
    drop(child);
    Ok(Spawned {
        pid,
        outputs,
        input,
        exit,
    })
}
