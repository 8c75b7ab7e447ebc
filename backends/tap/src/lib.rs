//! Attaching to a tap device by name through `/dev/net/tun`, and checking that a descriptor
//! passed by someone else is a tap served the same way.
//!
//! Every queue is attached with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and `IFF_MULTI_QUEUE`
//! when there is more than one), so that frames cross the tap whole, with a virtio-net header
//! in front of them. citadel-net opens its taps this way when given `--tap NAME`, and the
//! device launcher does the same before handing the queues to a citadel-net it starts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Errors while attaching to a tap.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `/dev/net/tun` could not be opened.
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// The interface name does not fit into `ifr_name`.
    #[error("tap name {0:?} is empty, too long (max 15 bytes) or contains a NUL")]
    BadName(String),
    /// TUNSETIFF refused to attach or create the interface.
    #[error("attaching queue {queue} of tap {name:?}: {source}")]
    Attach {
        /// Interface name.
        name: String,
        /// Queue being attached.
        queue: usize,
        /// What the kernel said.
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: the name and the flags.
#[repr(C)]
pub struct IfReq {
    /// Interface name, NUL-padded.
    pub name: [u8; libc::IFNAMSIZ],
    /// `IFF_*` flags.
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// An ifreq with no name and no flags.
    pub fn zeroed() -> IfReq {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// Opens `queues` queues of the tap called `name`, creating it if it does not exist (which
/// takes CAP_NET_ADMIN). Each queue is non-blocking and close-on-exec.
pub fn open_by_name(name: &str, queues: usize) -> Result<Vec<File>, OpenError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(OpenError::BadName(name.to_string()));
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    (0..queues)
        .map(|queue| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(OpenError::OpenTun)?;
            let mut req = IfReq::zeroed();
            // The flag values all fit in 16 bits (the kernel's ifr_flags is a short).
            req.flags = flags as libc::c_short;
            req.name[..bytes.len()].copy_from_slice(bytes);
            // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is a live, correctly
            // sized and laid out ifreq owned by this frame.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if ret < 0 {
                return Err(OpenError::Attach {
                    name: name.to_string(),
                    queue,
                    source: io::Error::last_os_error(),
                });
            }
            Ok(file)
        })
        .collect()
}

/// Why a descriptor cannot serve as a tap queue.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// TUNGETIFF failed: the descriptor is no tap (or tun) queue.
    #[error("descriptor {fd} is not a tap (TUNGETIFF: {source})")]
    NotTap {
        /// The descriptor.
        fd: i32,
        /// What the kernel said.
        source: io::Error,
    },
    /// The queue lacks one of `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    #[error(
        "descriptor {fd} is a queue of {name:?} with flags {flags:#x}: it must be a tap with IFF_NO_PI and IFF_VNET_HDR"
    )]
    Flags {
        /// The descriptor.
        fd: i32,
        /// The interface's name.
        name: String,
        /// Its `IFF_*` flags.
        flags: u32,
    },
}

/// Checks that `fd` is a queue of a tap attached as [`open_by_name`] attaches them
/// (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`); returns the tap's name.
pub fn check_tap(fd: BorrowedFd<'_>) -> Result<String, CheckError> {
    let mut req = IfReq::zeroed();
    // SAFETY: TUNGETIFF writes a struct ifreq into `req`, a live, correctly sized and laid
    // out ifreq owned by this frame; on a descriptor of another kind it fails.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
    if ret < 0 {
        return Err(CheckError::NotTap {
            fd: fd.as_raw_fd(),
            source: io::Error::last_os_error(),
        });
    }
    let len = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
    let flags = req.flags as u16 as u32;
    let needed = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
    if flags & needed != needed {
        return Err(CheckError::Flags {
            fd: fd.as_raw_fd(),
            name,
            flags,
        });
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(open_by_name(name, 1), Err(OpenError::BadName(_))));
        }
    }

    #[test]
    fn only_tap_queues_pass_the_check() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            check_tap(null.as_fd()),
            Err(CheckError::NotTap { .. })
        ));
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
