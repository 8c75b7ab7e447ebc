//! What the disk tests share: scratch images with a marker, the backend's presence, what the
//! `virtio_blk` guest program does with a disk, QMP error texts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::vm::Vm;

/// What the `virtio_blk` guest program writes over sector 1 of a disk, repeated.
const GUEST_PATTERN: &[u8] = b"citadel-guest-wrote-sector-one.";

/// Waits until the `virtio_blk` guest program (hotplug mode) has seen a plugged disk of `len`
/// bytes, read `marker` from its sector 0 and written its sector 1 without an error, each step
/// within `step`.
pub fn guest_used_plugged_disk(vm: &mut Vm, len: usize, marker: &[u8], step: Duration) {
    let line = vm.wait_serial("citadel-guest: hotplug plugged capacity=", step);
    assert!(line.ends_with(&format!("capacity={}", len / 512)), "{line}");
    // The program prints sector 0's first 32 bytes, a dot for each unprintable one.
    let line = vm.wait_serial("citadel-guest: hotplug read status=", step);
    assert_eq!(
        line,
        format!(
            "citadel-guest: hotplug read status=0 sector0={}{}",
            String::from_utf8_lossy(marker),
            ".".repeat(32usize.saturating_sub(marker.len()))
        )
    );
    let line = vm.wait_serial("citadel-guest: hotplug write status=", step);
    assert!(line.ends_with("status=0"), "{line}");
}

/// Asserts that `sector` (512 bytes read from an image) holds what the `virtio_blk` guest
/// program writes.
pub fn assert_guest_wrote(sector: &[u8]) {
    let expected: Vec<u8> = GUEST_PATTERN.iter().copied().cycle().take(512).collect();
    assert_eq!(sector, expected.as_slice());
}

/// Writes `dir/name`: `len` zero bytes with `marker` at the start, and returns its path.
pub fn image_with_marker(dir: &Path, name: &str, len: usize, marker: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = vec![0u8; len];
    bytes[..marker.len()].copy_from_slice(marker);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// True (and the test reported as skipped, or failed in CI) when citadel-blk has not been
/// built.
pub fn blk_backend_missing(test: &str) -> bool {
    let missing = !crate::binary("citadel-blk").exists();
    if missing {
        crate::skip(
            test,
            "citadel-blk not built (cargo build --workspace)",
            true,
        );
    }
    missing
}

/// The `desc` of a QMP error reply; panics on anything else.
pub fn error_desc(reply: &Value) -> String {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
        .to_string()
}

/// Checks that `image` holds what the `virtio_blk` guest program in `restart` mode writes to
/// each of its first `sectors` sectors: the sector's number (8 bytes, little-endian), then
/// the byte `number ^ 0x5a` to the end.
pub fn assert_numbered_sectors(image: &Path, sectors: usize) {
    let image = std::fs::read(image).unwrap();
    for n in 0..sectors {
        let sector = &image[n * 512..(n + 1) * 512];
        assert_eq!(
            u64::from_le_bytes(sector[..8].try_into().unwrap()),
            n as u64,
            "sector {n} does not hold its number"
        );
        assert!(
            sector[8..].iter().all(|&b| b == (n as u8) ^ 0x5a),
            "sector {n} does not hold its pattern"
        );
    }
}
