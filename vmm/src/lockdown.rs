//! What the VMM gives up once the VM is built: new privileges, the filesystem (Landlock) and,
//! per thread, every syscall its role does not need (seccomp).
//!
//! Landlock is applied once, on the main thread before the vCPU threads exist, so that every
//! thread lives in the same Landlock domain (threads inherit it). Seccomp filters are installed
//! by each thread on itself, so that each role carries its own allowlist.

use std::path::Path;

use citadel_sandbox::{AccessFs, LandlockEnforcement};
use citadel_seccomp::{CompiledFilter, Mode, Role};

/// Errors while locking down.
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    /// no_new_privs or Landlock could not be applied.
    #[error("lockdown: {0}")]
    Sandbox(#[from] citadel_sandbox::Error),
    /// A seccomp filter could not be installed.
    #[error("lockdown: {0}")]
    Seccomp(#[from] citadel_seccomp::Error),
}

/// Sets no_new_privs and confines the whole process with Landlock: no filesystem access by
/// path and no TCP, except removing entries from `removable_dirs` (where the VMM created its
/// QMP socket and pid file, which it deletes at exit) and reading `readable_files` (the
/// kernel and initrd, loaded again by `system_reset`). Call before any thread is spawned.
pub fn confine_process(
    removable_dirs: &[&Path],
    readable_files: &[&Path],
) -> Result<(), LockdownError> {
    citadel_sandbox::set_no_new_privs()?;
    let grants: Vec<(&Path, AccessFs)> = removable_dirs
        .iter()
        .map(|&dir| (dir, AccessFs::RemoveFile))
        .chain(
            readable_files
                .iter()
                .map(|&file| (file, AccessFs::ReadFile)),
        )
        .collect();
    match citadel_sandbox::restrict_filesystem_and_network(&grants)? {
        LandlockEnforcement::Full => log::info!("landlock: fully enforced"),
        LandlockEnforcement::Partial => {
            log::info!("landlock: partially enforced (older kernel ABI)")
        }
        LandlockEnforcement::None => log::warn!("landlock: not supported by this kernel"),
    }
    Ok(())
}

/// Compiles the vCPU allowlist once, for every vCPU thread to install on itself.
pub fn vcpu_filter(mode: Mode) -> Result<CompiledFilter, LockdownError> {
    Ok(CompiledFilter::new(Role::Vcpu, mode)?)
}

/// Installs the event-loop allowlist on the calling (main) thread.
pub fn event_loop_thread(mode: Mode) -> Result<(), LockdownError> {
    citadel_seccomp::apply_to_current_thread(Role::Vmm, mode)?;
    Ok(())
}
