//! The jail's files: its directory tree, the executables copied in, and, inside the new mount
//! namespace, the pivot into it and its `/dev`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{check, Error, Step};

/// Name of the file, next to the jail root, holding the VMM's pid.
pub const PID_FILE: &str = "citadel.pid";

/// Device nodes of the jail: (path, major, minor). Nothing else is visible under `/dev`.
const DEVICES: [(&str, u32, u32); 4] = [
    ("/dev/kvm", 10, 232),
    ("/dev/net/tun", 10, 200),
    ("/dev/urandom", 1, 9),
    ("/dev/null", 1, 3),
];

/// The jail directory tree on the host, removed again if the jail is not finished.
pub struct Jail {
    /// `<base>/citadel/<id>`: holds the pid file, not visible from inside.
    pub id_dir: PathBuf,
    /// `<base>/citadel/<id>/root`: becomes `/` of the VMM.
    pub root: PathBuf,
    /// What this run created, removed in reverse order if the jail is abandoned before the
    /// pivot, so that a retry starts from the same state.
    created: Vec<PathBuf>,
    armed: bool,
}

fn path_c(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::refused(
            Step::Copy,
            format!("{} contains a NUL byte", path.display()),
        )
    })
}

impl Jail {
    /// Creates `<base>/citadel/<id>/root` (0700, the root owned by uid:gid).
    pub fn create(base: &Path, id: &str, uid: u32, gid: u32) -> Result<Jail, Error> {
        let id_dir = base.join("citadel").join(id);
        let root = id_dir.join("root");
        let mut jail = Jail {
            id_dir,
            root,
            created: Vec::new(),
            armed: true,
        };
        let mut dirs: Vec<PathBuf> = jail.root.ancestors().map(Path::to_path_buf).collect();
        dirs.reverse();
        for dir in dirs {
            jail.directory(&dir)?;
        }
        let root = path_c(&jail.root)?;
        // SAFETY: `root` is a NUL-terminated path that outlives the calls.
        unsafe {
            check(
                libc::lchown(root.as_ptr(), uid, gid),
                Step::Copy,
                "chown jail root",
            )?;
            check(
                libc::chmod(root.as_ptr(), 0o700),
                Step::Copy,
                "chmod jail root",
            )?;
        }
        Ok(jail)
    }

    fn directory(&mut self, dir: &Path) -> Result<(), Error> {
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_dir() => Ok(()),
            Ok(_) => Err(Error::refused(
                Step::Copy,
                format!("{} exists and is not a directory", dir.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| Error::path(Step::Copy, "mkdir", dir, e))?;
                self.created.push(dir.to_path_buf());
                Ok(())
            }
            Err(e) => Err(Error::path(Step::Copy, "stat", dir, e)),
        }
    }

    /// Copies `source` into the jail root under its own name, owned by uid:gid, mode 0500.
    ///
    /// The destination is opened with O_NOFOLLOW and must turn out to be a regular file with a
    /// single link before anything is written: a symlink or a hard link planted there would
    /// otherwise redirect the copy onto a host file.
    pub fn copy_in(&mut self, source: &Path, uid: u32, gid: u32) -> Result<PathBuf, Error> {
        let name = source.file_name().ok_or_else(|| {
            Error::refused(Step::Copy, format!("{} names no file", source.display()))
        })?;
        let dest = self.root.join(name);
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
        let open = |create: bool| {
            let mut options = std::fs::OpenOptions::new();
            options
                .write(true)
                .mode(0o500)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
            if create {
                options.create_new(true);
            }
            options.open(&dest)
        };
        let mut output = match open(true) {
            Ok(file) => {
                self.created.push(dest.clone());
                file
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false).map_err(|e| {
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
            })?,
            Err(e) => return Err(Error::path(Step::Copy, "create", &dest, e)),
        };
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
        std::os::unix::fs::fchown(&output, Some(uid), Some(gid))
            .map_err(|e| Error::path(Step::Copy, "chown", &dest, e))?;
        output
            .set_permissions(std::fs::Permissions::from_mode(0o500))
            .map_err(|e| Error::path(Step::Copy, "chmod", &dest, e))?;
        Ok(Path::new("/").join(name))
    }

    /// Opens (creating or truncating) the pid file next to the jail root, outside the VMM's
    /// view, so that the VMM cannot rewrite it to point the operator at another process.
    pub fn open_pid_file(&mut self) -> Result<File, Error> {
        let path = self.id_dir.join(PID_FILE);
        let existed = std::fs::symlink_metadata(&path).is_ok();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::path(Step::Copy, "create pid file", &path, e))?;
        if !existed {
            self.created.push(path);
        }
        Ok(file)
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for path in self.created.iter().rev() {
            let removed = match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir(path),
                Ok(_) => std::fs::remove_file(path),
                Err(e) => Err(e),
            };
            if let Err(e) = removed {
                log::warn!("could not remove {} after a failure: {e}", path.display());
            }
        }
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("static strings have no NUL")
}

/// Enters new mount, IPC and UTS namespaces, makes the jail root the root of the mount
/// namespace (old root detached), and builds `/dev` on a fresh tmpfs holding only the jail's
/// devices. From the pivot on, host paths no longer resolve, so the jail is kept as it is
/// whatever happens next (a retry reuses it).
pub fn enter(jail: &mut Jail, uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Mount;
    let root = jail.root.clone();
    let root = root.as_path();
    let root_c = path_c(root)?;
    // SAFETY: unshare, mount, chdir, pivot_root and umount2 take NUL-terminated strings that
    // outlive the calls or NULL where the kernel accepts NULL; no memory is shared with them.
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
        if libc::mount(
            root_c.as_ptr(),
            root_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(Error::path(
                step,
                "bind mount",
                root,
                io::Error::last_os_error(),
            ));
        }
        // Device nodes planted in the jail directory are unusable: only the tmpfs /dev has any.
        if libc::mount(
            std::ptr::null(),
            root_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ) != 0
        {
            return Err(Error::path(
                step,
                "remount nodev,nosuid",
                root,
                io::Error::last_os_error(),
            ));
        }
        if libc::chdir(root_c.as_ptr()) != 0 {
            return Err(Error::path(step, "chdir", root, io::Error::last_os_error()));
        }
        let dot = c(".");
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(Error::path(
                step,
                "pivot_root",
                root,
                io::Error::last_os_error(),
            ));
        }
        jail.armed = false;
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
    make_dev(uid, gid)
}

fn make_dev(uid: u32, gid: u32) -> Result<(), Error> {
    let step = Step::Mount;
    let dev = Path::new("/dev");
    match std::fs::symlink_metadata(dev) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(Error::refused(step, "/dev in the jail is not a directory")),
        Err(_) => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dev)
            .map_err(|e| Error::path(step, "mkdir", dev, e))?,
    }
    let options = c(&format!(
        "mode=0700,uid={uid},gid={gid},size=64k,nr_inodes=16"
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
        let node = c(path);
        // SAFETY: NUL-terminated path; makedev only combines numbers.
        let ret = unsafe {
            libc::mknod(
                node.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(major, minor),
            )
        };
        if ret != 0 {
            return Err(Error::path(
                step,
                "mknod",
                Path::new(path),
                io::Error::last_os_error(),
            ));
        }
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| Error::path(step, "chown", Path::new(path), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::path(step, "chmod", Path::new(path), e))?;
    }
    Ok(())
}
