//! What a snapshot keeps of the q35 machine's PCI Express segment: each root port's registers
//! and removal state, and each virtio-pci card's configuration space, transport and MSI-X
//! state. Read back from an untrusted file: the segment checks it against the cards the
//! restoring command line plugs, and only guest-changeable register bits are taken from it.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::transport::TransportSnapshot;

/// The segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSnapshot {
    /// Every root port, in command-line order.
    pub ports: Vec<PortSnapshot>,
    /// Every card, by root port.
    pub cards: Vec<CardSnapshot>,
}

/// One root port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSnapshot {
    /// Its id.
    pub id: String,
    /// Its configuration space.
    pub config: Vec<u8>,
    /// A removal the guest was asked for and had not finished.
    pub removing: bool,
}

/// One virtio-pci card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardSnapshot {
    /// The root port it is in.
    pub bus: String,
    /// Its configuration header as the guest read it (256 bytes).
    pub config: Vec<u8>,
    /// The virtio transport behind its common configuration.
    pub transport: TransportSnapshot,
    /// Its MSI-X table and vector registers.
    pub msix: MsixSnapshot,
}

/// What a function's MSI-X keeps: the table the driver programmed and the vector registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixSnapshot {
    /// Per vector: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// config_msix_vector.
    pub config_vector: u16,
    /// Every queue's queue_msix_vector.
    pub queue_vectors: Vec<u16>,
}

/// Refuses a checked state whose machine had other cards than the restoring command line
/// plugs (`cards`: each `-device virtio-*-pci`'s root port and device type), before any
/// backend is started.
pub fn check_cards(json: &[u8], cards: &[(String, u32)]) -> Result<(), super::format::FormatError> {
    #[derive(Deserialize)]
    struct Saved {
        #[serde(default)]
        pci: Option<PciSnapshot>,
    }
    let saved: Saved =
        serde_json::from_slice(json).map_err(|e| super::format::FormatError::Io {
            file: "state",
            reason: format!("malformed state: {e}"),
        })?;
    let mut saved: Vec<(String, u32)> = saved
        .pci
        .map(|p| {
            p.cards
                .into_iter()
                .map(|c| (c.bus, c.transport.device_type))
                .collect()
        })
        .unwrap_or_default();
    let mut cards = cards.to_vec();
    saved.sort();
    cards.sort();
    if saved != cards {
        let list = |l: &[(String, u32)]| {
            l.iter()
                .map(|(bus, t)| {
                    format!(
                        "{} in {bus}",
                        if *t == VIRTIO_ID_BLOCK { "disk" } else { "NIC" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(super::format::FormatError::PluggedMismatch {
            snapshot: format!("PCI cards [{}]", list(&saved)),
            command_line: format!("PCI cards [{}]", list(&cards)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(cards: &[(&str, u32)]) -> Vec<u8> {
        let cards: Vec<serde_json::Value> = cards
            .iter()
            .map(|(bus, device_type)| {
                serde_json::json!({
                    "bus": bus,
                    "config": [],
                    "transport": {
                        "device_type": device_type, "status": 0, "device_features_sel": 0,
                        "driver_features_sel": 0, "driver_features": 0, "queue_sel": 0,
                        "queues": [], "interrupt_status": 0, "config_generation": 0
                    },
                    "msix": {"entries": [], "config_vector": 0, "queue_vectors": []}
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"pci": {"ports": [], "cards": cards}})).unwrap()
    }

    #[test]
    fn the_command_line_must_plug_the_cards_the_snapshot_had() {
        let saved = state_with(&[("pcie.1", 2), ("pcie.2", 1)]);
        let plugs = |cards: &[(&str, u32)]| {
            let cards: Vec<(String, u32)> =
                cards.iter().map(|(b, t)| (b.to_string(), *t)).collect();
            check_cards(&saved, &cards)
        };
        assert!(plugs(&[("pcie.2", 1), ("pcie.1", 2)]).is_ok());
        let e = plugs(&[("pcie.1", 2)]).unwrap_err().to_string();
        assert!(
            e.contains("disk in pcie.1, NIC in pcie.2") && e.contains("[disk in pcie.1]"),
            "{e}"
        );
        assert!(plugs(&[("pcie.1", 1), ("pcie.2", 1)]).is_err());
        // A microvm snapshot has no segment: no card may be plugged.
        assert!(check_cards(br#"{"vcpus":[]}"#, &[]).is_ok());
        assert!(check_cards(br#"{"vcpus":[]}"#, &[("pcie.1".into(), 2)]).is_err());
    }
}
