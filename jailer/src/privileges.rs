//! What the process may do: network namespace, resource limits, identities, capabilities,
//! no_new_privs and Landlock.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use caps::CapSet;
use citadel_sandbox::Limit;
use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

use crate::cli::Netns;
use crate::error::{check, Error, Step};

/// Joins the namespace at `Netns::Join`, unshares into a new, empty one, or (`Netns::Host`)
/// keeps the jailer's.
pub fn network(netns: &Netns) -> Result<(), Error> {
    match netns {
        Netns::Host => {}
        Netns::Join(path) => {
            let file = File::open(path).map_err(|e| Error::path(Step::Netns, "open", path, e))?;
            // SAFETY: setns on a descriptor we own; the kernel checks it is a network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::path(
                    Step::Netns,
                    "join",
                    path,
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Netns::New => {
            // SAFETY: unshare takes no pointers.
            check(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                Step::Netns,
                "create a network namespace",
            )?;
        }
    }
    Ok(())
}

/// Sets RLIMIT_NOFILE and, when asked, RLIMIT_FSIZE and RLIMIT_MEMLOCK (soft and hard).
pub fn rlimits(no_file: u64, fsize: Option<u64>, memlock: Option<u64>) -> Result<(), Error> {
    let limits = std::iter::once(Limit::OpenFiles(no_file))
        .chain(fsize.map(Limit::FileSize))
        .chain(memlock.map(Limit::LockedMemory));
    for limit in limits {
        citadel_sandbox::set_limit(limit).map_err(Error::sandbox(Step::Rlimit))?;
    }
    Ok(())
}

/// Becomes uid:gid with no supplementary groups and no capability in any set, for good.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Privileges;
    // The bounding set can only be emptied while CAP_SETPCAP is held, which the change of uid
    // ends; the sandbox empties it only when it still can, and a jail must never keep one.
    caps::clear(None, CapSet::Bounding)
        .map_err(|e| Error::refused(step, format!("clear bounding set: {e}")))?;
    // SAFETY: setgroups with a zero count reads no memory; the id calls take plain integers.
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()),
            step,
            "clear supplementary groups",
        )?;
        check(libc::setresgid(gid, gid, gid), step, "set gid")?;
        check(libc::setresuid(uid, uid, uid), step, "set uid")?;
    }
    // A change from uid 0 already empties most sets; a jail asked to run as uid 0 keeps none.
    citadel_sandbox::drop_capabilities().map_err(Error::sandbox(step))
}

/// Sets no_new_privs: nothing executed from now on can gain privileges (setuid bits, file
/// capabilities), and seccomp filters can be installed without privileges.
pub fn no_new_privs() -> Result<(), Error> {
    citadel_sandbox::set_no_new_privs().map_err(Error::sandbox(Step::Privileges))
}

fn landlock_error(e: impl std::fmt::Display) -> Error {
    Error::refused(Step::Privileges, format!("landlock: {e}"))
}

/// Confines the jailed process with Landlock: inside the jail it may read, write and create
/// files, directories and sockets, but execute only the copied `executables`, create no
/// device nodes or symlinks, use no TCP, and neither signal nor reach (abstract sockets)
/// processes outside its domain.
pub fn landlock(executables: &[PathBuf]) -> Result<(), Error> {
    let abi = ABI::V6;
    let all = AccessFs::from_all(abi);
    let in_jail =
        all & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::MakeSym);
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .map_err(landlock_error)?
        .add_rule(PathBeneath::new(
            PathFd::new(Path::new("/")).map_err(landlock_error)?,
            in_jail,
        ))
        .map_err(landlock_error)?;
    for exe in executables {
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                PathFd::new(exe).map_err(landlock_error)?,
                AccessFs::Execute | AccessFs::ReadFile,
            ))
            .map_err(landlock_error)?;
    }
    let status = ruleset.restrict_self().map_err(landlock_error)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(Error::refused(
            Step::Privileges,
            "landlock asked for, but this kernel does not enforce it",
        ));
    }
    log::info!("landlock: {:?}", status.ruleset);
    Ok(())
}
