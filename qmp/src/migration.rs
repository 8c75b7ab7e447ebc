//! Arguments and reply of the snapshot commands: `migrate {"uri": "file:DIR"}` writes a
//! snapshot of the VM into directory DIR, and `query-migrate` says how the last one went, in
//! QEMU's shape (`status`, and `error-desc` when it failed).

use serde::{Deserialize, Serialize};

use crate::error::QmpError;

/// The only URI scheme Citadel migrates to: a snapshot directory.
const FILE_SCHEME: &str = "file:";

/// `migrate`'s arguments. QEMU's `detach` is accepted and means nothing (a migration never
/// blocked the monitor there, and here it is over before the reply); its other members
/// describe network migrations and are refused as unexpected.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MigrateArgs {
    uri: String,
    #[serde(default)]
    #[allow(dead_code)]
    detach: Option<bool>,
}

impl MigrateArgs {
    /// The snapshot directory the URI names.
    pub(crate) fn validate(self) -> Result<String, QmpError> {
        match self.uri.strip_prefix(FILE_SCHEME) {
            Some(dir) if !dir.is_empty() && !dir.contains('\0') => Ok(dir.to_string()),
            Some(_) => Err(QmpError::invalid_parameter_value(
                "uri",
                "a snapshot directory after 'file:'",
            )),
            None => Err(QmpError::generic(format!(
                "Parameter 'uri' expects a valid migration protocol: Citadel writes snapshots \
                 to 'file:<directory>' only, not '{}'",
                self.uri.split(':').next().unwrap_or_default()
            ))),
        }
    }
}

/// Where the last `migrate` is, as `query-migrate` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No snapshot was asked for yet.
    None,
    /// The snapshot's files are being prepared.
    Setup,
    /// The snapshot is being written.
    Active,
    /// The snapshot is written.
    Completed,
    /// The snapshot could not be written; see `error-desc`.
    Failed,
}

/// What `query-migrate` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationInfo {
    /// Where the last snapshot is.
    pub status: MigrationStatus,
    /// Milliseconds the completed snapshot took, from the request to its files synced.
    #[serde(rename = "total-time", skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Why the last snapshot failed.
    #[serde(rename = "error-desc", skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    /// Before any `migrate`.
    pub const NONE: MigrationInfo = MigrationInfo {
        status: MigrationStatus::None,
        total_time: None,
        error_desc: None,
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::command::Command;

    fn parse(arguments: serde_json::Value) -> Result<Command, String> {
        let serde_json::Value::Object(map) = arguments else {
            unreachable!("the tests pass objects")
        };
        Command::parse("migrate", Some(map)).map_err(|e| format!("{:?}: {}", e.class, e.desc))
    }

    #[test]
    fn a_file_uri_names_the_snapshot_directory() {
        assert_eq!(
            parse(json!({"uri": "file:/var/lib/vm/snap"})),
            Ok(Command::Migrate {
                dir: "/var/lib/vm/snap".into()
            })
        );
        assert_eq!(
            parse(json!({"uri": "file:snap", "detach": true})),
            Ok(Command::Migrate { dir: "snap".into() })
        );
    }

    #[test]
    fn other_uris_and_members_are_refused() {
        assert_eq!(
            parse(json!({"uri": "tcp:127.0.0.1:4444"})),
            Err(
                "GenericError: Parameter 'uri' expects a valid migration protocol: Citadel \
                 writes snapshots to 'file:<directory>' only, not 'tcp'"
                    .into()
            )
        );
        assert_eq!(
            parse(json!({"uri": "file:"})),
            Err("GenericError: Parameter 'uri' expects a snapshot directory after 'file:'".into())
        );
        assert_eq!(
            parse(json!({"uri": "file:/a\u{0}b"})),
            Err("GenericError: Parameter 'uri' expects a snapshot directory after 'file:'".into())
        );
        assert_eq!(
            parse(json!({})),
            Err("GenericError: Parameter 'uri' is missing".into())
        );
        assert_eq!(
            parse(json!({"uri": "file:/d", "blk": true})),
            Err("GenericError: Parameter 'blk' is unexpected".into())
        );
        assert_eq!(
            parse(json!({"uri": 5})),
            Err("GenericError: Invalid parameter type for 'uri', expected: string".into())
        );
    }

    #[test]
    fn the_status_is_reported_in_qemus_shape() {
        assert_eq!(
            serde_json::to_value(MigrationInfo::NONE).unwrap(),
            json!({"status": "none"})
        );
        let failed = MigrationInfo {
            status: MigrationStatus::Failed,
            total_time: None,
            error_desc: Some("snapshot directory '/d' is not empty".into()),
        };
        assert_eq!(
            serde_json::to_value(failed).unwrap(),
            json!({"status": "failed", "error-desc": "snapshot directory '/d' is not empty"})
        );
        let done = MigrationInfo {
            status: MigrationStatus::Completed,
            total_time: Some(12),
            error_desc: None,
        };
        assert_eq!(
            serde_json::to_value(done).unwrap(),
            json!({"status": "completed", "total-time": 12})
        );
    }
}
