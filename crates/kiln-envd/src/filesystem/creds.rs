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

/// setfsuid/setfsgid report no errors directly: a second call returns the
/// value actually in effect, which must be the requested one.
fn set_fs_id(nr: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: setfsuid/setfsgid take a plain integer and only touch this
    // thread's credentials.
    unsafe {
        libc::syscall(nr, id);
        if libc::syscall(nr, id) as u32 != id {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "cannot switch file-system credentials",
            ));
        }
    }
    Ok(())
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
        set_fs_id(libc::SYS_setfsgid, user.gid)?;
        set_fs_id(libc::SYS_setfsuid, user.uid)?;
        Ok(guard)
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        // The fs uid goes back first: returning it to 0 restores the file
        // capabilities. A failure here would leave a pooled thread with the
        // wrong identity, which must never happen silently.
        if set_fs_id(libc::SYS_setfsuid, 0).is_err()
            || set_fs_id(libc::SYS_setfsgid, 0).is_err()
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
}
