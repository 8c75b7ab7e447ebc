//! Network namespaces a test creates for the tap end of a network backend, and unique names
//! for them, so that parallel tests never share one.

use std::process::Command;

/// A name unique to this process and moment, starting with `tag` (short enough for an
/// interface or namespace name when `tag` is a few characters).
pub fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}{}x{:x}", std::process::id(), nanos & 0xffff)
}

/// A network namespace that exists for the lifetime of the guard.
pub struct NetNs(String);

impl NetNs {
    /// Creates the namespace `name` with `ip netns add`.
    pub fn create(name: String) -> NetNs {
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add")
            .success();
        assert!(ok, "ip netns add {name} failed");
        NetNs(name)
    }

    /// A command running `args` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    /// Runs `args` inside the namespace, asserting success; returns its standard output.
    pub fn output(&self, args: &[&str]) -> String {
        let out = self.exec(args).output().expect("run in netns");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
