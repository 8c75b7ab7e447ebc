//! The host end of the NIC: a tap device opened through `/dev/net/tun` or inherited as fds.
//!
//! Every queue pair of the device owns one tap queue (a multiqueue tap when there is more than
//! one pair). Frames cross the tap with a virtio-net header in front of them, so checksum and
//! segmentation offloads pass between guest and host kernel untouched.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Errors while opening or configuring the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Attaching to the tap by name failed.
    #[error(transparent)]
    Open(#[from] citadel_tap::OpenError),
    /// An inherited fd is not a tap.
    #[error("fd {fd} is not a tap queue: {source}")]
    NotTap {
        /// The inherited fd.
        fd: RawFd,
        /// What the kernel said.
        source: io::Error,
    },
    /// An inherited tap lacks IFF_VNET_HDR or IFF_NO_PI.
    #[error("fd {fd} is a tap without IFF_VNET_HDR|IFF_NO_PI (flags {flags:#x})")]
    NoVnetHdr {
        /// The inherited fd.
        fd: RawFd,
        /// The flags the tap reports.
        flags: u32,
    },
    /// A tap ioctl failed.
    #[error("{what} on tap fd {fd}: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The tap fd.
        fd: RawFd,
        /// What the kernel said.
        source: io::Error,
    },
}

/// Offloads the guest accepted, which the tap may therefore hand us in received frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (VIRTIO_NET_F_GUEST_CSUM).
    pub csum: bool,
    /// TCPv4 segmentation (VIRTIO_NET_F_GUEST_TSO4).
    pub tso4: bool,
    /// TCPv6 segmentation (VIRTIO_NET_F_GUEST_TSO6).
    pub tso6: bool,
    /// UDP fragmentation (VIRTIO_NET_F_GUEST_UFO).
    pub ufo: bool,
}

impl Offloads {
    /// The TUNSETOFFLOAD flag word. Segmentation offloads are only valid with checksum offload.
    fn tun_flags(self, with_ufo: bool) -> libc::c_uint {
        if !self.csum {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.tso6 {
            flags |= libc::TUN_F_TSO6;
        }
        if self.ufo && with_ufo {
            flags |= libc::TUN_F_UFO;
        }
        flags
    }
}

/// One queue of a tap device, non-blocking, with a virtio-net header on every frame.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
}

impl TapQueue {
    /// Opens `queues` queues of the tap called `name`, creating it if it does not exist.
    pub fn open_by_name(name: &str, queues: usize) -> Result<Vec<TapQueue>, TapError> {
        citadel_tap::open_by_name(name, queues)?
            .into_iter()
            .map(|file| {
                let tap = TapQueue { file };
                tap.init()?;
                Ok(tap)
            })
            .collect()
    }

    /// Takes ownership of an inherited tap queue fd and checks that it is one.
    ///
    /// # Safety
    /// `fd` must be an open fd that nothing else in the process owns or will close.
    pub unsafe fn from_inherited_fd(fd: RawFd) -> Result<TapQueue, TapError> {
        // A number that names no open fd must not become a File (closing it later would close
        // whatever reuses the number).
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotTap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is open, and ownership is transferred to us by the caller's contract.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = citadel_tap::IfReq::zeroed();
        // SAFETY: TUNGETIFF writes a struct ifreq into `req`, which is large enough and live.
        let ret = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::NotTap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        let flags = req.flags as u16 as u32;
        let needed = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
        if flags & needed != needed {
            return Err(TapError::NoVnetHdr { fd, flags });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own, with integer arguments only.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::Ioctl {
                what: "fcntl(O_NONBLOCK)",
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: F_SETFD with an integer argument on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let tap = TapQueue { file };
        tap.init()?;
        Ok(tap)
    }

    /// A queue over a descriptor that passes frames whole, like a tap: one end of a
    /// `SOCK_SEQPACKET` socket pair, whose other end plays the network. Only for tests and
    /// the fuzz targets, which run without a tap device; the tap ioctls fail on it and are
    /// logged.
    #[cfg(any(test, fuzzing))]
    pub fn from_frame_socket(file: File) -> TapQueue {
        TapQueue { file }
    }

    /// Starts with no offloads (the guest has not accepted any yet) and the legacy 10-byte
    /// header; both are set again once the frontend acknowledges features.
    fn init(&self) -> Result<(), TapError> {
        self.set_offloads(Offloads::default())?;
        self.set_vnet_hdr_len(10)
    }

    /// Sets the virtio-net header length the tap expects in front of each frame.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let len = len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to `len`.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    /// Tells the tap which offloads it may use in frames it hands us. Kernels that no longer
    /// accept UFO get the other offloads alone.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
        let set = |flags: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
            unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    flags as libc::c_ulong,
                )
            }
        };
        if set(offloads.tun_flags(true)) == 0 {
            return Ok(());
        }
        if offloads.ufo && set(offloads.tun_flags(false)) == 0 {
            log::info!("tap refuses UFO offload; using checksum and TSO offloads only");
            return Ok(());
        }
        Err(self.ioctl_error("TUNSETOFFLOAD"))
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            what,
            fd: self.file.as_raw_fd(),
            source: io::Error::last_os_error(),
        }
    }

    /// Reads one frame (header included). `Ok(None)` when the tap has nothing queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        nonblocking(|| {
            // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
            unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
        })
    }

    /// Writes one frame (header included). `Ok(false)` when the tap queue is full.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<bool> {
        let written = nonblocking(|| {
            // SAFETY: `frame` is a valid readable buffer of `frame.len()` bytes.
            unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) }
        })?;
        Ok(written.is_some())
    }
}

/// Runs a read or write on the non-blocking tap, again when a signal interrupted it.
/// `Ok(None)` when the tap would block.
fn nonblocking(mut call: impl FnMut() -> isize) -> io::Result<Option<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_need_checksum() {
        let all = Offloads {
            csum: false,
            tso4: true,
            tso6: true,
            ufo: true,
        };
        assert_eq!(all.tun_flags(true), 0);
        let all = Offloads { csum: true, ..all };
        assert_eq!(
            all.tun_flags(true),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        assert_eq!(
            all.tun_flags(false),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(
                TapQueue::open_by_name(name, 1),
                Err(TapError::Open(citadel_tap::OpenError::BadName(_)))
            ));
        }
    }
}
