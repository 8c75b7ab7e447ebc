//! Typed QMP commands and the validation of the request envelope.
//!
//! A request is `{"execute": NAME, "arguments": {...}, "id": ANY}`. Validation happens in the
//! same order as QEMU's dispatcher: the envelope first ([`parse_envelope`]), then the command
//! name, then the arguments ([`Command::parse`]). Adding a command with arguments means adding
//! a variant holding a `#[derive(Deserialize)] #[serde(deny_unknown_fields)]` struct, a line
//! in [`Command::parse`] calling [`from_arguments`], and its name in the list behind
//! [`command_names`].

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::arguments::from_arguments;
use crate::balloon::BalloonArgs;
use crate::chardev::{ChardevAdd, ChardevAddArgs, ChardevRemoveArgs};
use crate::device::{
    BlockdevAdd, BlockdevAddArgs, BlockdevDelArgs, DeviceAdd, DeviceAddArgs, DeviceDelArgs,
};
use crate::error::QmpError;
use crate::fds::{AddFd, AddFdArgs, FdnameArgs, RemoveFd, RemoveFdArgs};
use crate::migration::MigrateArgs;
use crate::netdev::{NetdevAdd, NetdevAddArgs, NetdevDelArgs};

/// Every command Citadel understands, in the order `query-commands` lists them.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "query-cpus",
    "query-hotpluggable-cpus",
    "stop",
    "cont",
    "quit",
    "system_reset",
    "query-version",
    "query-commands",
    "blockdev-add",
    "blockdev-del",
    "device_add",
    "device_del",
    "netdev_add",
    "netdev_del",
    "query-block",
    "query-uuid",
    "getfd",
    "closefd",
    "add-fd",
    "remove-fd",
    "query-fdsets",
    "balloon",
    "query-balloon",
    "chardev-add",
    "chardev-remove",
    "query-chardev",
    "migrate",
    "query-migrate",
];

/// Every command name, for `query-commands`.
pub fn command_names() -> &'static [&'static str] {
    COMMANDS
}

/// A command with its typed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Capability negotiation; `enable` lists the capabilities the client asks for.
    QmpCapabilities {
        /// Requested capabilities (QEMU knows only "oob", which Citadel does not offer).
        enable: Vec<String>,
    },
    /// Run state of the VM.
    QueryStatus,
    /// vCPUs with their host thread ids.
    QueryCpus,
    /// vCPU slots.
    QueryHotpluggableCpus,
    /// Pause all vCPUs.
    Stop,
    /// Resume all vCPUs.
    Cont,
    /// Terminate the VM.
    Quit,
    /// Reset the VM.
    SystemReset,
    /// Version of the monitor.
    QueryVersion,
    /// Names of all commands.
    QueryCommands,
    /// Start serving an image as a block node.
    BlockdevAdd(BlockdevAdd),
    /// Stop serving a block node that no device uses.
    BlockdevDel {
        /// The node.
        node_name: String,
    },
    /// Attach a device.
    DeviceAdd(DeviceAdd),
    /// Detach a device.
    DeviceDel {
        /// The device's id.
        id: String,
    },
    /// Start serving a tap as a network backend.
    NetdevAdd(NetdevAdd),
    /// Stop serving a network backend that no device uses.
    NetdevDel {
        /// The backend's id.
        id: String,
    },
    /// The block devices and what they serve.
    QueryBlock,
    /// The VM's UUID.
    QueryUuid,
    /// Keep the descriptor attached to the message under a name.
    Getfd {
        /// The name.
        fdname: String,
    },
    /// Close a descriptor kept by `getfd`.
    Closefd {
        /// The name.
        fdname: String,
    },
    /// Add the descriptor attached to the message to an fd set.
    AddFd(AddFd),
    /// Close a descriptor of an fd set, or the whole set.
    RemoveFd(RemoveFd),
    /// The fd sets and their descriptors.
    QueryFdsets,
    /// Ask the guest to shrink or grow to a memory size.
    Balloon {
        /// The target size in bytes, positive.
        value: u64,
    },
    /// The guest's memory size as its balloon driver reports it.
    QueryBalloon,
    /// Connect to a vhost-user backend's Unix socket.
    ChardevAdd(ChardevAdd),
    /// Close a chardev that no device uses.
    ChardevRemove {
        /// The chardev's id.
        id: String,
    },
    /// The chardevs and whether a device uses each.
    QueryChardev,
    /// Pause the VM and write a snapshot of it into a directory.
    Migrate {
        /// The snapshot directory (`file:` stripped off the URI).
        dir: String,
    },
    /// How the last snapshot went.
    QueryMigrate,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default)]
    enable: Vec<String>,
}

/// Arguments of commands that take none: any member is unexpected.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

impl Command {
    /// Builds the command `name` from its `arguments` (absent means `{}`).
    pub fn parse(name: &str, arguments: Option<Map<String, Value>>) -> Result<Self, QmpError> {
        let command = match name {
            "qmp_capabilities" => {
                let args: CapabilitiesArgs = from_arguments(arguments)?;
                return Ok(Command::QmpCapabilities {
                    enable: args.enable,
                });
            }
            "blockdev-add" => {
                let args: BlockdevAddArgs = from_arguments(arguments)?;
                return Ok(Command::BlockdevAdd(args.validate()?));
            }
            "blockdev-del" => {
                let args: BlockdevDelArgs = from_arguments(arguments)?;
                return Ok(Command::BlockdevDel {
                    node_name: args.node_name,
                });
            }
            "device_add" => {
                let args: DeviceAddArgs = from_arguments(arguments)?;
                return Ok(Command::DeviceAdd(args.validate()?));
            }
            "device_del" => {
                let args: DeviceDelArgs = from_arguments(arguments)?;
                return Ok(Command::DeviceDel { id: args.id });
            }
            "getfd" => {
                let args: FdnameArgs = from_arguments(arguments)?;
                return Ok(Command::Getfd {
                    fdname: args.validate(true)?,
                });
            }
            "closefd" => {
                let args: FdnameArgs = from_arguments(arguments)?;
                return Ok(Command::Closefd {
                    fdname: args.validate(false)?,
                });
            }
            "add-fd" => {
                let args: AddFdArgs = from_arguments(arguments)?;
                return Ok(Command::AddFd(args.validate()?));
            }
            "remove-fd" => {
                let args: RemoveFdArgs = from_arguments(arguments)?;
                return Ok(Command::RemoveFd(args.into_command()));
            }
            "query-fdsets" => Command::QueryFdsets,
            "balloon" => {
                let args: BalloonArgs = from_arguments(arguments)?;
                return Ok(Command::Balloon {
                    value: args.validate()?,
                });
            }
            "query-balloon" => Command::QueryBalloon,
            "chardev-add" => {
                let args: ChardevAddArgs = from_arguments(arguments)?;
                return Ok(Command::ChardevAdd(args.validate()?));
            }
            "chardev-remove" => {
                let args: ChardevRemoveArgs = from_arguments(arguments)?;
                return Ok(Command::ChardevRemove { id: args.id });
            }
            "query-chardev" => Command::QueryChardev,
            "migrate" => {
                let args: MigrateArgs = from_arguments(arguments)?;
                return Ok(Command::Migrate {
                    dir: args.validate()?,
                });
            }
            "query-migrate" => Command::QueryMigrate,
            "netdev_add" => {
                let args: NetdevAddArgs = from_arguments(arguments)?;
                return Ok(Command::NetdevAdd(args.validate()?));
            }
            "netdev_del" => {
                let args: NetdevDelArgs = from_arguments(arguments)?;
                return Ok(Command::NetdevDel { id: args.id });
            }
            "query-block" => Command::QueryBlock,
            "query-uuid" => Command::QueryUuid,
            "query-status" => Command::QueryStatus,
            "query-cpus" => Command::QueryCpus,
            "query-hotpluggable-cpus" => Command::QueryHotpluggableCpus,
            "stop" => Command::Stop,
            "cont" => Command::Cont,
            "quit" => Command::Quit,
            "system_reset" => Command::SystemReset,
            "query-version" => Command::QueryVersion,
            "query-commands" => Command::QueryCommands,
            _ => return Err(QmpError::command_not_found(name)),
        };
        from_arguments::<NoArgs>(arguments)?;
        Ok(command)
    }

    /// The command's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities { .. } => "qmp_capabilities",
            Command::QueryStatus => "query-status",
            Command::QueryCpus => "query-cpus",
            Command::QueryHotpluggableCpus => "query-hotpluggable-cpus",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::SystemReset => "system_reset",
            Command::QueryVersion => "query-version",
            Command::QueryCommands => "query-commands",
            Command::BlockdevAdd(_) => "blockdev-add",
            Command::BlockdevDel { .. } => "blockdev-del",
            Command::DeviceAdd(_) => "device_add",
            Command::DeviceDel { .. } => "device_del",
            Command::NetdevAdd(_) => "netdev_add",
            Command::NetdevDel { .. } => "netdev_del",
            Command::QueryBlock => "query-block",
            Command::QueryUuid => "query-uuid",
            Command::Getfd { .. } => "getfd",
            Command::Closefd { .. } => "closefd",
            Command::AddFd(_) => "add-fd",
            Command::RemoveFd(_) => "remove-fd",
            Command::QueryFdsets => "query-fdsets",
            Command::Balloon { .. } => "balloon",
            Command::QueryBalloon => "query-balloon",
            Command::ChardevAdd(_) => "chardev-add",
            Command::ChardevRemove { .. } => "chardev-remove",
            Command::QueryChardev => "query-chardev",
            Command::Migrate { .. } => "migrate",
            Command::QueryMigrate => "query-migrate",
        }
    }

    /// Whether the command takes a descriptor attached to its message (`getfd`, `add-fd`);
    /// descriptors attached to any other command are closed unused.
    pub fn takes_descriptor(&self) -> bool {
        matches!(self, Command::Getfd { .. } | Command::AddFd(_))
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The client's `id`, any JSON value, to be echoed verbatim in the reply.
    pub id: Option<Value>,
    /// The command to run.
    pub command: Command,
}

/// A request that was refused, with the `id` to echo if the request carried one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    /// The client's `id`, if the input was an object with one.
    pub id: Option<Value>,
    /// What was wrong.
    pub error: QmpError,
}

/// A request whose envelope is well formed but whose command is not yet looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The client's `id`.
    pub id: Option<Value>,
    /// The `execute` member.
    pub name: String,
    /// The `arguments` member, if present.
    pub arguments: Option<Map<String, Value>>,
}

/// Checks the request envelope like QEMU: a JSON object whose only members are `execute`
/// (a string, required), `arguments` (an object) and `id` (anything).
pub fn parse_envelope(v: Value) -> Result<Envelope, RequestError> {
    let Value::Object(mut members) = v else {
        return Err(RequestError {
            id: None,
            error: QmpError::generic("QMP input must be a JSON object"),
        });
    };
    let id = members.remove("id");
    let fail = |id: Option<Value>, desc: String| RequestError {
        id,
        error: QmpError::generic(desc),
    };
    let mut name = None;
    let mut arguments = None;
    for (key, value) in members {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => name = Some(s),
                _ => {
                    return Err(fail(
                        id,
                        "QMP input member 'execute' must be a string".into(),
                    ))
                }
            },
            "arguments" => match value {
                Value::Object(m) => arguments = Some(m),
                _ => {
                    return Err(fail(
                        id,
                        "QMP input member 'arguments' must be an object".into(),
                    ))
                }
            },
            _ => return Err(fail(id, format!("QMP input member '{key}' is unexpected"))),
        }
    }
    match name {
        Some(name) => Ok(Envelope {
            id,
            name,
            arguments,
        }),
        None => Err(fail(id, "QMP input lacks member 'execute'".into())),
    }
}

/// Validates a request fully: envelope, command name and arguments.
pub fn parse_request(v: Value) -> Result<Request, RequestError> {
    let envelope = parse_envelope(v)?;
    match Command::parse(&envelope.name, envelope.arguments) {
        Ok(command) => Ok(Request {
            id: envelope.id,
            command,
        }),
        Err(error) => Err(RequestError {
            id: envelope.id,
            error,
        }),
    }
}
