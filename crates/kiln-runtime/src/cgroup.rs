//! A container's cgroup: freezing and thawing it, and what it uses.
//!
//! Every sandbox's spec sets `cgroupsPath: /kiln/<container id>`, so its
//! cgroup is `<mount>/kiln/<container id>`: one directory per controller on
//! cgroup v1 (freezer, cpuacct, memory), one unified directory on v2.
//!
//! Freezing matters because an idle gVisor sandbox keeps ~1.6 % of a CPU busy
//! (the sentry's timers); `runsc pause` does not stop that, the cgroup freezer
//! does.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a freeze may take before it is undone and reported.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a thaw may take.
const THAW_TIMEOUT: Duration = Duration::from_secs(2);

/// Resource usage of one sandbox, read from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SandboxStats {
    /// CPU time used since the container started, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory charged to the sandbox now, less the page cache the kernel can
    /// drop at once (inactive file pages, mostly the writable layer's files),
    /// as `docker stats` counts it: the layer lives on disk, so a sandbox
    /// holding large files would otherwise look out of memory.
    pub memory_bytes: u64,
    /// Its memory limit (`u64::MAX` when unlimited).
    pub memory_limit_bytes: u64,
    /// How often the kernel's OOM killer struck inside the cgroup.
    pub oom_kills: u64,
    /// Bytes in the sandbox's writable layer (0 when it has no limit).
    pub disk_bytes: u64,
    /// The writable layer's size limit (0 when it has none).
    pub disk_limit_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup found for container '{0}'")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: cannot parse {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("container '{cid}' not {want} within {timeout:?} (freezer says {state:?})")]
    Timeout {
        cid: String,
        want: &'static str,
        timeout: Duration,
        state: String,
    },
}

/// Where the cgroup hierarchies are mounted.
#[derive(Debug, Default, PartialEq)]
struct Mounts {
    /// cgroup v1 hierarchies: their controllers and mount point.
    v1: Vec<(Vec<String>, PathBuf)>,
    /// cgroup v2 mount points.
    v2: Vec<PathBuf>,
}

impl Mounts {
    fn v1(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(ctrls, _)| ctrls.iter().any(|c| c == controller))
            .map(|(_, p)| p.as_path())
    }
}

/// Parses `/proc/self/mountinfo`: `id parent dev root mountpoint opts [tags] - fstype source superopts`.
fn parse_mountinfo(text: &str) -> Mounts {
    let mut mounts = Mounts::default();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split_whitespace().nth(4) else {
            continue;
        };
        let mut right = right.split_whitespace();
        let (Some(fstype), Some(_source), Some(opts)) = (right.next(), right.next(), right.next())
        else {
            continue;
        };
        match fstype {
            "cgroup" => {
                let ctrls = opts
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .map(str::to_owned)
                    .collect();
                mounts.v1.push((ctrls, PathBuf::from(mount_point)));
            }
            "cgroup2" => mounts.v2.push(PathBuf::from(mount_point)),
            _ => {}
        }
    }
    mounts
}

static MOUNTS: LazyLock<Mounts> = LazyLock::new(|| {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
});

/// A container's cgroup directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    V1 {
        freezer: PathBuf,
        cpuacct: PathBuf,
        memory: PathBuf,
    },
    V2(PathBuf),
}

impl Cgroup {
    /// Finds the cgroup of container `cid` (v1 when the freezer hierarchy has
    /// it, else the unified hierarchy).
    pub fn of_container(cid: &str) -> Result<Cgroup, CgroupError> {
        Self::locate(&MOUNTS, cid)
    }

    fn locate(mounts: &Mounts, cid: &str) -> Result<Cgroup, CgroupError> {
        let rel = Path::new("kiln").join(cid);
        if let Some(freezer) = mounts.v1("freezer").map(|m| m.join(&rel))
            && freezer.is_dir()
        {
            let under = |ctrl: &str| {
                mounts
                    .v1(ctrl)
                    .map(|m| m.join(&rel))
                    .unwrap_or_else(|| freezer.clone())
            };
            return Ok(Cgroup::V1 {
                cpuacct: under("cpuacct"),
                memory: under("memory"),
                freezer,
            });
        }
        mounts
            .v2
            .iter()
            .map(|m| m.join(&rel))
            .find(|dir| dir.join("cgroup.freeze").exists())
            .map(Cgroup::V2)
            .ok_or_else(|| CgroupError::NotFound(cid.to_string()))
    }

    /// Whether the freezer reports the cgroup fully frozen.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        Ok(self.freezer_state()? == "FROZEN")
    }

    /// The freezer state in v1 words: FROZEN, FREEZING or THAWED.
    pub fn freezer_state(&self) -> Result<String, CgroupError> {
        match self {
            Cgroup::V1 { freezer, .. } => Ok(read(&freezer.join("freezer.state"))?.trim().into()),
            Cgroup::V2(dir) => {
                let path = dir.join("cgroup.events");
                let frozen =
                    key_value(&read(&path)?, "frozen").ok_or_else(|| parse_err(&path, ""))?;
                let wanted = read(&dir.join("cgroup.freeze"))?.trim() == "1";
                Ok(match (frozen == 1, wanted) {
                    (true, _) => "FROZEN",
                    (false, true) => "FREEZING",
                    (false, false) => "THAWED",
                }
                .into())
            }
        }
    }

    fn request(&self, frozen: bool) -> Result<(), CgroupError> {
        match self {
            Cgroup::V1 { freezer, .. } => write(
                &freezer.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            Cgroup::V2(dir) => write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
        }
    }

    /// Asks for `frozen` and waits until the freezer reports it.
    fn set_frozen(&self, cid: &str, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let want = if frozen { "FROZEN" } else { "THAWED" };
        self.request(frozen)?;
        let started = Instant::now();
        // Short sleeps first: a thaw is usually done at once, and hand-out waits on it.
        let mut pause = Duration::from_micros(50);
        loop {
            let state = self.freezer_state()?;
            if state == want {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(CgroupError::Timeout {
                    cid: cid.to_string(),
                    want: if frozen { "frozen" } else { "thawed" },
                    timeout,
                    state,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Reads CPU, memory and OOM figures.
    pub fn usage(&self) -> Result<SandboxStats, CgroupError> {
        match self {
            Cgroup::V1 {
                cpuacct, memory, ..
            } => {
                let oom = memory.join("memory.oom_control");
                Ok(SandboxStats {
                    cpu_usage_ns: read_u64(&cpuacct.join("cpuacct.usage"))?,
                    memory_bytes: read_u64(&memory.join("memory.usage_in_bytes"))?.saturating_sub(
                        stat_value(&memory.join("memory.stat"), "total_inactive_file"),
                    ),
                    memory_limit_bytes: read_u64(&memory.join("memory.limit_in_bytes"))?,
                    // Kernels before 4.13 have no oom_kill line.
                    oom_kills: key_value(&read(&oom)?, "oom_kill").unwrap_or(0),
                    ..Default::default()
                })
            }
            Cgroup::V2(dir) => {
                let cpu = dir.join("cpu.stat");
                let usage_usec =
                    key_value(&read(&cpu)?, "usage_usec").ok_or_else(|| parse_err(&cpu, ""))?;
                Ok(SandboxStats {
                    cpu_usage_ns: usage_usec.saturating_mul(1000),
                    memory_bytes: read_u64(&dir.join("memory.current"))?
                        .saturating_sub(stat_value(&dir.join("memory.stat"), "inactive_file")),
                    memory_limit_bytes: read_u64(&dir.join("memory.max"))?,
                    oom_kills: key_value(&read(&dir.join("memory.events"))?, "oom_kill")
                        .unwrap_or(0),
                    ..Default::default()
                })
            }
        }
    }
}

/// A value of a keyed file such as `memory.stat`; 0 when absent.
fn stat_value(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| key_value(&text, key))
        .unwrap_or(0)
}

/// Freezes container `cid` and waits until it is fully frozen. On a timeout
/// the freeze is undone, so the container is never left half-frozen.
pub fn freeze(cid: &str) -> Result<(), CgroupError> {
    let cg = Cgroup::of_container(cid)?;
    let result = cg.set_frozen(cid, true, FREEZE_TIMEOUT);
    if result.is_err() {
        let _ = cg.set_frozen(cid, false, THAW_TIMEOUT);
    }
    result
}

/// Thaws container `cid` and waits until it runs again.
pub fn thaw(cid: &str) -> Result<(), CgroupError> {
    Cgroup::of_container(cid)?.set_frozen(cid, false, THAW_TIMEOUT)
}

/// Thaws `cid` if its cgroup exists and is not thawed; errors are ignored.
/// A frozen (v1) sandbox cannot act on SIGKILL, so `runsc delete` would hang.
pub fn ensure_thawed(cid: &str) {
    if let Ok(cg) = Cgroup::of_container(cid)
        && cg.freezer_state().map(|s| s != "THAWED").unwrap_or(false)
        && let Err(e) = cg.set_frozen(cid, false, THAW_TIMEOUT)
    {
        tracing::warn!(container = %cid, error = %e, "thawing before teardown failed");
    }
}

/// CPU, memory and OOM figures of container `cid`.
pub fn usage(cid: &str) -> Result<SandboxStats, CgroupError> {
    Cgroup::of_container(cid)?.usage()
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_err(path: &Path, content: &str) -> CgroupError {
    CgroupError::Parse {
        path: path.to_path_buf(),
        content: content.to_string(),
    }
}

/// A number file; v2's `max` means unlimited.
fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    let text = text.trim();
    if text == "max" {
        return Ok(u64::MAX);
    }
    text.parse().map_err(|_| parse_err(path, text))
}

/// The value of the `key N` line of a flat keyed file (cpu.stat, memory.events, memory.oom_control).
fn key_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl crate::Runtime {
    /// CPU, memory and OOM figures of a running sandbox (for the metrics API).
    pub fn stats(&self, id: &str) -> Result<SandboxStats, crate::Error> {
        let entry = self.entry(id)?;
        let cid = {
            let record = entry.record.lock().unwrap_or_else(|e| e.into_inner());
            if record.state != crate::SandboxState::Running {
                return Err(crate::Error::InvalidState {
                    id: id.to_string(),
                    state: record.state.to_string(),
                    action: "report usage",
                });
            }
            record.cid().to_string()
        };
        let mut stats = usage(&cid)?;
        if let Some((used, total)) = crate::sandbox::disk::usage(&self.sandbox_run_dir(&cid)) {
            stats.disk_bytes = used;
            stats.disk_limit_bytes = total;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mountinfo_hybrid() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(
            m.v1("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(m.v1("cpu"), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(m.v1("freezer"), Some(Path::new("/sys/fs/cgroup/freezer")));
        assert_eq!(m.v1("name"), None);
        assert_eq!(m.v2, vec![PathBuf::from("/sys/fs/cgroup/unified")]);
    }

    #[test]
    fn mountinfo_unified() {
        let m = parse_mountinfo(
            "25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
        );
        assert!(m.v1.is_empty());
        assert_eq!(m.v2, vec![PathBuf::from("/sys/fs/cgroup")]);
    }

    #[test]
    fn locate_v1_and_v2() {
        let tmp = std::env::temp_dir().join(format!("kiln-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let v1 = Mounts {
            v1: vec![
                (vec!["freezer".into()], tmp.join("freezer")),
                (
                    vec!["cpu".into(), "cpuacct".into()],
                    tmp.join("cpu,cpuacct"),
                ),
                (vec!["memory".into()], tmp.join("memory")),
            ],
            v2: vec![tmp.join("unified")],
        };
        assert!(matches!(
            Cgroup::locate(&v1, "abc"),
            Err(CgroupError::NotFound(_))
        ));
        std::fs::create_dir_all(tmp.join("freezer/kiln/abc")).unwrap();
        assert_eq!(
            Cgroup::locate(&v1, "abc").unwrap(),
            Cgroup::V1 {
                freezer: tmp.join("freezer/kiln/abc"),
                cpuacct: tmp.join("cpu,cpuacct/kiln/abc"),
                memory: tmp.join("memory/kiln/abc"),
            }
        );
        // v2: a unified directory with cgroup.freeze and the usage files.
        let dir = tmp.join("unified/kiln/def");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.freeze"), "1\n").unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.current"), "12288\n").unwrap();
        // Inactive file pages (droppable page cache) do not count.
        std::fs::write(
            dir.join("memory.stat"),
            "anon 4096\nfile 8192\ninactive_file 8192\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        let cg = Cgroup::locate(&v1, "def").unwrap();
        assert_eq!(cg, Cgroup::V2(dir.clone()));
        assert!(cg.is_frozen().unwrap());
        assert_eq!(
            cg.usage().unwrap(),
            SandboxStats {
                cpu_usage_ns: 1_234_000,
                memory_bytes: 4096,
                memory_limit_bytes: u64::MAX,
                oom_kills: 1,
                ..Default::default()
            }
        );
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert_eq!(cg.freezer_state().unwrap(), "FREEZING");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn keyed_files() {
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(key_value(oom, "oom_kill"), Some(7));
        assert_eq!(key_value(oom, "oom_kill_disable"), Some(0));
        assert_eq!(
            key_value("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
            None
        );
    }
}
