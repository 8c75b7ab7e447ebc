//! Asynchronous events with their timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

/// QEMU's shutdown causes, spelt as QEMU spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownReason {
    /// No shutdown requested.
    None,
    /// An error in the host prevented the VM from continuing.
    HostError,
    /// `quit` over QMP.
    HostQmpQuit,
    /// `system_reset` over QMP.
    HostQmpSystemReset,
    /// A signal to the monitor process.
    HostSignal,
    /// The host's user interface.
    HostUi,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset itself.
    GuestReset,
    /// The guest panicked.
    GuestPanic,
    /// A device-triggered reset.
    SubsystemReset,
    /// Loading a snapshot.
    SnapshotLoad,
}

/// An event to send to every negotiated client.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. "STOP".
    pub name: String,
    /// Event data; left out of the line when `None`.
    pub data: Option<Value>,
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct Line<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    timestamp: Timestamp,
}

impl Event {
    /// Any event.
    pub fn new(name: impl Into<String>, data: Option<Value>) -> Self {
        Event {
            name: name.into(),
            data,
        }
    }

    /// `STOP`: the vCPUs were paused.
    pub fn stop() -> Self {
        Self::new("STOP", None)
    }

    /// `RESUME`: the vCPUs run again.
    pub fn resume() -> Self {
        Self::new("RESUME", None)
    }

    /// `SHUTDOWN` with `{"guest": guest, "reason": reason}`.
    pub fn shutdown(guest: bool, reason: ShutdownReason) -> Self {
        Self::new(
            "SHUTDOWN",
            Some(json!({ "guest": guest, "reason": reason })),
        )
    }

    /// `RESET` with `{"guest": guest, "reason": reason}`.
    pub fn reset(guest: bool, reason: ShutdownReason) -> Self {
        Self::new("RESET", Some(json!({ "guest": guest, "reason": reason })))
    }

    /// `DEVICE_DELETED` with `{"device": id, "path": path}` once the guest released a device.
    pub fn device_deleted(device: &str, path: &str) -> Self {
        Self::new(
            "DEVICE_DELETED",
            Some(json!({ "device": device, "path": path })),
        )
    }

    /// `BALLOON_CHANGE` with `{"actual": bytes}`: the guest's memory size after ballooning,
    /// under QEMU's and libvirt's name.
    pub fn balloon_change(actual: u64) -> Self {
        Self::new("BALLOON_CHANGE", Some(json!({ "actual": actual })))
    }

    /// `BALLOON_CHANGED` with `{"actual": bytes}`: the same report under StratoVirt's name.
    pub fn balloon_changed(actual: u64) -> Self {
        Self::new("BALLOON_CHANGED", Some(json!({ "actual": actual })))
    }

    /// The event as a line ending in "\r\n", stamped with `at` (times before 1970 are
    /// stamped 0).
    pub fn to_line(&self, at: SystemTime) -> String {
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let line = Line {
            event: &self.name,
            data: self.data.as_ref(),
            timestamp: Timestamp {
                seconds: since.as_secs(),
                microseconds: since.subsec_micros(),
            },
        };
        // Strings, integers and a JSON value always serialise.
        serde_json::to_string(&line).unwrap_or_default() + "\r\n"
    }
}
