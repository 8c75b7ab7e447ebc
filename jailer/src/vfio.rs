//! Host PCI functions the jailed VMM may pass through (`--vfio-device ADDRESS`).
//!
//! Inside the jail the device launcher needs three things per function: its sysfs directory
//! (whose `driver` and `iommu_group` links say whether it is vfio-pci's and which group it is
//! in), the VFIO container node `/dev/vfio/vfio`, and its group's node `/dev/vfio/<group>`.
//! Nothing else of sysfs or of `/dev/vfio` is visible: other functions and groups stay out of
//! reach even of a launcher that was taken over.
//!
//! The sysfs directory is the host's own, cloned as a detached mount before the pivot
//! (`open_tree`) and attached read-only, without devices, set-uid or execution, under a small
//! read-only tmpfs at `/sys` after it (`move_mount`); the nodes are made in the jail's `/dev`
//! with the host's device numbers, owned by the jailed uid and gid, mode 0600.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Step};

/// Where the host lists PCI functions, and where the jail shows the exposed ones.
const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The VFIO container node.
const CONTAINER: &str = "/dev/vfio/vfio";
/// `open_tree` flag: clone the tree rather than open the mount itself (`linux/mount.h`).
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount` flag: the source is the descriptor itself (`linux/mount.h`).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// One function: its address and its sysfs directory as a detached mount.
struct Function {
    address: String,
    tree: OwnedFd,
}

/// What the jail gets for `--vfio-device`: gathered on the host, installed after the pivot.
pub struct VfioExposure {
    functions: Vec<Function>,
    /// `(path, device number)` of the container node and of each group's node.
    nodes: Vec<(PathBuf, u64)>,
}

fn mount_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::path(Step::Mount, what, path, e)
}

fn char_device(path: &Path) -> Result<u64, Error> {
    let meta = std::fs::metadata(path).map_err(mount_error("stat", path))?;
    if !meta.file_type().is_char_device() {
        return Err(Error::refused(
            Step::Mount,
            format!("{} is not a character device", path.display()),
        ));
    }
    Ok(meta.rdev())
}

fn c_path(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::refused(Step::Mount, format!("{} holds a NUL", path.display())))
}

impl VfioExposure {
    /// Looks the functions `addresses` (canonical, from the command line) up on the host:
    /// each must exist and be in an IOMMU group whose node exists, which means vfio-pci has
    /// it. Must run before the pivot, in the jailer's mount namespace or a copy of it.
    pub fn prepare(addresses: &[String]) -> Result<Option<VfioExposure>, Error> {
        if addresses.is_empty() {
            return Ok(None);
        }
        let mut nodes = vec![(PathBuf::from(CONTAINER), char_device(Path::new(CONTAINER))?)];
        let mut functions = Vec::new();
        for address in addresses {
            let sysfs = Path::new(PCI_DEVICES).join(address);
            let group_link = sysfs.join("iommu_group");
            let group =
                std::fs::read_link(&group_link).map_err(mount_error("readlink", &group_link))?;
            let group = group
                .file_name()
                .and_then(|g| g.to_str())
                .filter(|g| g.bytes().all(|b| b.is_ascii_digit()) && !g.is_empty())
                .ok_or_else(|| {
                    Error::refused(
                        Step::Mount,
                        format!("{}: not an IOMMU group", group_link.display()),
                    )
                })?
                .to_string();
            let node = Path::new("/dev/vfio").join(&group);
            if !node.exists() {
                return Err(Error::refused(
                    Step::Mount,
                    format!(
                        "--vfio-device {address}: {} does not exist; bind the function to vfio-pci first",
                        node.display()
                    ),
                ));
            }
            let rdev = char_device(&node)?;
            if !nodes.iter().any(|(path, _)| *path == node) {
                nodes.push((node, rdev));
            }
            let source = c_path(&sysfs)?;
            // SAFETY: open_tree with a NUL-terminated path that outlives the call; the result
            // is a new descriptor or -1, checked below.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    source.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
                )
            };
            if fd < 0 {
                return Err(mount_error("clone", &sysfs)(io::Error::last_os_error()));
            }
            functions.push(Function {
                address: address.clone(),
                // SAFETY: open_tree just returned this descriptor and nothing else owns it.
                tree: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            });
        }
        Ok(Some(VfioExposure { functions, nodes }))
    }

    /// After the pivot, with the jail's `/dev` tmpfs mounted: `/sys` with the functions'
    /// directories, `/dev/vfio` with the nodes for uid:gid.
    pub fn install(self, uid: u32, gid: u32) -> Result<(), Error> {
        let sys = Path::new("/sys");
        mount(
            Some("tmpfs"),
            sys,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=0755,size=16k,nr_inodes=64"),
        )?;
        for function in &self.functions {
            let target = Path::new(PCI_DEVICES).join(&function.address);
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(&target)
                .map_err(mount_error("mkdir", &target))?;
            // The jailer's umask keeps new directories private; the VMM's uid must be able to
            // walk down to the function.
            for dir in target
                .ancestors()
                .take_while(|d| d.starts_with(sys) && *d != sys)
            {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(mount_error("chmod", dir))?;
            }
            let c_target = c_path(&target)?;
            // SAFETY: move_mount of the detached tree onto a NUL-terminated path that
            // outlives the call; the empty source path names the descriptor itself.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    function.tree.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    c_target.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                )
            };
            if ret != 0 {
                return Err(mount_error("attach", &target)(io::Error::last_os_error()));
            }
            mount(
                None,
                &target,
                None,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                None,
            )?;
        }
        mount(
            None,
            sys,
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=0755,size=16k,nr_inodes=64"),
        )?;
        let dir = Path::new("/dev/vfio");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(mount_error("mkdir", dir))?;
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(mount_error("chown", dir))?;
        for (path, rdev) in &self.nodes {
            crate::jail::make_node(path, *rdev, uid, gid)?;
        }
        Ok(())
    }
}

/// mount(2) with optional source, type and data.
fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    let source = source.map(|s| CString::new(s).expect("constant without NUL"));
    let fstype = fstype.map(|s| CString::new(s).expect("constant without NUL"));
    let data = data.map(|s| CString::new(s).expect("constant without NUL"));
    let c_target = c_path(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: NUL-terminated strings (or NULL where the kernel accepts it) that outlive the
    // call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            c_target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if ret != 0 {
        return Err(mount_error("mount", target)(io::Error::last_os_error()));
    }
    Ok(())
}
