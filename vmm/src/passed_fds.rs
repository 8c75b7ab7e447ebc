//! Descriptors handed to the VMM instead of paths: named ones (`getfd`), fd sets (`add-fd`
//! over QMP, `-add-fd` on the command line), and the `/dev/fdset/N` lookups of block nodes.
//!
//! A jailed VMM cannot open host paths, so management passes open files. What is kept here is
//! bounded per VM, whatever the clients send: [`MAX_NAMED`] named descriptors and
//! [`MAX_IN_FDSETS`] descriptors across all fd sets. Every descriptor is close-on-exec (QMP
//! receives them with `MSG_CMSG_CLOEXEC`, `-add-fd` sets the flag), so none leaks into the
//! device launcher.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use citadel_qmp::error::QmpError;
use citadel_qmp::fds::{AddFd, AddFdInfo, FdsetFdInfo, FdsetInfo, RemoveFd};
use serde_json::{json, Value};

/// Named descriptors one VM may hold.
pub const MAX_NAMED: usize = 64;
/// Descriptors one VM may hold across all its fd sets.
pub const MAX_IN_FDSETS: usize = 64;

/// One descriptor of an fd set.
struct Member {
    fd: OwnedFd,
    opaque: Option<String>,
}

/// The descriptors passed to one VM.
#[derive(Default)]
pub struct PassedFds {
    named: BTreeMap<String, OwnedFd>,
    /// Sets by id, members in the order they were added; a set with no member is removed.
    fdsets: BTreeMap<u64, Vec<Member>>,
}

impl PassedFds {
    /// No descriptor yet.
    pub fn new() -> Self {
        PassedFds::default()
    }

    /// `getfd`: keeps `fd` as `name`, closing a descriptor kept under that name before.
    pub fn getfd(&mut self, name: &str, fd: Option<OwnedFd>) -> Result<Value, QmpError> {
        let fd = fd.ok_or_else(QmpError::fd_not_supplied)?;
        if !self.named.contains_key(name) && self.named.len() >= MAX_NAMED {
            return Err(QmpError::generic(format!(
                "Too many named file descriptors: at most {MAX_NAMED}"
            )));
        }
        log::info!("QMP: descriptor {} kept as '{name}'", fd.as_raw_fd());
        self.named.insert(name.to_string(), fd);
        Ok(json!({}))
    }

    /// Takes the descriptor kept as `name` for a command that consumes it (`netdev_add`'s
    /// `fds`).
    pub fn take(&mut self, name: &str) -> Result<OwnedFd, QmpError> {
        self.named
            .remove(name)
            .ok_or_else(|| QmpError::fd_not_found(name))
    }

    /// `closefd`.
    pub fn closefd(&mut self, name: &str) -> Result<Value, QmpError> {
        self.named
            .remove(name)
            .map(|_| json!({}))
            .ok_or_else(|| QmpError::fd_not_found(name))
    }

    /// `add-fd`: `fd` joins the set `add.fdset_id`, or a new set with the lowest free id.
    pub fn add_fd(&mut self, add: &AddFd, fd: Option<OwnedFd>) -> Result<AddFdInfo, QmpError> {
        let fd = fd.ok_or_else(QmpError::fd_not_supplied)?;
        self.add(add.fdset_id, fd, add.opaque.clone())
    }

    /// Adds `fd` to set `fdset_id`, or to a new set with the lowest free id.
    pub fn add(
        &mut self,
        fdset_id: Option<u64>,
        fd: OwnedFd,
        opaque: Option<String>,
    ) -> Result<AddFdInfo, QmpError> {
        let held: usize = self.fdsets.values().map(Vec::len).sum();
        if held >= MAX_IN_FDSETS {
            return Err(QmpError::generic(format!(
                "Too many file descriptors in fd sets: at most {MAX_IN_FDSETS}"
            )));
        }
        // Ids are sorted, so the first one that differs from its position is free; with no
        // gap, the one after the last.
        let fdset_id = fdset_id.unwrap_or_else(|| {
            (0u64..)
                .zip(self.fdsets.keys())
                .find(|(free, used)| free != *used)
                .map_or(self.fdsets.len() as u64, |(free, _)| free)
        });
        let number = fd.as_raw_fd();
        self.fdsets
            .entry(fdset_id)
            .or_default()
            .push(Member { fd, opaque });
        log::info!("descriptor {number} added to fd set {fdset_id}");
        Ok(AddFdInfo {
            fdset_id,
            fd: number,
        })
    }

    /// `remove-fd`: closes one descriptor of a set, or every descriptor of it.
    pub fn remove_fd(&mut self, remove: &RemoveFd) -> Result<Value, QmpError> {
        let id = u64::try_from(remove.fdset_id).map_err(|_| remove.not_found())?;
        let members = self.fdsets.get_mut(&id).ok_or_else(|| remove.not_found())?;
        match remove.fd {
            Some(fd) => {
                let at = members
                    .iter()
                    .position(|m| i64::from(m.fd.as_raw_fd()) == fd)
                    .ok_or_else(|| remove.not_found())?;
                members.remove(at);
                if members.is_empty() {
                    self.fdsets.remove(&id);
                }
            }
            None => {
                self.fdsets.remove(&id);
            }
        }
        Ok(json!({}))
    }

    /// `query-fdsets`.
    pub fn query_fdsets(&self) -> Vec<FdsetInfo> {
        self.fdsets
            .iter()
            .map(|(&fdset_id, members)| FdsetInfo {
                fdset_id,
                fds: members
                    .iter()
                    .map(|m| FdsetFdInfo {
                        fd: m.fd.as_raw_fd(),
                        opaque: m.opaque.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// A duplicate of a descriptor of set `fdset_id` to open `filename` (`/dev/fdset/N`)
    /// with, as QEMU picks it: one open read-write for a read-write node; for a read-only
    /// node one open read-only, else one open read-write. The set keeps its own descriptor,
    /// so the set can serve again.
    pub fn open(
        &self,
        filename: &str,
        fdset_id: u64,
        read_only: bool,
    ) -> Result<OwnedFd, QmpError> {
        let refuse = |errno: i32| {
            QmpError::generic(format!(
                "Could not open '{filename}': {}",
                std::io::Error::from_raw_os_error(errno)
            ))
        };
        let members = self
            .fdsets
            .get(&fdset_id)
            .ok_or_else(|| refuse(libc::ENOENT))?;
        let with_mode =
            |mode: libc::c_int| members.iter().find(|m| access_mode(&m.fd) == Some(mode));
        let member = if read_only {
            with_mode(libc::O_RDONLY).or_else(|| with_mode(libc::O_RDWR))
        } else {
            with_mode(libc::O_RDWR)
        }
        .ok_or_else(|| refuse(libc::EACCES))?;
        member
            .fd
            .try_clone()
            .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))
    }
}

/// Why a descriptor named by `-add-fd` cannot be taken.
#[derive(Debug, thiserror::Error)]
#[error("-add-fd fd={fd}: {source}")]
pub struct InheritError {
    /// The descriptor number.
    pub fd: RawFd,
    /// What the kernel said.
    pub source: std::io::Error,
}

/// Takes ownership of descriptor `fd`, inherited open from the parent for `-add-fd`, and makes
/// it close-on-exec. Call it before this process opens anything: a number the parent did not
/// actually pass could otherwise name a descriptor something else owns.
pub fn adopt_inherited(fd: RawFd) -> Result<OwnedFd, InheritError> {
    let fail = |source| InheritError { fd, source };
    // SAFETY: F_GETFD and F_SETFD take integers; on a closed number they fail with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: as above, on a descriptor just found open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: the descriptor is open and, the process having opened nothing yet (see above),
    // owned by no other object; each number is adopted once (the command line refuses
    // duplicates).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `O_RDONLY`, `O_WRONLY` or `O_RDWR`: how `fd`'s open file description was opened.
fn access_mode(fd: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: F_GETFL on a descriptor this process owns takes no pointer.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    (flags >= 0).then_some(flags & libc::O_ACCMODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn file(write: bool) -> OwnedFd {
        OwnedFd::from(
            OpenOptions::new()
                .read(true)
                .write(write)
                .open("/dev/null")
                .unwrap(),
        )
    }

    fn add(fds: &mut PassedFds, set: Option<u64>, write: bool) -> AddFdInfo {
        fds.add_fd(
            &AddFd {
                fdset_id: set,
                opaque: None,
            },
            Some(file(write)),
        )
        .unwrap()
    }

    #[test]
    fn new_sets_take_the_lowest_free_id() {
        let mut fds = PassedFds::new();
        assert_eq!(add(&mut fds, None, true).fdset_id, 0);
        assert_eq!(add(&mut fds, Some(2), true).fdset_id, 2);
        assert_eq!(add(&mut fds, None, true).fdset_id, 1);
        assert_eq!(add(&mut fds, None, true).fdset_id, 3);
        let ids: Vec<u64> = fds.query_fdsets().iter().map(|s| s.fdset_id).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
    }

    #[test]
    fn access_modes_pick_the_member() {
        let mut fds = PassedFds::new();
        let ro = add(&mut fds, Some(5), false);
        let name = "/dev/fdset/5";
        assert_eq!(
            fds.open(name, 5, false).unwrap_err().desc,
            "Could not open '/dev/fdset/5': Permission denied (os error 13)"
        );
        let dup = fds.open(name, 5, true).unwrap();
        assert_ne!(dup.as_raw_fd(), ro.fd);
        assert_eq!(access_mode(&dup), Some(libc::O_RDONLY));
        add(&mut fds, Some(5), true);
        assert_eq!(
            access_mode(&fds.open(name, 5, false).unwrap()),
            Some(libc::O_RDWR)
        );
        // A read-only node still prefers the read-only member.
        assert_eq!(
            access_mode(&fds.open(name, 5, true).unwrap()),
            Some(libc::O_RDONLY)
        );
        assert_eq!(
            fds.open("/dev/fdset/6", 6, true).unwrap_err().desc,
            "Could not open '/dev/fdset/6': No such file or directory (os error 2)"
        );
    }

    #[test]
    fn limits_hold() {
        let mut fds = PassedFds::new();
        for _ in 0..MAX_IN_FDSETS {
            add(&mut fds, Some(1), false);
        }
        let refused = fds.add_fd(
            &AddFd {
                fdset_id: Some(1),
                opaque: None,
            },
            Some(file(false)),
        );
        assert!(refused.unwrap_err().desc.contains("at most 64"));
        for i in 0..MAX_NAMED {
            fds.getfd(&format!("n{i}"), Some(file(false))).unwrap();
        }
        assert!(fds.getfd("another", Some(file(false))).is_err());
        // Replacing a name is not one more.
        fds.getfd("n0", Some(file(false))).unwrap();
    }

    #[test]
    fn removal_and_errors() {
        let mut fds = PassedFds::new();
        assert_eq!(
            fds.getfd("x", None).unwrap_err().desc,
            "No file descriptor supplied via SCM_RIGHTS"
        );
        assert_eq!(
            fds.closefd("x").unwrap_err().desc,
            "File descriptor named 'x' not found"
        );
        let a = add(&mut fds, Some(0), true);
        let b = add(&mut fds, Some(0), true);
        let remove = |fd| RemoveFd {
            fdset_id: 0,
            fd: Some(fd),
        };
        fds.remove_fd(&remove(i64::from(a.fd))).unwrap();
        assert!(fds.remove_fd(&remove(i64::from(a.fd))).is_err());
        assert_eq!(fds.query_fdsets()[0].fds.len(), 1);
        fds.remove_fd(&remove(i64::from(b.fd))).unwrap();
        assert!(fds.query_fdsets().is_empty());
        assert!(fds
            .remove_fd(&RemoveFd {
                fdset_id: -1,
                fd: None
            })
            .is_err());
    }
}
