//! Starting a child process as a given user, with pipes or a PTY.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::sync::oneshot;

use super::vspawn::Prepared;
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
/// signals can reach all of its children. Processes with pipes are started
/// with `posix_spawn` (vfork, see [`super::vspawn`]); PTY processes are forked,
/// as they need `setsid` and `TIOCSCTTY` in the child.
pub fn spawn(config: SpawnConfig) -> Result<Spawned, SpawnError> {
    if config.pty.is_some() {
        spawn_pty(config)
    } else {
        spawn_pipes(config)
    }
}

/// Whether the child must switch to `user`'s credentials.
pub(crate) fn needs_user_switch(user: &User) -> bool {
    // SAFETY: geteuid/getuid cannot fail and have no preconditions.
    let (euid, ruid) = unsafe { (libc::geteuid(), libc::getuid()) };
    euid == 0 || user.uid != ruid
}

fn spawn_pipes(config: SpawnConfig) -> Result<Spawned, SpawnError> {
    let start_err = |source| SpawnError::Start {
        cmd: config.cmd.clone(),
        source,
    };
    let prepared = Prepared::new(&config, needs_user_switch(&config.user)).map_err(start_err)?;
    let (child, exit) = reaper::spawn_registered(|| {
        let child = prepared.spawn()?;
        let pid = child.pid;
        Ok((child, pid))
    })
    .map_err(start_err)?;
    let outputs = [
        (OutputKind::Stdout, child.stdout),
        (OutputKind::Stderr, child.stderr),
    ]
    .into_iter()
    .filter_map(|(kind, fd)| fd.map(|fd| (kind, fd)))
    .collect();
    Ok(Spawned {
        pid: child.pid,
        outputs,
        input: child.stdin.map(File::from),
        exit,
    })
}

fn spawn_pty(config: SpawnConfig) -> Result<Spawned, SpawnError> {
    let start_err = |source| SpawnError::Start {
        cmd: config.cmd.clone(),
        source,
    };
    let mut cmd = Command::new(&config.cmd);
    cmd.args(&config.args)
        .env_clear()
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    // Entered in the child after the user switch (std would do it before),
    // as for processes with pipes.
    let cwd = CString::new(config.cwd.as_os_str().as_bytes()).map_err(|_| {
        start_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "nul byte found in the working directory",
        ))
    })?;

    let (cols, rows) = config.pty.unwrap_or((0, 0));
    let (master, slave) = super::pty::open(cols, rows).map_err(|e| SpawnError::Pty(e.into()))?;
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(SpawnError::Pty);
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(slave));
    // A separate fd for writing input, so the reader thread owns its own.
    let writer = File::from(dup(&master)?);

    let switch_user = needs_user_switch(&config.user);
    let (uid, gid) = (config.user.uid, config.user.gid);
    let groups: Vec<libc::gid_t> = config.user.groups.clone();
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls only raw syscalls
    // (setsid, ioctl, setgroups, setgid, setuid, chdir) on data prepared
    // before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // stdin is the PTY slave by now: make it the controlling tty.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (child, exit) = reaper::spawn_registered(|| {
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok((child, pid))
    })
    .map_err(start_err)?;
    // The command still holds the parent's copies of the PTY slave; they
    // must go so the master reports EOF once the child's side closes.
    drop(cmd);

    let pid = child.id();
    // Dropping `child` neither waits nor kills: the reaper owns the wait.
    drop(child);
    Ok(Spawned {
        pid,
        outputs: vec![(OutputKind::Pty, master)],
        input: Some(writer),
        exit,
    })
}
