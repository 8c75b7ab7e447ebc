//! What the process may do: network namespace, resource limits, identities, capabilities,
//! no_new_privs and Landlock.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use caps::CapSet;
use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

use crate::cli::Netns;
use crate::error::{check, Error, Step};

/// Joins the namespace at `Netns::Join` or unshares into a new, empty one.
pub fn network(netns: &Netns) -> Result<(), Error> {
    match netns {
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

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &'static str,
) -> Result<(), Error> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: points to a live rlimit for the duration of the call.
    check(
        unsafe { libc::setrlimit(resource, &limit) },
        Step::Rlimit,
        what,
    )?;
    Ok(())
}

/// Sets RLIMIT_NOFILE and, when asked, RLIMIT_FSIZE (soft and hard).
pub fn rlimits(no_file: u64, fsize: Option<u64>) -> Result<(), Error> {
    set_rlimit(libc::RLIMIT_NOFILE, no_file, "set no-file limit")?;
    if let Some(fsize) = fsize {
        set_rlimit(libc::RLIMIT_FSIZE, fsize, "set fsize limit")?;
    }
    Ok(())
}

fn caps_error(what: &'static str, e: caps::errors::CapsError) -> Error {
    Error::refused(Step::Privileges, format!("{what}: {e}"))
}

/// Becomes uid:gid with no supplementary groups and no capability in any set, for good.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Privileges;
    // The bounding set can only be emptied while CAP_SETPCAP is still held.
    caps::clear(None, CapSet::Bounding).map_err(|e| caps_error("clear bounding set", e))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_error("clear ambient set", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| caps_error("clear inheritable set", e))?;
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
    // A change from uid 0 already empties them; a jail asked to run as uid 0 must not keep any.
    caps::clear(None, CapSet::Effective).map_err(|e| caps_error("clear effective set", e))?;
    caps::clear(None, CapSet::Permitted).map_err(|e| caps_error("clear permitted set", e))?;
    Ok(())
}

/// Sets no_new_privs: nothing executed from now on can gain privileges (setuid bits, file
/// capabilities), and seccomp filters can be installed without privileges.
pub fn no_new_privs() -> Result<(), Error> {
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        Step::Privileges,
        "set no_new_privs",
    )?;
    Ok(())
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
