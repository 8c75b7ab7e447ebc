//! What the VMM and the launcher say to each other: one JSON object per `SOCK_SEQPACKET`
//! message, descriptors alongside in `SCM_RIGHTS`.
//!
//! The launcher reads what the VMM sends as it would read a peer it does not trust: a message
//! or a descriptor list larger than the bounds below is refused whole (and the descriptors that
//! came with it closed), and every descriptor count must match what the request says.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// Largest message either side sends: a request naming a path of `PATH_MAX` bytes fits.
pub const MAX_MESSAGE: usize = 8192;

/// Most descriptors one message carries: a tap queue per queue pair of citadel-net (at most
/// 16), or one image, or one socket, or the three of a snapshot directory.
pub const MAX_FDS: usize = 16;

/// Longest serial number of a disk: the 20 bytes of virtio-blk's GET_ID.
pub const MAX_SERIAL_LEN: usize = 20;

/// Whether `serial` can be a disk's serial number: at most [`MAX_SERIAL_LEN`] bytes of
/// printable ASCII, spaces included.
pub fn valid_serial(serial: &str) -> bool {
    serial.len() <= MAX_SERIAL_LEN && serial.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

/// Most host PCI functions one VM has passed through at once.
pub const MAX_VFIO_DEVICES: usize = citadel_pci::address::MAX_HOST_FUNCTIONS;

/// One region of a VFIO device, as the kernel describes it (`struct vfio_region_info`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VfioRegion {
    /// The region's index (`VFIO_PCI_*_REGION_INDEX`).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Its size in bytes; 0 when the function does not implement it.
    pub size: u64,
    /// Where it starts in the device file.
    pub offset: u64,
}

/// What the VMM is told of a function opened for passthrough.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VfioInfo {
    /// Its BARs (indexes 0 to 5), expansion ROM (6) and configuration space (7).
    pub regions: Vec<VfioRegion>,
    /// MSI vectors it has.
    pub msi_vectors: u32,
    /// MSI-X vectors it has.
    pub msix_vectors: u32,
}

/// A request from the VMM.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Start citadel-blk; the image is `path`, or else the one descriptor sent along.
    SpawnBlk {
        /// Device id, for logs.
        id: String,
        /// Image path, resolved with "/" as root; absent when the image descriptor is sent.
        path: Option<String>,
        /// Serve the image read-only.
        read_only: bool,
        /// Open the image with O_DIRECT.
        direct: bool,
        /// The disk's serial number (GET_ID), at most [`MAX_SERIAL_LEN`] printable ASCII
        /// bytes.
        #[serde(default)]
        serial: Option<String>,
    },
    /// Start citadel-net on the tap queue descriptors sent along (one per queue pair).
    SpawnNet {
        /// Device id, for logs.
        id: String,
        /// MAC address of the device.
        mac: Option<[u8; 6]>,
    },
    /// Attach one queue of the tap called `name` (creating the tap when it is missing) and
    /// send it back.
    OpenTap {
        /// The tap's interface name.
        name: String,
    },
    /// Connect to the Unix socket at `path` (resolved with "/" as root) and send the
    /// connected socket back.
    Connect {
        /// The socket's path.
        path: String,
    },
    /// Stop one backend the launcher started.
    Stop {
        /// Its process id.
        pid: i32,
    },
    /// Create the snapshot directory `path` (resolved with "/" as root) or take it empty,
    /// create its two files, and send the directory, memory and state descriptors back.
    CreateSnapshot {
        /// The directory.
        path: String,
    },
    /// Open the host PCI function `host` (`dddd:bb:dd.f`) for passthrough and send back the
    /// descriptors of its VFIO container and device.
    OpenVfio {
        /// The function's address.
        host: String,
    },
    /// Release a function [`Request::OpenVfio`] opened; the VMM has closed its descriptors.
    CloseVfio {
        /// The function's address.
        host: String,
    },
    /// Remove both files of the snapshot directory `path`, and the directory itself when
    /// `remove_dir`.
    RemoveSnapshot {
        /// The directory.
        path: String,
        /// Whether the directory goes too (it was created for the snapshot).
        remove_dir: bool,
    },
}

/// The launcher's answer to a request (and, unsolicited, to its own start).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// The launcher is confined and waits for requests.
    Ready,
    /// A backend runs; its vhost-user socket comes along.
    Spawned {
        /// The backend's process id.
        pid: i32,
    },
    /// The socket asked for is connected; it comes along.
    Connected,
    /// The backend is gone and reaped.
    Stopped,
    /// The snapshot directory is ready; its directory, memory and state descriptors come
    /// along, in that order.
    SnapshotCreated {
        /// Whether the directory was created for this snapshot.
        created_dir: bool,
    },
    /// The snapshot's files are gone.
    SnapshotRemoved,
    /// The function is open for passthrough; the container's and the device's descriptors
    /// come along, in that order.
    VfioOpened(VfioInfo),
    /// The function is released.
    VfioClosed,
    /// The tap queue asked for is attached; it comes along.
    TapOpened,
    /// The request failed; the text is one line for the user.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Sends `value` and `fds` as one message.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, value: &T, fds: &[RawFd]) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message of {} bytes and {} descriptors is over the bounds ({MAX_MESSAGE}, {MAX_FDS})",
                bytes.len(),
                fds.len()
            ),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = ControlBuffer::new();
    // SAFETY: msghdr is plain data; every pointer field is set below or stays null.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        msg.msg_control = control.as_mut_ptr();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds MAX_FDS descriptors and `space` is at most that,
        // so the first header and its data lie within it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    loop {
        // SAFETY: `msg` points to the live iovec and control buffer above.
        let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message. `Ok(None)` when the other side has closed its end.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    // One byte more than the largest message, so that a longer one shows as truncated.
    let mut bytes = vec![0u8; MAX_MESSAGE + 1];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut control = ControlBuffer::new();
    // SAFETY: msghdr is plain data; the pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr();
    msg.msg_controllen = ControlBuffer::LEN;
    let received = loop {
        // SAFETY: `msg` points to the live buffers above, whose lengths it states.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // Taken first, so that every descriptor that arrived is closed on any refusal below.
    let fds = take_descriptors(&msg);
    if received == 0 && fds.is_empty() {
        return Ok(None);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 || received > MAX_MESSAGE {
        return Err(invalid(format!("message longer than {MAX_MESSAGE} bytes")));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(invalid(format!("more than {MAX_FDS} descriptors")));
    }
    let value = serde_json::from_slice(&bytes[..received])
        .map_err(|e| invalid(format!("malformed message: {e}")))?;
    Ok(Some((value, fds)))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Collects the descriptors of every `SCM_RIGHTS` header in `msg`.
fn take_descriptors(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within msg_controllen,
    // and each SCM_RIGHTS header carries (cmsg_len - CMSG_LEN(0)) / 4 descriptors the kernel
    // has just installed in this process, owned by nobody else yet.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}

/// Room for one `SCM_RIGHTS` header with [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
struct ControlBuffer([u64; ControlBuffer::WORDS]);

impl ControlBuffer {
    /// CMSG_SPACE(MAX_FDS * 4) on 64-bit Linux: a 16-byte header and 64 bytes of data.
    const LEN: usize = 16 + MAX_FDS * std::mem::size_of::<RawFd>();
    const WORDS: usize = Self::LEN / 8;

    fn new() -> Self {
        ControlBuffer([0; Self::WORDS])
    }

    fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: two fresh descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn control_buffer_matches_cmsg_space() {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
        assert_eq!(ControlBuffer::LEN, space);
    }

    #[test]
    fn request_and_descriptors_round_trip() {
        let (a, b) = seqpacket_pair();
        let (extra, _keep) = UnixDatagram::pair().unwrap();
        let request = Request::SpawnNet {
            id: "net0".into(),
            mac: Some([2, 0, 0, 0, 0, 1]),
        };
        send(a.as_fd(), &request, &[extra.as_raw_fd()]).unwrap();
        let (got, fds) = recv::<Request>(b.as_fd()).unwrap().unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 1);
        drop(a);
        assert!(recv::<Request>(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn oversized_and_malformed_messages_are_refused() {
        let (a, b) = seqpacket_pair();
        let big = vec![b'x'; MAX_MESSAGE + 100];
        // SAFETY: sends a live buffer of the stated length.
        let sent = unsafe { libc::send(a.as_raw_fd(), big.as_ptr().cast(), big.len(), 0) };
        assert_eq!(sent as usize, big.len());
        let err = recv::<Request>(b.as_fd()).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        let junk = br#"{"request":"spawn-blk","id":"x","surprise":1}"#;
        // SAFETY: as above.
        unsafe { libc::send(a.as_raw_fd(), junk.as_ptr().cast(), junk.len(), 0) };
        let err = recv::<Request>(b.as_fd()).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, b) = seqpacket_pair();
        let (s, _keep) = UnixDatagram::pair().unwrap();
        let fds = vec![s.as_raw_fd(); MAX_FDS + 1];
        let payload = std::mem::size_of_val(fds.as_slice());
        let bytes = br#"{"request":"stop","pid":1}"#;
        // SAFETY: a message with one SCM_RIGHTS header of MAX_FDS + 1 descriptors built in a
        // buffer large enough for it.
        unsafe {
            let space = libc::CMSG_SPACE(payload as u32) as usize;
            let mut control = vec![0u64; space.div_ceil(8)];
            let mut iov = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
            assert!(libc::sendmsg(a.as_raw_fd(), &msg, 0) > 0);
        }
        let err = recv::<Request>(b.as_fd()).unwrap_err();
        assert!(err.to_string().contains("descriptors"), "{err}");
    }
}
