//! Descriptors a client passes over the socket (`SCM_RIGHTS`), as QEMU takes them:
//!
//! - `getfd {"fdname":"x"}` keeps the descriptor attached to the message under a name,
//!   `closefd {"fdname":"x"}` closes it;
//! - `add-fd {"fdset-id":N, "opaque":"..."}` adds it to fd set N (both members optional) and
//!   returns [`AddFdInfo`]; `remove-fd {"fdset-id":N, "fd":F}` closes one descriptor of a
//!   set, or the whole set without `fd`; `query-fdsets` lists the sets ([`FdsetInfo`]);
//! - a block node whose filename is `/dev/fdset/N` uses a descriptor of set N.
//!
//! Only the shape of the arguments is checked here; the descriptors themselves are the
//! server's.

use serde::{Deserialize, Serialize};

use crate::error::QmpError;

/// Longest descriptor name `getfd` accepts.
pub const MAX_FDNAME_LEN: usize = 127;

/// Longest `opaque` string `add-fd` accepts.
pub const MAX_OPAQUE_LEN: usize = 255;

/// The prefix of a filename that names an fd set.
pub const FDSET_PREFIX: &str = "/dev/fdset/";

/// The fd set `filename` names (`/dev/fdset/N`, N a decimal number), if it names one.
/// `Some(Err)` for a filename with the prefix but no valid number after it.
pub fn fdset_of(filename: &str) -> Option<Result<u64, QmpError>> {
    let number = filename.strip_prefix(FDSET_PREFIX)?;
    Some(
        number
            .parse::<u64>()
            .ok()
            .filter(|_| number.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Could not open '{filename}': an fd set is named by a decimal number"
                ))
            }),
    )
}

/// `add-fd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFd {
    /// The set to add to; a new set with the lowest free id when absent.
    pub fdset_id: Option<u64>,
    /// A string kept with the descriptor and shown by `query-fdsets`.
    pub opaque: Option<String>,
}

/// `remove-fd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveFd {
    /// The set.
    pub fdset_id: i64,
    /// The descriptor to close; the whole set when absent.
    pub fd: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FdnameArgs {
    fdname: String,
}

impl FdnameArgs {
    /// The name; for `getfd`, which stores under it, also checked as QEMU does (no digit
    /// first, so it cannot be mistaken for a descriptor number) and bounded.
    pub(crate) fn validate(self, storing: bool) -> Result<String, QmpError> {
        if storing {
            if self.fdname.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(QmpError::invalid_parameter_value(
                    "fdname",
                    "a name not starting with a digit",
                ));
            }
            let printable = self.fdname.chars().all(|c| c.is_ascii_graphic());
            if self.fdname.is_empty() || self.fdname.len() > MAX_FDNAME_LEN || !printable {
                return Err(QmpError::invalid_parameter_value(
                    "fdname",
                    &format!("1 to {MAX_FDNAME_LEN} printable ASCII characters"),
                ));
            }
        }
        Ok(self.fdname)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct AddFdArgs {
    #[serde(default)]
    fdset_id: Option<i64>,
    #[serde(default)]
    opaque: Option<String>,
}

impl AddFdArgs {
    pub(crate) fn validate(self) -> Result<AddFd, QmpError> {
        let fdset_id = match self.fdset_id {
            Some(id) => Some(u64::try_from(id).map_err(|_| {
                QmpError::invalid_parameter_value("fdset-id", "a non-negative value")
            })?),
            None => None,
        };
        if let Some(opaque) = &self.opaque {
            if opaque.len() > MAX_OPAQUE_LEN || opaque.chars().any(char::is_control) {
                return Err(QmpError::invalid_parameter_value(
                    "opaque",
                    &format!("at most {MAX_OPAQUE_LEN} bytes without control characters"),
                ));
            }
        }
        Ok(AddFd {
            fdset_id,
            opaque: self.opaque,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RemoveFdArgs {
    fdset_id: i64,
    #[serde(default)]
    fd: Option<i64>,
}

impl RemoveFdArgs {
    pub(crate) fn into_command(self) -> RemoveFd {
        RemoveFd {
            fdset_id: self.fdset_id,
            fd: self.fd,
        }
    }
}

impl RemoveFd {
    /// QEMU's error when the set, or the descriptor in it, does not exist.
    pub fn not_found(&self) -> QmpError {
        let what = match self.fd {
            Some(fd) => format!("fdset-id:{}, fd:{fd}", self.fdset_id),
            None => format!("fdset-id:{}", self.fdset_id),
        };
        QmpError::fd_not_found(&what)
    }
}

/// Return value of `add-fd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFdInfo {
    /// The set the descriptor joined.
    pub fdset_id: u64,
    /// The descriptor's number in the VMM.
    pub fd: i32,
}

/// One set of `query-fdsets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FdsetInfo {
    /// The set's id.
    pub fdset_id: u64,
    /// Its descriptors.
    pub fds: Vec<FdsetFdInfo>,
}

/// One descriptor of an fd set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FdsetFdInfo {
    /// The descriptor's number in the VMM.
    pub fd: i32,
    /// What `add-fd` was given with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arguments::from_arguments;
    use serde_json::{json, Value};

    fn args(v: Value) -> Option<serde_json::Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    #[test]
    fn fdset_filenames() {
        assert_eq!(fdset_of("/dev/fdset/0"), Some(Ok(0)));
        assert_eq!(fdset_of("/dev/fdset/17"), Some(Ok(17)));
        assert!(fdset_of("/dev/fdset/").unwrap().is_err());
        assert!(fdset_of("/dev/fdset/+1").unwrap().is_err());
        assert!(fdset_of("/dev/fdset/1/x").unwrap().is_err());
        assert_eq!(fdset_of("/dev/fdsetx/1"), None);
        assert_eq!(fdset_of("/var/img"), None);
    }

    #[test]
    fn getfd_names_are_checked() {
        let parse = |v| {
            from_arguments::<FdnameArgs>(args(v))
                .and_then(|a| a.validate(true))
                .map_err(|e| e.desc)
        };
        assert_eq!(parse(json!({"fdname": "tap0"})), Ok("tap0".into()));
        assert_eq!(
            parse(json!({"fdname": "0tap"})),
            Err("Parameter 'fdname' expects a name not starting with a digit".into())
        );
        assert!(parse(json!({"fdname": ""})).is_err());
        assert!(parse(json!({"fdname": "a b"})).is_err());
        assert!(parse(json!({"fdname": "x".repeat(MAX_FDNAME_LEN + 1)})).is_err());
        assert_eq!(
            parse(json!({})),
            Err("Parameter 'fdname' is missing".into())
        );
    }

    #[test]
    fn add_fd_arguments() {
        let parse = |v| {
            from_arguments::<AddFdArgs>(args(v))
                .and_then(AddFdArgs::validate)
                .map_err(|e| e.desc)
        };
        assert_eq!(
            parse(json!({})),
            Ok(AddFd {
                fdset_id: None,
                opaque: None
            })
        );
        assert_eq!(
            parse(json!({"fdset-id": 3, "opaque": "rw image"})),
            Ok(AddFd {
                fdset_id: Some(3),
                opaque: Some("rw image".into())
            })
        );
        assert_eq!(
            parse(json!({"fdset-id": -1})),
            Err("Parameter 'fdset-id' expects a non-negative value".into())
        );
        assert!(parse(json!({"opaque": "a\nb"})).is_err());
        assert!(parse(json!({"fd": 3})).is_err());
    }

    #[test]
    fn remove_fd_not_found_text() {
        let with_fd = RemoveFd {
            fdset_id: 2,
            fd: Some(9),
        };
        assert_eq!(
            with_fd.not_found().desc,
            "File descriptor named 'fdset-id:2, fd:9' not found"
        );
        let set = RemoveFd {
            fdset_id: 2,
            fd: None,
        };
        assert_eq!(
            set.not_found().desc,
            "File descriptor named 'fdset-id:2' not found"
        );
    }

    #[test]
    fn fdsets_serialise_as_qemu() {
        let info = vec![FdsetInfo {
            fdset_id: 1,
            fds: vec![
                FdsetFdInfo {
                    fd: 21,
                    opaque: Some("ro".into()),
                },
                FdsetFdInfo {
                    fd: 22,
                    opaque: None,
                },
            ],
        }];
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            json!([{"fdset-id": 1, "fds": [{"fd": 21, "opaque": "ro"}, {"fd": 22}]}])
        );
        assert_eq!(
            serde_json::to_value(AddFdInfo { fdset_id: 0, fd: 7 }).unwrap(),
            json!({"fdset-id": 0, "fd": 7})
        );
    }
}
