//! What the VMM gives up once the VM is built: new privileges, the filesystem (Landlock) and,
//! per thread, every syscall its role does not need (seccomp).
//!
//! Landlock is applied once, on the main thread before the vCPU threads exist, so that every
//! thread lives in the same Landlock domain (threads inherit it). Seccomp filters are installed
//! by each thread on itself, so that each role carries its own allowlist.

use std::path::Path;

use citadel_seccomp::{CompiledFilter, Mode, Role};
use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The Landlock ABI the VMM's ruleset is written against; older kernels enforce what they can.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Errors while locking down.
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    /// no_new_privs could not be set.
    #[error("lockdown: {0}")]
    Sandbox(#[from] citadel_sandbox::Error),
    /// The Landlock ruleset could not be built or applied.
    #[error("lockdown: Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    /// A directory the VMM must keep could not be opened.
    #[error("lockdown: Landlock rule for {path}: {source}")]
    LandlockPath {
        /// The directory.
        path: String,
        /// What landlock said.
        source: landlock::PathFdError,
    },
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
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))?
        .scope(Scope::from_all(LANDLOCK_ABI))?
        .create()?;
    let grants = removable_dirs
        .iter()
        .map(|dir| (dir, AccessFs::RemoveFile))
        .chain(readable_files.iter().map(|file| (file, AccessFs::ReadFile)));
    for (path, access) in grants {
        let fd = PathFd::new(path).map_err(|source| LockdownError::LandlockPath {
            path: path.display().to_string(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = ruleset.restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => log::info!("landlock: fully enforced"),
        RulesetStatus::PartiallyEnforced => {
            log::info!("landlock: partially enforced (older kernel ABI)")
        }
        RulesetStatus::NotEnforced => log::warn!("landlock: not supported by this kernel"),
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
