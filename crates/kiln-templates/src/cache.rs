//! The layer cache.
//!
//! Every step has a key: sha256 over its parent's key, the step's content
//! (and for COPY/ADD, the content of the copied files). A step's result is
//! stored under its key as `layers/<first 24 hex digits>/`: `diff/` (the
//! overlayfs upper dir of the step; absent for steps that change no files)
//! and `done`, written last, holding the full key. A rebuild reuses every
//! layer up to the first step whose key changed.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::context::hex;
use crate::{StepKind, vars::shell_quote};

/// Hash of a sequence of fields (each length-prefixed, so fields cannot run together).
pub fn hash_fields(fields: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f);
    }
    hex(&h.finalize())
}

/// The key of a step on top of `parent`; `files` is the hash of a COPY's files.
pub fn step_key(parent: &str, step: &StepKind, files: Option<&str>) -> String {
    let text = step_text(step);
    hash_fields(&[
        b"kiln-step-v1",
        parent.as_bytes(),
        text.as_bytes(),
        files.unwrap_or_default().as_bytes(),
    ])
}

/// A step as the build log shows it (and as it enters its key). COPY's
/// context directory is left out: the files' hash stands for it.
pub fn step_text(step: &StepKind) -> String {
    let owner = |u: &Option<String>| {
        u.as_ref()
            .map(|u| format!("--chown={u} "))
            .unwrap_or_default()
    };
    let mode = |m: &Option<u32>| m.map(|m| format!("--chmod={m:o} ")).unwrap_or_default();
    match step {
        StepKind::Run { cmd, user: None } => format!("RUN {cmd}"),
        StepKind::Run { cmd, user: Some(u) } => format!("RUN (as {u}) {cmd}"),
        StepKind::Copy {
            src,
            dest,
            user,
            mode: m,
            ..
        } => format!("COPY {}{}{src} {dest}", owner(user), mode(m)),
        StepKind::Add {
            src,
            dest,
            user,
            mode: m,
            ..
        } => format!("ADD {}{}{src} {dest}", owner(user), mode(m)),
        StepKind::Env(pairs) => {
            let parts: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", shell_quote(v)))
                .collect();
            format!("ENV {}", parts.join(" "))
        }
        StepKind::Workdir(d) => format!("WORKDIR {d}"),
        StepKind::User { name, sudo: false } => format!("USER {name}"),
        StepKind::User { name, sudo: true } => format!("USER {name} (sudoer)"),
    }
}

/// The layer store under a cache directory.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
}

/// A cached layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Relative to the cache directory (short mount options).
    pub diff: Option<PathBuf>,
}

impl LayerStore {
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            root: cache_dir.to_path_buf(),
        }
    }

    fn rel_dir(key: &str) -> PathBuf {
        PathBuf::from("layers").join(&key[..24.min(key.len())])
    }

    /// The cached layer of `key`, if complete.
    pub fn get(&self, key: &str) -> Option<Layer> {
        let rel = Self::rel_dir(key);
        let done = std::fs::read_to_string(self.root.join(&rel).join("done")).ok()?;
        if done.trim() != key {
            return None;
        }
        let diff = rel.join("diff");
        Some(Layer {
            diff: self.root.join(&diff).is_dir().then_some(diff),
        })
    }

    /// Stores `upper` (moved, when given) as the layer of `key`, replacing
    /// an earlier one (a forced step).
    pub fn put(&self, key: &str, upper: Option<&Path>) -> std::io::Result<Layer> {
        let rel = Self::rel_dir(key);
        let dir = self.root.join(&rel);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let diff = match upper {
            Some(upper) => {
                std::fs::rename(upper, dir.join("diff"))?;
                Some(rel.join("diff"))
            }
            None => None,
        };
        std::fs::write(dir.join("done"), key)?;
        Ok(Layer { diff })
    }

    pub fn absolute(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str) -> StepKind {
        StepKind::Run {
            cmd: cmd.into(),
            user: None,
        }
    }

    #[test]
    fn keys_chain_and_change_with_content() {
        let a = step_key("base", &run("echo a"), None);
        assert_eq!(a, step_key("base", &run("echo a"), None));
        assert_ne!(a, step_key("base", &run("echo b"), None));
        assert_ne!(a, step_key("other-base", &run("echo a"), None));
        assert_ne!(
            a,
            step_key(
                "base",
                &StepKind::Run {
                    cmd: "echo a".into(),
                    user: Some("root".into())
                },
                None
            )
        );
        let copy = |ctx: &str| StepKind::Copy {
            context: ctx.into(),
            src: "a".into(),
            dest: "/a".into(),
            user: None,
            mode: None,
        };
        // The context directory does not matter, the files do.
        assert_eq!(
            step_key("p", &copy("/x"), Some("h1")),
            step_key("p", &copy("/y"), Some("h1"))
        );
        assert_ne!(
            step_key("p", &copy("/x"), Some("h1")),
            step_key("p", &copy("/x"), Some("h2"))
        );
        // Field boundaries matter.
        assert_ne!(hash_fields(&[b"ab", b"c"]), hash_fields(&[b"a", b"bc"]));
    }

    #[test]
    fn step_texts() {
        assert_eq!(step_text(&run("make")), "RUN make");
        assert_eq!(
            step_text(&StepKind::Env(vec![("A".into(), "x y".into())])),
            "ENV A='x y'"
        );
        assert_eq!(
            step_text(&StepKind::Copy {
                context: "/c".into(),
                src: "a".into(),
                dest: "/b/".into(),
                user: Some("user".into()),
                mode: Some(0o755)
            }),
            "COPY --chown=user --chmod=755 a /b/"
        );
    }

    #[test]
    fn store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::new(dir.path());
        let key = step_key("p", &run("x"), None);
        assert!(store.get(&key).is_none());
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        let layer = store.put(&key, Some(&upper)).unwrap();
        assert!(
            store
                .absolute(layer.diff.as_ref().unwrap())
                .join("etc")
                .is_dir()
        );
        assert!(store.get(&key).unwrap().diff.is_some());
        let empty = step_key("p", &StepKind::Env(vec![]), None);
        store.put(&empty, None).unwrap();
        assert!(store.get(&empty).unwrap().diff.is_none());
    }
}
