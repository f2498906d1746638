//! Host overlayfs mounts for build steps, and flattening layers into one rootfs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mounts an overlay at `target`: `lowers` top first (paths relative to
/// `cwd` keep the mount options short), `upper`/`work` its writable layer.
pub(crate) fn mount(
    cwd: &Path,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> std::io::Result<()> {
    let bad = |p: &Path| p.to_string_lossy().contains([':', ',', '\\']);
    if let Some(p) = lowers
        .iter()
        .chain([upper.to_path_buf(), work.to_path_buf()].iter())
        .find(|p| bad(p))
    {
        return Err(std::io::Error::other(format!(
            "path {} has a ':', ',' or '\\', which overlayfs options cannot carry",
            p.display()
        )));
    }
    let lower = lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    // No redirects or metacopy: every layer must be a plain, complete diff.
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
        upper.display(),
        work.display()
    );
    if options.len() > 4000 {
        return Err(std::io::Error::other(format!(
            "too many layers ({}) for one overlay mount",
            lowers.len()
        )));
    }
    let out = Command::new("mount")
        .current_dir(cwd)
        .args(["-t", "overlay", "kiln-build", "-o", &options])
        .arg(target)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "mount overlay at {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Unmounts `target` (lazily when busy: nothing of it must stay mounted).
pub(crate) fn unmount(target: &Path) -> std::io::Result<()> {
    let c = CString::new(target.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) || err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(()); // not mounted
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    Err(err)
}

/// Whether something is mounted at `target`.
pub(crate) fn is_mounted(target: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let t = target.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == t))
}

/// Builds `dest` from `base` plus `layers` (bottom first): hard links, so
/// files are shared with the base and the cache, never copied.
pub(crate) fn flatten(base: &Path, layers: &[PathBuf], dest: &Path) -> std::io::Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg("-l")
        .arg(base)
        .arg(dest)
        .status()?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(dest);
        // A base on another filesystem cannot be linked: copy it.
        let status = Command::new("cp").arg("-a").arg(base).arg(dest).status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "copying {} failed",
                base.display()
            )));
        }
    }
    for layer in layers {
        apply(layer, dest)?;
    }
    Ok(())
}

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let name = c"trusted.overlay.opaque";
    let mut value = [0u8; 4];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn copy_owner_and_mode(from: &std::fs::Metadata, to: &Path) -> std::io::Result<()> {
    std::os::unix::fs::lchown(to, Some(from.uid()), Some(from.gid()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(from.mode() & 0o7777))
}

/// Applies one overlayfs upper dir to `dest`: whiteouts delete, opaque
/// directories replace, everything else is linked in.
fn apply(layer: &Path, dest: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(layer)? {
        let entry = entry?;
        let src = entry.path();
        let dst = dest.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src)?;
        if is_whiteout(&meta) {
            remove_any(&dst)?;
        } else if meta.is_dir() {
            let existing = std::fs::symlink_metadata(&dst).ok();
            match existing {
                Some(m) if m.is_dir() && !is_opaque(&src) => {}
                _ => {
                    remove_any(&dst)?;
                    std::fs::create_dir(&dst)?;
                }
            }
            copy_owner_and_mode(&meta, &dst)?;
            apply(&src, &dst)?;
        } else {
            remove_any(&dst)?;
            std::fs::hard_link(&src, &dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (mknod, trusted xattrs); runs under `cargo test` as root.
    #[test]
    fn root_flatten_applies_whiteouts_and_opaque_dirs() {
        if !nix_is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir_all(base.join("etc/old")).unwrap();
        std::fs::write(base.join("etc/old/x"), "x").unwrap();
        std::fs::write(base.join("etc/gone"), "g").unwrap();
        std::fs::write(base.join("etc/keep"), "k").unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("etc/old")).unwrap();
        std::fs::write(layer.join("etc/old/new"), "n").unwrap();
        std::fs::write(layer.join("etc/added"), "a").unwrap();
        let c = CString::new(layer.join("etc/gone").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path; a 0/0 char device is an overlayfs whiteout.
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0
        );
        let d = CString::new(layer.join("etc/old").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid strings and value.
        let r = unsafe {
            libc::lsetxattr(
                d.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(r, 0);
        let dest = dir.path().join("flat");
        flatten(&base, &[layer], &dest).unwrap();
        assert!(!dest.join("etc/gone").exists());
        assert!(!dest.join("etc/old/x").exists());
        assert_eq!(
            std::fs::read_to_string(dest.join("etc/old/new")).unwrap(),
            "n"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("etc/added")).unwrap(),
            "a"
        );
        assert_eq!(std::fs::read_to_string(dest.join("etc/keep")).unwrap(), "k");
        // The base is untouched.
        assert!(base.join("etc/gone").exists() && base.join("etc/old/x").exists());
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
