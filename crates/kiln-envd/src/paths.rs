//! Resolving user-given paths the way E2B's envd does.

use std::path::{Component, Path, PathBuf};

use crate::users::User;

/// Resolves `path` for `user`: `~` and `~/x` expand to the user's home,
/// relative paths are taken from `base` (the user's home when `None`), and
/// `.`/`..` are removed lexically so the result is absolute and clean.
pub fn resolve(path: &str, user: &User, base: Option<&Path>) -> PathBuf {
    let base = base.unwrap_or(&user.home);
    let joined = if path == "~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix("~/") {
        user.home.join(rest)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        base.join(path)
    };
    clean(&joined)
}

/// Lexically normalises an absolute path (like Go's `filepath.Clean`).
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: PathBuf::from("/home/user"),
            shell: "/bin/bash".into(),
        }
    }

    #[test]
    fn resolves_like_envd() {
        let u = user();
        assert_eq!(resolve("~", &u, None), PathBuf::from("/home/user"));
        assert_eq!(resolve("~/a/b", &u, None), PathBuf::from("/home/user/a/b"));
        assert_eq!(
            resolve("a.txt", &u, None),
            PathBuf::from("/home/user/a.txt")
        );
        assert_eq!(
            resolve("/tmp/../etc/./x", &u, None),
            PathBuf::from("/etc/x")
        );
        assert_eq!(resolve("../../..", &u, None), PathBuf::from("/"));
        assert_eq!(
            resolve("x", &u, Some(Path::new("/srv"))),
            PathBuf::from("/srv/x")
        );
    }
}
