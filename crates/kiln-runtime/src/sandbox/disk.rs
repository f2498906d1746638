//! The writable layer of a sandbox and its size limit.
//!
//! gVisor keeps a sandbox's writes in an overlay over the shared template
//! rootfs. With `--overlay2=root:dir=<upper>` that layer is a file gVisor
//! creates in `<upper>`; Kiln mounts a tmpfs of the sandbox's `disk_mb` there,
//! so writing past the limit fails inside the sandbox and the host is
//! unharmed. A checkpoint captures the layer's contents, and a restore writes
//! them into a new file in the new container's `<upper>`.
//!
//! A checkpoint can only be restored with the medium it was taken with, so
//! every snapshot's `complete` marker names it; snapshots from before the
//! limit existed (an empty marker) keep the old in-memory layer.

use std::path::{Path, PathBuf};

use crate::Error;

/// Where gVisor keeps a container's writable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Medium {
    /// In sandbox memory (`root:memory`), unlimited but by memory.
    Memory,
    /// A file on the container's size-limited tmpfs (`root:dir=…`).
    LimitedDir,
}

const MARKER: &str = "complete";
const LIMITED: &str = "overlay=limited-dir";

/// The tmpfs holding container `cid`'s writable layer.
pub(crate) fn upper_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("upper")
}

/// The medium a snapshot was taken with.
pub(crate) fn snapshot_medium(image: &Path) -> Medium {
    let text = std::fs::read_to_string(image.join(MARKER)).unwrap_or_default();
    if text.lines().any(|l| l == LIMITED) {
        Medium::LimitedDir
    } else {
        Medium::Memory
    }
}

/// The gVisor platform a complete snapshot was taken on (`None`: none is
/// complete). Checkpoints restore only on their own platform; markers from
/// before platforms were recorded are `systrap`, the only one used then.
pub(crate) fn snapshot_platform(image: &Path) -> Option<String> {
    let text = std::fs::read_to_string(image.join(MARKER)).ok()?;
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix("platform="))
            .unwrap_or("systrap")
            .to_string(),
    )
}

/// Marks `image` as complete, naming the medium and platform it was taken with.
pub(crate) fn mark_complete(image: &Path, medium: Medium, platform: &str) -> Result<(), Error> {
    let mut text = String::new();
    if medium == Medium::LimitedDir {
        text.push_str(LIMITED);
        text.push('\n');
    }
    text.push_str(&format!("platform={platform}\n"));
    std::fs::write(image.join(MARKER), text).map_err(|e| Error::io("marking snapshot", e))
}

/// The medium of the running container whose run dir is `run_dir`.
pub(crate) fn container_medium(run_dir: &Path) -> Medium {
    if upper_dir(run_dir).exists() {
        Medium::LimitedDir
    } else {
        Medium::Memory
    }
}

/// Mounts a tmpfs of `disk_mb` at the container's upper dir and returns the
/// `--overlay2` value that puts the writable layer there.
pub(crate) fn prepare(run_dir: &Path, medium: Medium, disk_mb: u64) -> Result<String, Error> {
    if medium == Medium::Memory {
        return Ok("root:memory".into());
    }
    use nix::mount::{MsFlags, mount};
    let upper = upper_dir(run_dir);
    std::fs::create_dir_all(&upper)
        .map_err(|e| Error::io(format!("creating {}", upper.display()), e))?;
    // Not noexec: gVisor maps the layer's pages executable for programs
    // that live in it.
    mount(
        Some("kiln-upper"),
        &upper,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={}m,mode=0700", disk_mb.max(1)).as_str()),
    )
    .map_err(|e| {
        Error::io(
            format!("mounting the writable layer at {}", upper.display()),
            e.into(),
        )
    })?;
    Ok(format!("root:dir={}", upper.display()))
}

/// Unmounts the container's upper dir if it is mounted (idempotent).
pub(crate) fn release(run_dir: &Path) {
    let upper = upper_dir(run_dir);
    if !upper.exists() {
        return;
    }
    // Detached: a sandbox process that is still exiting may hold it open.
    match nix::mount::umount2(&upper, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            tracing::warn!(path = %upper.display(), error = %e, "unmounting the writable layer failed")
        }
    }
}

/// Bytes used and total of a container's writable layer, when it has a limit.
pub(crate) fn usage(run_dir: &Path) -> Option<(u64, u64)> {
    let upper = upper_dir(run_dir);
    let st = nix::sys::statvfs::statvfs(&upper).ok()?;
    // Only the tmpfs counts: an unmounted dir would report the host's disk.
    let parent = nix::sys::statvfs::statvfs(run_dir).ok()?;
    if st.filesystem_id() == parent.filesystem_id() {
        return None;
    }
    let frsize = st.fragment_size();
    let total = st.blocks() * frsize;
    let free = st.blocks_free() * frsize;
    Some((total.saturating_sub(free), total))
}
