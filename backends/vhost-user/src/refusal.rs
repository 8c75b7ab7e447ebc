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

/// The `VhostUserBackendReqHandlerMut` methods for requests neither backend supports
/// (memory slots, device state transfer, shared memory regions, dirty logging), each refused
/// with [`refuse`]. Expands inside the trait's `impl`; the caller has `File`, `VhostError` and
/// the vhost-user message types in scope, as that impl needs them anyway.
#[macro_export]
macro_rules! refuse_unsupported_requests {
    () => {
        fn get_max_mem_slots(&mut self) -> Result<u64, VhostError> {
            $crate::refusal::refuse("CONFIGURE_MEM_SLOTS is not supported")
        }

        fn add_mem_region(
            &mut self,
            _region: &VhostUserSingleMemoryRegion,
            _fd: File,
            _postcopy_listening: Option<bool>,
        ) -> Result<Option<u64>, VhostError> {
            $crate::refusal::refuse("CONFIGURE_MEM_SLOTS is not supported")
        }

        fn remove_mem_region(
            &mut self,
            _region: &VhostUserSingleMemoryRegion,
        ) -> Result<(), VhostError> {
            $crate::refusal::refuse("CONFIGURE_MEM_SLOTS is not supported")
        }

        fn set_device_state_fd(
            &mut self,
            _direction: VhostTransferStateDirection,
            _phase: VhostTransferStatePhase,
            _fd: File,
        ) -> Result<Option<File>, VhostError> {
            $crate::refusal::refuse("device state transfer is not supported")
        }

        fn check_device_state(&mut self) -> Result<(), VhostError> {
            $crate::refusal::refuse("device state transfer is not supported")
        }

        fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig, VhostError> {
            $crate::refusal::refuse("shared memory regions are not supported")
        }

        fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<(), VhostError> {
            $crate::refusal::refuse("dirty logging is not supported")
        }
    };
}
