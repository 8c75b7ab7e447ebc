//! Self-sandboxing for Citadel processes.
//!
//! A device process opens everything it needs (disk image, sockets, tap), then calls
//! [`restrict_self`] before it reads its first untrusted byte. After that the process:
//!
//! - cannot gain privileges through `execve` (`no_new_privs`),
//! - cannot open, create or rename any file, nor bind or connect TCP ports, nor signal or reach
//!   abstract sockets outside its domain (Landlock, best effort on older kernels),
//! - is bounded by the resource limits it asked for,
//! - holds no capabilities (effective, permitted, inheritable, ambient and, when permitted,
//!   the bounding set are emptied).
//!
//! The seccomp filter is installed separately, by the `citadel-seccomp` crate, as the very
//! last step, because it forbids the syscalls used here.
//!
//! [`unix_socket`] holds what a backend needs to meet only its own frontend, [`core_dump`] what
//! keeps guest memory out of core files, [`memory_file`] the checks on files a peer hands over
//! to be mapped.

pub mod core_dump;
pub mod memory_file;
pub mod unix_socket;

use std::path::Path;

pub use landlock::AccessFs;
use landlock::{
    Access, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// Landlock ABI that Citadel's rulesets are written against.
pub const LANDLOCK_ABI: u32 = 6;

/// `LANDLOCK_CREATE_RULESET_VERSION`: asks `landlock_create_ruleset` for the ABI version.
const CREATE_RULESET_VERSION: libc::c_uint = 1;

/// A resource limit to set (soft and hard limit alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Highest file descriptor number + 1 (`RLIMIT_NOFILE`).
    OpenFiles(u64),
    /// Largest file the process may create or extend (`RLIMIT_FSIZE`), in bytes.
    FileSize(u64),
    /// Core dump size (`RLIMIT_CORE`), in bytes; 0 keeps guest data out of core files.
    CoreSize(u64),
    /// Number of processes and threads of the real user (`RLIMIT_NPROC`).
    Processes(u64),
    /// Locked memory (`RLIMIT_MEMLOCK`), in bytes.
    LockedMemory(u64),
}

impl Limit {
    fn resource(self) -> (libc::__rlimit_resource_t, &'static str, u64) {
        match self {
            Limit::OpenFiles(v) => (libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", v),
            Limit::FileSize(v) => (libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", v),
            Limit::CoreSize(v) => (libc::RLIMIT_CORE, "RLIMIT_CORE", v),
            Limit::Processes(v) => (libc::RLIMIT_NPROC, "RLIMIT_NPROC", v),
            Limit::LockedMemory(v) => (libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK", v),
        }
    }
}

/// What [`restrict_self`] applies.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Resource limits to set.
    pub limits: Vec<Limit>,
    /// Fail when the kernel cannot enforce the Landlock ruleset at all (instead of logging).
    pub require_landlock: bool,
}

/// How much of the policy the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockEnforcement {
    /// Every requested Landlock restriction is enforced.
    Full,
    /// The kernel knows an older Landlock ABI: filesystem access is still denied but some
    /// newer restrictions (network, scopes) are not.
    Partial,
    /// The kernel has no Landlock.
    None,
}

/// Errors while sandboxing; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    /// Building or applying the Landlock ruleset failed.
    #[error("applying the Landlock ruleset: {0}")]
    Landlock(#[from] landlock::RulesetError),
    /// A path to keep access to could not be opened for its Landlock rule.
    #[error("Landlock rule for {path}: {source}")]
    LandlockPath {
        /// The path.
        path: String,
        /// What landlock said.
        source: landlock::PathFdError,
    },
    /// Landlock is required but the kernel does not enforce it.
    #[error("Landlock is required but this kernel does not enforce it")]
    LandlockUnavailable,
    /// A Landlock ABI outside 1..=LANDLOCK_ABI was asked for.
    #[error("Landlock ABI {0} is not one Citadel writes rulesets for (1 to {LANDLOCK_ABI})")]
    LandlockAbi(u32),
    /// The kernel did not enforce every right of the ABI asked for.
    #[error("the kernel did not fully enforce the Landlock ruleset at ABI {0}")]
    LandlockNotFullyEnforced(u32),
    /// `setrlimit` failed.
    #[error("setting {name} to {value}: {source}")]
    Rlimit {
        /// Resource name.
        name: &'static str,
        /// Requested value.
        value: u64,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Dropping capabilities failed.
    #[error("dropping capabilities: {0}")]
    Capabilities(String),
}

/// Sets `no_new_privs` on the calling thread (inherited by threads and children created later).
pub fn set_no_new_privs() -> Result<(), Error> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(Error::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The Landlock ABI version the running kernel offers, 0 when it has no Landlock (not built
/// in, or not enabled at boot).
pub fn kernel_landlock_abi() -> u32 {
    // SAFETY: with a NULL attribute, a size of 0 and the VERSION flag, the kernel reads no
    // memory and only returns a number (or -1 with errno).
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(version).unwrap_or(0)
}

/// Applies the ruleset of [`restrict_filesystem_and_network`] at exactly Landlock ABI `abi`:
/// every filesystem right that ABI knows is handled (granted only as `grants` say), TCP from
/// ABI 4 and signal and abstract-socket scoping from ABI 6. Unlike the best-effort variant it
/// fails when the kernel does not enforce every one of those rights, so that what the caller
/// reports as enforced is enforced.
pub fn restrict_at_abi(abi: u32, grants: &[(&Path, AccessFs)]) -> Result<(), Error> {
    if !(1..=LANDLOCK_ABI).contains(&abi) {
        return Err(Error::LandlockAbi(abi));
    }
    let level = ABI::from(abi as i32);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(level))?;
    if abi >= 4 {
        ruleset = ruleset.handle_access(AccessNet::from_all(level))?;
    }
    if abi >= 6 {
        ruleset = ruleset.scope(Scope::from_all(level))?;
    }
    let mut ruleset = ruleset.create()?;
    for &(path, access) in grants {
        let fd = PathFd::new(path).map_err(|source| Error::LandlockPath {
            path: path.display().to_string(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    match ruleset.restrict_self()?.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        _ => Err(Error::LandlockNotFullyEnforced(abi)),
    }
}

/// Applies a Landlock ruleset that handles every filesystem and TCP right and grants none,
/// and scopes signals and abstract Unix sockets to the sandbox. Already open descriptors keep
/// working; nothing new can be opened by path.
pub fn deny_filesystem_and_network() -> Result<LandlockEnforcement, Error> {
    restrict_filesystem_and_network(&[])
}

/// Like [`deny_filesystem_and_network`], but keeps the rights `grants` names: each entry allows
/// `access` on a file, or beneath a directory.
pub fn restrict_filesystem_and_network(
    grants: &[(&Path, AccessFs)],
) -> Result<LandlockEnforcement, Error> {
    let abi = ABI::from(LANDLOCK_ABI as i32);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    for &(path, access) in grants {
        let fd = PathFd::new(path).map_err(|source| Error::LandlockPath {
            path: path.display().to_string(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockEnforcement::Full,
        RulesetStatus::PartiallyEnforced => LandlockEnforcement::Partial,
        RulesetStatus::NotEnforced => LandlockEnforcement::None,
    })
}

/// Sets one resource limit (soft = hard = the given value).
pub fn set_limit(limit: Limit) -> Result<(), Error> {
    let (resource, name, value) = limit.resource();
    let rlim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `rlim` is a valid, initialised rlimit that outlives the call.
    let rc = unsafe { libc::setrlimit(resource, &rlim) };
    if rc != 0 {
        return Err(Error::Rlimit {
            name,
            value,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Drops every capability of the calling thread. The bounding set is emptied too when the
/// thread may do so (it holds CAP_SETPCAP); otherwise it is left as is, which is harmless once
/// the permitted set is empty and no_new_privs is set.
pub fn drop_capabilities() -> Result<(), Error> {
    use caps::CapSet;
    let err = |e: caps::errors::CapsError| Error::Capabilities(e.to_string());
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).map_err(err)? {
        caps::clear(None, CapSet::Bounding).map_err(err)?;
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    caps::clear(None, CapSet::Effective).map_err(err)?;
    caps::clear(None, CapSet::Permitted).map_err(err)?;
    Ok(())
}

/// Applies the whole policy to the calling thread, in the order that keeps each step possible:
/// rlimits, capabilities, no_new_privs, Landlock. Threads created afterwards inherit all of it.
pub fn restrict_self(policy: &Policy) -> Result<LandlockEnforcement, Error> {
    for limit in &policy.limits {
        set_limit(*limit)?;
    }
    drop_capabilities()?;
    set_no_new_privs()?;
    let enforcement = deny_filesystem_and_network()?;
    match enforcement {
        LandlockEnforcement::Full => log::debug!("landlock: fully enforced"),
        LandlockEnforcement::Partial => {
            log::warn!("landlock: partially enforced (older kernel ABI)")
        }
        LandlockEnforcement::None if policy.require_landlock => {
            return Err(Error::LandlockUnavailable)
        }
        LandlockEnforcement::None => log::warn!("landlock: not available on this kernel"),
    }
    Ok(enforcement)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child and returns its exit status, so that restrictions applied
    /// by `f` do not leak into the test harness.
    fn in_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child only runs `f` (which uses async-signal-tolerant calls in practice:
        // prctl, landlock syscalls, open) and then `_exit`s without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = f();
            // SAFETY: terminating the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(libc::WIFEXITED(status), "child did not exit: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn no_filesystem_access_after_restrict() {
        let code = in_child(|| {
            if std::fs::File::open("/etc/hostname").is_err() {
                return 10;
            }
            let policy = Policy {
                limits: vec![Limit::CoreSize(0), Limit::OpenFiles(64)],
                require_landlock: false,
            };
            match restrict_self(&policy) {
                Ok(LandlockEnforcement::None) => 20,
                Ok(_) => match std::fs::File::open("/etc/hostname") {
                    Ok(_) => 30,
                    Err(e) if e.raw_os_error() == Some(libc::EACCES) => 0,
                    Err(_) => 31,
                },
                Err(_) => 40,
            }
        });
        if code == 20 {
            eprintln!("SKIPPED no_filesystem_access_after_restrict: kernel without Landlock");
            return;
        }
        assert_eq!(code, 0, "child reported failure code {code}");
    }

    #[test]
    fn every_abi_up_to_the_kernels_denies_the_filesystem() {
        let kernel = kernel_landlock_abi();
        if kernel == 0 {
            eprintln!("SKIPPED every_abi_up_to_the_kernels_denies_the_filesystem: no Landlock");
            return;
        }
        for abi in 1..=kernel.min(LANDLOCK_ABI) {
            let code = match abi {
                1 => in_child(|| denies_after(1)),
                2 => in_child(|| denies_after(2)),
                3 => in_child(|| denies_after(3)),
                4 => in_child(|| denies_after(4)),
                5 => in_child(|| denies_after(5)),
                _ => in_child(|| denies_after(6)),
            };
            assert_eq!(code, 0, "ABI {abi}: child reported failure code {code}");
        }
    }

    fn denies_after(abi: u32) -> i32 {
        if restrict_at_abi(abi, &[]).is_err() {
            return 1;
        }
        match std::fs::File::open("/etc/hostname") {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => 0,
            _ => 2,
        }
    }

    #[test]
    fn abis_citadel_does_not_write_rulesets_for_are_refused() {
        for abi in [0, LANDLOCK_ABI + 1] {
            assert!(matches!(
                restrict_at_abi(abi, &[]),
                Err(Error::LandlockAbi(n)) if n == abi
            ));
        }
    }

    #[test]
    fn no_new_privs_is_visible_in_proc_status() {
        let code = in_child(|| {
            if set_no_new_privs().is_err() {
                return 1;
            }
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            if status.lines().any(|l| l == "NoNewPrivs:\t1") {
                0
            } else {
                2
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn rlimit_is_applied() {
        let code = in_child(|| {
            if set_limit(Limit::OpenFiles(32)).is_err() {
                return 1;
            }
            let mut rlim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: valid out-pointer to an rlimit.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) };
            if rlim.rlim_cur == 32 && rlim.rlim_max == 32 {
                0
            } else {
                2
            }
        });
        assert_eq!(code, 0);
    }
}
