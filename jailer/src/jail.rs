//! The jail's files: its directory tree, the executables copied in, and, inside the new mount
//! namespace, the pivot into it, the read-only executables and its `/dev`.
//!
//! The tree is walked with directory descriptors from `/`, one component at a time, with
//! `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`: a symlink anywhere on the path is refused
//! rather than followed, and ownership and modes are changed on the descriptor that was
//! checked, never by path. The chroot base and every directory above it must be owned by root
//! and writable by nobody else, so that no other user can swap a component between the check
//! and the use; a root-owned sticky directory (such as `/tmp`) is accepted above the base,
//! because there no other user can rename or remove the root-owned entry the walk goes on
//! with, only squat its name (which the ownership check then refuses). `citadel/` and
//! `citadel/<id>/` must be root-owned and writable by root alone, sticky or not.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use citadel_pci::address::MAX_HOST_FUNCTIONS;

use crate::error::{check, Error, Step};
use crate::vfio::VfioExposure;

/// Name of the file, next to the jail root, holding the VMM's pid.
pub const PID_FILE: &str = "citadel.pid";

/// Mode of the executables in the jail: readable and executable by all, writable by none;
/// owned by root, so that the jailed uid can neither rewrite nor chmod them.
pub const EXECUTABLE_MODE: u32 = 0o555;

/// Device nodes of the jail: (path, major, minor). Nothing else is visible under `/dev`.
const DEVICES: [(&str, u32, u32); 4] = [
    ("/dev/kvm", 10, 232),
    ("/dev/net/tun", 10, 200),
    ("/dev/urandom", 1, 9),
    ("/dev/null", 1, 3),
];

/// Symlinks are never followed and the walk never leaves the directory it starts from.
const RESOLVE: u64 = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH;

/// `openat2(dir, name, flags, mode)` with [`RESOLVE`]; close-on-exec always.
fn open_beneath(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain integers, so all-zero is a valid value (and the kernel wants
    // any field it does not know zeroed).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = RESOLVE;
    // SAFETY: `name` is NUL-terminated and `how` a fully initialised open_how; both outlive
    // the call, whose size argument is that of the struct passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain integers, so all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a live descriptor writing one `stat` into the live `st`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn name_c(name: &[u8], path: &Path) -> Result<CString, Error> {
    CString::new(name).map_err(|_| {
        Error::refused(
            Step::Copy,
            format!("{} contains a NUL byte", path.display()),
        )
    })
}

/// How much a directory on the jail's path must be trusted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// `/` to the chroot base: root-owned, writable by root alone unless sticky.
    Ancestor,
    /// `citadel/` and `citadel/<id>/`: root-owned and writable by root alone.
    JailerOwned,
    /// The jail root, handed to the jailed uid.
    JailRoot,
}

/// One directory of the walk, held open.
struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Something this run created, removed again if the jail is abandoned: `name` in the walked
/// directory `parent` (an index into `Jail::dirs`).
struct Created {
    parent: usize,
    name: CString,
    dir: bool,
}

/// The jail directory tree on the host, removed again if the jail is not finished.
pub struct Jail {
    /// `<base>/citadel/<id>`: holds the pid file, not visible from inside.
    pub id_dir: PathBuf,
    /// `<base>/citadel/<id>/root`: becomes `/` of the VMM.
    pub root: PathBuf,
    /// `/`, each component down to the base, `citadel`, `<id>` and `root`, held open.
    dirs: Vec<Dir>,
    /// What this run created, in order, removed in reverse if the jail is abandoned, so that a
    /// retry starts from the same state.
    created: Vec<Created>,
    /// Device and inode of the jail root, to recognise it again inside the mount namespace.
    root_id: (u64, u64),
}

impl Jail {
    /// Creates `<base>/citadel/<id>/root` (0700, owned by uid:gid) and its empty `dev`.
    pub fn create(base: &Path, id: &str, uid: u32, gid: u32) -> Result<Jail, Error> {
        let slash = Path::new("/");
        // SAFETY: NUL-terminated path; the result is checked before use.
        let fd = unsafe {
            libc::open(
                c"/".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        check(fd, Step::Copy, "open /")?;
        // SAFETY: open just returned this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut jail = Jail {
            id_dir: base.join("citadel").join(id),
            root: base.join("citadel").join(id).join("root"),
            dirs: Vec::new(),
            created: Vec::new(),
            root_id: (0, 0),
        };
        jail.check_trust(fd.as_fd(), slash, Trust::Ancestor)?;
        jail.dirs.push(Dir {
            fd,
            path: slash.to_path_buf(),
        });
        for component in base.components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => jail.step(name.as_bytes(), Trust::Ancestor)?,
                Component::Prefix(_) | Component::ParentDir => {
                    return Err(Error::refused(
                        Step::Copy,
                        format!("{}: not a plain absolute path", base.display()),
                    ))
                }
            }
        }
        jail.step(b"citadel", Trust::JailerOwned)?;
        jail.step(id.as_bytes(), Trust::JailerOwned)?;
        jail.step(b"root", Trust::JailRoot)?;
        let root = jail.dirs.last().expect("the walk holds the root");
        let root_fd = root.fd.as_raw_fd();
        // SAFETY: fchown and fchmod on the descriptor just checked to be the jail root.
        unsafe {
            check(
                libc::fchown(root_fd, uid, gid),
                Step::Copy,
                "chown jail root",
            )?;
            check(libc::fchmod(root_fd, 0o700), Step::Copy, "chmod jail root")?;
        }
        let st =
            fstat(root.fd.as_fd()).map_err(|e| Error::path(Step::Copy, "stat", &jail.root, e))?;
        jail.root_id = (st.st_dev, st.st_ino);
        jail.make_dev_dir()?;
        Ok(jail)
    }

    /// Opens (creating if missing) directory `name` in the last walked directory and checks
    /// it deserves `trust`.
    fn step(&mut self, name: &[u8], trust: Trust) -> Result<(), Error> {
        let parent = self.dirs.len() - 1;
        let path = self.dirs[parent]
            .path
            .join(std::ffi::OsStr::from_bytes(name));
        let name_c = name_c(name, &path)?;
        let parent_fd = self.dirs[parent].fd.as_fd();
        let open = || open_beneath(parent_fd, &name_c, libc::O_RDONLY | libc::O_DIRECTORY, 0);
        let fd = match open() {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // SAFETY: mkdirat relative to a held directory with a NUL-terminated name that
                // is a single component (no '/' can come from Path::components or the id).
                if unsafe { libc::mkdirat(parent_fd.as_raw_fd(), name_c.as_ptr(), 0o700) } != 0 {
                    return Err(Error::path(
                        Step::Copy,
                        "mkdir",
                        &path,
                        io::Error::last_os_error(),
                    ));
                }
                self.created.push(Created {
                    parent,
                    name: name_c.clone(),
                    dir: true,
                });
                open().map_err(|e| Error::path(Step::Copy, "open", &path, e))?
            }
            Err(e) => return Err(walk_error(&path, e)),
        };
        self.check_trust(fd.as_fd(), &path, trust)?;
        self.dirs.push(Dir { fd, path });
        Ok(())
    }

    fn check_trust(&self, fd: BorrowedFd<'_>, path: &Path, trust: Trust) -> Result<(), Error> {
        if trust == Trust::JailRoot {
            return Ok(());
        }
        let st = fstat(fd).map_err(|e| Error::path(Step::Copy, "stat", path, e))?;
        let refuse = |why: String| {
            Err(Error::refused(
                Step::Copy,
                format!(
                    "{}: {why}: refusing to build a jail beneath it",
                    path.display()
                ),
            ))
        };
        if st.st_uid != 0 {
            return refuse(format!("owned by uid {}, not root", st.st_uid));
        }
        let writable = st.st_mode & 0o022 != 0;
        let sticky = st.st_mode & libc::S_ISVTX != 0;
        if writable && !(sticky && trust == Trust::Ancestor) {
            return refuse(format!(
                "writable by group or others (mode {:04o})",
                st.st_mode & 0o7777
            ));
        }
        Ok(())
    }

    fn root_fd(&self) -> BorrowedFd<'_> {
        self.dirs
            .last()
            .expect("the walk holds the root")
            .fd
            .as_fd()
    }

    /// The jail root's `dev`, where the tmpfs goes: made here, on the host, so that a failure
    /// after the pivot can remove it with the rest.
    fn make_dev_dir(&mut self) -> Result<(), Error> {
        self.make_mount_point(c"dev")
    }

    /// The jail root's `sys`, where the sysfs directories of passed-through PCI functions go
    /// (see [`VfioExposure`]).
    pub fn make_sys_dir(&mut self) -> Result<(), Error> {
        self.make_mount_point(c"sys")
    }

    fn make_mount_point(&mut self, name: &CStr) -> Result<(), Error> {
        let path = self.root.join(name.to_string_lossy().as_ref());
        let root = self.dirs.len() - 1;
        // SAFETY: mkdirat relative to the held jail root with a constant single-component name.
        if unsafe { libc::mkdirat(self.root_fd().as_raw_fd(), name.as_ptr(), 0o700) } == 0 {
            self.created.push(Created {
                parent: root,
                name: name.to_owned(),
                dir: true,
            });
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(Error::path(Step::Copy, "mkdir", &path, e));
        }
        let fd = open_beneath(self.root_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| walk_error(&path, e))?;
        drop(fd);
        Ok(())
    }

    /// Copies `source` into the jail root under its own name, owned by root, mode 0555.
    ///
    /// The destination is opened relative to the held jail root with O_NOFOLLOW and must turn
    /// out to be a regular file with a single link before anything is written: a symlink or a
    /// hard link planted there would otherwise redirect the copy onto a host file.
    pub fn copy_in(&mut self, source: &Path) -> Result<PathBuf, Error> {
        let name = source.file_name().ok_or_else(|| {
            Error::refused(Step::Copy, format!("{} names no file", source.display()))
        })?;
        let dest = self.root.join(name);
        let name_c = name_c(name.as_bytes(), &dest)?;
        let mut input =
            File::open(source).map_err(|e| Error::path(Step::Copy, "open", source, e))?;
        let meta = input
            .metadata()
            .map_err(|e| Error::path(Step::Copy, "stat", source, e))?;
        if !meta.file_type().is_file() {
            return Err(Error::refused(
                Step::Copy,
                format!("{} is not a regular file", source.display()),
            ));
        }
        let flags = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let root = self.dirs.len() - 1;
        let output = match open_beneath(
            self.root_fd(),
            &name_c,
            flags | libc::O_CREAT | libc::O_EXCL,
            0o500,
        ) {
            Ok(fd) => {
                self.created.push(Created {
                    parent: root,
                    name: name_c,
                    dir: false,
                });
                fd
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                open_beneath(self.root_fd(), &name_c, flags, 0).map_err(|e| {
                    if e.raw_os_error() == Some(libc::ELOOP) {
                        Error::refused(
                            Step::Copy,
                            format!(
                                "{} is a symlink: refusing to copy through it",
                                dest.display()
                            ),
                        )
                    } else {
                        Error::path(Step::Copy, "open destination", &dest, e)
                    }
                })?
            }
            Err(e) => return Err(Error::path(Step::Copy, "create", &dest, e)),
        };
        let mut output = File::from(output);
        let existing = output
            .metadata()
            .map_err(|e| Error::path(Step::Copy, "stat", &dest, e))?;
        if !existing.file_type().is_file() {
            return Err(Error::refused(
                Step::Copy,
                format!("{} exists and is not a regular file", dest.display()),
            ));
        }
        if existing.nlink() != 1 {
            return Err(Error::refused(
                Step::Copy,
                format!(
                    "{} has {} hard links: refusing to overwrite a file shared with the host",
                    dest.display(),
                    existing.nlink()
                ),
            ));
        }
        output
            .set_len(0)
            .map_err(|e| Error::path(Step::Copy, "truncate", &dest, e))?;
        io::copy(&mut input, &mut output)
            .map_err(|e| Error::path(Step::Copy, "write", &dest, e))?;
        std::os::unix::fs::fchown(&output, Some(0), Some(0))
            .map_err(|e| Error::path(Step::Copy, "chown", &dest, e))?;
        output
            .set_permissions(std::fs::Permissions::from_mode(EXECUTABLE_MODE))
            .map_err(|e| Error::path(Step::Copy, "chmod", &dest, e))?;
        Ok(Path::new("/").join(name))
    }

    /// Opens (creating or truncating) the pid file next to the jail root, outside the VMM's
    /// view, so that the VMM cannot rewrite it to point the operator at another process.
    pub fn open_pid_file(&mut self) -> Result<File, Error> {
        let path = self.id_dir.join(PID_FILE);
        let id_dir = self.dirs.len() - 2;
        let name = name_c(PID_FILE.as_bytes(), &path)?;
        let dir = self.dirs[id_dir].fd.as_fd();
        let flags = libc::O_WRONLY | libc::O_NOFOLLOW;
        let fd = match open_beneath(dir, &name, flags | libc::O_CREAT | libc::O_EXCL, 0o644) {
            Ok(fd) => {
                self.created.push(Created {
                    parent: id_dir,
                    name,
                    dir: false,
                });
                fd
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                open_beneath(dir, &name, flags | libc::O_TRUNC, 0)
                    .map_err(|e| Error::path(Step::Copy, "open pid file", &path, e))?
            }
            Err(e) => return Err(Error::path(Step::Copy, "create pid file", &path, e)),
        };
        Ok(File::from(fd))
    }

    /// Gives up removing anything: the jail is in use.
    pub fn keep(&mut self) {
        self.created.clear();
        self.dirs.clear();
    }
}

/// The error for a walk step that could not open an existing entry.
fn walk_error(path: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => Error::refused(
            Step::Copy,
            format!(
                "{} is a symbolic link: refusing to follow it",
                path.display()
            ),
        ),
        Some(libc::ENOTDIR) => Error::refused(
            Step::Copy,
            format!("{} exists and is not a directory", path.display()),
        ),
        _ => Error::path(Step::Copy, "open", path, e),
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for created in self.created.iter().rev() {
            let Some(parent) = self.dirs.get(created.parent) else {
                continue;
            };
            let flags = if created.dir { libc::AT_REMOVEDIR } else { 0 };
            // SAFETY: unlinkat relative to a held directory with a NUL-terminated name.
            let ret =
                unsafe { libc::unlinkat(parent.fd.as_raw_fd(), created.name.as_ptr(), flags) };
            if ret != 0 {
                log::warn!(
                    "could not remove {} after a failure: {}",
                    parent
                        .path
                        .join(std::ffi::OsStr::from_bytes(created.name.to_bytes()))
                        .display(),
                    io::Error::last_os_error()
                );
            }
        }
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("static strings have no NUL")
}

/// `/proc/self/fd/N`: the path through which a mount call reaches what descriptor N is.
fn fd_path(fd: &OwnedFd) -> CString {
    c(&format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Bind-mounts what `fd` refers to onto itself, then reopens it through `open_again` (which
/// crosses into the new mount) and remounts that read-write or read-only, always nosuid and
/// nodev. Returns the descriptor of the new mount.
fn bind_onto_itself(
    fd: &OwnedFd,
    open_again: impl Fn() -> io::Result<OwnedFd>,
    read_only: bool,
    path: &Path,
) -> Result<OwnedFd, Error> {
    let step = Step::Mount;
    let at = fd_path(fd);
    // SAFETY: NUL-terminated strings that outlive the call; NULL where the kernel accepts it.
    if unsafe {
        libc::mount(
            at.as_ptr(),
            at.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(Error::path(
            step,
            "bind mount",
            path,
            io::Error::last_os_error(),
        ));
    }
    let top = open_again().map_err(|e| Error::path(step, "open the bind mount", path, e))?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    let at = fd_path(&top);
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            at.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(Error::path(
            step,
            if read_only {
                "remount read-only"
            } else {
                "remount nodev,nosuid"
            },
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(top)
}

/// Enters new mount, IPC and UTS namespaces, makes the jail root the root of the mount
/// namespace (old root detached), with the `executables` bind-mounted read-only over
/// themselves, and builds `/dev` on a fresh tmpfs holding only the jail's devices.
///
/// Descriptors opened before `unshare` still refer to the host's mounts, on which nothing can
/// be mounted from the new namespace, so the jail root is opened again here, without following
/// symlinks, and must be the directory the jail was built in.
pub fn enter(
    jail: &Jail,
    executables: &[PathBuf],
    uid: u32,
    gid: u32,
    vfio: Option<VfioExposure>,
) -> Result<(), Error> {
    let step = Step::Mount;
    let root = jail.root.as_path();
    // SAFETY: unshare and mount take NUL-terminated strings that outlive the calls or NULL
    // where the kernel accepts NULL; no memory is shared with them.
    unsafe {
        check(
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS),
            step,
            "unshare mount, IPC and UTS namespaces",
        )?;
        check(
            libc::mount(
                std::ptr::null(),
                c("/").as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            step,
            "make / private",
        )?;
    }
    let slash = File::open("/").map_err(|e| Error::path(step, "open", Path::new("/"), e))?;
    let relative = root.strip_prefix("/").unwrap_or(root);
    let relative = name_c(relative.as_os_str().as_bytes(), root)?;
    let open_root = || {
        open_beneath(
            slash.as_fd(),
            &relative,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
    };
    let below = open_root().map_err(|e| walk_error(root, e))?;
    let st = fstat(below.as_fd()).map_err(|e| Error::path(step, "stat", root, e))?;
    if (st.st_dev, st.st_ino) != jail.root_id {
        return Err(Error::refused(
            step,
            format!("{} is no longer the jail root built", root.display()),
        ));
    }
    // Device nodes or setuid files planted in the jail directory are unusable: nodev, nosuid.
    let top = bind_onto_itself(&below, open_root, false, root)?;
    for exe in executables {
        let name = exe.file_name().unwrap_or_default();
        let host = root.join(name);
        let name = name_c(name.as_bytes(), &host)?;
        let open_exe = || open_beneath(top.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0);
        let file = open_exe().map_err(|e| walk_error(&host, e))?;
        let st = fstat(file.as_fd()).map_err(|e| Error::path(step, "stat", &host, e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != 0 {
            return Err(Error::refused(
                step,
                format!("{} is not the root-owned file copied in", host.display()),
            ));
        }
        bind_onto_itself(&file, open_exe, true, &host)?;
    }
    // SAFETY: fchdir on a held directory, then pivot_root, umount2, chdir and sethostname
    // with NUL-terminated strings or buffers that outlive the calls.
    unsafe {
        check(libc::fchdir(top.as_raw_fd()), step, "chdir into the jail")?;
        let dot = c(".");
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(Error::path(
                step,
                "pivot_root",
                root,
                io::Error::last_os_error(),
            ));
        }
        check(
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
            step,
            "detach the old root",
        )?;
        check(libc::chdir(c("/").as_ptr()), step, "chdir /")?;
        let name = b"citadel";
        check(
            libc::sethostname(name.as_ptr().cast(), name.len()),
            step,
            "sethostname",
        )?;
    }
    make_dev(uid, gid)?;
    match vfio {
        Some(vfio) => vfio.install(uid, gid),
        None => Ok(()),
    }
}

fn make_dev(uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Mount;
    let dev = Path::new("/dev");
    match std::fs::symlink_metadata(dev) {
        Ok(meta) if meta.is_dir() => {}
        _ => return Err(Error::refused(step, "/dev in the jail is not a directory")),
    }
    // Inodes: the root, net/ and the device nodes, vfio/ and its container, and a group node
    // per passed-through function at most, with room to spare.
    let options = c(&format!(
        "mode=0700,uid={uid},gid={gid},size=64k,nr_inodes={}",
        16 + MAX_HOST_FUNCTIONS
    ));
    // SAFETY: NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            c("tmpfs").as_ptr(),
            c("/dev").as_ptr(),
            c("tmpfs").as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(Error::path(
            step,
            "mount tmpfs",
            dev,
            io::Error::last_os_error(),
        ));
    }
    let net = Path::new("/dev/net");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(net)
        .map_err(|e| Error::path(step, "mkdir", net, e))?;
    std::os::unix::fs::chown(net, Some(uid), Some(gid))
        .map_err(|e| Error::path(step, "chown", net, e))?;
    for (path, major, minor) in DEVICES {
        make_node(Path::new(path), libc::makedev(major, minor), uid, gid)?;
    }
    Ok(())
}

/// Creates character device node `path` for device number `rdev`, owned by uid:gid, mode
/// 0600.
pub(crate) fn make_node(path: &Path, rdev: u64, uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Mount;
    let node = name_c(path.as_os_str().as_bytes(), path)?;
    // SAFETY: NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, rdev) };
    if ret != 0 {
        return Err(Error::path(step, "mknod", path, io::Error::last_os_error()));
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| Error::path(step, "chown", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::path(step, "chmod", path, e))
}
