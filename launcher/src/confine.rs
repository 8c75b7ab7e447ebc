//! What the launcher process may do once forked: keep its control socket and stderr, open and
//! read or write files (disk images, `/dev/net/tun`), create and remove snapshot directories,
//! execute the two backend binaries and nothing else, and make only the syscalls of the
//! `launcher` seccomp role.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;

use citadel_sandbox::{AccessFs, LandlockEnforcement};

use crate::LauncherConfig;

/// The descriptor number the control socket gets in the launcher.
pub(crate) const CONTROL_FD: RawFd = 3;

/// The tun clone device, one of the two places the launcher issues ioctls beneath.
const TUN: &str = "/dev/net/tun";

/// VFIO's container and group nodes: passthrough devices are opened here for the VMM.
const VFIO: &str = "/dev/vfio";

/// Why the launcher could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Rearranging descriptors failed.
    #[error("{what}: {source}")]
    Descriptors {
        /// The step.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// no_new_privs or Landlock failed.
    #[error("sandbox: {0}")]
    Sandbox(#[from] citadel_sandbox::Error),
    /// Landlock was asked for and the kernel has none.
    #[error("Landlock is required but this kernel does not enforce it (-sandbox landlock=off to run without)")]
    NoLandlock,
    /// The seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] citadel_seccomp::Error),
}

/// Sets no_new_privs and, when `config.landlock`, applies the launcher's Landlock ruleset:
/// read and write any file beneath "/", list, create and remove directories and regular files
/// (snapshot directories), issue ioctls on `/dev/net/tun` and beneath `/dev/vfio`, execute only `config.blk_binary`
/// and `config.net_binary`; no device node, FIFO, socket or symlink may be created, nothing
/// renamed or linked, no TCP port bound or connected, no process outside the launcher's
/// domain signalled.
///
/// Public so that a test can apply exactly the launcher's rules to a process of its own and
/// watch what it may execute.
pub fn restrict_filesystem(config: &LauncherConfig) -> Result<LandlockEnforcement, ConfineError> {
    citadel_sandbox::set_no_new_privs()?;
    if !config.landlock {
        log::warn!("launcher: Landlock off; the launcher may execute any program");
        return Ok(LandlockEnforcement::None);
    }
    let mut grants: Vec<(&Path, AccessFs)> = vec![
        (Path::new("/"), AccessFs::ReadFile),
        (Path::new("/"), AccessFs::WriteFile),
        // Snapshot directories: created or checked empty, their files created, and all of it
        // removed again when writing the snapshot failed.
        (Path::new("/"), AccessFs::ReadDir),
        (Path::new("/"), AccessFs::MakeDir),
        (Path::new("/"), AccessFs::MakeReg),
        (Path::new("/"), AccessFs::RemoveFile),
        (Path::new("/"), AccessFs::RemoveDir),
        (config.blk_binary.as_path(), AccessFs::Execute),
        (config.net_binary.as_path(), AccessFs::Execute),
    ];
    for device in [TUN, VFIO] {
        if Path::new(device).exists() {
            grants.push((Path::new(device), AccessFs::IoctlDev));
        }
    }
    match citadel_sandbox::restrict_filesystem_and_network(&grants)? {
        LandlockEnforcement::None => Err(ConfineError::NoLandlock),
        LandlockEnforcement::Partial => {
            log::warn!("launcher: Landlock partially enforced (older kernel ABI)");
            Ok(LandlockEnforcement::Partial)
        }
        LandlockEnforcement::Full => Ok(LandlockEnforcement::Full),
    }
}

/// First step in the freshly forked launcher: `control` becomes descriptor [`CONTROL_FD`],
/// stdin and stdout are `/dev/null` (so that no descriptor the launcher opens later takes their
/// numbers and leaks into a backend as its stdin or stdout), stderr stays for logs, every other
/// descriptor inherited from the VMM is closed.
pub(crate) fn keep_only_control(control: OwnedFd) -> Result<(), ConfineError> {
    let fail = |what| move |source| ConfineError::Descriptors { what, source };
    // SAFETY: dup3 onto CONTROL_FD; whatever held that number was inherited from the VMM and
    // is closed below anyway.
    if control.as_raw_fd() != CONTROL_FD
        && unsafe { libc::dup3(control.as_raw_fd(), CONTROL_FD, libc::O_CLOEXEC) } < 0
    {
        return Err(fail("moving the control socket")(io::Error::last_os_error()));
    }
    // From here on the socket is known by its number; the original descriptor is closed with
    // the others below, or replaced by /dev/null when it was stdin or stdout.
    let _ = control.into_raw_fd();
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(fail("opening /dev/null"))?
        .into_raw_fd();
    for target in [0, 1] {
        // SAFETY: dup2 onto stdin/stdout, which the launcher owns from now on (a no-op when
        // /dev/null already got that number).
        if unsafe { libc::dup2(null, target) } < 0 {
            return Err(fail("redirecting stdin and stdout")(
                io::Error::last_os_error(),
            ));
        }
    }
    // SAFETY: closes every descriptor above the control socket (the /dev/null descriptor too,
    // unless it is stdin or stdout); none is owned by an object still alive in this process,
    // which was just forked and owns nothing else.
    if unsafe { libc::syscall(libc::SYS_close_range, CONTROL_FD + 1, u32::MAX, 0) } < 0 {
        return Err(fail("closing inherited descriptors")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Last step: no_new_privs, Landlock, then the seccomp filter (compiled before the fork).
pub(crate) fn confine_launcher(
    config: &LauncherConfig,
    filter: &citadel_seccomp::CompiledFilter,
) -> Result<(), ConfineError> {
    restrict_filesystem(config)?;
    filter.install()?;
    Ok(())
}
