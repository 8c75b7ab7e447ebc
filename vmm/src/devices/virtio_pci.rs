//! virtio-pci transport, modern interface (virtio 1.2 section 4.1), for cards behind the q35
//! machine's root ports.
//!
//! A card is a PCI Express endpoint whose BAR 0 holds the virtio structures its vendor
//! capabilities point at:
//!
//! ```text
//! 0x0000  common configuration      0x0800  ISR status (read clears)
//! 0x1000  device configuration      0x2000  queue notifications, 4 bytes per queue
//! 0x3000  MSI-X table               0x3800  MSI-X pending bits
//! ```
//!
//! The negotiation itself (status, features, queue setup, device start) is the virtio-mmio
//! transport's state machine: the common configuration registers are translated into its
//! registers, so both transports accept and refuse exactly the same driver behaviour.
//! Interrupts are MSI-X vectors routed through KVM; a queue's notification address is a KVM
//! ioeventfd once the guest has placed the BAR and enabled memory decoding, so neither kicks
//! nor completions pass through the VMM. Without MSI-X the card cannot interrupt (it has no
//! INTx pin): Linux then fails the probe instead of waiting forever.

use std::sync::Arc;

use citadel_pci::config::{reg, ConfigSpace, Identity, COMMAND_MEMORY};
use citadel_pci::segment::Function;
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::TransportInterrupt;
use super::mmio_bus::MmioDevice;
use super::msix::{self, MsixInterrupt};
use super::virtio_mmio::{VirtioDevice, VirtioMmioTransport, CONFIG_SPACE_OFFSET};
use crate::snapshot::pci::MsixSnapshot;
use crate::snapshot::transport::TransportSnapshot;

/// The virtio vendor id.
const VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device ids are this plus the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id of virtio cards (any value from 0x40 is a modern card).
const SUBSYSTEM_ID: u16 = 0x1100;
/// Register of the subsystem vendor id, then the subsystem id.
const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x4000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x0800;
const ISR_LEN: u64 = 4;
const DEVICE_OFFSET: u64 = 0x1000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x2000;
/// Bytes between two queues' notification addresses.
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x3000;
const MSIX_PBA_OFFSET: u64 = 0x3800;
/// Most MSI-X vectors a card has: its table fills the room before the pending bits.
pub const MAX_VECTORS: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as u16;

/// Capability ids.
const CAP_VENDOR: u8 = 0x09;
const CAP_PCIE: u8 = 0x10;
/// virtio_pci_cap cfg_type values.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// How a card's BAR reaches the machine: a place on the MMIO bus and KVM ioeventfds on its
/// notification addresses.
pub trait BarWiring: Send + Sync {
    /// Maps `region` at `base..base + len`.
    fn map(&self, base: u64, len: u64, region: Arc<dyn MmioDevice>) -> Result<(), String>;
    /// Unmaps whatever was mapped at `base`.
    fn unmap(&self, base: u64);
    /// Has writes of any width to `addr` signal `evt` in the kernel.
    fn register_notify(&self, addr: u64, evt: &EventFd) -> Result<(), String>;
    /// Undoes [`BarWiring::register_notify`].
    fn unregister_notify(&self, addr: u64, evt: &EventFd);
}

/// The class code a guest expects of each device type.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        // Network controller, Ethernet.
        1 => 0x02_00_00,
        // Mass storage, SCSI (what virtio block cards have always reported).
        2 => 0x01_00_00,
        _ => 0xff_00_00,
    }
}

/// A card's device, shared with the card (see [`VirtioPciCard::handle`]).
pub struct CardHandle<D: VirtioDevice>(Arc<BarRegion<D>>);

impl<D: VirtioDevice> CardHandle<D> {
    /// Starts the device if its driver asked since the last call.
    pub fn run_pending_activation(&self) {
        self.0.transport.run_pending_activation();
    }

    /// Runs `f` on the device.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        self.0.transport.with_device(f)
    }

    /// The card's transport.
    pub fn transport(&self) -> &VirtioMmioTransport<D, MsixInterrupt> {
        &self.0.transport
    }

    /// The transport and MSI-X state, for a snapshot.
    pub fn save(&self) -> (TransportSnapshot, MsixSnapshot) {
        (self.0.transport.save(), self.0.msix().save_table())
    }

    /// Puts saved transport and MSI-X state back (see [`VirtioMmioTransport::restore`] and
    /// [`MsixInterrupt::restore_table`]), before the card's header is replayed.
    pub fn restore(
        &self,
        transport: &TransportSnapshot,
        msix: &MsixSnapshot,
    ) -> Result<(), String> {
        self.0.msix().restore_table(msix)?;
        self.0.transport.restore(transport)
    }
}

/// BAR 0's contents, shared by the card and the MMIO bus.
struct BarRegion<D: VirtioDevice> {
    transport: VirtioMmioTransport<D, MsixInterrupt>,
}

impl<D: VirtioDevice> BarRegion<D> {
    fn msix(&self) -> &MsixInterrupt {
        self.transport.interrupt().as_ref()
    }

    fn mmio_read(&self, register: u32) -> u32 {
        let mut data = [0; 4];
        self.transport.read(u64::from(register), &mut data);
        u32::from_le_bytes(data)
    }

    fn mmio_write(&self, register: u32, value: u32) {
        self.transport
            .write(u64::from(register), &value.to_le_bytes());
    }

    /// A common configuration read of `len` bytes at `offset`; only the fields' own widths
    /// are decoded, anything else reads zero.
    fn common_read(&self, offset: u64, len: usize) -> u32 {
        let view = self.transport.driver_view();
        let queue = view.queue.unwrap_or_default();
        let half = |value: u64, high: bool| {
            if high {
                (value >> 32) as u32
            } else {
                value as u32
            }
        };
        match (offset, len) {
            (0x00, 4) => view.device_features_sel,
            (0x04, 4) => self.mmio_read(VIRTIO_MMIO_DEVICE_FEATURES),
            (0x08, 4) => view.driver_features_sel,
            (0x0c, 4) => match view.driver_features_sel {
                0 => view.driver_features as u32,
                1 => (view.driver_features >> 32) as u32,
                _ => 0,
            },
            (0x10, 2) => u32::from(self.msix().config_vector()),
            (0x12, 2) => view.queues as u32,
            (0x14, 1) => self.mmio_read(VIRTIO_MMIO_STATUS),
            (0x15, 1) => self.mmio_read(VIRTIO_MMIO_CONFIG_GENERATION) & 0xff,
            (0x16, 2) => view.queue_sel,
            (0x18, 2) => u32::from(view.queue.map_or(0, |q| q.size)),
            (0x1a, 2) => u32::from(self.msix().queue_vector(view.queue_sel as usize)),
            (0x1c, 2) => u32::from(queue.ready),
            // Each queue notifies at its own address: the offset is the queue index.
            (0x1e, 2) => view.queue.map_or(0, |_| view.queue_sel),
            (0x20 | 0x24, 4) => half(queue.desc, offset == 0x24),
            (0x28 | 0x2c, 4) => half(queue.avail, offset == 0x2c),
            (0x30 | 0x34, 4) => half(queue.used, offset == 0x34),
            _ => {
                log::debug!("virtio-pci: {len}-byte common configuration read at {offset:#x}");
                0
            }
        }
    }

    fn common_write(&self, offset: u64, value: u32, len: usize) {
        let register = match (offset, len) {
            (0x00, 4) => VIRTIO_MMIO_DEVICE_FEATURES_SEL,
            (0x08, 4) => VIRTIO_MMIO_DRIVER_FEATURES_SEL,
            (0x0c, 4) => VIRTIO_MMIO_DRIVER_FEATURES,
            (0x10, 2) => {
                self.msix().set_config_vector(value as u16);
                return;
            }
            (0x14, 1) => VIRTIO_MMIO_STATUS,
            (0x16, 2) => VIRTIO_MMIO_QUEUE_SEL,
            (0x18, 2) => VIRTIO_MMIO_QUEUE_NUM,
            (0x1a, 2) => {
                let queue = self.transport.driver_view().queue_sel as usize;
                self.msix().set_queue_vector(queue, value as u16);
                return;
            }
            (0x1c, 2) => VIRTIO_MMIO_QUEUE_READY,
            (0x20, 4) => VIRTIO_MMIO_QUEUE_DESC_LOW,
            (0x24, 4) => VIRTIO_MMIO_QUEUE_DESC_HIGH,
            (0x28, 4) => VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            (0x2c, 4) => VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            (0x30, 4) => VIRTIO_MMIO_QUEUE_USED_LOW,
            (0x34, 4) => VIRTIO_MMIO_QUEUE_USED_HIGH,
            _ => {
                log::debug!(
                    "virtio-pci: {len}-byte common configuration write at {offset:#x} ignored"
                );
                return;
            }
        };
        self.mmio_write(register, value);
    }
}

/// A little-endian value of up to 4 bytes.
fn value_of(data: &[u8]) -> u32 {
    let mut bytes = [0; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

impl<D: VirtioDevice> MmioDevice for BarRegion<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN && data.len() <= 4 => {
                let value = self.common_read(o - COMMON_OFFSET, data.len());
                data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
            }
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                data.fill(0);
                if o == ISR_OFFSET {
                    // Reading the ISR acknowledges it.
                    let isr = self.msix().isr_status();
                    self.msix().acknowledge(isr);
                    data[0] = isr as u8;
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.transport
                    .read(CONFIG_SPACE_OFFSET + (o - DEVICE_OFFSET), data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix().table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix().pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN && data.len() <= 4 => {
                self.common_write(o - COMMON_OFFSET, value_of(data), data.len())
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.transport
                    .write(CONFIG_SPACE_OFFSET + (o - DEVICE_OFFSET), data);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // What the ioeventfd does once registered: the address says which queue.
                self.transport
                    .notify_queue(((o - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER) as u32);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix().table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => log::debug!(
                "virtio-pci: {}-byte write at BAR offset {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

/// A virtio card: its configuration space, and BAR 0 mapped where the guest placed it.
pub struct VirtioPciCard<D: VirtioDevice> {
    identity: Identity,
    vectors: u16,
    space: ConfigSpace,
    msix_cap: u16,
    region: Arc<BarRegion<D>>,
    wiring: Arc<dyn BarWiring>,
    mapped: Option<u64>,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioPciCard<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciCard")
            .field("identity", &self.identity)
            .field("mapped", &self.mapped)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + 'static> VirtioPciCard<D> {
    /// A card around `transport`, whose interrupt has `vectors` MSI-X vectors (at most
    /// [`MAX_VECTORS`]); the card's BAR goes through `wiring`.
    pub fn new(
        transport: VirtioMmioTransport<D, MsixInterrupt>,
        vectors: u16,
        wiring: Arc<dyn BarWiring>,
    ) -> Self {
        let device_type = transport.with_device(|d| d.device_type());
        let identity = Identity {
            vendor: VENDOR_ID,
            device: DEVICE_ID_BASE + device_type as u16,
            class: class_of(device_type),
            revision: 1,
        };
        let vectors = vectors.clamp(1, MAX_VECTORS);
        let (space, msix_cap) = registers(identity, vectors);
        VirtioPciCard {
            identity,
            vectors,
            space,
            msix_cap,
            region: Arc::new(BarRegion { transport }),
            wiring,
            mapped: None,
        }
    }

    /// A handle on the card's device, which outlives the card in its slot: the event loop
    /// starts the device with it once its driver asked (see
    /// [`VirtioMmioTransport::with_deferred_activation`]), and takes back what the device
    /// holds once the card is out.
    pub fn handle(&self) -> CardHandle<D> {
        CardHandle(self.region.clone())
    }

    /// Follows the guest's BAR and memory-decoding settings: maps BAR 0 where it now is, or
    /// nowhere.
    fn sync_bar(&mut self) {
        let command = self.space.read_u16(reg::COMMAND);
        let bar = u64::from(self.space.read_u32(reg::BAR0) & !0xf);
        let wanted = (command & COMMAND_MEMORY != 0 && bar != 0).then_some(bar);
        if wanted == self.mapped {
            return;
        }
        self.unmap();
        if let Some(base) = wanted {
            self.map(base);
        }
    }

    fn map(&mut self, base: u64) {
        let region: Arc<dyn MmioDevice> = self.region.clone();
        if let Err(e) = self.wiring.map(base, BAR_SIZE, region) {
            log::warn!("virtio-pci: BAR 0 at {base:#x} cannot be mapped: {e}");
            return;
        }
        for (index, evt) in self.region.transport.notify_eventfds().iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + index as u64 * NOTIFY_MULTIPLIER;
            if let Err(e) = self.wiring.register_notify(addr, evt) {
                // The kick still arrives, as an MMIO exit.
                log::warn!("virtio-pci: queue {index} notifications through the VMM: {e}");
            }
        }
        self.mapped = Some(base);
    }

    fn sync_msix(&self) {
        let control = self.space.read_u16(self.msix_cap + 2);
        self.region.msix().set_control(
            control & msix::CONTROL_ENABLE != 0,
            control & msix::CONTROL_FUNCTION_MASK != 0,
        );
    }
}

/// The configuration space of a card: header, virtio capabilities, MSI-X and PCI Express
/// endpoint capabilities. Returns it with the MSI-X capability's offset.
fn registers(identity: Identity, vectors: u16) -> (ConfigSpace, u16) {
    let mut space = ConfigSpace::endpoint(identity);
    space.set_u16(SUBSYSTEM_VENDOR_ID, VENDOR_ID);
    space.set_u16(SUBSYSTEM_VENDOR_ID + 2, SUBSYSTEM_ID);
    // A 32-bit memory BAR: the size is what the guest reads back after writing all-ones.
    space.writable_u32(reg::BAR0, !(BAR_SIZE as u32 - 1));
    let structures = [
        (CFG_COMMON, COMMON_OFFSET, COMMON_LEN),
        (CFG_NOTIFY, NOTIFY_OFFSET, MSIX_TABLE_OFFSET - NOTIFY_OFFSET),
        (CFG_ISR, ISR_OFFSET, ISR_LEN),
        (CFG_DEVICE, DEVICE_OFFSET, DEVICE_LEN),
    ];
    for (cfg_type, offset, length) in structures {
        let notify = cfg_type == CFG_NOTIFY;
        let cap_len: u8 = if notify { 20 } else { 16 };
        let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
        body.extend_from_slice(&(offset as u32).to_le_bytes());
        body.extend_from_slice(&(length as u32).to_le_bytes());
        if notify {
            body.extend_from_slice(&(NOTIFY_MULTIPLIER as u32).to_le_bytes());
        }
        space
            .add_capability(CAP_VENDOR, &body)
            .expect("the virtio capabilities fit");
    }
    let mut msix = Vec::with_capacity(10);
    msix.extend_from_slice(&(vectors - 1).to_le_bytes());
    msix.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
    msix.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
    let msix_cap = space
        .add_capability(msix::CAPABILITY_ID, &msix)
        .expect("MSI-X fits after the virtio capabilities");
    space.writable_u16(
        msix_cap + 2,
        msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK,
    );
    // PCI Express endpoint, version 2, on a 2.5 GT/s x1 link.
    let mut pcie = [0u8; 0x3a];
    pcie[..2].copy_from_slice(&2u16.to_le_bytes());
    pcie[0x0a..0x0c].copy_from_slice(&0x11u16.to_le_bytes());
    pcie[0x10..0x12].copy_from_slice(&0x11u16.to_le_bytes());
    let pcie_cap = space
        .add_capability(CAP_PCIE, &pcie)
        .expect("the PCI Express capability fits");
    space.writable_u16(pcie_cap + 8, 0x7fff);
    space.write_1_clears_u16(pcie_cap + 0x0a, 0x000f);
    (space, msix_cap)
}

impl<D: VirtioDevice + 'static> Function for VirtioPciCard<D> {
    fn read(&self, offset: u16, data: &mut [u8]) {
        self.space.read(offset, data);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if !self.space.write(offset, data) {
            return;
        }
        let end = offset + data.len() as u16;
        if offset < self.msix_cap + 4 && end > self.msix_cap + 2 {
            self.sync_msix();
        }
        if offset < reg::BAR0 + 4 && end > reg::COMMAND {
            self.sync_bar();
        }
    }

    fn multifunction(&self) -> bool {
        false
    }

    /// Back to power-on: BAR unmapped, MSI-X off, the device reset (its backend stops its
    /// rings).
    fn reset(&mut self) {
        self.unmap();
        self.space = registers(self.identity, self.vectors).0;
        self.region.msix().reset_table();
        self.sync_msix();
        self.region.transport.reset();
    }
}

impl<D: VirtioDevice> VirtioPciCard<D> {
    fn unmap(&mut self) {
        let Some(base) = self.mapped.take() else {
            return;
        };
        for (index, evt) in self.region.transport.notify_eventfds().iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + index as u64 * NOTIFY_MULTIPLIER;
            self.wiring.unregister_notify(addr, evt);
        }
        self.wiring.unmap(base);
    }
}

impl<D: VirtioDevice> Drop for VirtioPciCard<D> {
    fn drop(&mut self) {
        self.unmap();
    }
}
