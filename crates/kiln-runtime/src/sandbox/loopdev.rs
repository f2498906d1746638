//! Loop devices, attached with `LOOP_CONFIGURE` (Linux 5.8+) so that the
//! device is set up in one ioctl and detaches itself once unmounted.
//! libc has no bindings for these, so the kernel's structs are here.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches `backing` to a free loop device that detaches itself when its
/// last user (the mount) goes away. Returns the device's path and an open
/// handle: keep it until the device is mounted.
pub(crate) fn attach(backing: &File) -> std::io::Result<(PathBuf, File)> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process can take the free device between the two ioctls.
    let mut last = None;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        // Direct I/O keeps the data out of the host's page cache a second
        // time; a backing filesystem without O_DIRECT gets buffered I/O.
        for flags in [LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO, LO_FLAGS_AUTOCLEAR] {
            // SAFETY: all-zero is a valid loop_config (plain integers and arrays).
            let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
            cfg.fd = backing.as_raw_fd() as u32;
            cfg.block_size = 4096;
            cfg.info.lo_flags = flags;
            // SAFETY: cfg is a valid loop_config that outlives the call; the
            // kernel only reads it.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
            if r == 0 {
                return Ok((path, dev));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => continue,
                _ => {
                    last = Some(err);
                    break;
                }
            }
        }
        if last.as_ref().and_then(|e| e.raw_os_error()) != Some(libc::EBUSY) {
            break;
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free loop device")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel() {
        // Sizes from <linux/loop.h> on 64-bit Linux.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
