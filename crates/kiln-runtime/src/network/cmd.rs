//! Running `ip` and `nft` with a script on stdin (one exec per change).

use std::io::Write;
use std::process::{Command, Stdio};

use super::NetworkError;

/// Runs `program args...` feeding `script` on stdin; fails with the command's stderr.
pub(crate) fn run_script(
    program: &str,
    args: &[&str],
    script: &str,
    context: &str,
) -> Result<(), NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    tracing::trace!(%command, %script, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Spawn {
            context: context.to_string(),
            command: command.clone(),
            source,
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Feed stdin from a thread: a large script and a chatty stderr could otherwise deadlock.
    let input = script.to_owned();
    let writer = std::thread::spawn(move || {
        let res = stdin.write_all(input.as_bytes());
        drop(stdin);
        res
    });
    let out = child
        .wait_with_output()
        .map_err(|source| NetworkError::Spawn {
            context: context.to_string(),
            command: command.clone(),
            source,
        })?;
    let write_res = writer.join().unwrap_or(Ok(()));
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetworkError::Command {
            context: context.to_string(),
            command,
            status: out.status.to_string(),
            stderr,
        });
    }
    write_res.map_err(|e| NetworkError::io(format!("{context}: writing stdin of `{command}`"), e))
}

/// `ip -batch -` in the host namespace, or in `netns` when given.
pub(crate) fn ip_batch(
    netns: Option<&str>,
    force: bool,
    script: &str,
    context: &str,
) -> Result<(), NetworkError> {
    let mut args = Vec::with_capacity(5);
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    if force {
        args.push("-force");
    }
    args.extend(["-batch", "-"]);
    run_script("ip", &args, script, context)
}

/// `nft -f -`: the whole script is one atomic kernel transaction.
pub(crate) fn nft(script: &str, context: &str) -> Result<(), NetworkError> {
    run_script("nft", &["-f", "-"], script, context)
}

/// Forgets the host's connection tracking entries to and from `ip`, so that a
/// reused address inherits no flows (replies still in flight for the sandbox
/// that had it would otherwise be let through to the next one). Best effort:
/// `conntrack` exits 1 when nothing matched, and a host without the tool
/// is warned about once.
pub(crate) fn flush_conntrack(ip: std::net::Ipv4Addr) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static MISSING: AtomicBool = AtomicBool::new(false);
    if MISSING.load(Ordering::Relaxed) {
        return;
    }
    for side in ["--orig-src", "--orig-dst"] {
        let ip = ip.to_string();
        match Command::new("conntrack")
            .args(["-D", side, &ip])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !MISSING.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "`conntrack` is not installed: a reused sandbox address keeps the old \
                         sandbox's connection tracking entries (install the conntrack package)"
                    );
                }
                return;
            }
            Err(e) => tracing::debug!(%ip, error = %e, "conntrack -D failed"),
        }
    }
}

/// Writes a sysctl through /proc/sys (no exec).
pub(crate) fn write_sysctl(path: &str, value: &str) -> Result<(), NetworkError> {
    std::fs::write(path, value).map_err(|e| NetworkError::io(format!("writing {path}"), e))
}
