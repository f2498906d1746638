//! `EntryInfo`: what envd reports about one file, directory or symlink.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use buffa::{EnumValue, MessageField};
use buffa_types::google::protobuf::Timestamp;
use kiln_proto::filesystem::{EntryInfo, FileType};

use crate::paths;
use crate::users;

/// xattrs under this prefix are a file's user metadata (`X-Metadata-*` on upload).
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

/// Stats `path` without following a final symlink and describes it.
/// `EntryInfo.path` is `path` as given.
pub fn entry_info(path: &Path) -> io::Result<EntryInfo> {
    Names::default().entry_info(path, path)
}

/// Caches uid/gid names while describing many entries (a directory listing
/// would otherwise re-read `/etc/passwd` for each one).
#[derive(Default)]
pub(crate) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| users::user_name(uid))
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| users::group_name(gid))
            .clone()
    }

    /// Describes the entry at `real` (not following a final symlink) and
    /// reports it under `shown` (the path the client asked about).
    pub(crate) fn entry_info(&mut self, real: &Path, shown: &Path) -> io::Result<EntryInfo> {
        let meta = std::fs::symlink_metadata(real)?;
        let mut info = EntryInfo {
            name: base_name(shown),
            path: shown.to_string_lossy().into_owned(),
            size: meta.size() as i64,
            mode: meta.mode() & 0o777,
            permissions: go_mode_string(&meta),
            owner: self.user(meta.uid()),
            group: self.group(meta.gid()),
            modified_time: MessageField::some(Timestamp {
                seconds: meta.mtime(),
                nanos: meta.mtime_nsec() as i32,
                ..Default::default()
            }),
            metadata: read_metadata(real).into_iter().collect(),
            ..Default::default()
        };
        let is_dir = if meta.file_type().is_symlink() {
            // A symlink reports its target's type and permission bits; a
            // dangling one is a file with the link's own bits.
            info.is_symlink = true;
            let (target, target_meta) = symlink_target(real);
            info.symlink_target = Some(target.to_string_lossy().into_owned());
            if let Some(target_meta) = &target_meta {
                info.mode = target_meta.mode() & 0o777;
            }
            target_meta.is_some_and(|m| m.is_dir())
        } else {
            meta.is_dir()
        };
        info.r#type = EnumValue::from(if is_dir {
            // E2B reports directories with size 0 (the SDK tests assert it).
            info.size = 0;
            FileType::FILE_TYPE_DIRECTORY
        } else {
            FileType::FILE_TYPE_FILE
        });
        Ok(info)
    }
}

/// The last path component, or `/` for the root (like Go's `filepath.Base`).
fn base_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string())
}

/// The absolute target of the symlink at `link` and the target's metadata.
/// A resolvable link gives its fully resolved target; a dangling one the
/// lexically joined link text and no metadata.
fn symlink_target(link: &Path) -> (PathBuf, Option<Metadata>) {
    if let Ok(resolved) = std::fs::canonicalize(link) {
        let meta = std::fs::metadata(&resolved).ok();
        return (resolved, meta);
    }
    let text = std::fs::read_link(link).unwrap_or_default();
    let parent = link.parent().unwrap_or(Path::new("/"));
    (paths::clean(&parent.join(text)), None)
}

/// Go's `fs.FileMode.String()` for what `os.Lstat` returns, e.g.
/// `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, `dtrwxrwxrwx`.
pub(crate) fn go_mode_string(meta: &Metadata) -> String {
    let ft = meta.file_type();
    let mode = meta.mode();
    // Go's type/flag letters in its bit order: d a l T L D p S u g c t ?.
    let flags = [
        ('d', ft.is_dir()),
        ('L', ft.is_symlink()),
        ('D', ft.is_block_device() || ft.is_char_device()),
        ('p', ft.is_fifo()),
        ('S', ft.is_socket()),
        ('u', mode & 0o4000 != 0),
        ('g', mode & 0o2000 != 0),
        ('c', ft.is_char_device()),
        ('t', mode & 0o1000 != 0),
    ];
    let mut out: String = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
    if out.is_empty() {
        out.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        out.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    out
}

/// The `user.e2b.*` xattrs of `path` (not following a final symlink), with
/// the prefix stripped. Unsupported or unreadable xattrs give an empty map.
pub(crate) fn read_metadata(path: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let Some(names) = list_xattrs(&cpath) else {
        return out;
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        if let Some(value) = get_xattr(&cpath, &cname) {
            out.insert(
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    out
}

/// Calls a size-then-fill xattr function, retrying if the value grows.
fn read_sized(mut call: impl FnMut(*mut libc::c_char, usize) -> isize) -> Option<Vec<u8>> {
    for _ in 0..4 {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return None;
        }
        if size == 0 {
            return Some(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        let got = call(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Some(buf);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
    }
    None
}

fn list_xattrs(path: &CString) -> Option<Vec<u8>> {
    read_sized(|buf, len| {
        // SAFETY: `path` is NUL-terminated; `buf` is null with len 0 (size
        // query) or points to `len` writable bytes.
        unsafe { libc::llistxattr(path.as_ptr(), buf, len) }
    })
}

fn get_xattr(path: &CString, name: &CString) -> Option<Vec<u8>> {
    read_sized(|buf, len| {
        // SAFETY: as in `list_xattrs`; `name` is NUL-terminated.
        unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.cast(), len) }
    })
}

/// Whether `name` (a base name) is a temp file of the upload handler.
pub(crate) fn is_upload_temp(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b".kiln-upload-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn go_style_mode_strings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let meta = std::fs::symlink_metadata(&file).unwrap();
        assert_eq!(go_mode_string(&meta), "-rw-r--r--");

        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let meta = std::fs::symlink_metadata(dir.path()).unwrap();
        assert_eq!(go_mode_string(&meta), "dtrwxrwxrwx");

        let link = dir.path().join("l");
        std::os::unix::fs::symlink("f", &link).unwrap();
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert_eq!(go_mode_string(&meta), "Lrwxrwxrwx");
    }

    #[test]
    fn describes_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::set_permissions(root.join("d"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("d", root.join("to-dir")).unwrap();
        std::os::unix::fs::symlink("missing", root.join("dangling")).unwrap();

        let info = entry_info(&root.join("to-dir")).unwrap();
        assert!(info.is_symlink);
        assert_eq!(info.r#type.as_known(), Some(FileType::FILE_TYPE_DIRECTORY));
        assert_eq!(
            info.symlink_target.as_deref(),
            Some(root.join("d").to_str().unwrap())
        );
        assert_eq!(info.mode, 0o755, "the target's permission bits");
        assert_eq!(info.size, 0, "directories have size 0");

        let info = entry_info(&root.join("dangling")).unwrap();
        assert_eq!(info.r#type.as_known(), Some(FileType::FILE_TYPE_FILE));
        assert_eq!(
            info.symlink_target.as_deref(),
            Some(root.join("missing").to_str().unwrap())
        );
    }

    #[test]
    fn reads_e2b_metadata_xattrs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let cpath = CString::new(file.as_os_str().as_bytes()).unwrap();
        let set = |name: &str, value: &str| {
            let cname = CString::new(name).unwrap();
            // SAFETY: NUL-terminated strings and a live value buffer.
            unsafe {
                libc::lsetxattr(
                    cpath.as_ptr(),
                    cname.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        };
        if set("user.e2b.owner", "alice") != 0 {
            // The file system does not support user xattrs.
            return;
        }
        set("user.other", "ignored");
        let meta = read_metadata(&file);
        assert_eq!(meta.len(), 1);
        assert_eq!(meta.get("owner").map(String::as_str), Some("alice"));
    }
}
