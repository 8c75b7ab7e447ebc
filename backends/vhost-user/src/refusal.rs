//! How a backend's message handler refuses a frontend request, and the one precaution it takes
//! with every ring descriptor it is handed.

use std::fs::File;
use std::os::fd::AsRawFd;

use vhost::vhost_user::Error as VhostError;

/// Refuses an operation the backend does not support; the frontend gets a negative ack and the
/// connection goes on.
pub fn refuse<T>(why: &'static str) -> Result<T, VhostError> {
    Err(VhostError::InvalidOperation(why))
}

/// Refuses a request whose values are wrong, saying which; the connection goes on.
pub fn bad_input(why: String) -> VhostError {
    VhostError::ReqHandlerError(std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
}

/// Makes a kick or call descriptor non-blocking, so that a worker never waits on the frontend
/// (a pipe nobody reads would otherwise stall it while it holds its queue).
pub fn nonblocking(file: &File) -> Result<(), VhostError> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; only the status flags change.
    let rc = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(VhostError::ReqHandlerError(std::io::Error::last_os_error()));
    }
    Ok(())
}
