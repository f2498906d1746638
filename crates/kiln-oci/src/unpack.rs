//! Applies image layers (tar archives, maybe compressed) to a root directory.
//!
//! Rules, so that a layer can never touch anything outside the root:
//! - absolute entry paths are taken relative to the root; a `..` component
//!   rejects the layer;
//! - a path is resolved component by component with `lstat`, and a symlink
//!   met on the way rejects the layer (a layer that plants `etc -> /` and then
//!   writes `etc/passwd` fails instead of writing the host's file);
//! - the last component is never followed either: an existing entry there is
//!   removed and replaced (files are created with `O_CREAT|O_EXCL|O_NOFOLLOW`);
//! - hard link targets are resolved by the same rules.
//!
//! Whiteouts follow the OCI image spec: `.wh.<name>` deletes `<name>` of the
//! lower layers, `.wh..wh..opq` empties its directory of everything the lower
//! layers put there (entries of the same layer stay). Ownership and modes are
//! kept (ownership only when running as root); device nodes are skipped
//! (logged), xattrs are not applied.
//!
//! The root must be a directory no one else writes to while a layer is being
//! applied (the puller uses a fresh temporary directory).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;
use tracing::{debug, info};

use crate::OciError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// `None` for a media type that is not a tar layer this crate can apply.
    pub fn for_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// What applying one layer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: usize,
    pub whiteouts: usize,
    pub skipped_devices: usize,
}

/// Applies the layer read from `blob` on top of `root`. `layer` names the
/// layer in errors (its digest).
pub fn apply_layer(
    root: &Path,
    blob: impl Read,
    compression: Compression,
    layer: &str,
) -> Result<LayerStats, OciError> {
    let bad = |detail: String| OciError::BadLayer {
        layer: layer.to_string(),
        detail,
    };
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(blob))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(blob)
                .map_err(|e| bad(format!("cannot start zstd decompression: {e}")))?,
        ),
    };
    let mut applier = Applier {
        root,
        layer,
        written: HashSet::new(),
        chown: nix::unistd::geteuid().is_root(),
        stats: LayerStats::default(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("cannot read the tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("cannot read the tar stream: {e}")))?;
        applier.apply(&mut entry)?;
    }
    if applier.stats.skipped_devices > 0 {
        info!(
            layer,
            count = applier.stats.skipped_devices,
            "skipped device nodes in the layer"
        );
    }
    Ok(applier.stats)
}

struct Applier<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Paths (relative to the root) this layer created, parents included:
    /// an opaque whiteout keeps them.
    written: HashSet<PathBuf>,
    chown: bool,
    stats: LayerStats,
}

impl Applier<'_> {
    fn unsafe_entry(&self, entry: &Path, reason: impl Into<String>) -> OciError {
        OciError::UnsafeLayer {
            layer: self.layer.to_string(),
            entry: entry.display().to_string(),
            reason: reason.into(),
        }
    }

    fn io_err(&self, entry: &Path, what: &str, e: io::Error) -> OciError {
        OciError::BadLayer {
            layer: self.layer.to_string(),
            detail: format!("entry '{}': {what}: {e}", entry.display()),
        }
    }

    /// The entry path as normal components relative to the root.
    fn sanitize(&self, raw: &Path) -> Result<PathBuf, OciError> {
        let mut out = PathBuf::new();
        for comp in raw.components() {
            match comp {
                Component::Normal(c) => out.push(c),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir => return Err(self.unsafe_entry(raw, "has a '..' component")),
                Component::Prefix(_) => return Err(self.unsafe_entry(raw, "has a path prefix")),
            }
        }
        Ok(out)
    }

    /// The directory `rel` inside the root, walked without following symlinks.
    /// With `create`, missing directories are made; without, `None` when it
    /// does not exist (or is not a directory).
    fn dir(&mut self, entry: &Path, rel: &Path, create: bool) -> Result<Option<PathBuf>, OciError> {
        let mut cur = self.root.to_path_buf();
        let mut cur_rel = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            cur_rel.push(comp);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.unsafe_entry(
                        entry,
                        format!(
                            "its parent '{}' is a symlink (paths in a layer are never resolved through symlinks)",
                            cur_rel.display()
                        ),
                    ));
                }
                Ok(_) if create => {
                    return Err(self.unsafe_entry(
                        entry,
                        format!("its parent '{}' is not a directory", cur_rel.display()),
                    ));
                }
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&cur)
                        .map_err(|e| self.io_err(entry, "creating a parent directory", e))?;
                    self.written.insert(cur_rel.clone());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(self.io_err(entry, "inspecting a parent directory", e)),
            }
        }
        Ok(Some(cur))
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), OciError> {
        let raw = entry
            .path()
            .map_err(|e| OciError::BadLayer {
                layer: self.layer.to_string(),
                detail: format!("entry with an unreadable path: {e}"),
            })?
            .into_owned();
        let rel = self.sanitize(&raw)?;
        self.stats.entries += 1;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Directory
            | EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Fifo => {}
            EntryType::Char | EntryType::Block => {
                // Sandboxes get their devices from the runtime.
                debug!(layer = self.layer, entry = %raw.display(), "skipping a device node");
                self.stats.skipped_devices += 1;
                return Ok(());
            }
            other => {
                // PAX global headers and the like: nothing to create.
                debug!(layer = self.layer, entry = %raw.display(), kind = ?other, "skipping an entry of an unhandled type");
                return Ok(());
            }
        }

        let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
            // The root itself ("./"): only its metadata can change.
            if kind == EntryType::Directory {
                return self.set_metadata(&raw, self.root, entry.header(), false);
            }
            return Err(self.unsafe_entry(&raw, "replaces the root directory"));
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();

        // Names are bytes: a non-UTF-8 name must come out unchanged.
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            self.stats.whiteouts += 1;
            let hidden = OsStr::from_bytes(hidden).to_os_string();
            return self.whiteout(&raw, &parent_rel, &name, &hidden);
        }

        let parent = self
            .dir(&raw, &parent_rel, true)?
            .ok_or_else(|| self.unsafe_entry(&raw, "its parent is not a directory"))?;
        let path = parent.join(&name);
        let existing = match fs::symlink_metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io_err(&raw, "inspecting", e)),
        };
        let header = entry.header().clone();

        match kind {
            EntryType::Directory => {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        remove_any(&path).map_err(|e| self.io_err(&raw, "replacing", e))?;
                        fs::create_dir(&path).map_err(|e| self.io_err(&raw, "mkdir", e))?;
                    }
                    None => fs::create_dir(&path).map_err(|e| self.io_err(&raw, "mkdir", e))?,
                }
                self.set_metadata(&raw, &path, &header, false)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                if existing.is_some() {
                    remove_any(&path).map_err(|e| self.io_err(&raw, "replacing", e))?;
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc_o_nofollow())
                    .open(&path)
                    .map_err(|e| self.io_err(&raw, "creating", e))?;
                io::copy(entry, &mut file).map_err(|e| self.io_err(&raw, "writing", e))?;
                self.set_file_metadata(&raw, &file, &header)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.io_err(&raw, "reading the symlink target", e))?
                    .ok_or_else(|| self.unsafe_entry(&raw, "symlink without a target"))?
                    .into_owned();
                if existing.is_some() {
                    remove_any(&path).map_err(|e| self.io_err(&raw, "replacing", e))?;
                }
                // The target is stored as is: it is only ever followed inside the sandbox.
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| self.io_err(&raw, "creating the symlink", e))?;
                self.set_metadata(&raw, &path, &header, true)?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(|e| self.io_err(&raw, "reading the hard link target", e))?
                    .ok_or_else(|| self.unsafe_entry(&raw, "hard link without a target"))?
                    .into_owned();
                let target_rel = self.sanitize(&target_raw).map_err(|_| {
                    self.unsafe_entry(
                        &raw,
                        format!(
                            "hard link target '{}' has a '..' component",
                            target_raw.display()
                        ),
                    )
                })?;
                let target_name = target_rel
                    .file_name()
                    .ok_or_else(|| self.unsafe_entry(&raw, "hard link to the root directory"))?;
                let target_parent = target_rel.parent().unwrap_or(Path::new(""));
                let source = self
                    .dir(&raw, target_parent, false)?
                    .map(|d| d.join(target_name))
                    .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()))
                    .ok_or_else(|| OciError::BadLayer {
                        layer: self.layer.to_string(),
                        detail: format!(
                            "entry '{}': hard link target '{}' is missing or a directory",
                            raw.display(),
                            target_raw.display()
                        ),
                    })?;
                if source == path {
                    return Ok(());
                }
                if existing.is_some() {
                    remove_any(&path).map_err(|e| self.io_err(&raw, "replacing", e))?;
                }
                // linkat(2) without AT_SYMLINK_FOLLOW: a symlink source is linked, not followed.
                fs::hard_link(&source, &path)
                    .map_err(|e| self.io_err(&raw, "creating the hard link", e))?;
            }
            EntryType::Fifo => {
                if existing.is_some() {
                    remove_any(&path).map_err(|e| self.io_err(&raw, "replacing", e))?;
                }
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| self.io_err(&raw, "mkfifo", io::Error::from(e)))?;
                self.set_metadata(&raw, &path, &header, false)?;
            }
            _ => unreachable!("entry types are filtered above"),
        }
        self.mark_written(&rel);
        Ok(())
    }

    fn mark_written(&mut self, rel: &Path) {
        let mut p = rel;
        loop {
            if !self.written.insert(p.to_path_buf()) {
                break; // Its parents are in already.
            }
            match p.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                _ => break,
            }
        }
    }

    fn whiteout(
        &mut self,
        raw: &Path,
        parent_rel: &Path,
        name: &OsStr,
        hidden: &OsStr,
    ) -> Result<(), OciError> {
        let Some(parent) = self.dir(raw, parent_rel, false)? else {
            return Ok(()); // Nothing below to hide.
        };
        if name == OPAQUE_MARKER {
            return self.clear_lower(raw, &parent, parent_rel);
        }
        if hidden.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // Other `.wh..wh.*` names are AUFS bookkeeping, not content.
            debug!(layer = self.layer, entry = %raw.display(), "skipping AUFS metadata");
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.as_bytes().contains(&b'/')
        {
            return Err(self.unsafe_entry(raw, "whiteout of an invalid name"));
        }
        remove_any(&parent.join(hidden)).map_err(|e| self.io_err(raw, "applying the whiteout", e))
    }

    /// Opaque directory: removes what lower layers put in `dir`, keeping what
    /// this layer wrote.
    fn clear_lower(&self, raw: &Path, dir: &Path, dir_rel: &Path) -> Result<(), OciError> {
        let read =
            fs::read_dir(dir).map_err(|e| self.io_err(raw, "reading an opaque directory", e))?;
        for child in read {
            let child = child.map_err(|e| self.io_err(raw, "reading an opaque directory", e))?;
            let child_rel = dir_rel.join(child.file_name());
            let child_path = child.path();
            if !self.written.contains(&child_rel) {
                remove_any(&child_path)
                    .map_err(|e| self.io_err(raw, "emptying an opaque directory", e))?;
            } else if fs::symlink_metadata(&child_path).is_ok_and(|m| m.is_dir()) {
                self.clear_lower(raw, &child_path, &child_rel)?;
            }
        }
        Ok(())
    }

    fn owner(&self, raw: &Path, header: &tar::Header) -> Result<(u32, u32), OciError> {
        let field = |v: io::Result<u64>, bytes: &[u8], what: &str| -> Result<u32, OciError> {
            // A blank field means 0 (as Go's archive/tar reads it).
            if v.is_err() && bytes.iter().all(|b| *b == 0 || *b == b' ') {
                return Ok(0);
            }
            let v = v.map_err(|e| self.io_err(raw, what, e))?;
            u32::try_from(v)
                .map_err(|_| self.unsafe_entry(raw, format!("{what} {v} is out of range")))
        };
        let old = header.as_old();
        Ok((
            field(header.uid(), &old.uid, "uid")?,
            field(header.gid(), &old.gid, "gid")?,
        ))
    }

    /// Owner, mode and mtime of a path that is not a regular file. Symlinks
    /// get only their owner (their mode is meaningless on Linux).
    fn set_metadata(
        &self,
        raw: &Path,
        path: &Path,
        header: &tar::Header,
        is_symlink: bool,
    ) -> Result<(), OciError> {
        if self.chown {
            let (uid, gid) = self.owner(raw, header)?;
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(|e| self.io_err(raw, "chown", e))?;
        }
        if is_symlink {
            return Ok(());
        }
        // After chown, which clears set-id bits.
        let mode = header.mode().map_err(|e| self.io_err(raw, "mode", e))? & 0o7777;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| self.io_err(raw, "chmod", e))?;
        Ok(())
    }

    fn set_file_metadata(
        &self,
        raw: &Path,
        file: &File,
        header: &tar::Header,
    ) -> Result<(), OciError> {
        if self.chown {
            let (uid, gid) = self.owner(raw, header)?;
            std::os::unix::fs::fchown(file, Some(uid), Some(gid))
                .map_err(|e| self.io_err(raw, "chown", e))?;
        }
        let mode = header.mode().map_err(|e| self.io_err(raw, "mode", e))? & 0o7777;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| self.io_err(raw, "chmod", e))?;
        if let Ok(mtime) = header.mtime() {
            let _ = file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
        }
        Ok(())
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Removes whatever is at `path` (a directory with its content), never
/// following a symlink; missing is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
