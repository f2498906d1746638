//! The OCI runtime spec (`config.json`) of a sandbox.
//!
//! envd is the sandbox's init (PID 1): processes started by `runsc exec` that
//! are alive at checkpoint time break restore, so envd starts and owns every
//! process. The template's root filesystem is shared by all of its sandboxes
//! and never written: gVisor's overlay keeps each sandbox's writes in a file
//! on a size-limited tmpfs of its own (`--overlay2=root:dir=…`, see
//! [`crate::sandbox::create`]; a read-only root would disable that overlay).
//! `/tmp` is a tmpfs of the same size (gVisor would mount an unlimited one
//! there otherwise).

use std::path::Path;

use serde_json::{Value, json};

/// Resources of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mb: u64,
    /// Most processes and threads inside the sandbox at once.
    pub pids: i64,
    /// Size limit of the writable layer (everything the sandbox writes to its
    /// filesystem). It lives in memory and counts toward `memory_mb` too.
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u64,
}

fn default_disk_mb() -> u64 {
    Resources::DEFAULT_DISK_MB
}

impl Resources {
    /// The writable layer's default size limit.
    pub const DEFAULT_DISK_MB: u64 = 1024;
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            vcpus: 2,
            memory_mb: 512,
            pids: 4096,
            disk_mb: Self::DEFAULT_DISK_MB,
        }
    }
}

const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_NET_ADMIN",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_ADMIN",
    "CAP_SYS_TIME",
    "CAP_SYS_RESOURCE",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// Builds the spec of sandbox `id` running `rootfs` in network namespace
/// `netns`. `tmp_in_layer`: `/tmp` is the template's own `/tmp`, bound and
/// overlaid like the root so that its writes go to the writable layer (runsc
/// would otherwise put an unlimited tmpfs there, in memory); else a tmpfs of
/// `disk_mb` (snapshots made before, and templates without a `/tmp` dir).
pub fn sandbox_spec(
    id: &str,
    rootfs: &Path,
    netns: &Path,
    resources: &Resources,
    tmp_in_layer: bool,
) -> Value {
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let period: u64 = 100_000;
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ["/usr/bin/envd"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "RUST_LOG=info",
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1_048_576u64, "soft": 1_048_576u64 }],
            "noNewPrivileges": false
        },
        "root": { "path": rootfs, "readonly": false },
        "hostname": "kiln",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
                { "type": "network", "path": netns }
            ],
            "cgroupsPath": format!("/kiln/{id}"),
            "resources": {
                "memory": { "limit": resources.memory_mb * 1024 * 1024 },
                "cpu": { "quota": resources.vcpus as u64 * period, "period": period },
                "pids": { "limit": resources.pids }
            }
        }
    });
    let tmp = if tmp_in_layer && tmp_is_a_dir(rootfs) {
        json!({ "destination": "/tmp", "type": "bind", "source": rootfs.join("tmp"),
                "options": ["rbind", "rw", "nosuid", "nodev"] })
    } else {
        json!({ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", resources.disk_mb.max(1))] })
    };
    spec["mounts"].as_array_mut().expect("mounts").push(tmp);
    spec
}

/// Whether `rootfs/tmp` is a directory of the rootfs itself: a symlink there
/// (an image can hold anything) would bind a host path into the sandbox.
fn tmp_is_a_dir(rootfs: &Path) -> bool {
    std::fs::symlink_metadata(rootfs.join("tmp")).is_ok_and(|m| m.is_dir())
}

/// Writes `spec` as `bundle/config.json`.
pub fn write_bundle(bundle: &Path, spec: &Value) -> std::io::Result<()> {
    std::fs::create_dir_all(bundle)?;
    let text = serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?;
    std::fs::write(bundle.join("config.json"), text)
}
