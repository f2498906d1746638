//! The writable layer of a sandbox, its size limit, and where `/tmp` lives.
//!
//! gVisor keeps a sandbox's writes in an overlay over the shared template
//! rootfs. With `--overlay2=root:dir=<upper>` that layer is a file gVisor
//! creates in `<upper>`. Kiln mounts a filesystem of the sandbox's `disk_mb`
//! there: an ext4 image on the host's disk (in `data_dir/layers`), attached
//! to a loop device. So writing past the limit fails inside the sandbox, and
//! the layer's pages are ordinary page cache that the kernel writes back and
//! reclaims: a sandbox's files can outgrow its memory. (The first version used
//! a tmpfs, whose pages count as memory that cannot be reclaimed without swap,
//! so a sandbox writing more than its memory was OOM-killed.) `/tmp` is part of
//! the layer too, as on an ordinary machine (and on E2B): the template's own
//! empty `/tmp`, bound and overlaid like the root (`spec::sandbox_spec`).
//!
//! Each image is a sparse copy of an empty one made once per size with
//! `mkfs.ext4`, and is unlinked as soon as it is attached: the loop device
//! holds it, detaches itself at unmount, and the kernel frees the file then,
//! so a crash leaves no image behind.
//!
//! A checkpoint captures the layer's contents, and a restore writes them into
//! a new file in the new container's `<upper>`. A checkpoint can only be
//! restored with the medium and mounts it was taken with, so every snapshot's
//! `complete` marker names its [`Layout`]; older snapshots keep theirs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::Error;

/// Where gVisor keeps a container's writable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Medium {
    /// In sandbox memory (`root:memory`), unlimited but by memory: snapshots
    /// from before the size limit.
    Memory,
    /// A file in the container's size-limited upper dir (`root:dir=…`).
    Dir,
}

/// What a checkpoint needs again at restore: the layer's medium, and whether
/// `/tmp` is in the layer or a tmpfs of its own (snapshots from before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) medium: Medium,
    pub(crate) tmp_in_layer: bool,
}

impl Layout {
    /// What new containers get.
    pub(crate) const CURRENT: Layout = Layout {
        medium: Medium::Dir,
        tmp_in_layer: true,
    };
}

const MARKER: &str = "complete";
/// The container's layout, written at [`prepare`], copied into its snapshots.
const LAYOUT_FILE: &str = "layout";
const DIR_LINE: &str = "overlay=limited-dir";
const TMP_LINE: &str = "tmp=layer";

fn parse_layout(text: &str) -> Layout {
    Layout {
        medium: if text.lines().any(|l| l == DIR_LINE) {
            Medium::Dir
        } else {
            Medium::Memory
        },
        tmp_in_layer: text.lines().any(|l| l == TMP_LINE),
    }
}

fn layout_lines(layout: Layout) -> String {
    let mut text = String::new();
    if layout.medium == Medium::Dir {
        text.push_str(DIR_LINE);
        text.push('\n');
    }
    if layout.tmp_in_layer {
        text.push_str(TMP_LINE);
        text.push('\n');
    }
    text
}

/// The mount point of container `cid`'s writable layer.
pub(crate) fn upper_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("upper")
}

/// The layout a snapshot was taken with.
pub(crate) fn snapshot_layout(image: &Path) -> Layout {
    parse_layout(&std::fs::read_to_string(image.join(MARKER)).unwrap_or_default())
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

/// Marks `image` as complete, naming the layout and platform it was taken with.
pub(crate) fn mark_complete(image: &Path, layout: Layout, platform: &str) -> Result<(), Error> {
    let text = format!("{}platform={platform}\n", layout_lines(layout));
    std::fs::write(image.join(MARKER), text).map_err(|e| Error::io("marking snapshot", e))
}

/// The layout of the running container whose run dir is `run_dir`.
pub(crate) fn container_layout(run_dir: &Path) -> Layout {
    match std::fs::read_to_string(run_dir.join(LAYOUT_FILE)) {
        Ok(text) => parse_layout(&text),
        // Started by a version that wrote no layout file.
        Err(_) => Layout {
            medium: if upper_dir(run_dir).exists() {
                Medium::Dir
            } else {
                Medium::Memory
            },
            tmp_in_layer: false,
        },
    }
}

/// Prepares container `run_dir`'s writable layer of `disk_mb` (images in
/// `layers_dir`) and returns the `--overlay2` value that puts it there.
pub(crate) fn prepare(
    run_dir: &Path,
    layers_dir: &Path,
    layout: Layout,
    disk_mb: u64,
) -> Result<String, Error> {
    // The run dir exists: the bundle was written into it.
    std::fs::write(run_dir.join(LAYOUT_FILE), layout_lines(layout))
        .map_err(|e| Error::io("writing the layer layout", e))?;
    if layout.medium == Medium::Memory {
        return Ok("root:memory".into());
    }
    let upper = upper_dir(run_dir);
    std::fs::create_dir_all(&upper)
        .map_err(|e| Error::io(format!("creating {}", upper.display()), e))?;
    let started = std::time::Instant::now();
    let image = layers_dir.join(match run_dir.file_name() {
        Some(cid) => format!("{}.ext4", cid.to_string_lossy()),
        None => "layer.ext4".into(),
    });
    mount_layer(&upper, layers_dir, &image, disk_mb.max(1)).map_err(|e| {
        Error::io(
            format!("mounting the writable layer at {}", upper.display()),
            e,
        )
    })?;
    tracing::debug!(took = ?started.elapsed(), disk_mb, "writable layer mounted");
    // `all`: the root and the bind mount of the template's /tmp (the only
    // bind mount of a sandbox) keep their layers side by side in `upper`.
    let mounts = if layout.tmp_in_layer { "all" } else { "root" };
    Ok(format!("{mounts}:dir={}", upper.display()))
}

/// Mounts a new, empty ext4 filesystem of `mb` MiB at `upper`, kept in
/// `image` (unlinked once attached).
fn mount_layer(upper: &Path, layers_dir: &Path, image: &Path, mb: u64) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    let empty = empty_image(layers_dir, mb)?;
    let attached = sparse_copy(&empty, image).and_then(|()| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)?;
        super::loopdev::attach(&file)
    });
    // The loop device holds the file from here on; the kernel frees it when
    // the device detaches.
    let _ = std::fs::remove_file(image);
    let (dev, _dev_handle) = attached?;
    // Not noexec: gVisor maps the layer's pages executable for programs that
    // live in it.
    mount(
        Some(&dev),
        upper,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )?;
    std::fs::set_permissions(upper, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// An empty ext4 image of `mb` MiB in `layers_dir`, made once per size.
fn empty_image(layers_dir: &Path, mb: u64) -> std::io::Result<PathBuf> {
    static MAKING: Mutex<()> = Mutex::new(());
    let path = layers_dir.join(format!("empty-{mb}m.ext4"));
    if path.exists() {
        return Ok(path);
    }
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(layers_dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // No journal (the layer does not outlive a crash of its sandbox), few
    // inodes (gVisor keeps one file there), inode tables written now rather
    // than by a background thread after every mount, no reserved blocks.
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-m",
            "0",
            "-N",
            "64",
            "-L",
            "kiln-layer",
        ])
        .args(["-O", "^has_journal,^resize_inode"])
        .args(["-E", "lazy_itable_init=0,nodiscard"])
        .arg(&tmp)
        .arg(format!("{mb}M"))
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("running mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::other(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Copies `from` to a new file `to`, keeping holes as holes (the empty image
/// is almost all holes).
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    use std::os::fd::AsRawFd;
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let start = match lseek(src.as_raw_fd(), pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let end = lseek(src.as_raw_fd(), start, Whence::SeekHole)?;
        let mut off = start as u64;
        while off < end as u64 {
            let n = buf.len().min((end as u64 - off) as usize);
            src.read_exact_at(&mut buf[..n], off)?;
            dst.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        pos = end;
    }
    Ok(())
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
    use std::os::unix::fs::MetadataExt;
    let upper = upper_dir(run_dir);
    let st = nix::sys::statvfs::statvfs(&upper).ok()?;
    // Only a mounted layer counts: an unmounted dir would report the host's disk.
    let parent = nix::sys::statvfs::statvfs(run_dir).ok()?;
    if st.filesystem_id() == parent.filesystem_id() {
        return None;
    }
    let frsize = st.fragment_size();
    let fs_total = st.blocks() * frsize;
    let used = fs_total.saturating_sub(st.blocks_free() * frsize);
    // The limit is the device's size (ext4 does not count its own metadata);
    // a tmpfs layer (older containers) has no device.
    let dev = std::fs::metadata(&upper).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let total = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(fs_total, |sectors| sectors * 512);
    Some((used, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip_and_old_markers_keep_their_meaning() {
        for layout in [
            Layout::CURRENT,
            Layout {
                medium: Medium::Dir,
                tmp_in_layer: false,
            },
            Layout {
                medium: Medium::Memory,
                tmp_in_layer: false,
            },
        ] {
            assert_eq!(parse_layout(&layout_lines(layout)), layout);
        }
        // Markers written by earlier versions.
        assert_eq!(
            parse_layout(""),
            Layout {
                medium: Medium::Memory,
                tmp_in_layer: false
            }
        );
        assert_eq!(
            parse_layout("overlay=limited-dir\nplatform=systrap\n"),
            Layout {
                medium: Medium::Dir,
                tmp_in_layer: false
            }
        );
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("kiln-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&vec![7u8; 3 << 20], 20 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        sparse_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        // Allocated blocks (512 B each): about the 3 MiB written, not 64 MiB.
        assert!(std::fs::metadata(&b).unwrap().blocks() < 16 * 1024);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
