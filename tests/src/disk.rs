//! What the disk tests share: scratch images with a marker, the backend's presence, QMP
//! error texts.

use std::path::{Path, PathBuf};

use serde_json::Value;

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
