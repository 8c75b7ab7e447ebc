//! `/dev/kvm` for unit tests. A test that needs it and cannot open it says so on stderr and in
//! the skipped-tests list `scripts/test.sh` prints, and fails under CI, where KVM is expected.

use kvm_ioctls::Kvm;

/// KVM, or `None` after reporting `test` as skipped (a failure under `CI=true`).
pub(crate) fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            citadel_tests::skip(test, &format!("/dev/kvm is not available: {e}"), true);
            None
        }
    }
}
