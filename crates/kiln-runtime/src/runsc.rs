//! The `runsc` (gVisor) command line, with the workarounds this runtime needs.
//!
//! - `run` and `restore` start in a private mount namespace with a tmpfs over
//!   `/proc/sys/net`: this runsc decides it is in the root network namespace by
//!   the presence of `/proc/sys/net/core/rmem_default`, which newer kernels show
//!   in every netns, and would then refuse netstack networking.
//! - runsc's stdio goes to a log file, never a pipe: the detached sandbox keeps
//!   it open for its whole life, and a reader would wait for it forever.
//! - Every call has a timeout, so a wedged runsc cannot hang the runtime.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// How runsc is invoked.
#[derive(Debug, Clone)]
pub struct Runsc {
    /// The runsc binary.
    pub bin: PathBuf,
    /// runsc's state directory (`--root`).
    pub root: PathBuf,
    /// gVisor platform: `systrap` works everywhere, `kvm` needs real KVM.
    pub platform: String,
}

/// A sandbox's container state as `runsc state` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerStatus {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
    Missing,
}

impl Runsc {
    fn command(&self) -> Command {
        // Only `run` and `restore` read the overlay flag; the others talk to
        // a sandbox that has its own.
        self.command_with_overlay("root:memory")
    }

    fn command_with_overlay(&self, overlay: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(format!("--root={}", self.root.display()))
            .arg(format!("--platform={}", self.platform))
            .arg(format!("--overlay2={overlay}"))
            // Checkpoints must succeed while clients are connected to envd.
            .arg("--net-disconnect-ok")
            .stdin(Stdio::null());
        // Diagnostics: gVisor's own debug logs, one file per runsc command.
        if let Some(dir) = std::env::var_os("KILN_RUNSC_DEBUG_DIR").filter(|d| !d.is_empty()) {
            let mut flag = std::ffi::OsString::from("--debug-log=");
            flag.push(dir);
            flag.push("/");
            cmd.arg("--debug").arg(flag);
        }
        cmd
    }

    /// Runs runsc with `args`, sending its output to `log`, waiting at most `timeout`.
    fn exec(
        &self,
        what: &str,
        args: &[&OsStr],
        log: &Path,
        private_netfs: bool,
        timeout: Duration,
    ) -> Result<(), Error> {
        self.exec_with(self.command(), what, args, log, private_netfs, timeout)
    }

    /// Like [`Runsc::exec`], starting from `cmd` (runsc with its global flags).
    fn exec_with(
        &self,
        mut cmd: Command,
        what: &str,
        args: &[&OsStr],
        log: &Path,
        private_netfs: bool,
        timeout: Duration,
    ) -> Result<(), Error> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io("cloning log fd", e))?;
        cmd.args(args).stdout(out).stderr(err);
        if private_netfs {
            // SAFETY: only async-signal-safe syscalls (unshare, mount) run
            // between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    use nix::mount::{MsFlags, mount};
                    use nix::sched::{CloneFlags, unshare};
                    unshare(CloneFlags::CLONE_NEWNS)?;
                    mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                        None::<&str>,
                    )?;
                    mount(
                        Some("kiln"),
                        "/proc/sys/net",
                        Some("tmpfs"),
                        MsFlags::empty(),
                        None::<&str>,
                    )?;
                    Ok(())
                });
            }
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", self.bin.display()), e))?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(Error::Runsc {
                        what: what.to_string(),
                        detail: format!("{status}: {}", log_tail(log)),
                    });
                }
                Ok(None) if started.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Runsc {
                        what: what.to_string(),
                        detail: format!("timed out after {timeout:?}: {}", log_tail(log)),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(Error::io("waiting for runsc", e)),
            }
        }
    }

    /// Starts a new sandbox from `bundle` (detached), its writable layer
    /// where `overlay` (an `--overlay2` value) says (`none`: writes go
    /// straight to the rootfs, as template builds want), and its host pid
    /// written to `pid_file`.
    pub fn run(
        &self,
        id: &str,
        bundle: &Path,
        overlay: &str,
        pid_file: &Path,
        log: &Path,
    ) -> Result<(), Error> {
        let args: Vec<&OsStr> = vec![
            "run".as_ref(),
            "--detach".as_ref(),
            "--pid-file".as_ref(),
            pid_file.as_os_str(),
            "--bundle".as_ref(),
            bundle.as_os_str(),
            id.as_ref(),
        ];
        let cmd = self.command_with_overlay(overlay);
        self.exec_with(cmd, "run", &args, log, true, Duration::from_secs(60))
    }

    /// Restores a sandbox from a checkpoint image (detached); `overlay` must
    /// be the medium the checkpoint was taken with.
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        image: &Path,
        overlay: &str,
        pid_file: &Path,
        log: &Path,
    ) -> Result<(), Error> {
        let args: Vec<&OsStr> = vec![
            "restore".as_ref(),
            "--detach".as_ref(),
            "--pid-file".as_ref(),
            pid_file.as_os_str(),
            "--bundle".as_ref(),
            bundle.as_os_str(),
            "--image-path".as_ref(),
            image.as_os_str(),
            id.as_ref(),
        ];
        let cmd = self.command_with_overlay(overlay);
        self.exec_with(cmd, "restore", &args, log, true, Duration::from_secs(120))
    }

    /// Checkpoints a sandbox into `image`; the sandbox stops afterwards.
    pub fn checkpoint(&self, id: &str, image: &Path, log: &Path) -> Result<(), Error> {
        let args: Vec<&OsStr> = vec![
            "checkpoint".as_ref(),
            "--compression=none".as_ref(),
            "--image-path".as_ref(),
            image.as_os_str(),
            id.as_ref(),
        ];
        self.exec("checkpoint", &args, log, false, Duration::from_secs(300))
    }

    /// Force-deletes a sandbox (blocks ~2 s for a running one).
    pub fn delete(&self, id: &str, log: &Path) -> Result<(), Error> {
        let args: Vec<&OsStr> = vec!["delete".as_ref(), "--force".as_ref(), id.as_ref()];
        self.exec("delete", &args, log, false, Duration::from_secs(60))
    }

    /// The container's status; `Missing` when runsc does not know it.
    pub fn state(&self, id: &str) -> ContainerStatus {
        let output = self
            .command()
            .args(["state", id])
            .stderr(Stdio::null())
            .output();
        let Ok(output) = output else {
            return ContainerStatus::Missing;
        };
        if !output.status.success() {
            return ContainerStatus::Missing;
        }
        let status = serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_owned))
            .unwrap_or_default();
        match status.as_str() {
            "creating" => ContainerStatus::Creating,
            "created" => ContainerStatus::Created,
            "running" => ContainerStatus::Running,
            "paused" => ContainerStatus::Paused,
            "stopped" => ContainerStatus::Stopped,
            _ => ContainerStatus::Missing,
        }
    }

    /// The host pid of a running sandbox's `runsc-sandbox` process.
    pub fn pid(&self, id: &str) -> Option<u32> {
        let output = self
            .command()
            .args(["state", id])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let state: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        state
            .get("pid")?
            .as_u64()
            .filter(|p| *p > 0)
            .map(|p| p as u32)
    }

    /// IDs of every container runsc knows in this root.
    pub fn list(&self) -> Vec<String> {
        let Ok(output) = self
            .command()
            .args(["list", "-quiet"])
            .stderr(Stdio::null())
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// The last lines of a runsc log, for error messages.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(12).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
