//! What citadel-blk and citadel-net share as vhost-user backends built on the `vhost` crate's
//! request dispatcher: the frontend's memory table, validated and mapped ([`memory`]), and the
//! serving of one connection message by message, including SET_VRING_ENABLE messages that
//! QEMU 7.2 sends before SET_FEATURES ([`session`]).

pub mod memory;
pub mod refusal;
pub mod session;
