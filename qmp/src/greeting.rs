//! The greeting a QMP server sends as soon as a client connects.

use serde::Serialize;

use crate::reply::VersionInfo;

#[derive(Serialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: Banner,
}

#[derive(Serialize)]
struct Banner {
    version: VersionInfo,
    capabilities: [&'static str; 0],
}

/// `{"QMP":{"version":{"qemu":{"micro":m,"minor":n,"major":M},"package":P},"capabilities":[]}}`
/// followed by "\r\n". No capability is offered: Citadel has no out-of-band execution.
pub fn greeting(version: &VersionInfo) -> String {
    let greeting = Greeting {
        qmp: Banner {
            version: version.clone(),
            capabilities: [],
        },
    };
    // Integers and strings always serialise.
    serde_json::to_string(&greeting).unwrap_or_default() + "\r\n"
}
