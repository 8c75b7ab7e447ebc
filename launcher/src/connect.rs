//! Connecting to a vhost-user backend the user started (QMP `chardev-add` of a Unix socket):
//! the VMM, confined, may create no socket, so the launcher connects on its behalf and hands
//! the connected socket back.
//!
//! The path is resolved from the launcher's "/" (the jail's root when jailed), like an image
//! path, and the connection attempt is bounded: a listener whose backlog is full makes the
//! attempt wait, which must not hold the VMM's event loop for long.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How long a connection attempt may wait for a listener with a full backlog.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest socket path: `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a Unix socket could not be connected; QEMU's words for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The path cannot name a Unix socket.
    #[error("Invalid socket path '{path}': {why}")]
    Path {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `socket`, `setsockopt` or `connect` failed.
    #[error("Failed to connect to '{path}': {source}")]
    Connect {
        /// The path as given.
        path: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// Connects a close-on-exec Unix stream socket to `path` (a relative path is taken from "/").
pub fn connect_unix(path: &str) -> Result<OwnedFd, ConnectError> {
    let refuse = |why| ConnectError::Path {
        path: path.to_string(),
        why,
    };
    if path.is_empty() {
        return Err(refuse("it is empty"));
    }
    if path.contains('\0') {
        return Err(refuse("it contains a NUL byte"));
    }
    let absolute = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if absolute.len() > MAX_SOCKET_PATH {
        return Err(refuse("a Unix socket path is at most 107 bytes"));
    }
    let fail = |source| ConnectError::Connect {
        path: path.to_string(),
        source,
    };
    // SAFETY: socket takes no pointers; a new descriptor or -1 is returned.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // A Unix stream connect waits for room in the listener's backlog at most as long as the
    // socket's send timeout.
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt on a socket this function owns, with a live timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: sockaddr_un is plain data; zeroed is a valid empty address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(absolute.bytes()) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + absolute.len() + 1;
    loop {
        // SAFETY: `addr` is a live sockaddr_un whose first `len` bytes hold the family and
        // the NUL-terminated path (checked above to fit).
        let rc = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(socket);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(fail(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn connects_to_a_listener_and_refuses_what_cannot_be_one() {
        let dir = std::env::temp_dir().join(format!("citadel-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let socket = connect_unix(path.to_str().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut ours = UnixStream::from(socket);
        ours.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        peer.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");

        let missing = dir.join("missing.sock");
        let err = connect_unix(missing.to_str().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Failed to connect to '{}': No such file or directory (os error 2)",
                missing.display()
            )
        );
        // A regular file is no socket.
        let file = dir.join("file");
        std::fs::write(&file, b"").unwrap();
        let err = connect_unix(file.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("Connection refused"), "{err}");
        assert!(matches!(connect_unix(""), Err(ConnectError::Path { .. })));
        assert!(matches!(
            connect_unix(&"/x".repeat(60)),
            Err(ConnectError::Path { .. })
        ));
        assert!(matches!(
            connect_unix("a\0b"),
            Err(ConnectError::Path { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
