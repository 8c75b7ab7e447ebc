//! Builds the guest test programs (guest/, freestanding C and assembly) with `make`, into
//! `<target-dir>/<triple>/guest/` where `citadel_tests::guest_program` looks for them.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_src = manifest_dir
        .parent()
        .expect("tests/ is inside the workspace")
        .join("guest");
    println!("cargo:rerun-if-changed={}", guest_src.display());

    // OUT_DIR is <target-dir>/<triple>/<profile>/build/<pkg>-<hash>/out; the guest programs
    // sit next to the profile directories.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_out = out_dir
        .ancestors()
        .nth(4)
        .map(|dir| dir.join("guest"))
        .expect("OUT_DIR has the layout cargo documents");

    build(&guest_src, &guest_out);
}

fn build(src: &Path, out: &Path) {
    let status = Command::new("make")
        .arg("-C")
        .arg(src)
        .arg(format!("OUT={}", out.display()))
        .arg("--no-print-directory")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!(
            "building the guest programs failed ({status}): make -C {} OUT={}",
            src.display(),
            out.display()
        ),
        Err(err) => panic!("cannot run make for the guest programs: {err}"),
    }
}
