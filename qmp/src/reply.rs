//! Replies to commands and the typed values they return.

use serde::Serialize;
use serde_json::Value;

use crate::error::QmpError;

#[derive(Serialize)]
struct Success<'a, T: Serialize> {
    #[serde(rename = "return")]
    ret: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct Failure<'a> {
    error: &'a QmpError,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// `{"return": ret, "id": id}\r\n` (`id` left out when the request had none).
pub fn success(id: Option<&Value>, ret: Value) -> String {
    success_with(id, &ret)
}

/// Like [`success`], serialising a typed return value directly so its members keep their
/// declaration order on the wire.
pub fn success_with<T: Serialize>(id: Option<&Value>, ret: &T) -> String {
    match serde_json::to_string(&Success { ret, id }) {
        Ok(line) => line + "\r\n",
        Err(e) => error(
            id,
            &QmpError::generic(format!("Cannot serialise the reply: {e}")),
        ),
    }
}

/// `{"error": {"class": CLASS, "desc": DESC}, "id": id}\r\n`.
pub fn error(id: Option<&Value>, err: &QmpError) -> String {
    // A struct of strings and a JSON value always serialises.
    serde_json::to_string(&Failure { error: err, id }).unwrap_or_default() + "\r\n"
}

/// QEMU's run states, spelt as QEMU spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration or snapshot.
    #[serde(rename = "inmigrate")]
    InMigrate,
    /// Stopped after an emulation failure.
    InternalError,
    /// Stopped after a disk I/O error.
    IoError,
    /// Stopped by `stop`.
    Paused,
    /// Stopped after an outgoing migration or snapshot completed.
    #[serde(rename = "postmigrate")]
    PostMigrate,
    /// Not started yet.
    Prelaunch,
    /// Finishing an outgoing migration.
    FinishMigrate,
    /// Restoring a saved state.
    RestoreVm,
    /// vCPUs running.
    Running,
    /// Saving state.
    SaveVm,
    /// The guest shut down.
    Shutdown,
    /// The guest is suspended.
    Suspended,
    /// Stopped by a watchdog.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO fault tolerance.
    Colo,
}

/// Return value of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusInfo {
    /// True if the vCPUs run.
    pub running: bool,
    /// Always false: Citadel has no single-step mode.
    pub singlestep: bool,
    /// The run state.
    pub status: RunState,
}

/// Topology position of a vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuProps {
    /// Core within the socket.
    #[serde(rename = "core-id")]
    pub core_id: u32,
    /// Socket.
    #[serde(rename = "socket-id")]
    pub socket_id: u32,
    /// Thread within the core.
    #[serde(rename = "thread-id")]
    pub thread_id: u32,
}

/// One element of `query-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuInfo {
    /// vCPU index.
    #[serde(rename = "CPU")]
    pub cpu: u32,
    /// Architecture, "x86".
    pub arch: String,
    /// True for the vCPU the monitor considers current (the first).
    pub current: bool,
    /// True if the vCPU is halted.
    pub halted: bool,
    /// Topology position.
    pub props: CpuProps,
    /// QOM path, e.g. `/machine/unattached/device[0]`.
    pub qom_path: String,
    /// Host thread id (TID) of the vCPU thread.
    pub thread_id: i32,
}

/// One element of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HotpluggableCpu {
    /// Topology position.
    pub props: CpuProps,
    /// QOM path of the vCPU in this slot.
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    /// CPU type, "host-x86-cpu".
    #[serde(rename = "type")]
    pub cpu_type: String,
    /// vCPUs per slot.
    #[serde(rename = "vcpus-count")]
    pub vcpus_count: u32,
}

/// A three-part version number, members in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VersionTriple {
    /// Micro (patch) version.
    pub micro: u32,
    /// Minor version.
    pub minor: u32,
    /// Major version.
    pub major: u32,
}

/// Return value of `query-version`, also part of the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// The version (QMP calls the member "qemu").
    pub qemu: VersionTriple,
    /// Package string, usually empty.
    pub package: String,
}

impl VersionInfo {
    /// Version `major.minor.micro` with an empty package string.
    pub fn new(major: u32, minor: u32, micro: u32) -> Self {
        VersionInfo {
            qemu: VersionTriple {
                micro,
                minor,
                major,
            },
            package: String::new(),
        }
    }

    /// The same version with `package` naming the build that reports it.
    pub fn with_package(self, package: impl Into<String>) -> Self {
        VersionInfo {
            package: package.into(),
            ..self
        }
    }
}

/// Return value of `query-uuid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UuidInfo {
    /// The UUID, all zeros when none was given (as QEMU answers).
    #[serde(rename = "UUID")]
    pub uuid: String,
}

impl UuidInfo {
    /// The UUID QEMU reports for a VM started without one.
    pub const NONE: &'static str = "00000000-0000-0000-0000-000000000000";
}

/// One element of `query-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandInfo {
    /// Command name.
    pub name: String,
}

/// The return value of `query-commands`: every command Citadel understands.
pub fn command_list() -> Vec<CommandInfo> {
    crate::command::command_names()
        .iter()
        .map(|name| CommandInfo {
            name: (*name).to_owned(),
        })
        .collect()
}
