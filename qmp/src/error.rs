//! QMP error classes and the error value carried in `{"error": ...}` replies.

use serde::Serialize;

/// QEMU's error classes, spelt on the wire exactly as QEMU spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Every error without a more specific class (argument errors, failed operations).
    GenericError,
    /// The command does not exist, or is not allowed in the current negotiation state.
    CommandNotFound,
    /// The device exists but is not in a state that allows the operation.
    DeviceNotActive,
    /// No device with the given id exists.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears in the `class` member of an error reply.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error as reported to a QMP client: a class and a human-readable description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// Machine-readable class.
    pub class: ErrorClass,
    /// Human-readable description, one line.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound` for a command name that is not known at all.
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// `DeviceNotFound` with QEMU's text for a missing device id.
    pub fn device_not_found(id: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        )
    }

    /// `DeviceNotActive` with QEMU's text for a kind of device (e.g. "balloon") that the
    /// machine does not have.
    pub fn device_not_active(kind: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotActive,
            format!("No {kind} device has been activated"),
        )
    }

    /// `KVMMissingCap` with QEMU's text: KVM lacks `cap`, so `feature` is unavailable.
    pub fn kvm_missing_cap(cap: &str, feature: &str) -> Self {
        Self::new(
            ErrorClass::KVMMissingCap,
            format!("Using KVM without {cap}, {feature} unavailable"),
        )
    }

    /// QEMU's error for `getfd` or `add-fd` sent without a descriptor attached.
    pub fn fd_not_supplied() -> Self {
        Self::generic("No file descriptor supplied via SCM_RIGHTS")
    }

    /// QEMU's error for a descriptor name (or fd set member) that does not exist.
    pub fn fd_not_found(name: &str) -> Self {
        Self::generic(format!("File descriptor named '{name}' not found"))
    }

    /// QEMU's "Parameter 'x' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// QEMU's "Parameter 'x' is unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// QEMU's `Invalid parameter type for 'x', expected: <type>`.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// QEMU's `Parameter 'x' expects <what>`, for values of the right type but out of range.
    pub fn invalid_parameter_value(name: &str, expects: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expects}"))
    }

    /// QEMU's "Parameter 'x' does not accept value 'v'", for unknown enumeration values.
    pub fn unaccepted_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }
}
