//! Arguments of the network backend commands, in the form StratoVirt's guide sends them:
//! `netdev_add {"id":"net-0","ifname":"tap0"}` (also with `"type":"tap"`, and QEMU's
//! `"script":"no"`, `"downscript":"no"`), `netdev_del {"id":"net-0"}`. A tap opened by the
//! management instead comes as `"fds":"NAME"`, a descriptor kept with `getfd` (Kata's way).
//!
//! Only the shape is checked here; whether the tap can be opened is the launcher's business.

use serde::Deserialize;

use crate::device::check_id;
use crate::error::QmpError;

/// Longest interface name Linux accepts (IFNAMSIZ without the terminating NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Where a netdev's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tap {
    /// Opened by name (and created when missing).
    Ifname(String),
    /// Already open: the name under which `getfd` kept the descriptor.
    Fd(String),
}

/// `netdev_add`: a tap to be served by a network backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevAdd {
    /// The id `device_add`'s `netdev` refers to.
    pub id: String,
    /// The tap.
    pub tap: Tap,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NetdevAddArgs {
    id: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    ifname: Option<String>,
    /// A descriptor name given to `getfd`; QEMU's colon-separated list for multiqueue taps
    /// is refused, since a NIC slot has one queue pair.
    #[serde(default)]
    fds: Option<String>,
    /// QEMU runs these on the host to configure the tap; Citadel runs nothing, so only "no"
    /// is accepted.
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    downscript: Option<String>,
}

impl NetdevAddArgs {
    pub(crate) fn validate(self) -> Result<NetdevAdd, QmpError> {
        check_id("id", &self.id)?;
        if let Some(kind) = self.kind.as_deref() {
            if kind != "tap" {
                return Err(QmpError::unaccepted_value("type", kind));
            }
        }
        for (member, value) in [("script", &self.script), ("downscript", &self.downscript)] {
            if let Some(value) = value.as_deref() {
                if value != "no" {
                    return Err(QmpError::unaccepted_value(member, value));
                }
            }
        }
        let tap = match (self.ifname, self.fds) {
            (Some(ifname), None) => {
                check_ifname(&ifname)?;
                Tap::Ifname(ifname)
            }
            (None, Some(fds)) => {
                if fds.contains(':') {
                    return Err(QmpError::generic(
                        "Multiqueue taps are not supported: fds takes one descriptor name",
                    ));
                }
                if fds.is_empty() || !fds.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(QmpError::invalid_parameter_value(
                        "fds",
                        "the name of a descriptor passed with getfd",
                    ));
                }
                Tap::Fd(fds)
            }
            (None, None) => return Err(QmpError::missing_parameter("ifname")),
            (Some(_), Some(_)) => {
                return Err(QmpError::generic("ifname= and fds= are mutually exclusive"))
            }
        };
        Ok(NetdevAdd { id: self.id, tap })
    }
}

/// A tap's interface name: what Linux accepts, without the characters that would make it a
/// path or an alias.
pub fn check_ifname(ifname: &str) -> Result<(), QmpError> {
    let valid = !ifname.is_empty()
        && ifname.len() <= MAX_IFNAME_LEN
        && ifname
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if valid {
        Ok(())
    } else {
        Err(QmpError::invalid_parameter_value(
            "ifname",
            "an interface name of 1 to 15 printable characters without '/' or ':'",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NetdevDelArgs {
    pub(crate) id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arguments::from_arguments;
    use serde_json::{json, Value};

    fn netdev(v: Value) -> Result<NetdevAdd, QmpError> {
        let Value::Object(m) = v else { unreachable!() };
        from_arguments::<NetdevAddArgs>(Some(m))?.validate()
    }

    #[test]
    fn the_guides_netdev_add_is_understood() {
        let guide = netdev(json!({"id":"net-0","ifname":"tap0"})).unwrap();
        assert_eq!(
            guide,
            NetdevAdd {
                id: "net-0".into(),
                tap: Tap::Ifname("tap0".into())
            }
        );
        let qemu = netdev(json!({"type":"tap","id":"net-1","ifname":"tap1",
            "script":"no","downscript":"no"}))
        .unwrap();
        assert_eq!(qemu.tap, Tap::Ifname("tap1".into()));
        let kata = netdev(json!({"type":"tap","id":"net-2","fds":"fdtap0"})).unwrap();
        assert_eq!(kata.tap, Tap::Fd("fdtap0".into()));
    }

    #[test]
    fn netdev_add_mistakes_are_refused() {
        let e = |v| netdev(v).unwrap_err().desc;
        assert_eq!(e(json!({"ifname":"tap0"})), "Parameter 'id' is missing");
        assert_eq!(e(json!({"id":"n"})), "Parameter 'ifname' is missing");
        assert_eq!(
            e(json!({"id":"n","type":"user","ifname":"t"})),
            "Parameter 'type' does not accept value 'user'"
        );
        assert_eq!(
            e(json!({"id":"n","ifname":"t","script":"/etc/qemu-ifup"})),
            "Parameter 'script' does not accept value '/etc/qemu-ifup'"
        );
        assert_eq!(
            e(json!({"id":"n","ifname":"t","fds":"a"})),
            "ifname= and fds= are mutually exclusive"
        );
        assert!(e(json!({"id":"n","fds":"a:b"})).starts_with("Multiqueue taps are not supported"));
        assert!(e(json!({"id":"n","fds":""})).starts_with("Parameter 'fds' expects"));
        for bad in ["", "a-very-long-tap-name", "../tap", "tap 0", "tap:0"] {
            assert!(
                e(json!({"id":"n","ifname":bad})).starts_with("Parameter 'ifname' expects"),
                "{bad}"
            );
        }
    }
}
