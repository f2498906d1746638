//! The unary file operations. Each runs on a blocking thread with the request
//! user's file-system credentials (see `creds`), so the kernel decides what
//! the user may touch.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use connectrpc::ConnectError;
use kiln_proto::filesystem::EntryInfo;

use super::entry::{Names, is_upload_temp};

/// Maps an I/O error about `path` to the Connect error the SDKs expect.
pub(crate) fn io_error(err: io::Error, path: &Path) -> ConnectError {
    let shown = path.display();
    match err.kind() {
        io::ErrorKind::NotFound => {
            ConnectError::not_found(format!("file or directory '{shown}' not found"))
        }
        io::ErrorKind::PermissionDenied => {
            ConnectError::permission_denied(format!("permission denied for '{shown}': {err}"))
        }
        io::ErrorKind::NotADirectory => {
            ConnectError::invalid_argument(format!("a parent of '{shown}' is not a directory"))
        }
        io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
            ConnectError::already_exists(format!("'{shown}' already exists: {err}"))
        }
        io::ErrorKind::IsADirectory => {
            ConnectError::invalid_argument(format!("'{shown}' is a directory"))
        }
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => {
            ConnectError::invalid_argument(format!("invalid path '{shown}': {err}"))
        }
        _ => ConnectError::internal(format!("'{shown}': {err}")),
    }
}

pub(crate) fn stat(path: &Path) -> Result<EntryInfo, ConnectError> {
    Names::default()
        .entry_info(path, path)
        .map_err(|e| io_error(e, path))
}

/// Creates every missing directory of `path` (mode 0755, owned by the
/// current fs user).
fn create_dirs(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
}

pub(crate) fn make_dir(path: &Path) -> Result<EntryInfo, ConnectError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(ConnectError::already_exists(format!(
                "directory '{}' already exists",
                path.display()
            )));
        }
        Ok(_) => {
            return Err(ConnectError::invalid_argument(format!(
                "path '{}' already exists and is not a directory",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(e, path)),
    }
    create_dirs(path).map_err(|e| io_error(e, path))?;
    stat(path)
}

pub(crate) fn rename(source: &Path, destination: &Path) -> Result<EntryInfo, ConnectError> {
    if let Err(e) = std::fs::symlink_metadata(source) {
        return Err(if e.kind() == io::ErrorKind::NotFound {
            ConnectError::not_found(format!("source '{}' not found", source.display()))
        } else {
            io_error(e, source)
        });
    }
    if let Some(parent) = destination.parent() {
        create_dirs(parent).map_err(|e| io_error(e, parent))?;
    }
    std::fs::rename(source, destination).map_err(|e| match e.raw_os_error() {
        Some(libc::EXDEV) => ConnectError::internal(format!(
            "cannot move '{}' to '{}': different file systems",
            source.display(),
            destination.display()
        )),
        _ => io_error(e, destination),
    })?;
    stat(destination)
}

/// `rm -rf`: a missing path is fine; a symlink is removed, not followed.
pub(crate) fn remove(path: &Path) -> Result<(), ConnectError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(e, path)),
    };
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(e, path)),
        _ => Ok(()),
    }
}

/// Lists `path` like Go's `filepath.WalkDir`: lexical depth-first pre-order,
/// the root excluded, symlinks not followed, at most `depth` levels deep.
/// A symlinked root is listed through its target but entries keep the
/// requested prefix.
pub(crate) fn list_dir(path: &Path, depth: u32) -> Result<Vec<EntryInfo>, ConnectError> {
    let depth = depth.max(1);
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            ConnectError::not_found(format!("directory '{}' not found", path.display()))
        }
        _ => io_error(e, path),
    })?;
    if !meta.is_dir() {
        return Err(ConnectError::invalid_argument(format!(
            "path '{}' is not a directory",
            path.display()
        )));
    }
    let real = std::fs::canonicalize(path).map_err(|e| io_error(e, path))?;
    let mut names = Names::default();
    let mut out = Vec::new();
    // The root must be readable; deeper unreadable directories are listed
    // as entries but not descended into.
    let children = sorted_children(&real).map_err(|e| io_error(e, path))?;
    walk(&mut names, &real, path, children, 1, depth, &mut out);
    Ok(out)
}

fn sorted_children(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    // Upload temp files are not part of the directory yet.
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| !is_upload_temp(n))
        .collect();
    names.sort();
    Ok(names)
}

fn walk(
    names: &mut Names,
    real_dir: &Path,
    shown_dir: &Path,
    children: Vec<std::ffi::OsString>,
    level: u32,
    depth: u32,
    out: &mut Vec<EntryInfo>,
) {
    for name in children {
        let real: PathBuf = real_dir.join(&name);
        let shown: PathBuf = shown_dir.join(&name);
        // Entries that vanish while walking are skipped.
        let Ok(info) = names.entry_info(&real, &shown) else {
            continue;
        };
        let descend = level < depth
            && !info.is_symlink
            && std::fs::symlink_metadata(&real).is_ok_and(|m| m.is_dir());
        out.push(info);
        if descend && let Ok(grandchildren) = sorted_children(&real) {
            walk(names, &real, &shown, grandchildren, level + 1, depth, out);
        }
    }
}
