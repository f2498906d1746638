//! Starting a process with pipes through glibc's `posix_spawn`.
//!
//! `posix_spawn` uses `clone(CLONE_VM | CLONE_VFORK)`, so the child shares
//! envd's address space until it execs. A `fork` copies the address space,
//! which under gVisor costs about 15 ms more per process. Everything the
//! fork path did in the child before exec is expressed as spawn attributes
//! and file actions; the user switch happens on a short-lived thread whose
//! credentials (and so the child's) are dropped with raw, thread-local
//! syscalls before spawning.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

use super::spawn::{DEFAULT_PATH, SpawnConfig};

/// The fork-free half of a spawn: strings and pipes, prepared up front.
pub struct Prepared {
    /// `cmd` as given (argv[0] and what is resolved against PATH).
    cmd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// The child's PATH, for resolving a `cmd` without a slash.
    path_var: String,
    cwd: CString,
    cwd_path: PathBuf,
    /// Switch to (uid, gid, groups) before spawning.
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// Child ends (stdin's is None for /dev/null).
    child_stdin: Option<OwnedFd>,
    child_stdout: OwnedFd,
    child_stderr: OwnedFd,
    /// envd's ends (none when the child got fds of someone else's).
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// A started child and envd's ends of its pipes.
pub struct PipeChild {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn cstring(what: &str, bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("nul byte found in the {what}"),
        )
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    // Both ends close-on-exec: the child gets its copies through dup2
    // (which clears the flag), and no other child inherits them.
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

impl Prepared {
    /// Builds argv/envp and creates the pipes. `switch_user` asks for the
    /// child to run with `config.user`'s uid, gid and groups.
    pub fn new(config: &SpawnConfig, switch_user: bool) -> io::Result<Prepared> {
        let cmd = cstring("command", config.cmd.as_bytes())?;
        let mut argv = vec![cmd.clone()];
        for arg in &config.args {
            argv.push(cstring("arguments", arg.as_bytes())?);
        }
        // Later entries win; sorted by name, as std's Command passes them.
        let env: BTreeMap<&str, &str> = config
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in &env {
            envp.push(cstring("environment", format!("{k}={v}").as_bytes())?);
        }
        let path_var = env.get("PATH").unwrap_or(&DEFAULT_PATH).to_string();
        let cwd = cstring("working directory", config.cwd.as_os_str().as_bytes())?;

        let (child_stdin, stdin) = if config.stdin {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let (stdout, child_stdout) = pipe()?;
        let (stderr, child_stderr) = pipe()?;
        let user = &config.user;
        Ok(Prepared {
            cmd,
            argv,
            envp,
            path_var,
            cwd,
            cwd_path: config.cwd.clone(),
            creds: switch_user.then(|| (user.uid, user.gid, user.groups.clone())),
            child_stdin,
            child_stdout,
            child_stderr,
            stdin,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }

    /// A child whose stdin, stdout and stderr are `stdio` as they are (e.g.
    /// fds another process handed over, see [`crate::sudo`]); `cmd`
    /// without a '/' is looked up in `path_var`. With `creds` it runs as
    /// that uid, gid and groups.
    pub fn with_stdio(
        cmd: &[u8],
        argv: &[Vec<u8>],
        env: &[(Vec<u8>, Vec<u8>)],
        path_var: &str,
        cwd: &Path,
        creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
        stdio: [OwnedFd; 3],
    ) -> io::Result<Prepared> {
        let argv = argv
            .iter()
            .map(|a| cstring("arguments", a))
            .collect::<io::Result<Vec<_>>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| cstring("environment", &[k.as_slice(), b"=", v.as_slice()].concat()))
            .collect::<io::Result<Vec<_>>>()?;
        let [stdin, stdout, stderr] = stdio;
        Ok(Prepared {
            cmd: cstring("command", cmd)?,
            argv,
            envp,
            path_var: path_var.to_string(),
            cwd: cstring("working directory", cwd.as_os_str().as_bytes())?,
            cwd_path: cwd.to_path_buf(),
            creds,
            child_stdin: Some(stdin),
            child_stdout: stdout,
            child_stderr: stderr,
            stdin: None,
            stdout: None,
            stderr: None,
        })
    }

    /// Starts the child. With a user switch this runs on a dedicated thread
    /// that drops its credentials first and then ends; otherwise on the
    /// calling thread. envd's pipe ends are returned; the child's are closed.
    pub fn spawn(self) -> io::Result<PipeChild> {
        let pid = match &self.creds {
            None => self.spawn_here()?,
            Some((uid, gid, groups)) => std::thread::scope(|scope| {
                let thread = std::thread::Builder::new()
                    .name("envd-spawn".into())
                    .spawn_scoped(scope, || {
                        drop_credentials(*uid, *gid, groups)?;
                        self.spawn_here()
                    })?;
                thread
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
            })?,
        };
        Ok(PipeChild {
            pid: pid as u32,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
        })
    }

    /// Resolves the program and calls posix_spawn with this thread's
    /// credentials.
    fn spawn_here(&self) -> io::Result<libc::pid_t> {
        let program = if self.cmd.as_bytes().contains(&b'/') {
            self.cmd.clone()
        } else {
            resolve(
                OsStr::from_bytes(self.cmd.as_bytes()),
                &self.path_var,
                &self.cwd_path,
            )?
        };
        let mut actions = FileActions::new()?;
        match &self.child_stdin {
            Some(fd) => actions.dup2(fd, 0)?,
            None => actions.open_null(0)?,
        }
        actions.dup2(&self.child_stdout, 1)?;
        actions.dup2(&self.child_stderr, 2)?;
        actions.chdir(&self.cwd)?;
        let attr = Attr::new()?;

        match posix_spawn(&program, &self.argv, &self.envp, &actions, &attr) {
            // Like execvp: a file the kernel cannot execute is a shell script.
            Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
                let mut argv = vec![c"/bin/sh".to_owned(), program];
                argv.extend(self.argv.iter().skip(1).cloned());
                posix_spawn(c"/bin/sh", &argv, &self.envp, &actions, &attr)
            }
            other => other,
        }
    }
}

/// Looks `name` up in `path_var` the way execvp does: the first existing
/// regular file this thread may execute; EACCES if only unusable files were
/// found, ENOENT if none. Empty and relative entries are relative to the
/// child's working directory, where exec would happen.
fn resolve(name: &OsStr, path_var: &str, cwd: &Path) -> io::Result<CString> {
    if name.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let mut denied = false;
    for dir in path_var.split(':') {
        let candidate = cwd.join(dir).join(name);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        let c = cstring("program path", candidate.as_os_str().as_bytes())?;
        // SAFETY: `c` is a valid NUL-terminated string for the call.
        let executable = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
        if meta.is_file() && executable {
            return Ok(c);
        }
        denied = true;
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

/// Sets this thread's groups, gids and uids (real, effective, saved; the fs
/// ids follow). Raw syscalls: glibc's wrappers would apply them to every
/// thread of envd. The thread never switches back.
fn drop_credentials(uid: libc::uid_t, gid: libc::gid_t, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `groups` is a valid slice of gid_t for the length passed; the
    // setres* calls take plain integers. They change only this thread.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    // posix_spawn* return the error number instead of setting errno.
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

fn posix_spawn(
    program: &std::ffi::CStr,
    argv: &[CString],
    envp: &[CString],
    actions: &FileActions,
    attr: &Attr,
) -> io::Result<libc::pid_t> {
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(std::ptr::null_mut());
    let mut pid: libc::pid_t = 0;
    // SAFETY: all pointers are valid for the call: NUL-terminated strings
    // owned by the caller, NULL-terminated pointer arrays, initialized file
    // actions and attributes. posix_spawn does not write through argv/envp.
    // The vfork child runs only glibc's spawn code before exec, not Rust code.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attr.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    })?;
    Ok(pid)
}

/// Owned `posix_spawn_file_actions_t`.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: an all-zero value is a valid placeholder for init to fill.
        let mut actions: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        // SAFETY: `actions` is valid writable storage for init.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut actions) })?;
        Ok(FileActions(actions))
    }

    fn dup2(&mut self, fd: &OwnedFd, target: libc::c_int) -> io::Result<()> {
        // SAFETY: initialized actions; glibc copies the ints. `fd` stays open
        // until the spawn returned (it is owned by `Prepared`).
        check(unsafe {
            libc::posix_spawn_file_actions_adddup2(&mut self.0, fd.as_raw_fd(), target)
        })
    }

    fn open_null(&mut self, target: libc::c_int) -> io::Result<()> {
        // SAFETY: initialized actions; glibc copies the path string.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(
                &mut self.0,
                target,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
                0,
            )
        })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: initialized actions; glibc (>= 2.29) copies the path string.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: the actions were initialized in `new` and are destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Owned `posix_spawnattr_t`: a new process group, an empty signal mask and
/// every signal at its default action (envd ignores SIGPIPE, for one; a
/// child must not inherit that), glibc's internal ones included.
struct Attr(libc::posix_spawnattr_t);

impl Attr {
    fn new() -> io::Result<Attr> {
        // SAFETY: an all-zero value is a valid placeholder for init to fill.
        let mut attr: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
        // SAFETY: `attr` is valid writable storage for init.
        check(unsafe { libc::posix_spawnattr_init(&mut attr) })?;
        let mut attr = Attr(attr);
        // SAFETY: zeroed sigset_t storage is filled by sigemptyset/sigfillset
        // before use; `attr.0` was initialized above. All calls only read the
        // sets, which outlive them.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigfillset(&mut all);
            add_internal_signals(&mut all);
            let flags = libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut attr.0,
                flags as libc::c_short,
            ))?;
            check(libc::posix_spawnattr_setpgroup(&mut attr.0, 0))?;
            check(libc::posix_spawnattr_setsigmask(&mut attr.0, &empty))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &all))?;
        }
        Ok(attr)
    }
}

/// Adds glibc's internal signals (32 up to SIGRTMIN: thread cancellation
/// and set*id broadcast) to `set`. glibc 2.36's sigfillset leaves them out,
/// and its spawn child sets them to SIG_IGN, which survives exec unless they
/// are in the sigdefault set. sigaddset refuses them, so set the bits.
fn add_internal_signals(set: &mut libc::sigset_t) {
    let words = std::mem::size_of::<libc::sigset_t>() / std::mem::size_of::<libc::c_ulong>();
    let bits = libc::c_ulong::BITS as usize;
    // SAFETY: glibc's sigset_t is an array of unsigned longs with signal n
    // at bit n-1; the index stays below the array's length.
    let array = unsafe {
        std::slice::from_raw_parts_mut(std::ptr::from_mut(set).cast::<libc::c_ulong>(), words)
    };
    for sig in 32..libc::SIGRTMIN() as usize {
        let bit = sig - 1;
        if bit / bits < words {
            array[bit / bits] |= 1 << (bit % bits);
        }
    }
}

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: the attributes were initialized in `new` and are destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // A non-executable file, then an executable one of the same name.
        std::fs::write(a.join("prog"), "").unwrap();
        std::fs::write(b.join("prog"), "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b.join("prog"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", a.display(), b.display());
        let found = resolve(OsStr::new("prog"), &path, Path::new("/")).unwrap();
        assert_eq!(found.as_bytes(), b.join("prog").as_os_str().as_bytes());

        // Only a non-executable one: EACCES; nothing: ENOENT.
        let err =
            resolve(OsStr::new("prog"), &a.display().to_string(), Path::new("/")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        let err = resolve(OsStr::new("nope"), &path, Path::new("/")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // A directory of that name does not count.
        let err = resolve(
            OsStr::new("a"),
            &dir.path().display().to_string(),
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        // Relative and empty entries are relative to the child's cwd.
        let found = resolve(OsStr::new("prog"), "x:b", dir.path()).unwrap();
        assert_eq!(found.as_bytes(), b.join("prog").as_os_str().as_bytes());
        let found = resolve(OsStr::new("prog"), "", &b).unwrap();
        assert_eq!(
            found.as_bytes(),
            b.join("").join("prog").as_os_str().as_bytes()
        );
    }
}
