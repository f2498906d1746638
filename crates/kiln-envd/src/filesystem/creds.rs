//! Running file operations with a request user's file-system credentials.
//!
//! envd runs as root, but a request acting as `user` must not reach what that
//! user could not. Rather than re-implementing the kernel's access rules
//! (mode bits, groups, sticky directories, ACLs), the calling thread switches
//! its fs uid/gid and supplementary groups for the duration of the operation.
//! Linux keeps these credentials per thread (glibc only broadcasts them to all
//! threads in its wrappers, so the raw syscalls are used), and switching the
//! fs uid away from 0 drops the file capabilities such as `CAP_DAC_OVERRIDE`.
//! New files and directories then belong to the user without a `chown`.
//!
//! gVisor has no setfsuid/setfsgid (ENOSYS). There the thread switches its
//! *effective* uid/gid instead (`setresuid(-1, uid, -1)`), keeping real and
//! saved ids at 0 so it can switch back; gVisor checks file access against
//! the effective ids, and leaving euid 0 drops the effective capabilities
//! the same way.

use std::io;

use crate::users::User;

/// Runs `f` with `user`'s file-system credentials on the current thread.
///
/// Call it only on a thread that may block (e.g. inside `spawn_blocking`):
/// the credentials are restored before it returns, even when `f` panics.
/// Fails only when the credentials cannot be switched.
pub fn as_user<T>(user: &User, f: impl FnOnce() -> T) -> io::Result<T> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if user.uid == euid || euid != 0 {
        // Either nothing to switch or no privilege to do it: act as ourselves.
        return Ok(f());
    }
    let _guard = Switched::enter(user)?;
    Ok(f())
}

/// Restores root's fs credentials when dropped.
struct Switched {
    saved_groups: Vec<libc::gid_t>,
}

fn raw_setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t; the
    // syscall only reads it. The raw syscall changes this thread only.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a zero size only asks for the number of groups.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: the buffer holds exactly `n` entries.
    let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(got as usize);
    Ok(groups)
}

/// Whether the kernel has setfsuid/setfsgid (Linux does, gVisor does not).
fn have_fs_ids() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        // SAFETY: an invalid id (-1) changes nothing; the call only reports
        // the current fs uid, or fails with ENOSYS where it does not exist.
        let rc = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) };
        !(rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS))
    })
}

/// Which id a switch changes.
#[derive(Clone, Copy)]
enum Id {
    Uid,
    Gid,
}

/// Sets this thread's fs uid or gid, or its effective one where there are
/// no fs ids (see the module docs).
fn set_id(which: Id, id: u32) -> io::Result<()> {
    let failed = || {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "cannot switch file-system credentials",
        )
    };
    if have_fs_ids() {
        let nr = match which {
            Id::Uid => libc::SYS_setfsuid,
            Id::Gid => libc::SYS_setfsgid,
        };
        // SAFETY: setfsuid/setfsgid take a plain integer and only touch this
        // thread's credentials. They report no errors directly: a second
        // call returns the value in effect, which must be the requested one.
        unsafe {
            libc::syscall(nr, id);
            if libc::syscall(nr, id) as u32 != id {
                return Err(failed());
            }
        }
        return Ok(());
    }
    set_effective_id(which, id).map_err(|_| failed())
}

/// Sets this thread's effective uid or gid, keeping the real and saved ones.
fn set_effective_id(which: Id, id: u32) -> io::Result<()> {
    let nr = match which {
        Id::Uid => libc::SYS_setresuid,
        Id::Gid => libc::SYS_setresgid,
    };
    let keep = u32::MAX; // -1: leave the real and saved ids as they are
    // SAFETY: plain integers; the raw syscall changes this thread only.
    let rc = unsafe { libc::syscall(nr, keep, id, keep) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Switched {
    fn enter(user: &User) -> io::Result<Switched> {
        let saved_groups = current_groups()?;
        let guard = Switched { saved_groups };
        // From here on Drop restores whatever was changed.
        let mut groups: Vec<libc::gid_t> = user.groups.clone();
        if !groups.contains(&user.gid) {
            groups.push(user.gid);
        }
        raw_setgroups(&groups)?;
        set_id(Id::Gid, user.gid)?;
        set_id(Id::Uid, user.uid)?;
        Ok(guard)
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        // The fs uid goes back first: returning it to 0 restores the file
        // capabilities. A failure here would leave a pooled thread with the
        // wrong identity, which must never happen silently.
        if set_id(Id::Uid, 0).is_err()
            || set_id(Id::Gid, 0).is_err()
            || raw_setgroups(&self.saved_groups).is_err()
        {
            tracing::error!("cannot restore root file-system credentials; aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_credentials() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let Ok(user) = User::lookup("user") else {
            return;
        };
        let before = current_groups().unwrap();
        let denied = as_user(&user, || std::fs::read_dir("/root").map(|_| ())).unwrap();
        assert_eq!(
            denied.unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "user must not list /root"
        );
        assert!(std::fs::read_dir("/root").is_ok(), "root again afterwards");
        assert_eq!(current_groups().unwrap(), before);
    }

    #[test]
    fn effective_id_fallback_restores_root() {
        // The path gVisor takes, exercised on Linux on its own thread.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let Ok(user) = User::lookup("user") else {
            return;
        };
        std::thread::spawn(move || {
            set_effective_id(Id::Gid, user.gid).unwrap();
            set_effective_id(Id::Uid, user.uid).unwrap();
            let err = std::fs::read_dir("/root").map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
            set_effective_id(Id::Uid, 0).unwrap();
            set_effective_id(Id::Gid, 0).unwrap();
            assert!(std::fs::read_dir("/root").is_ok(), "root again afterwards");
        })
        .join()
        .unwrap();
    }
}
