//! Arguments and reply of the balloon commands, as QEMU takes and gives them:
//! `balloon {"value": BYTES}` sets the memory size the guest should shrink or grow to, and
//! `query-balloon` returns `{"actual": BYTES}`, the size the guest's driver reports.

use serde::{Deserialize, Serialize};

use crate::error::QmpError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BalloonArgs {
    value: i64,
}

impl BalloonArgs {
    /// The target in bytes. QEMU refuses a target that is not positive before it looks for a
    /// balloon device, naming the member `target` (its internal name), and so does Citadel.
    pub(crate) fn validate(self) -> Result<u64, QmpError> {
        u64::try_from(self.value)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| QmpError::invalid_parameter_value("target", "a size"))
    }
}

/// What `query-balloon` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BalloonInfo {
    /// The guest's memory size in bytes: its RAM less what its balloon holds.
    pub actual: u64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::command::Command;

    fn parse(arguments: serde_json::Value) -> Result<Command, String> {
        let serde_json::Value::Object(map) = arguments else {
            unreachable!("the tests pass objects")
        };
        Command::parse("balloon", Some(map)).map_err(|e| format!("{:?}: {}", e.class, e.desc))
    }

    #[test]
    fn a_positive_value_is_the_target() {
        assert_eq!(
            parse(json!({"value": 536870912})),
            Ok(Command::Balloon { value: 536870912 })
        );
        assert_eq!(
            parse(json!({"value": 1})),
            Ok(Command::Balloon { value: 1 })
        );
    }

    #[test]
    fn values_are_refused_with_qemus_texts() {
        for value in [json!(0), json!(-1), json!(i64::MIN)] {
            assert_eq!(
                parse(json!({ "value": value })),
                Err("GenericError: Parameter 'target' expects a size".into())
            );
        }
        for value in [json!("1G"), json!(1.5), json!(null), json!([1])] {
            assert_eq!(
                parse(json!({ "value": value })),
                Err("GenericError: Invalid parameter type for 'value', expected: integer".into()),
                "{value}"
            );
        }
        assert_eq!(
            parse(json!({})),
            Err("GenericError: Parameter 'value' is missing".into())
        );
        assert_eq!(
            parse(json!({"value": 1, "target": 1})),
            Err("GenericError: Parameter 'target' is unexpected".into())
        );
        assert_eq!(
            parse(json!({ "value": u64::MAX })),
            Err("GenericError: Parameter 'value' expects int64_t".into())
        );
    }

    #[test]
    fn query_balloon_takes_no_arguments() {
        assert_eq!(
            Command::parse("query-balloon", None),
            Ok(Command::QueryBalloon)
        );
        let serde_json::Value::Object(map) = json!({"value": 1}) else {
            unreachable!()
        };
        assert!(Command::parse("query-balloon", Some(map)).is_err());
    }
}
