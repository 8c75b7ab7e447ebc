//! Shared helpers for Citadel's integration tests: where the binaries, guest programs and
//! guest kernel are, and how a test that cannot run on this host says so.

use std::path::PathBuf;

/// The cargo profile directory (`target/debug` or `target/release`) this test or binary was
/// built into, found from the running executable so that any `CARGO_TARGET_DIR` works.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Tests are <target>/<profile>/deps/<test>-<hash>; binaries <target>/<profile>/<name>.
    let dir = exe.parent().expect("executable has a parent folder");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary (`citadel`, `citadel-blk`, ...). Panics with a hint when it
/// has not been built, since `cargo test` alone does not build other packages' binaries.
pub fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// Path of a guest test program, `<target>/guest/<name>.elf`.
pub fn guest_program(name: &str) -> PathBuf {
    let path = profile_dir()
        .parent()
        .expect("profile dir has a parent")
        .join("guest")
        .join(format!("{name}.elf"));
    assert!(
        path.exists(),
        "{} not found: the guest programs are built by `make -C guest`",
        path.display()
    );
    path
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// True when running under CI, where a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| v == "true" || v == "1")
}

/// Reports a test that cannot run here. Under CI a missing prerequisite that CI is meant to
/// install fails the test instead (`required` = true); a host limitation (`required` = false,
/// e.g. no hardware virtualization) is always a visible skip.
pub fn skip(test: &str, why: &str, required: bool) {
    if required && in_ci() {
        panic!("{test}: prerequisite missing under CI: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    // cargo test hides a passing test's output; the list is printed by scripts/test.sh.
    let record = skipped_list();
    let line = format!("SKIPPED {test}: {why}\n");
    if let Err(e) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&record)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
    {
        eprintln!("recording the skip in {}: {e}", record.display());
    }
}

/// File listing the tests skipped in this target directory: `<target>/<triple>/skipped-tests.txt`.
pub fn skipped_list() -> PathBuf {
    profile_dir()
        .parent()
        .expect("profile dir has a parent")
        .join("skipped-tests.txt")
}
pub mod cpio;
pub mod disk;
pub mod foreign;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod procfs;
pub mod vhost_user;
pub mod vhost_user_script;
pub mod vm;

/// A child process killed and reaped on every path out of a test, panics included.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
