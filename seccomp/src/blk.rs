//! Allowlist of the citadel-blk backend process.

use crate::{Error, Rules};

/// Syscalls citadel-blk needs once it serves its frontend.
pub fn rules() -> Result<Rules, Error> {
    Ok(vec![])
}
