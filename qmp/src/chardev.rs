//! Arguments and replies of the character device commands, in QEMU's shapes, for attaching
//! vhost-user backends the user started (qemu-storage-daemon, for one):
//!
//! - `chardev-add {"id":"c0","backend":{"type":"socket","data":{"addr":{"type":"unix",
//!   "data":{"path":"/run/vu.sock"}},"server":false}}}`: a Unix socket Citadel connects to;
//!   with `"addr":{"type":"fd","data":{"str":"vu"}}`, a socket the management connected and
//!   passed with `getfd` as `vu`;
//! - `chardev-remove {"id":"c0"}`;
//! - `query-chardev`, answered with [`ChardevInfo`]s.
//!
//! Only client sockets are accepted: Citadel never listens for a backend, and
//! QEMU's other backends (pty, file, TCP...) have no vhost-user peer. QEMU's `server`
//! defaults to true, so `"server": false` must be given. Only the shape is checked here;
//! whether the socket answers is the VMM's business.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::arguments::from_arguments;
use crate::device::check_id;
use crate::error::QmpError;

/// Longest socket path: `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// `chardev-add` of a Unix client socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevAdd {
    /// The id `device_add`'s `chardev` refers to.
    pub id: String,
    /// Where the socket comes from.
    pub socket: ChardevSocket,
}

/// Where a chardev's socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevSocket {
    /// A Unix socket path to connect to.
    Path(String),
    /// A connected socket passed with `getfd` under this name.
    Fd(String),
}

/// One chardev in `query-chardev`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChardevInfo {
    /// The chardev's id.
    pub label: String,
    /// Where it leads: `unix:PATH`, or `fd:NAME` for a socket passed with `getfd`.
    pub filename: String,
    /// Whether a device uses it.
    #[serde(rename = "frontend-open")]
    pub frontend_open: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChardevAddArgs {
    id: String,
    backend: TypedArgs,
}

/// QEMU's `{"type": T, "data": {...}}` unions; `data` is read once `type` is known.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedArgs {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketArgs {
    addr: TypedArgs,
    #[serde(default)]
    server: Option<bool>,
    /// Only meaningful for a server; QEMU refuses it on a client.
    #[serde(default)]
    wait: Option<bool>,
    /// TCP_NODELAY: nothing on a Unix socket.
    #[serde(default, rename = "nodelay")]
    _nodelay: Option<bool>,
    #[serde(default)]
    reconnect: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdArgs {
    str: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnixArgs {
    path: String,
    #[serde(default, rename = "abstract")]
    abstract_name: Option<bool>,
    /// How an abstract name is sized: nothing for a path.
    #[serde(default, rename = "tight")]
    _tight: Option<bool>,
}

/// Reads a nested `data` member, naming members in errors by their full path, as QEMU does.
fn nested<T: serde::de::DeserializeOwned>(
    prefix: &str,
    data: Map<String, Value>,
) -> Result<T, QmpError> {
    from_arguments(Some(data)).map_err(|mut e| {
        e.desc = e.desc.replacen('\'', &format!("'{prefix}."), 1);
        e
    })
}

impl ChardevAddArgs {
    pub(crate) fn validate(self) -> Result<ChardevAdd, QmpError> {
        check_id("id", &self.id)?;
        if self.backend.kind != "socket" {
            return Err(QmpError::generic(format!(
                "Chardev backend '{}' is not supported: chardev-add takes a Unix socket (\"type\": \"socket\") that citadel connects to",
                self.backend.kind
            )));
        }
        let SocketArgs {
            addr,
            server,
            wait,
            reconnect,
            ..
        } = nested("backend.data", self.backend.data)?;
        if server != Some(false) {
            return Err(QmpError::generic(
                "Only client sockets are supported: give \"server\": false (citadel connects to the backend's listening socket)",
            ));
        }
        if wait.is_some() {
            return Err(QmpError::generic(
                "'wait' option is incompatible with socket in client connect mode",
            ));
        }
        if reconnect.is_some_and(|r| r > 0) {
            return Err(QmpError::generic(
                "reconnect is not supported: citadel connects at chardev-add and again at each device_add",
            ));
        }
        if addr.kind == "fd" {
            let FdArgs { str: name } = nested("backend.data.addr.data", addr.data)?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(QmpError::invalid_parameter_value(
                    "backend.data.addr.data.str",
                    "the name of a descriptor passed with getfd",
                ));
            }
            return Ok(ChardevAdd {
                id: self.id,
                socket: ChardevSocket::Fd(name),
            });
        }
        if addr.kind != "unix" {
            return Err(QmpError::generic(format!(
                "Socket address type '{}' is not supported: a vhost-user backend is reached through a Unix socket (\"type\": \"unix\", or \"fd\" for one passed with getfd)",
                addr.kind
            )));
        }
        let UnixArgs {
            path,
            abstract_name,
            ..
        } = nested("backend.data.addr.data", addr.data)?;
        if abstract_name == Some(true) {
            return Err(QmpError::generic(
                "Abstract Unix sockets are not supported: give the path of a socket file",
            ));
        }
        if path.is_empty() || path.len() > MAX_SOCKET_PATH || path.contains('\0') {
            return Err(QmpError::invalid_parameter_value(
                "backend.data.addr.data.path",
                "a socket path of 1 to 107 bytes",
            ));
        }
        Ok(ChardevAdd {
            id: self.id,
            socket: ChardevSocket::Path(path),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChardevRemoveArgs {
    pub(crate) id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chardev(v: Value) -> Result<ChardevAdd, QmpError> {
        let Value::Object(m) = v else { unreachable!() };
        from_arguments::<ChardevAddArgs>(Some(m))?.validate()
    }

    fn socket(data: Value) -> Value {
        json!({"id": "c0", "backend": {"type": "socket", "data": data}})
    }

    #[test]
    fn qemus_unix_client_socket_is_understood() {
        let add = chardev(socket(json!({"addr": {"type": "unix",
            "data": {"path": "/run/vu.sock"}}, "server": false})))
        .unwrap();
        assert_eq!(
            add,
            ChardevAdd {
                id: "c0".into(),
                socket: ChardevSocket::Path("/run/vu.sock".into())
            }
        );
        let passed = chardev(socket(
            json!({"addr": {"type": "fd", "data": {"str": "vu"}},
            "server": false}),
        ))
        .unwrap();
        assert_eq!(passed.socket, ChardevSocket::Fd("vu".into()));
        // Harmless members QEMU clients send.
        chardev(socket(
            json!({"addr": {"type": "unix", "data": {"path": "vu.sock",
            "abstract": false, "tight": true}}, "server": false, "nodelay": true,
            "reconnect": 0}),
        ))
        .unwrap();
    }

    #[test]
    fn servers_other_backends_and_other_addresses_are_refused_clearly() {
        let e = |v| chardev(v).unwrap_err().desc;
        let unix = json!({"type": "unix", "data": {"path": "/s"}});
        assert!(e(socket(json!({"addr": unix}))).starts_with("Only client sockets"));
        assert!(e(socket(json!({"addr": unix, "server": true}))).starts_with("Only client sockets"));
        assert_eq!(
            e(socket(
                json!({"addr": unix, "server": false, "wait": false})
            )),
            "'wait' option is incompatible with socket in client connect mode"
        );
        assert!(e(socket(
            json!({"addr": unix, "server": false, "reconnect": 5})
        ))
        .starts_with("reconnect is not supported"));
        assert!(
            e(json!({"id": "c0", "backend": {"type": "pty", "data": {}}}))
                .starts_with("Chardev backend 'pty' is not supported")
        );
        assert!(e(socket(json!({"addr": {"type": "inet",
            "data": {"host": "::1", "port": "80"}}, "server": false})))
        .starts_with("Socket address type 'inet' is not supported"));
        assert!(e(socket(json!({"addr": {"type": "unix",
            "data": {"path": "x", "abstract": true}}, "server": false})))
        .starts_with("Abstract Unix sockets"));
        assert_eq!(
            e(socket(
                json!({"addr": {"type": "unix", "data": {}}, "server": false})
            )),
            "Parameter 'backend.data.addr.data.path' is missing"
        );
        assert_eq!(
            e(socket(
                json!({"addr": {"type": "fd", "data": {}}, "server": false})
            )),
            "Parameter 'backend.data.addr.data.str' is missing"
        );
        assert!(e(socket(json!({"addr": {"type": "fd", "data": {"str": ""}},
            "server": false})))
        .starts_with("Parameter 'backend.data.addr.data.str' expects"));
        assert_eq!(
            e(socket(
                json!({"addr": unix, "server": false, "telnet": true})
            )),
            "Parameter 'backend.data.telnet' is unexpected"
        );
        assert_eq!(
            e(socket(json!({"server": false}))),
            "Parameter 'backend.data.addr' is missing"
        );
        assert!(e(socket(json!({"addr": {"type": "unix",
            "data": {"path": "/x".repeat(60)}}, "server": false})))
        .starts_with("Parameter 'backend.data.addr.data.path' expects"));
        assert!(
            e(json!({"id": "0c", "backend": {"type": "socket", "data": {}}}))
                .contains("expects an identifier")
        );
        assert_eq!(e(json!({"id": "c0"})), "Parameter 'backend' is missing");
    }
}
