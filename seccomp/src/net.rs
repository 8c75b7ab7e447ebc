//! Allowlist of the citadel-net backend process.

use crate::{Error, Rules};

/// Syscalls citadel-net needs once it serves its frontend.
pub fn rules() -> Result<Rules, Error> {
    Ok(vec![])
}
