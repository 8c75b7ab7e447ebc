//! Citadel's QMP protocol: stream framing, the greeting, capability negotiation, typed
//! commands and arguments, replies with QEMU's error classes and texts, and timestamped
//! events. It knows nothing about the VMM, so it can be tested and fuzzed on its own.
//!
//! A server connection typically runs: send [`greeting::greeting`]; feed every read to a
//! [`framing::Decoder`]; hand each frame to [`session::Session::handle`]; write
//! [`session::Outcome::Reply`] lines back and execute [`session::Outcome::Dispatch`]ed
//! requests, answering with [`reply::success`] or [`reply::error`]; send
//! [`event::Event::to_line`] to clients that are [`session::Session::negotiated`].

pub mod arguments;
pub mod balloon;
pub mod chardev;
pub mod command;
pub mod device;
pub mod error;
pub mod event;
pub mod fds;
pub mod framing;
pub mod greeting;
pub mod migration;
pub mod netdev;
pub mod reply;
pub mod session;

pub use command::{Command, Request, RequestError};
pub use error::{ErrorClass, QmpError};
pub use event::{Event, ShutdownReason};
pub use framing::{Decoder, FrameError};
pub use session::{Outcome, Session};
