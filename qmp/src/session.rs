//! Per-connection capability negotiation.

use serde_json::{json, Value};

use crate::command::{parse_envelope, Command, Request};
use crate::error::{ErrorClass, QmpError};
use crate::framing::FrameError;
use crate::reply;

/// The state of one client connection.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

/// What to do with one frame from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send this line back; nothing else to do.
    Reply(String),
    /// Execute this request and reply with its result.
    Dispatch(Box<Request>),
}

impl Session {
    /// A connection that has just been greeted.
    pub fn new() -> Self {
        Session::default()
    }

    /// True once `qmp_capabilities` succeeded; events go only to negotiated clients.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one frame from the decoder.
    pub fn handle(&mut self, frame: Result<Value, FrameError>) -> Outcome {
        let value = match frame {
            Ok(value) => value,
            Err(e) => return Outcome::Reply(reply::error(None, &QmpError::generic(e.to_string()))),
        };
        let envelope = match parse_envelope(value) {
            Ok(envelope) => envelope,
            Err(e) => return Outcome::Reply(reply::error(e.id.as_ref(), &e.error)),
        };
        let id = envelope.id;
        // Before negotiation only qmp_capabilities exists, as in QEMU.
        if !self.negotiated && envelope.name != "qmp_capabilities" {
            let err = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return Outcome::Reply(reply::error(id.as_ref(), &err));
        }
        let command = match Command::parse(&envelope.name, envelope.arguments) {
            Ok(command) => command,
            Err(err) => return Outcome::Reply(reply::error(id.as_ref(), &err)),
        };
        match command {
            Command::QmpCapabilities { enable } => Outcome::Reply(match self.negotiate(&enable) {
                Ok(()) => reply::success(id.as_ref(), json!({})),
                Err(err) => reply::error(id.as_ref(), &err),
            }),
            command => Outcome::Dispatch(Box::new(Request { id, command })),
        }
    }

    fn negotiate(&mut self, enable: &[String]) -> Result<(), QmpError> {
        if self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        // As in QEMU, names outside the capability enumeration are refused first; "oob", its
        // only member, is refused next because Citadel executes every command in order.
        if let Some((i, cap)) = enable.iter().enumerate().find(|(_, cap)| *cap != "oob") {
            return Err(QmpError::unaccepted_value(&format!("enable[{i}]"), cap));
        }
        if !enable.is_empty() {
            return Err(QmpError::generic("Capability 'oob' not available"));
        }
        self.negotiated = true;
        Ok(())
    }
}
