//! COPY sources: matching a path or glob in the build context (honouring
//! `.dockerignore`), refusing anything outside it, hashing the matched
//! files for the cache key and staging them for the build sandbox.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use globset::GlobMatcher;
use sha2::{Digest, Sha256};

/// `.dockerignore` rules: the last matching pattern decides; `!` re-includes.
#[derive(Default)]
pub struct IgnoreRules {
    rules: Vec<(GlobMatcher, bool)>,
}

impl IgnoreRules {
    /// Reads `context/.dockerignore` (none: nothing is ignored).
    pub fn load(context: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(context.join(".dockerignore")) {
            Ok(text) => Self::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("reading .dockerignore: {e}")),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negate, pattern) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
            let pattern = pattern.strip_prefix("./").unwrap_or(pattern);
            if pattern.is_empty() {
                continue;
            }
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| format!(".dockerignore pattern '{line}': {e}"))?;
            rules.push((glob.compile_matcher(), !negate));
        }
        Ok(Self { rules })
    }

    /// Whether `rel` (relative to the context) is excluded: a pattern
    /// matching a parent directory excludes everything below it.
    pub fn ignored(&self, rel: &Path) -> bool {
        let mut ignored = false;
        for (glob, excludes) in &self.rules {
            let mut prefix = PathBuf::new();
            let hit = rel.components().any(|c| {
                prefix.push(c);
                glob.is_match(&prefix)
            });
            if hit {
                ignored = *excludes;
            }
        }
        ignored
    }
}

/// One thing to copy, as staged: `stage_rel` is its path below the staging dir.
#[derive(Debug, Clone)]
pub struct Entry {
    pub source: PathBuf,
    pub stage_rel: PathBuf,
    pub kind: EntryKind,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryKind {
    File { size: u64 },
    Dir,
    Symlink(PathBuf),
}

/// A matched source: staged as `<index>/<name>` (a file) or `<index>/` (a
/// directory, whose contents are copied).
#[derive(Debug, Clone)]
pub struct Matched {
    pub index: usize,
    pub name: String,
    pub is_dir: bool,
    /// Names directly inside a matched directory (what lands in dest).
    pub top_names: Vec<String>,
}

/// What a COPY step copies.
#[derive(Debug, Default)]
pub struct Sources {
    pub matched: Vec<Matched>,
    pub entries: Vec<Entry>,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Lexically normalises `src` below the context; `None` when it leaves it.
fn normalise(src: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(src).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Finds what `src` names in `context`.
pub fn collect(context: &Path, src: &str) -> Result<Sources, String> {
    let root = context
        .canonicalize()
        .map_err(|e| format!("build context {}: {e}", context.display()))?;
    if src.starts_with('/') {
        return Err(format!(
            "source '{src}' is an absolute path; sources are relative to the build context"
        ));
    }
    let rel =
        normalise(src).ok_or_else(|| format!("source '{src}' is outside the build context"))?;
    let rules = IgnoreRules::load(&root)?;
    let mut tops: Vec<PathBuf> = Vec::new();
    if has_glob(src) {
        let pattern = rel.to_string_lossy().into_owned();
        let glob = globset::GlobBuilder::new(&pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("source pattern '{src}': {e}"))?
            .compile_matcher();
        for entry in walkdir::WalkDir::new(&root)
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| format!("reading the build context: {e}"))?;
            let r = entry.path().strip_prefix(&root).unwrap_or(entry.path());
            if glob.is_match(r) && !tops.iter().any(|t| r.starts_with(t)) {
                tops.push(r.to_path_buf());
            }
        }
    } else if rel.as_os_str().is_empty() {
        tops.push(PathBuf::new());
    } else {
        let path = root.join(&rel);
        std::fs::symlink_metadata(&path)
            .map_err(|_| format!("source '{src}' does not exist in the build context"))?;
        tops.push(rel);
    }
    tops.retain(|t| t.as_os_str().is_empty() || !rules.ignored(t));
    if tops.is_empty() {
        return Err(format!("no files in the build context match '{src}'"));
    }
    let mut out = Sources::default();
    for (index, top) in tops.iter().enumerate() {
        let path = root.join(top);
        // The matched path itself may be a symlink: it must stay in the context.
        let real = path
            .canonicalize()
            .map_err(|e| format!("source '{}': {e}", top.display()))?;
        if !real.starts_with(&root) {
            return Err(format!(
                "source '{}' is a symlink to {}, outside the build context",
                top.display(),
                real.display()
            ));
        }
        let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
        let name = top
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stage_dir = PathBuf::from(index.to_string());
        if meta.is_dir() {
            let mut top_names = Vec::new();
            out.entries.push(Entry {
                source: real.clone(),
                stage_rel: stage_dir.clone(),
                kind: EntryKind::Dir,
                mode: meta.mode() & 0o7777,
            });
            let mut walk = walkdir::WalkDir::new(&real)
                .min_depth(1)
                .sort_by_file_name()
                .into_iter();
            while let Some(entry) = walk.next() {
                let entry = entry.map_err(|e| format!("reading {}: {e}", real.display()))?;
                let inner = entry.path().strip_prefix(&real).unwrap_or(entry.path());
                let context_rel = real.strip_prefix(&root).unwrap_or(&real).join(inner);
                if rules.ignored(&context_rel) {
                    if entry.file_type().is_dir() {
                        walk.skip_current_dir();
                    }
                    continue;
                }
                if entry.depth() == 1 {
                    top_names.push(entry.file_name().to_string_lossy().into_owned());
                }
                out.entries
                    .push(entry_of(entry.path(), stage_dir.join(inner))?);
            }
            out.matched.push(Matched {
                index,
                name,
                is_dir: true,
                top_names,
            });
        } else {
            let name = if name.is_empty() { "file".into() } else { name };
            out.entries.push(entry_of(&real, stage_dir.join(&name))?);
            out.matched.push(Matched {
                index,
                name,
                is_dir: false,
                top_names: Vec::new(),
            });
        }
    }
    Ok(out)
}

fn entry_of(path: &Path, stage_rel: PathBuf) -> Result<Entry, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let kind = if meta.file_type().is_symlink() {
        // Kept as a link (it names a path in the image, not on this host).
        EntryKind::Symlink(
            std::fs::read_link(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )
    } else if meta.is_dir() {
        EntryKind::Dir
    } else if meta.is_file() {
        EntryKind::File { size: meta.len() }
    } else {
        return Err(format!(
            "{} is not a regular file, directory or symlink",
            path.display()
        ));
    };
    Ok(Entry {
        source: path.to_path_buf(),
        stage_rel,
        kind,
        mode: meta.mode() & 0o7777,
    })
}

impl Sources {
    /// Hash of everything copied: paths, modes, sizes, contents, link targets.
    pub fn hash(&self) -> Result<String, String> {
        let mut h = Sha256::new();
        for e in &self.entries {
            h.update(e.stage_rel.to_string_lossy().as_bytes());
            h.update([0]);
            h.update(e.mode.to_le_bytes());
            match &e.kind {
                EntryKind::Dir => h.update(b"d"),
                EntryKind::Symlink(t) => {
                    h.update(b"l");
                    h.update(t.to_string_lossy().as_bytes());
                }
                EntryKind::File { size } => {
                    h.update(b"f");
                    h.update(size.to_le_bytes());
                    let mut f = std::fs::File::open(&e.source)
                        .map_err(|err| format!("{}: {err}", e.source.display()))?;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(|err| format!("{}: {err}", e.source.display()))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
            }
            h.update([0]);
        }
        Ok(hex(&h.finalize()))
    }

    /// Copies everything into `stage`.
    pub fn stage(&self, stage: &Path) -> std::io::Result<()> {
        for e in &self.entries {
            let dst = stage.join(&e.stage_rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            match &e.kind {
                EntryKind::Dir => {
                    std::fs::create_dir_all(&dst)?;
                    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(e.mode))?;
                }
                EntryKind::Symlink(t) => std::os::unix::fs::symlink(t, &dst)?,
                EntryKind::File { .. } => {
                    std::fs::copy(&e.source, &dst)?;
                    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(e.mode))?;
                }
            }
        }
        Ok(())
    }
}

/// Whether `path` starts like a tar archive (plain, gzip, bzip2, xz, zstd).
pub fn is_archive(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let n = f.read(&mut head).unwrap_or(0);
    let head = &head[..n];
    head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(b"BZh")
        || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (n >= 262 && &head[257..262] == b"ustar")
}

/// Whether matched file `m` is a tar archive (ADD extracts those).
pub fn is_archive_staged(sources: &Sources, m: &Matched) -> bool {
    let rel = PathBuf::from(m.index.to_string()).join(&m.name);
    sources
        .entries
        .iter()
        .find(|e| e.stage_rel == rel)
        .is_some_and(|e| matches!(e.kind, EntryKind::File { .. }) && is_archive(&e.source))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("src/sub")).unwrap();
        std::fs::write(p.join("src/a.py"), "a").unwrap();
        std::fs::write(p.join("src/b.txt"), "b").unwrap();
        std::fs::write(p.join("src/sub/c.py"), "c").unwrap();
        std::fs::write(p.join("top.py"), "t").unwrap();
        dir
    }

    #[test]
    fn dockerignore_rules() {
        let r = IgnoreRules::parse("# c\n*.log\nbuild/\n!keep.log\n**/tmp\n").unwrap();
        assert!(r.ignored(Path::new("x.log")));
        assert!(!r.ignored(Path::new("keep.log")));
        assert!(!r.ignored(Path::new("dir/x.log")));
        assert!(r.ignored(Path::new("build/out/a.o")));
        assert!(r.ignored(Path::new("a/b/tmp/f")));
        assert!(!r.ignored(Path::new("src/main.rs")));
    }

    #[test]
    fn globs_and_dirs() {
        let ctx = context();
        let s = collect(ctx.path(), "src/*.py").unwrap();
        assert_eq!(s.matched.len(), 1);
        assert_eq!(s.matched[0].name, "a.py");
        let s = collect(ctx.path(), "src").unwrap();
        assert!(s.matched[0].is_dir);
        assert_eq!(s.matched[0].top_names, vec!["a.py", "b.txt", "sub"]);
        let s = collect(ctx.path(), "./src/../top.py").unwrap();
        assert_eq!(s.matched[0].name, "top.py");
        assert!(
            collect(ctx.path(), "*.rs")
                .unwrap_err()
                .contains("no files")
        );
        assert!(
            collect(ctx.path(), "missing")
                .unwrap_err()
                .contains("does not exist")
        );
    }

    #[test]
    fn sources_outside_the_context_are_refused() {
        let ctx = context();
        assert!(collect(ctx.path(), "../x").unwrap_err().contains("outside"));
        assert!(
            collect(ctx.path(), "src/../../x")
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            collect(ctx.path(), "/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        std::os::unix::fs::symlink("/etc", ctx.path().join("escape")).unwrap();
        assert!(
            collect(ctx.path(), "escape")
                .unwrap_err()
                .contains("outside")
        );
        // A symlink inside the context is followed.
        std::os::unix::fs::symlink("src/a.py", ctx.path().join("inner")).unwrap();
        assert!(collect(ctx.path(), "inner").is_ok());
    }

    #[test]
    fn dockerignore_is_honoured() {
        let ctx = context();
        std::fs::write(ctx.path().join(".dockerignore"), "src/*.txt\nsrc/sub\n").unwrap();
        let s = collect(ctx.path(), "src").unwrap();
        assert_eq!(s.matched[0].top_names, vec!["a.py"]);
        assert!(collect(ctx.path(), "src/b.txt").is_err());
    }

    #[test]
    fn hash_follows_content_and_mode() {
        let ctx = context();
        let h1 = collect(ctx.path(), "src").unwrap().hash().unwrap();
        assert_eq!(h1, collect(ctx.path(), "src").unwrap().hash().unwrap());
        std::fs::write(ctx.path().join("src/a.py"), "changed").unwrap();
        let h2 = collect(ctx.path(), "src").unwrap().hash().unwrap();
        assert_ne!(h1, h2);
        std::fs::set_permissions(
            ctx.path().join("src/a.py"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        assert_ne!(h2, collect(ctx.path(), "src").unwrap().hash().unwrap());
    }
}
