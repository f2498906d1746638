//! Users and groups, read from `/etc/passwd` and `/etc/group`.
//!
//! envd is a static binary without NSS, so it parses the files itself. They
//! are re-read on every lookup: templates and user commands may add users.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid username: '{0}'")]
    Unknown(String),
    #[error("reading {path}: {source}")]
    Io {
        path: &'static str,
        source: std::io::Error,
    },
}

/// A user processes and file operations can act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: String,
}

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

fn read(path: &'static str) -> Result<String, UserError> {
    std::fs::read_to_string(path).map_err(|source| UserError::Io { path, source })
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
    shell: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
            shell: f[6],
        })
    })
}

/// (name, gid, members) of each group.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

impl User {
    /// Looks a user up by name.
    pub fn lookup(name: &str) -> Result<User, UserError> {
        let passwd = read(PASSWD)?;
        let entry = passwd_entries(&passwd)
            .find(|e| e.name == name)
            .ok_or_else(|| UserError::Unknown(name.to_string()))?;
        let mut groups = vec![entry.gid];
        if let Ok(group) = read(GROUP) {
            for (_, gid, members) in group_entries(&group) {
                if members.contains(&name) && !groups.contains(&gid) {
                    groups.push(gid);
                }
            }
        }
        Ok(User {
            name: entry.name.to_string(),
            uid: entry.uid,
            gid: entry.gid,
            groups,
            home: PathBuf::from(if entry.home.is_empty() {
                "/"
            } else {
                entry.home
            }),
            shell: entry.shell.to_string(),
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// The name of `uid`, or the number as text when it has none.
pub fn user_name(uid: u32) -> String {
    read(PASSWD)
        .ok()
        .and_then(|p| {
            passwd_entries(&p)
                .find(|e| e.uid == uid)
                .map(|e| e.name.to_string())
        })
        .unwrap_or_else(|| uid.to_string())
}

/// The name of `gid`, or the number as text when it has none.
pub fn group_name(gid: u32) -> String {
    read(GROUP)
        .ok()
        .and_then(|g| {
            group_entries(&g)
                .find(|e| e.1 == gid)
                .map(|e| e.0.to_string())
        })
        .unwrap_or_else(|| gid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists() {
        let root = User::lookup("root").unwrap();
        assert_eq!(root.uid, 0);
        assert_eq!(root.home, PathBuf::from("/root"));
        assert_eq!(user_name(0), "root");
        assert_eq!(group_name(0), "root");
    }

    #[test]
    fn unknown_user_is_an_error() {
        let err = User::lookup("no-such-user-kiln").unwrap_err();
        assert_eq!(err.to_string(), "invalid username: 'no-such-user-kiln'");
    }
}
