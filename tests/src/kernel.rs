//! The project's guest kernel (built by `scripts/guest-kernel.sh`), initramfs images that run
//! a test's own script inside the guest, and a process whose standard output is a guest's
//! serial console (QEMU or Citadel with `-serial stdio`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A built guest kernel: the cache directory and the files in it.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// `${CITADEL_CACHE_DIR:-$HOME/.cache/citadel}/kernel-<hash>`.
    pub dir: PathBuf,
    /// ELF kernel with the PVH entry note.
    pub vmlinux: PathBuf,
    /// The same kernel in the Linux boot protocol's bzImage format.
    pub bzimage: PathBuf,
    /// gzip newc initramfs: busybox and Citadel's `/init`.
    pub initramfs: PathBuf,
}

/// The guest kernel if `scripts/guest-kernel.sh` has built it for the current sources, `None`
/// otherwise (build it with `scripts/guest-kernel.sh`; it takes minutes).
pub fn guest_kernel() -> Option<GuestKernel> {
    let output = Command::new(crate::workspace_root().join("scripts/guest-kernel.sh"))
        .arg("--path")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    let kernel = GuestKernel {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio.gz"),
        dir,
    };
    [&kernel.vmlinux, &kernel.bzimage, &kernel.initramfs]
        .iter()
        .all(|path| path.is_file())
        .then_some(kernel)
}

/// Writes `out`: the initramfs `base` followed by an uncompressed newc archive holding
/// `/test.sh` (mode 0755) with `script` as its content. Citadel's `/init` runs that script
/// with `sh`, prints `citadel-init: done rc=<status>` and powers the guest off.
pub fn initramfs_with_script(base: &Path, script: &str, out: &Path) -> io::Result<()> {
    initramfs_with_files(base, script, &[], out)
}

/// Like [`initramfs_with_script`], with `files` (path without the leading `/`, permission
/// bits, contents) added as well, each in a directory the archive creates.
pub fn initramfs_with_files(
    base: &Path,
    script: &str,
    files: &[(&str, u32, &[u8])],
    out: &Path,
) -> io::Result<()> {
    let mut image = std::fs::read(base)?;
    // The kernel looks for an archive header only at 4-byte aligned offsets of the whole
    // image, and skips the zero bytes in between.
    image.resize(image.len().next_multiple_of(4), 0);
    crate::cpio::append_newc_entry(&mut image, 1, "test.sh", 0o100_755, script.as_bytes())?;
    let mut ino = 2;
    let mut dirs: Vec<&str> = Vec::new();
    for (path, perm, data) in files {
        if let Some((dir, _)) = path.rsplit_once('/') {
            if !dirs.contains(&dir) {
                crate::cpio::append_newc_entry(&mut image, ino, dir, 0o040_755, &[])?;
                ino += 1;
                dirs.push(dir);
            }
        }
        crate::cpio::append_newc_entry(&mut image, ino, path, 0o100_000 | (perm & 0o7777), data)?;
        ino += 1;
    }
    crate::cpio::append_newc_entry(&mut image, 0, "TRAILER!!!", 0, &[])?;
    let mut file = File::create(out)?;
    file.write_all(&image)?;
    file.sync_all()
}

/// `qemu-system-x86_64` from `PATH`, if installed.
pub fn qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
}

/// True when `/dev/kvm` can be opened for reading and writing.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A process whose standard output carries a guest's serial console, read line by line.
/// Killed and reaped on drop, including when the test panics.
pub struct ConsoleProcess {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl ConsoleProcess {
    /// Spawns `command` with stdout piped (the console) and stderr collected for reports.
    pub fn spawn(mut command: Command) -> io::Result<ConsoleProcess> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut raw = Vec::new();
            // Console output is not necessarily UTF-8; a lossy line is still searchable.
            while matches!(reader.read_until(b'\n', &mut raw), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&raw);
                if tx
                    .send(line.trim_end_matches(['\r', '\n']).to_string())
                    .is_err()
                {
                    break;
                }
                raw.clear();
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr buffer")
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok(ConsoleProcess {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a console line containing `needle` and returns it. Lines
    /// read on the way are kept for `transcript`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_any(&[needle], timeout).map(|(_, line)| line)
    }

    /// Waits for a line containing any of `needles`; returns the index of the needle found
    /// and the line.
    pub fn wait_for_any(&mut self, needles: &[&str], timeout: Duration) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(i) = needles.iter().position(|n| line.contains(n)) {
                        return Some((i, line));
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// All console lines that arrive within `window` (fewer if the console closes).
    pub fn lines_for(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    got.push(line);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        got
    }

    /// Waits up to `timeout` for the process to exit; its exit code (`None` if it is still
    /// running or was killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process wrote to stderr so far (its log).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned()
    }

    /// Everything seen so far: console lines, then the process's stderr, for assertion
    /// messages.
    pub fn transcript(&self) -> String {
        let stderr = self.stderr.lock().expect("stderr buffer");
        format!(
            "--- console ---\n{}\n--- stderr ---\n{}",
            self.seen.join("\n"),
            String::from_utf8_lossy(&stderr)
        )
    }
}

impl ConsoleProcess {
    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The appended archive, read back by GNU cpio: one executable test.sh holding the script.
    #[test]
    fn appended_archive_is_newc_with_an_executable_test_script() {
        let dir = std::env::temp_dir().join(format!("citadel-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base");
        let out = dir.join("out");
        // An odd length forces padding before the appended archive.
        std::fs::write(&base, b"base!").unwrap();
        let script = "echo one\nexit 3\n";
        initramfs_with_script(&base, script, &out).unwrap();
        let image = std::fs::read(&out).unwrap();
        assert_eq!(&image[..5], b"base!");
        assert_eq!(&image[5..8], &[0, 0, 0]);
        assert_eq!(&image[8..14], b"070701");
        assert_eq!(image.len() % 4, 0);
        let archive = dir.join("archive.cpio");
        std::fs::write(&archive, &image[8..]).unwrap();

        let cpio = |args: &[&str]| {
            Command::new("cpio")
                .args(args)
                .stdin(File::open(&archive).unwrap())
                .output()
        };
        let Ok(listing) = cpio(&["-itv", "--quiet"]) else {
            crate::skip("initramfs cpio check", "cpio is not installed", false);
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        };
        let listing = String::from_utf8_lossy(&listing.stdout).to_string();
        assert!(
            listing.starts_with("-rwxr-xr-x") && listing.trim_end().ends_with(" test.sh"),
            "{listing}"
        );
        let content = cpio(&["-i", "--to-stdout", "--quiet", "test.sh"]).unwrap();
        assert_eq!(String::from_utf8_lossy(&content.stdout), script);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Added files keep the permission bits asked for, in the directories the archive makes.
    #[test]
    fn added_files_keep_their_permission_bits() {
        let dir =
            std::env::temp_dir().join(format!("citadel-initramfs-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base");
        let out = dir.join("out");
        std::fs::write(&base, b"base").unwrap();
        let files: &[(&str, u32, &[u8])] = &[
            ("bin/tool", 0o755, b"\x7fELF"),
            ("modules/m.ko", 0o644, b"module"),
        ];
        initramfs_with_files(&base, "true\n", files, &out).unwrap();
        let image = std::fs::read(&out).unwrap();
        let archive = dir.join("archive.cpio");
        std::fs::write(&archive, &image[4..]).unwrap();
        let Ok(listing) = Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(File::open(&archive).unwrap())
            .output()
        else {
            crate::skip("initramfs cpio check", "cpio is not installed", false);
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        };
        let listing = String::from_utf8_lossy(&listing.stdout).to_string();
        let mode_of = |name: &str| {
            listing
                .lines()
                .find(|line| line.ends_with(&format!(" {name}")))
                .and_then(|line| line.split_whitespace().next())
                .unwrap_or_else(|| panic!("{name} missing\n{listing}"))
                .to_string()
        };
        assert_eq!(mode_of("bin"), "drwxr-xr-x", "{listing}");
        assert_eq!(mode_of("bin/tool"), "-rwxr-xr-x", "{listing}");
        assert_eq!(mode_of("modules/m.ko"), "-rw-r--r--", "{listing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
