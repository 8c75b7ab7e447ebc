//! Running a `citadel` process for a test: its serial output collected line by line, a QMP
//! client that separates replies from events, and cleanup on every path.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::kernel::ConsoleProcess;

/// A unique scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `/tmp/citadel-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "citadel-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running citadel process with its serial console, killed on drop.
pub struct Vm {
    console: ConsoleProcess,
    /// The QMP socket path.
    pub qmp_path: PathBuf,
    _dir: TempDir,
}

impl Vm {
    /// Starts `citadel -machine microvm -kernel <kernel> -qmp unix:<tmp>,server,nowait
    /// -serial stdio` plus `extra` arguments.
    pub fn start(kernel: &Path, extra: &[&str]) -> Vm {
        Vm::start_with(kernel, extra, "", None)
    }

    /// Like [`Vm::start`], with `qmp_options` appended to the `-qmp` value and, when given,
    /// `umask` set in the child before exec.
    pub fn start_with(
        kernel: &Path,
        extra: &[&str],
        qmp_options: &str,
        umask: Option<libc::mode_t>,
    ) -> Vm {
        Vm::start_full(kernel, extra, qmp_options, umask, &[])
    }

    /// Like [`Vm::start`], with descriptors `inherit` (close-on-exec in this process) left
    /// open in citadel under the same numbers, as a parent passes them for `-add-fd`.
    pub fn start_inheriting(kernel: &Path, extra: &[&str], inherit: &[RawFd]) -> Vm {
        Vm::start_full(kernel, extra, "", None, inherit)
    }

    fn start_full(
        kernel: &Path,
        extra: &[&str],
        qmp_options: &str,
        umask: Option<libc::mode_t>,
        inherit: &[RawFd],
    ) -> Vm {
        use std::os::unix::process::CommandExt;
        let dir = TempDir::new("vm");
        let qmp_path = dir.path().join("qmp.sock");
        let mut cmd = Command::new(crate::binary("citadel"));
        if !inherit.is_empty() {
            let fds = inherit.to_vec();
            // SAFETY: fcntl is async-signal-safe and changes only the child's descriptors.
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &fds {
                        if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(mask) = umask {
            // SAFETY: umask is async-signal-safe and changes only the child's own mask.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        cmd.arg("-machine")
            .arg("microvm")
            .arg("-kernel")
            .arg(kernel)
            .arg("-qmp")
            .arg(format!(
                "unix:{},server,nowait{qmp_options}",
                qmp_path.display()
            ))
            .arg("-serial")
            .arg("stdio")
            .args(extra);
        Vm {
            console: ConsoleProcess::spawn(cmd).expect("spawn citadel"),
            qmp_path,
            _dir: dir,
        }
    }

    /// Waits for a serial line containing `needle`; panics with everything seen on timeout.
    pub fn wait_serial(&mut self, needle: &str, timeout: Duration) -> String {
        self.console.wait_for(needle, timeout).unwrap_or_else(|| {
            panic!(
                "no serial line containing {needle:?} within {timeout:?}\n{}",
                self.console.transcript()
            )
        })
    }

    /// Serial lines received within `window`, without waiting for anything in particular.
    pub fn serial_lines_for(&mut self, window: Duration) -> Vec<String> {
        self.console.lines_for(window)
    }

    /// What citadel logged so far (its stderr).
    pub fn log(&self) -> String {
        self.console.stderr()
    }

    /// Everything seen so far, serial console and log, for assertion messages.
    pub fn transcript(&self) -> String {
        self.console.transcript()
    }

    /// Connects a QMP client, waiting for the socket to appear.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path, Duration::from_secs(10))
    }

    /// The citadel process id.
    pub fn pid(&self) -> u32 {
        self.console.pid()
    }

    /// Waits up to `timeout` for the process to exit; its exit code (`None` if it is still
    /// running or was killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.console.wait_exit(timeout)
    }
}

/// A blocking QMP client that keeps events apart from replies.
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received so far and not yet taken.
    pub events: Vec<Value>,
    /// The greeting.
    pub greeting: Value,
}

impl Qmp {
    /// Connects (retrying until the socket exists) and reads the greeting, without
    /// negotiating.
    pub fn connect(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "QMP connect {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut qmp = Qmp {
            stream,
            reader,
            events: Vec::new(),
            greeting: Value::Null,
        };
        qmp.greeting = qmp.read_value().expect("greeting");
        qmp
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut qmp = Qmp::connect(path, Duration::from_secs(10));
        let r = qmp.execute("qmp_capabilities", None);
        assert_eq!(r, serde_json::json!({"return": {}}), "negotiation");
        qmp
    }

    /// Reads one JSON object (one line).
    pub fn read_value(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("QMP sent invalid JSON {line:?}: {e}")),
            ),
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("QMP write");
    }

    /// Sends raw bytes, reporting failure instead of panicking (for clients the VMM may drop).
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends `bytes` in one message with `fds` attached (`SCM_RIGHTS`).
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // Room for 64 descriptors, aligned for cmsghdr.
        let mut control = [0u64; 34];
        let payload = std::mem::size_of_val(fds);
        assert!(fds.len() <= 64, "at most 64 descriptors per message");
        // SAFETY: msghdr is plain data; the pointers are set to live buffers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
            // SAFETY: the control buffer (272 bytes) holds one header with up to 64
            // descriptors; the header and data pointers come from the CMSG macros over it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast(),
                    fds.len(),
                );
            }
        }
        // SAFETY: `msg` points to the live buffers above, whose lengths it states.
        let sent = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, 0) };
        assert_eq!(
            sent,
            bytes.len() as isize,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Executes a command sent with `fds` attached and returns its whole reply object.
    pub fn execute_with_fds(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fds: &[RawFd],
    ) -> Value {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let text = serde_json::to_string(&msg).expect("encode");
        self.send_with_fds(text.as_bytes(), fds);
        self.read_reply()
    }

    /// Reads until a reply (not an event) arrives; events are stored in `self.events`.
    pub fn read_reply(&mut self) -> Value {
        loop {
            let v = self
                .read_value()
                .expect("QMP connection closed before a reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Executes a command and returns its whole reply object.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let text = serde_json::to_string(&msg).expect("encode");
        self.send_raw(text.as_bytes());
        self.read_reply()
    }

    /// QMP `migrate` to `file:DIR`, returning the reply.
    pub fn migrate(&mut self, dir: &Path) -> Value {
        self.execute(
            "migrate",
            Some(serde_json::json!({"uri": format!("file:{}", dir.display())})),
        )
    }

    /// Waits for an event named `name` (already received ones count), and removes it.
    pub fn wait_event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let v = self
                .read_value()
                .unwrap_or_else(|| panic!("QMP closed before event {name}"));
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Reads whatever remains until the peer closes (used after `quit`).
    pub fn read_to_end(&mut self) -> String {
        let mut rest = String::new();
        let _ = self.reader.read_to_string(&mut rest);
        rest
    }
}
