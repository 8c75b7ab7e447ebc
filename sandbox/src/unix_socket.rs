//! The Unix socket a backend listens on for its frontend.
//!
//! Whoever connects to a backend's socket becomes its frontend: it hands the backend guest
//! memory and eventfds and steers its I/O. So the socket file is created with mode 0600
//! whatever the process umask (only the backend's own uid, and root, can connect), and every
//! accepted connection is checked once more with `SO_PEERCRED` against the uids and gids the
//! operator allowed. The second check still holds when the file's mode or its directory is
//! wider than intended, or the listening descriptor is passed to another process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Connections waiting to be accepted; a backend serves one frontend at a time.
const BACKLOG: libc::c_int = 16;

/// Why the listening socket could not be created.
#[derive(Debug, thiserror::Error)]
#[error("listening on {}: {source}", path.display())]
pub struct ListenError {
    /// The socket path.
    pub path: PathBuf,
    /// What went wrong.
    pub source: io::Error,
}

/// Creates a listening Unix stream socket at `path`, mode 0600 whatever the umask.
///
/// A socket left at `path` by an earlier run is replaced; any other kind of file is refused.
/// The directory is not created: put the socket in a directory only its users can enter.
pub fn listen_private(path: &Path) -> Result<UnixListener, ListenError> {
    listen(path, 0o600)
}

/// Like [`listen_private`], with the permission bits `mode` (at most 0o777) instead of 0600.
pub fn listen(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let err = |source| ListenError {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the kernel wants a NUL-terminated path.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must have 1 to {} bytes and no NUL",
                addr.sun_path.len() - 1
            ),
        )));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked, then owned by the listener.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // The socket file takes its mode from the umask at bind time, and chmod after bind would
    // leave a window with the wider mode, so bind under a umask that leaves exactly `mode`.
    // The umask is per process: callers bind before they start threads that create files.
    let mask = 0o777 & !(mode & 0o777);
    // SAFETY: umask only swaps the process's file creation mask.
    let previous = unsafe { libc::umask(mask as libc::mode_t) };
    // SAFETY: `addr` is an initialised sockaddr_un and the length is its size.
    let bound = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    let bind_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::umask(previous) };
    if bound != 0 {
        return Err(err(bind_error));
    }
    // SAFETY: `fd` is a bound stream socket.
    if unsafe { libc::listen(fd, BACKLOG) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(listener)
}

/// Who is at the other end of a connection, as the kernel recorded it at `connect` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id of the peer (in this process's PID namespace; 0 when not visible there).
    pub pid: i32,
    /// Effective uid of the peer.
    pub uid: u32,
    /// Effective gid of the peer.
    pub gid: u32,
}

impl std::fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// Why a connecting peer is not served.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel did not say who the peer is.
    #[error("reading the peer's credentials: {0}")]
    Credentials(io::Error),
    /// The peer is neither an allowed uid nor in an allowed gid.
    #[error("peer {0} is not an allowed frontend (see --allow-uid and --allow-gid)")]
    Refused(PeerCredentials),
}

/// The uids and gids whose processes may be a backend's frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl PeerPolicy {
    /// Allows the calling process's effective uid, plus the extra `uids` and `gids`.
    pub fn own_uid_and(uids: &[u32], gids: &[u32]) -> PeerPolicy {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let mut all = vec![unsafe { libc::geteuid() }];
        all.extend_from_slice(uids);
        PeerPolicy {
            uids: all,
            gids: gids.to_vec(),
        }
    }

    /// Whether a peer with these credentials may be the frontend.
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        self.uids.contains(&peer.uid) || self.gids.contains(&peer.gid)
    }

    /// Reads the credentials of `stream`'s peer and checks them.
    pub fn check(&self, stream: &UnixStream) -> Result<PeerCredentials, PeerError> {
        let peer = peer_credentials(stream).map_err(PeerError::Credentials)?;
        if self.allows(&peer) {
            Ok(peer)
        } else {
            Err(PeerError::Refused(peer))
        }
    }
}

/// The credentials the kernel recorded for `stream`'s peer.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out-pointers sized for SO_PEERCRED's struct ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("citadel-sandbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn socket_is_0600_and_replaces_only_a_stale_socket() {
        let dir = scratch("listen");
        let path = dir.join("s.sock");
        let first = listen_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        drop(first);
        let listener = listen_private(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let peer = peer_credentials(&accepted).unwrap();
        // SAFETY: getpid/geteuid/getegid have no preconditions.
        let me = unsafe { (libc::getpid(), libc::geteuid(), libc::getegid()) };
        assert_eq!((peer.pid, peer.uid, peer.gid), me);
        assert!(PeerPolicy::own_uid_and(&[], &[]).check(&accepted).is_ok());
        drop(client);
        drop(listener);
        let _group = listen(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o660);
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(listen_private(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn policy_allows_own_uid_and_listed_ids_only() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let other = me.wrapping_add(4242);
        let peer = |uid, gid| PeerCredentials { pid: 1, uid, gid };
        let own = PeerPolicy::own_uid_and(&[], &[]);
        assert!(own.allows(&peer(me, 7)));
        assert!(!own.allows(&peer(other, 7)));
        let wide = PeerPolicy::own_uid_and(&[other], &[99]);
        assert!(wide.allows(&peer(other, 7)));
        assert!(wide.allows(&peer(other.wrapping_add(1), 99)));
        assert!(!wide.allows(&peer(other.wrapping_add(1), 98)));
    }
}
