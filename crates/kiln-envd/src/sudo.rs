//! `sudo` for sandboxes.
//!
//! gVisor ignores set-user-ID bits (google/gvisor#212), so the real `sudo`
//! can never become root in a sandbox, yet E2B users expect `sudo apt-get
//! install …` to work as `user`. envd is root and already starts every
//! process, so it does the elevation: templates that have `sudo` get
//! `/usr/bin/sudo` as a link to envd, and envd run as `sudo` is a small
//! client ([`client_main`]). It sends its argv, environment and working
//! directory over a Unix socket, with its stdin, stdout and stderr attached
//! (SCM_RIGHTS), so the command reads and writes exactly where sudo's caller
//! would, terminal included, and its credentials (SCM_CREDENTIALS, which the
//! kernel checks: a process can only claim its own ids; gVisor's SO_PEERCRED
//! reports the listener's ids instead of the caller's, so it cannot be used).
//! envd ([`serve`]) checks the caller's uid against the sudoers files, starts the command as the target
//! user with those fds, forwards the signals the client receives (Ctrl-C on
//! a terminal reaches the client's process group), and reports the exit
//! status, which the client exits with.
//!
//! Authorisation: root, or a user named on a sudoers line (`name …` or
//! `%group …` for one of its groups) in `/etc/sudoers` or `/etc/sudoers.d/*`.
//! The rest of the rule is not interpreted (Kiln's templates grant `ALL`
//! with `NOPASSWD`); passwords are never asked for.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, sendmsg,
    sockopt::PassCred,
};
use serde::{Deserialize, Serialize};

/// Debian's `secure_path` is envd's default PATH.
use crate::process::spawn::DEFAULT_PATH;
use crate::process::vspawn::Prepared;
use crate::users::User;

/// Where envd listens for sudo requests inside a sandbox.
pub const SOCKET: &str = "/run/kiln-sudo.sock";
/// Overrides [`SOCKET`] (tests run envd outside a sandbox).
pub const SOCKET_ENV: &str = "KILN_SUDO_SOCKET";

/// What the client asks for.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    /// Target user (`-u`), default root.
    user: String,
    /// The command; for `-i`/`-s` the client has already made it a shell.
    argv: Vec<Vec<u8>>,
    /// The caller's environment.
    env: Vec<(Vec<u8>, Vec<u8>)>,
    /// `VAR=value` arguments before the command.
    set_env: Vec<(Vec<u8>, Vec<u8>)>,
    /// `-E`: keep the caller's environment.
    preserve_env: bool,
    /// `-i`: the target's login shell in its home directory.
    login: bool,
    /// `-s`: the shell, run from the caller's directory.
    shell: bool,
    /// `-H`: HOME is the target's (always the case without `-E`).
    set_home: bool,
    cwd: Vec<u8>,
}

fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SOCKET))
}

// ---------------------------------------------------------------- client --

const USAGE: &str = "usage: sudo [-EHinSs] [-u user] [VAR=value] [--] command [arg ...]\n\
       sudo -v | -k | -K | -V | -h\n\
Kiln's sudo: envd runs the command as the target user (default root).";

/// The client: `envd` started under the name `sudo`. Returns the exit code.
pub fn client_main(args: Vec<OsString>) -> i32 {
    match client(args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("sudo: {msg}");
            1
        }
    }
}

fn client(args: Vec<OsString>) -> Result<i32, String> {
    let mut req = Request {
        user: "root".into(),
        argv: Vec::new(),
        env: std::env::vars_os()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect(),
        set_env: Vec::new(),
        preserve_env: false,
        login: false,
        shell: false,
        set_home: false,
        cwd: std::env::current_dir()
            .map(|d| d.into_os_string().into_vec())
            .unwrap_or_else(|_| b"/".to_vec()),
    };
    let mut rest = args.into_iter().skip(1).map(OsString::into_vec).peekable();
    // Options, each possibly bundled (`-nE`), until the command.
    while let Some(arg) = rest.peek().cloned() {
        if arg == b"--" {
            rest.next();
            break;
        }
        if arg.first() != Some(&b'-') || arg.len() < 2 {
            break;
        }
        rest.next();
        if let Some(long) = arg.strip_prefix(b"--") {
            let long = String::from_utf8_lossy(long).into_owned();
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.clone(), None),
            };
            match name.as_str() {
                "preserve-env" => req.preserve_env = true,
                "login" => req.login = true,
                "shell" => req.shell = true,
                "set-home" => req.set_home = true,
                "non-interactive" | "stdin" | "preserve-groups" => {}
                "user" => {
                    req.user = match value {
                        Some(v) => v,
                        None => rest
                            .next()
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                            .ok_or("option requires an argument -- 'user'")?,
                    }
                }
                "validate" | "reset-timestamp" | "remove-timestamp" => return Ok(0),
                "version" => {
                    println!("Sudo version 1.9 (Kiln envd {})", crate::VERSION);
                    return Ok(0);
                }
                "help" => {
                    println!("{USAGE}");
                    return Ok(0);
                }
                _ => return Err(format!("unrecognized option '--{name}'\n{USAGE}")),
            }
            continue;
        }
        let flags = &arg[1..];
        let mut i = 0;
        while i < flags.len() {
            match flags[i] {
                b'E' => req.preserve_env = true,
                b'H' => req.set_home = true,
                b'i' => req.login = true,
                b's' => req.shell = true,
                // No passwords are asked for, so these change nothing.
                b'n' | b'S' | b'P' => {}
                b'v' | b'k' | b'K' => {
                    if flags[i] == b'k' && i + 1 == flags.len() && rest.peek().is_some() {
                        // `sudo -k cmd`: forget nothing, run cmd.
                    } else {
                        return Ok(0);
                    }
                }
                b'V' => {
                    println!("Sudo version 1.9 (Kiln envd {})", crate::VERSION);
                    return Ok(0);
                }
                b'h' => {
                    println!("{USAGE}");
                    return Ok(0);
                }
                b'u' => {
                    let value = if i + 1 < flags.len() {
                        flags[i + 1..].to_vec()
                    } else {
                        rest.next().ok_or("option requires an argument -- 'u'")?
                    };
                    req.user = String::from_utf8_lossy(&value).into_owned();
                    break;
                }
                other => {
                    return Err(format!(
                        "option '-{}' is not supported by Kiln's sudo\n{USAGE}",
                        other as char
                    ));
                }
            }
            i += 1;
        }
    }
    while let Some(arg) = rest.peek() {
        match arg.iter().position(|&b| b == b'=') {
            Some(eq) if eq > 0 && !arg[..eq].contains(&b'/') => {
                let arg = rest.next().unwrap_or_default();
                req.set_env
                    .push((arg[..eq].to_vec(), arg[eq + 1..].to_vec()));
            }
            _ => break,
        }
    }
    req.argv = rest.collect();
    if req.argv.is_empty() && !req.login && !req.shell {
        return Err(format!("a command is required\n{USAGE}"));
    }
    run_remote(&req)
}

/// Sends the request with our stdio, forwards signals, returns the exit code.
fn run_remote(req: &Request) -> Result<i32, String> {
    let path = socket_path();
    let stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach envd at {} ({e}); sudo works only inside a Kiln sandbox",
            path.display()
        )
    })?;
    let mut body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    body.push(b'\n');
    let fds: [RawFd; 3] = [0, 1, 2];
    // Our pid, uid and gid; the kernel refuses anything else.
    let creds = UnixCredentials::new();
    let cmsg = [
        ControlMessage::ScmRights(&fds),
        ControlMessage::ScmCredentials(&creds),
    ];
    // The fds travel with the first chunk; the rest follows as plain bytes.
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&body)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("talking to envd: {e}"))?;
    (&stream)
        .write_all(&body[sent..])
        .map_err(|e| format!("talking to envd: {e}"))?;

    // Signals meant for the command reach us (our process group has the
    // terminal): pass them on.
    let forward = stream.try_clone().map_err(|e| e.to_string())?;
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
        libc::SIGCONT,
    ]) {
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if writeln!(&forward, "signal {sig}").is_err() {
                    break;
                }
            }
        });
    }
    let mut lines = BufReader::new(&stream).lines();
    match lines.next() {
        Some(Ok(line)) => {
            if let Some(code) = line.strip_prefix("exit ") {
                return code
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad reply: {line}"));
            }
            if let Some(sig) = line.strip_prefix("signal ") {
                let sig: i32 = sig
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad reply: {line}"))?;
                // Die the way the command died, like sudo does.
                // SAFETY: resetting a handler to the default and raising a
                // signal at ourselves; nothing else runs after this point.
                unsafe {
                    libc::signal(sig, libc::SIG_DFL);
                    libc::raise(sig);
                }
                return Ok(128 + sig);
            }
            if let Some(msg) = line.strip_prefix("error ") {
                return Err(msg.to_string());
            }
            Err(format!("bad reply from envd: {line}"))
        }
        _ => Err("envd closed the connection".into()),
    }
}

// ---------------------------------------------------------------- server --

/// Listens on the sudo socket on a plain thread (envd registers nothing with
/// epoll). Inside a sandbox only, or where [`SOCKET_ENV`] names a path.
pub fn serve() {
    let explicit = std::env::var_os(SOCKET_ENV).is_some();
    if !explicit && std::process::id() != 1 {
        return;
    }
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "sudo socket unavailable");
            return;
        }
    };
    // Anyone may ask; the peer's uid decides.
    let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666));
    tracing::info!(path = %path.display(), "sudo socket listening");
    let spawned = std::thread::Builder::new()
        .name("envd-sudo".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let _ = std::thread::Builder::new()
                            .name("envd-sudo-conn".into())
                            .spawn(move || handle(stream));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sudo accept failed");
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the sudo thread");
    }
}

fn reply(stream: &UnixStream, line: &str) {
    let _ = writeln!(&*stream, "{line}");
}

fn handle(stream: UnixStream) {
    let (req, fds, cred) = match receive(&stream) {
        Ok(x) => x,
        Err(e) => {
            reply(&stream, &format!("error {e}"));
            return;
        }
    };
    let caller = crate::users::user_name(cred.uid());
    if let Err(e) = authorize(cred.uid(), &caller, Path::new("/etc")) {
        tracing::warn!(caller = %caller, "sudo refused");
        reply(&stream, &format!("error {e}"));
        return;
    }
    let target = match target_user(&req.user) {
        Ok(u) => u,
        Err(e) => {
            reply(&stream, &format!("error {e}"));
            return;
        }
    };
    let argv = match command_line(&req, &target) {
        Ok(a) => a,
        Err(e) => {
            reply(&stream, &format!("error {e}"));
            return;
        }
    };
    let env = environment(&req, &target, &caller, cred.uid(), cred.gid(), &argv);
    let cwd = if req.login {
        target.home.clone()
    } else {
        PathBuf::from(OsString::from_vec(req.cwd.clone()))
    };
    tracing::info!(caller = %caller, user = %target.name,
        command = %String::from_utf8_lossy(&argv.join(&b' ')), "sudo");
    // Started like every other process envd runs (vfork, own process group,
    // signals at their defaults), with the caller's stdio.
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == b"PATH")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let creds = crate::process::spawn::needs_user_switch(&target)
        .then(|| (target.uid, target.gid, target.groups.clone()));
    let started = Prepared::with_stdio(&argv[0], &argv, &env, &path_var, &cwd, creds, fds)
        .and_then(|prepared| {
            crate::reaper::spawn_registered(|| {
                let child = prepared.spawn()?;
                let pid = child.pid;
                Ok((child, pid))
            })
        });
    let (child, exit) = match started {
        Ok(x) => x,
        Err(e) => {
            let name = String::from_utf8_lossy(&argv[0]).into_owned();
            let msg = if e.kind() == std::io::ErrorKind::NotFound {
                format!("{name}: command not found")
            } else {
                format!("unable to execute {name}: {e}")
            };
            reply(&stream, &format!("error {msg}"));
            return;
        }
    };
    let pgid = child.pid as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Signals from the client go to the command's process group; a client
    // that vanishes takes the command with it.
    if let Ok(reader) = stream.try_clone() {
        let done = done.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Some(sig) = line
                    .strip_prefix("signal ")
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill takes plain integers.
                    unsafe { libc::kill(-pgid, sig) };
                }
            }
            if !done.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: as above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        });
    }
    let status = exit.blocking_recv().unwrap_or(0);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if libc::WIFSIGNALED(status) {
        reply(&stream, &format!("signal {}", libc::WTERMSIG(status)));
    } else {
        reply(&stream, &format!("exit {}", libc::WEXITSTATUS(status)));
    }
}

/// Reads the request, the three fds and the credentials sent with it.
fn receive(stream: &UnixStream) -> Result<(Request, [OwnedFd; 3], UnixCredentials), String> {
    nix::sys::socket::setsockopt(stream, PassCred, &true)
        .map_err(|e| format!("cannot identify the caller: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; 3], libc::ucred);
    let mut creds = None;
    let (n, mut fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("reading the request: {e}"))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| e.to_string())? {
            match c {
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: the kernel just installed these fds for us;
                    // each is owned exactly once from here on.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
                ControlMessageOwned::ScmCredentials(c) => creds = Some(c),
                _ => {}
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(n);
    // The rest of a long request, byte by byte: what follows the newline
    // (forwarded signals) is not ours to read here.
    while !buf.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        match std::io::Read::read(&mut &*stream, &mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) => return Err("the request ended early".into()),
            Err(e) => return Err(format!("reading the request: {e}")),
        }
        if buf.len() > 16 << 20 {
            return Err("the request is too large".into());
        }
    }
    let req: Request =
        serde_json::from_slice(buf.trim_ascii_end()).map_err(|e| format!("bad request: {e}"))?;
    if fds.len() != 3 {
        return Err(format!(
            "expected stdin, stdout and stderr, got {} fds",
            fds.len()
        ));
    }
    let creds = creds.ok_or("the caller sent no credentials")?;
    let stderr = fds.pop().ok_or("no stderr")?;
    let stdout = fds.pop().ok_or("no stdout")?;
    let stdin = fds.pop().ok_or("no stdin")?;
    Ok((req, [stdin, stdout, stderr], creds))
}

/// Whether `caller` (uid) may use sudo, by the sudoers files under `etc`.
fn authorize(uid: u32, caller: &str, etc: &Path) -> Result<(), String> {
    if uid == 0 {
        return Ok(());
    }
    let groups: Vec<String> = User::lookup(caller)
        .map(|u| {
            u.groups
                .iter()
                .map(|g| crate::users::group_name(*g))
                .collect()
        })
        .unwrap_or_default();
    let mut files = vec![etc.join("sudoers")];
    if let Ok(dir) = std::fs::read_dir(etc.join("sudoers.d")) {
        let mut extra: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            // sudo skips names with a dot or ending in '~'.
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.contains('.') && !n.ends_with('~'))
            })
            .collect();
        extra.sort();
        files.extend(extra);
    }
    let allowed = files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| sudoers_allows(&text, caller, &groups))
    });
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "{caller} is not in the sudoers file.  This incident will be reported."
        ))
    }
}

/// Whether a sudoers text has a rule line for `user` or one of its groups.
fn sudoers_allows(text: &str, user: &str, groups: &[String]) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("Defaults") {
            return false;
        }
        let who = line.split_whitespace().next().unwrap_or("");
        // A rule names its users before the hosts: `who host=(runas) cmds`.
        if !line.contains('=') {
            return false;
        }
        who.split(',').any(|w| match w.strip_prefix('%') {
            Some(g) => groups.iter().any(|mine| mine == g),
            None => w == user || w == "ALL",
        })
    })
}

fn target_user(spec: &str) -> Result<User, String> {
    let name = match spec.strip_prefix('#') {
        Some(uid) => {
            let uid: u32 = uid.parse().map_err(|_| format!("unknown user {spec}"))?;
            crate::users::user_name(uid)
        }
        None => spec.to_string(),
    };
    User::lookup(&name).map_err(|_| format!("unknown user {spec}"))
}

/// The argv to run: the command, or a shell for `-i`/`-s`.
fn command_line(req: &Request, target: &User) -> Result<Vec<Vec<u8>>, String> {
    if !req.login && !req.shell {
        return Ok(req.argv.clone());
    }
    let shell = if req.login || !req.preserve_env {
        target.shell.clone()
    } else {
        req.env
            .iter()
            .find(|(k, _)| k == b"SHELL")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| target.shell.clone())
    };
    let shell = if shell.is_empty() {
        "/bin/sh".into()
    } else {
        shell
    };
    let mut argv = vec![shell.into_bytes()];
    if req.login {
        argv.push(b"-l".to_vec());
    }
    if !req.argv.is_empty() {
        // sudo escapes the words for the shell; quoting each keeps them intact.
        let words: Vec<Vec<u8>> = req.argv.iter().map(|a| shell_quote(a)).collect();
        argv.push(b"-c".to_vec());
        argv.push(words.join(&b' '));
    }
    Ok(argv)
}

fn shell_quote(word: &[u8]) -> Vec<u8> {
    if !word.is_empty()
        && word
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(b))
    {
        return word.to_vec();
    }
    let mut out = vec![b'\''];
    for &b in word {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The command's environment, as Debian's sudo builds it (env_reset,
/// secure_path), or the caller's with `-E`.
fn environment(
    req: &Request,
    target: &User,
    caller: &str,
    caller_uid: u32,
    caller_gid: u32,
    argv: &[Vec<u8>],
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let keep = |k: &[u8]| {
        matches!(
            k,
            b"TERM"
                | b"COLORTERM"
                | b"DISPLAY"
                | b"XAUTHORITY"
                | b"LANG"
                | b"LANGUAGE"
                | b"TZ"
                | b"COLUMNS"
                | b"LINES"
                | b"LS_COLORS"
        ) || k.starts_with(b"LC_")
    };
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = if req.preserve_env {
        req.env.clone()
    } else {
        req.env.iter().filter(|(k, _)| keep(k)).cloned().collect()
    };
    let mut set = |k: &str, v: Vec<u8>| {
        env.retain(|(key, _)| key != k.as_bytes());
        env.push((k.as_bytes().to_vec(), v));
    };
    if !req.preserve_env {
        set("PATH", DEFAULT_PATH.as_bytes().to_vec());
        set("SHELL", target.shell.clone().into_bytes());
        set("USER", target.name.clone().into_bytes());
        set("LOGNAME", target.name.clone().into_bytes());
        set("MAIL", format!("/var/mail/{}", target.name).into_bytes());
    }
    if !req.preserve_env || req.set_home || req.login {
        set("HOME", target.home.clone().into_os_string().into_vec());
    }
    set("SUDO_USER", caller.as_bytes().to_vec());
    set("SUDO_UID", caller_uid.to_string().into_bytes());
    set("SUDO_GID", caller_gid.to_string().into_bytes());
    set("SUDO_COMMAND", argv.join(&b' '));
    for (k, v) in &req.set_env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sudoers_rules() {
        let text = "# comment\nDefaults env_reset\nuser ALL=(ALL:ALL) NOPASSWD: ALL\n%admins ALL=(ALL) ALL\n";
        assert!(sudoers_allows(text, "user", &[]));
        assert!(!sudoers_allows(text, "other", &[]));
        assert!(sudoers_allows(text, "other", &["admins".into()]));
        assert!(!sudoers_allows("#user ALL=(ALL) ALL\n", "user", &[]));
        assert!(!sudoers_allows("Defaults:user !requiretty\n", "user", &[]));
        assert!(sudoers_allows("alice,user ALL=(ALL) ALL\n", "user", &[]));
    }

    #[test]
    fn quoting_keeps_words() {
        assert_eq!(shell_quote(b"ls"), b"ls".to_vec());
        assert_eq!(shell_quote(b"a b"), b"'a b'".to_vec());
        assert_eq!(shell_quote(b"it's"), b"'it'\\''s'".to_vec());
        assert_eq!(shell_quote(b""), b"''".to_vec());
    }

    #[test]
    fn environment_is_reset_unless_preserved() {
        let target = User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
            shell: "/bin/bash".into(),
        };
        let mut req = Request {
            user: "root".into(),
            argv: vec![b"env".to_vec()],
            env: vec![
                (b"PATH".to_vec(), b"/home/user/bin".to_vec()),
                (b"SECRET".to_vec(), b"x".to_vec()),
                (b"TERM".to_vec(), b"xterm".to_vec()),
                (b"HOME".to_vec(), b"/home/user".to_vec()),
            ],
            set_env: vec![(b"FOO".to_vec(), b"bar".to_vec())],
            preserve_env: false,
            login: false,
            shell: false,
            set_home: false,
            cwd: b"/".to_vec(),
        };
        let get = |env: &[(Vec<u8>, Vec<u8>)], k: &str| {
            env.iter()
                .find(|(key, _)| key == k.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let env = environment(&req, &target, "user", 1000, 1000, &req.argv);
        assert_eq!(get(&env, "SECRET"), None);
        assert_eq!(get(&env, "TERM").as_deref(), Some("xterm"));
        assert_eq!(get(&env, "PATH").as_deref(), Some(DEFAULT_PATH));
        assert_eq!(get(&env, "HOME").as_deref(), Some("/root"));
        assert_eq!(get(&env, "SUDO_USER").as_deref(), Some("user"));
        assert_eq!(get(&env, "FOO").as_deref(), Some("bar"));
        req.preserve_env = true;
        let env = environment(&req, &target, "user", 1000, 1000, &req.argv);
        assert_eq!(get(&env, "SECRET").as_deref(), Some("x"));
        assert_eq!(get(&env, "HOME").as_deref(), Some("/home/user"));
        assert_eq!(get(&env, "PATH").as_deref(), Some("/home/user/bin"));
    }
}
