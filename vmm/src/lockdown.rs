//! What the VMM gives up once the VM is built: new privileges, the filesystem (Landlock) and,
//! per thread, every syscall its role does not need (seccomp).
//!
//! Landlock is applied once, on the main thread before the vCPU threads exist, so that every
//! thread lives in the same Landlock domain (threads inherit it). Seccomp filters are installed
//! by each thread on itself, so that each role carries its own allowlist.
//!
//! The two layers are planned together ([`plan`]): a kernel without Landlock is refused unless
//! the operator said `-sandbox landlock=off`, and then the event loop gets an allowlist without
//! the one path syscall the `vmm` role keeps (`unlink`, for removing the QMP socket and pid
//! file at exit), so that nothing Landlock would have refused is left open. Older Landlock ABIs
//! need no such trade: the `vmm` role already lacks every syscall whose restriction came with a
//! later ABI, so ABI 1 (Linux 5.13) covers all the VMM can still reach by path:
//!
//! | ABI | Adds | Why the `vmm` role does not depend on it |
//! | --- | --- | --- |
//! | 1 | read, write, create, remove, execute by path | the one it relies on: `unlink` is kept to the QMP socket's and pid file's directories |
//! | 2 | rename and link across directories | no `rename*`, `link*` |
//! | 3 | truncate | no `open*`, `truncate`, `ftruncate` |
//! | 4 | TCP bind and connect | no `socket`, `connect`, `bind` |
//! | 5 | ioctl on device files opened later | nothing can be opened |
//! | 6 | abstract Unix sockets and signals outside the domain | no `socket`; `tgkill` only to its own threads |

use std::path::Path;

use citadel_sandbox::{AccessFs, LANDLOCK_ABI};
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
    /// Landlock is required and the kernel (or the `landlock-abi` cap) offers none.
    #[error(
        "lockdown: Landlock is not available ({0}); citadel refuses to run without it unless \
         started with -sandbox landlock=off"
    )]
    LandlockUnavailable(&'static str),
}

/// What the operator asked for with `-sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LandlockChoice {
    /// Landlock is required (the default). `max_abi` (`landlock-abi=N`) makes Citadel use at
    /// most that ABI, as if the kernel offered no more; it exists to test older kernels'
    /// behaviour on a newer one and can only lower what is enforced, never skip it: 0 is
    /// treated like a kernel without Landlock, which is refused.
    #[default]
    Required,
    /// Like `Required`, at most at this ABI.
    AtMost(u32),
    /// `landlock=off`: run without Landlock, with the stricter event-loop allowlist.
    Off,
}

/// How the process will be confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The Landlock ABI the ruleset is written at; `None` when Landlock is off.
    pub landlock_abi: Option<u32>,
    /// The event loop's seccomp role.
    pub event_loop: Role,
}

impl Plan {
    /// Whether the VMM may remove its QMP socket and pid file at exit: only when Landlock
    /// confines `unlink` to their directories.
    pub fn removes_its_files(&self) -> bool {
        self.landlock_abi.is_some()
    }
}

/// Decides how to confine the VMM on a kernel offering Landlock ABI `kernel_abi` (0: none).
pub fn plan(kernel_abi: u32, choice: LandlockChoice) -> Result<Plan, LockdownError> {
    let available = match choice {
        LandlockChoice::Off => {
            return Ok(Plan {
                landlock_abi: None,
                event_loop: Role::VmmWithoutLandlock,
            })
        }
        LandlockChoice::Required => kernel_abi,
        LandlockChoice::AtMost(cap) => kernel_abi.min(cap),
    };
    if available == 0 {
        return Err(LockdownError::LandlockUnavailable(if kernel_abi == 0 {
            "this kernel has none"
        } else {
            "capped at ABI 0 by -sandbox landlock-abi"
        }));
    }
    Ok(Plan {
        landlock_abi: Some(available.min(LANDLOCK_ABI)),
        event_loop: Role::Vmm,
    })
}

/// Sets no_new_privs and, as `plan` says, confines the whole process with Landlock: no
/// filesystem access by path and no TCP, except removing entries from `removable_dirs` (where
/// the VMM created its QMP socket and pid file, which it deletes at exit). Call before any
/// thread is spawned.
pub fn confine_process(plan: &Plan, removable_dirs: &[&Path]) -> Result<(), LockdownError> {
    citadel_sandbox::set_no_new_privs()?;
    let Some(abi) = plan.landlock_abi else {
        log::warn!(
            "landlock: off (-sandbox landlock=off); the QMP socket and pid file are left behind \
             at exit"
        );
        return Ok(());
    };
    let grants: Vec<(&Path, AccessFs)> = removable_dirs
        .iter()
        .map(|&dir| (dir, AccessFs::RemoveFile))
        .collect();
    citadel_sandbox::restrict_at_abi(abi, &grants)?;
    log::info!("landlock: enforced at ABI {abi}");
    Ok(())
}

/// Compiles the vCPU allowlist once, for every vCPU thread to install on itself.
pub fn vcpu_filter(mode: Mode) -> Result<CompiledFilter, LockdownError> {
    Ok(CompiledFilter::new(Role::Vcpu, mode)?)
}

/// Installs the event-loop allowlist `plan` chose on the calling (main) thread.
pub fn event_loop_thread(plan: &Plan, mode: Mode) -> Result<(), LockdownError> {
    citadel_seccomp::apply_to_current_thread(plan.event_loop, mode)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_landlock_is_refused_unless_turned_off() {
        assert!(matches!(
            plan(0, LandlockChoice::Required),
            Err(LockdownError::LandlockUnavailable(_))
        ));
        let off = plan(0, LandlockChoice::Off).unwrap();
        assert_eq!(off.landlock_abi, None);
        assert_eq!(off.event_loop, Role::VmmWithoutLandlock);
        assert!(!off.removes_its_files());
        // Off wins on a kernel that has Landlock too: the operator's explicit choice.
        assert_eq!(plan(7, LandlockChoice::Off).unwrap(), off);
    }

    #[test]
    fn older_abis_are_enforced_as_far_as_they_go() {
        for kernel in 1..=LANDLOCK_ABI {
            let p = plan(kernel, LandlockChoice::Required).unwrap();
            assert_eq!(p.landlock_abi, Some(kernel));
            assert_eq!(p.event_loop, Role::Vmm);
            assert!(p.removes_its_files());
        }
        // Newer kernels get the ABI the rulesets are written against.
        assert_eq!(
            plan(9, LandlockChoice::Required).unwrap().landlock_abi,
            Some(LANDLOCK_ABI)
        );
    }

    #[test]
    fn the_abi_cap_only_lowers_and_never_skips() {
        assert_eq!(
            plan(7, LandlockChoice::AtMost(3)).unwrap().landlock_abi,
            Some(3)
        );
        // A cap above what the kernel has claims nothing more.
        assert_eq!(
            plan(2, LandlockChoice::AtMost(6)).unwrap().landlock_abi,
            Some(2)
        );
        // Capping to nothing is a refusal, not a silent run without Landlock.
        assert!(matches!(
            plan(7, LandlockChoice::AtMost(0)),
            Err(LockdownError::LandlockUnavailable(_))
        ));
    }
}
