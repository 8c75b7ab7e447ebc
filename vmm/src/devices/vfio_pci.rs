//! PCI passthrough: a host PCI function, bound to vfio-pci on the host, as a card behind one of
//! the q35 machine's root ports.
//!
//! The device launcher opens the function's VFIO container and device (the VMM may open
//! nothing) and hands both descriptors over. vfio-ioctls can only open them by path, so the few
//! requests the VMM itself makes on those descriptors (interrupts, DMA mappings, reset) are
//! issued here with vfio-bindings' structures.
//!
//! What the guest sees: the function's own configuration space (identity, class, command and
//! status live from the device), with these parts virtualized:
//!
//! - BARs: sized from the VFIO regions and placed wherever the guest writes them while memory
//!   decoding is on. A region VFIO lets us mmap becomes a KVM memory slot at the guest's first
//!   access (see [`PlacedBar`]), so the guest then reaches the device's registers without an
//!   exit; any other region stays trapped, forwarded with `pread`/`pwrite`.
//! - MSI: the guest's message is routed through KVM's GSI table; enabling it has the function
//!   signal an eventfd (`VFIO_DEVICE_SET_IRQS`) that is an irqfd of that GSI, so interrupts
//!   never pass through the VMM. One vector, no per-vector masking.
//! - MSI-X: the table and pending bits are Citadel's ([`MsixInterrupt`], as for virtio-pci
//!   cards: one GSI and eventfd per vector, an irqfd while the vector is unmasked, a count
//!   left in the eventfd while masked being its pending bit); enabling MSI-X has the function
//!   signal those eventfds. A BAR holding the table or pending bits stays trapped (the rest of
//!   it is forwarded to the function).
//! - INTx, while neither MSI nor MSI-X is enabled: the function's pin, behind its root port,
//!   raises the port's line (see [`crate::boot::layout::pci_intx_gsi`], which the DSDT's
//!   `_PRT` tells the guest) through a KVM irqfd with a resample eventfd, with which VFIO
//!   unmasks the function's INTx after the guest's EOI ([`Intx`]).
//! - Not offered (and said so in the log): port I/O BARs, the expansion ROM, extended
//!   configuration space (reads 0), and writes outside the command register, BARs, interrupt
//!   line, MSI capability and MSI-X message control (dropped).
//!
//! All guest RAM is mapped for the function's DMA through the container (type-1 IOMMU) at I/O
//! virtual address = guest physical address while the card is plugged.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use citadel_launcher::protocol::VfioRegion;
use citadel_launcher::VfioHandle;
use citadel_pci::config::reg::{
    BAR0, BAR_END, CAPABILITIES, COMMAND, HEADER_TYPE, INTERRUPT_LINE, INTERRUPT_PIN, STATUS,
};
use citadel_pci::config::COMMAND_MEMORY;
use citadel_pci::msi::CAPABILITY_ID as MSI_CAPABILITY;
use citadel_pci::segment::Function;
use citadel_seccomp::vfio as requests;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, vfio_irq_set, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::mmio_bus::{MmioBus, MmioDevice};
use super::msi_routes::MsiRoutes;
use super::msix::{self, MsixInterrupt, MSIX_ENTRY_SIZE};

/// Bytes of configuration space the guest sees; extended configuration space reads 0.
const CONFIG_LEN: usize = 256;
const ROM: u16 = 0x30;
/// Command register bits the guest may set on the function: memory decoding, bus mastering,
/// INTx disable. Port I/O decoding stays off (no I/O BAR is offered).
const COMMAND_WRITABLE: u16 = (1 << 1) | (1 << 2) | (1 << 10);
/// MSI message control: enable, 64-bit address.
const MSI_ENABLE: u16 = 1;
const MSI_64BIT: u16 = 1 << 7;
/// Most capabilities a list is followed through: a looping list ends there.
const MAX_CAPABILITIES: usize = 48;
/// KVM memory slots for BARs start here, above those of guest RAM.
const FIRST_BAR_SLOT: u32 = 16;
/// And end here (KVM offers at least 509 user slots on x86).
const BAR_SLOT_END: u32 = 508;

/// Why a function could not become a card.
#[derive(Debug, thiserror::Error)]
pub enum VfioCardError {
    /// The launcher's description lacks the configuration space.
    #[error("the device has no configuration space region")]
    NoConfigSpace,
    /// Reading the configuration space failed.
    #[error("reading its configuration space: {0}")]
    ReadConfig(io::Error),
    /// An eventfd for its interrupts could not be made.
    #[error("creating an eventfd: {0}")]
    EventFd(io::Error),
    /// The function is a bridge.
    #[error("only endpoints can be passed through (header type {0:#x})")]
    NotEndpoint(u8),
    /// Mapping guest RAM for DMA failed.
    #[error(
        "mapping guest RAM for DMA at {iova:#x} (+{size:#x}): {source}{}",
        memlock_hint(source)
    )]
    DmaMap {
        /// The guest physical address.
        iova: u64,
        /// The length.
        size: u64,
        /// What the kernel said.
        source: io::Error,
    },
}

/// What to do about the usual reason a DMA mapping fails: the pages it pins count against the
/// VMM's locked-memory limit, unless it holds CAP_IPC_LOCK.
fn memlock_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        " (the mapping pins guest RAM: RLIMIT_MEMLOCK must cover it, e.g. citadel-jailer --resource-limit memlock=N)"
    } else {
        ""
    }
}

/// Where a card's BARs go: the MMIO bus for trapped regions, KVM memory slots for mapped ones.
pub struct PassthroughWiring {
    mmio: Arc<MmioBus>,
    vm: Arc<VmFd>,
    slots: Mutex<std::collections::BTreeSet<u32>>,
}

impl PassthroughWiring {
    /// BARs on `mmio` and in `vm`'s memory slots.
    pub fn new(mmio: Arc<MmioBus>, vm: Arc<VmFd>) -> Self {
        PassthroughWiring {
            mmio,
            vm,
            slots: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    fn allocate_slot(&self) -> Option<u32> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (FIRST_BAR_SLOT..BAR_SLOT_END).find(|s| !slots.contains(s))?;
        slots.insert(slot);
        Some(slot)
    }

    fn release_slot(&self, slot: u32) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
    }

    /// Points memory slot `slot` at `len` bytes of host memory `host` for guest physical
    /// address `gpa`, or deletes it when `len` is 0.
    fn set_slot(&self, slot: u32, gpa: u64, len: u64, host: u64) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: `host..host + len` is a mapping of the device's BAR that stays mapped until
        // this slot is deleted (`MappedBar::drop` deletes the slot before it unmaps); deleting
        // (len 0) touches no memory.
        unsafe { self.vm.set_user_memory_region(region) }
    }
}

/// The function's VFIO device descriptor and regions.
struct DeviceFile {
    file: std::fs::File,
    regions: Vec<VfioRegion>,
}

impl DeviceFile {
    fn region(&self, index: u32) -> Option<&VfioRegion> {
        self.regions.iter().find(|r| r.index == index && r.size > 0)
    }

    /// Reads `data.len()` bytes at `offset` of region `index`; what lies outside the region
    /// or cannot be read reads as all-ones, like an absent device.
    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        let Some(region) = self.region(index) else {
            data.fill(0xff);
            return;
        };
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= region.size);
        if !inside
            || self
                .file
                .read_exact_at(data, region.offset + offset)
                .is_err()
        {
            data.fill(0xff);
        }
    }

    /// Writes `data` at `offset` of region `index`; a write outside the region is dropped.
    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        let Some(region) = self.region(index) else {
            return;
        };
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= region.size);
        if inside {
            // The guest drives these writes, as often as it likes: not worth a warning each.
            if let Err(e) = self.file.write_all_at(data, region.offset + offset) {
                log::debug!("vfio-pci: writing region {index} at {offset:#x}: {e}");
            }
        }
    }

    /// Has the vectors of interrupt `index` (MSI or MSI-X) signal `evts`, one eventfd per
    /// vector from vector 0, or turns that interrupt off when `evts` is empty.
    fn set_irqs<'a>(
        &self,
        index: u32,
        evts: impl IntoIterator<Item = &'a EventFd>,
    ) -> io::Result<()> {
        self.set_irqs_action(index, VFIO_IRQ_SET_ACTION_TRIGGER, evts)
    }

    /// Like [`DeviceFile::set_irqs`] for another action: `VFIO_IRQ_SET_ACTION_UNMASK` has a
    /// write to the eventfd unmask INTx.
    fn set_irqs_action<'a>(
        &self,
        index: u32,
        action: u32,
        evts: impl IntoIterator<Item = &'a EventFd>,
    ) -> io::Result<()> {
        // struct vfio_irq_set is five u32 fields, then the data: here one descriptor (an int)
        // per vector. Built as u32 words, it is aligned as the kernel expects.
        let fds: Vec<u32> = evts.into_iter().map(|e| e.as_raw_fd() as u32).collect();
        let data = if fds.is_empty() {
            VFIO_IRQ_SET_DATA_NONE
        } else {
            VFIO_IRQ_SET_DATA_EVENTFD
        };
        let header = std::mem::size_of::<vfio_irq_set>() / 4;
        let mut words = vec![0u32; header + fds.len()];
        words[0] = (words.len() * 4) as u32;
        words[1] = data | action;
        words[2] = index;
        words[3] = 0;
        words[4] = fds.len() as u32;
        words[header..].copy_from_slice(&fds);
        // SAFETY: the kernel reads `argsz` bytes: the header and one descriptor per vector,
        // all initialised. The eventfds outlive the interrupt (it is turned off before they
        // are closed).
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ptr(
                &self.file,
                requests::VFIO_DEVICE_SET_IRQS(),
                words.as_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn reset(&self) {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&self.file, requests::VFIO_DEVICE_RESET()) };
        if ret < 0 {
            log::info!(
                "vfio-pci: the function has no reset: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Guest RAM mapped for the function's DMA, unmapped when dropped.
struct DmaMappings {
    container: std::fs::File,
    mapped: Vec<(u64, u64)>,
}

impl DmaMappings {
    /// Maps every region of `memory` at I/O virtual address = guest physical address.
    fn map(container: OwnedFd, memory: &GuestMemoryMmap) -> Result<Self, VfioCardError> {
        let mut mappings = DmaMappings {
            container: container.into(),
            mapped: Vec::new(),
        };
        for region in memory.iter() {
            let iova = region.start_addr().0;
            let size = region.len();
            let Ok(host) = memory.get_host_address(region.start_addr()) else {
                continue;
            };
            let map = vfio_iommu_type1_dma_map {
                argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
                flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                vaddr: host as u64,
                iova,
                size,
            };
            // SAFETY: `host..host + size` is guest RAM, mapped for the life of the VM, which
            // outlives this container's mappings (they end when this is dropped). The device
            // only ever sees it as guest memory, which the VMM accesses with volatile copies.
            let ret = unsafe {
                ioctl_with_ref(&mappings.container, requests::VFIO_IOMMU_MAP_DMA(), &map)
            };
            if ret < 0 {
                return Err(VfioCardError::DmaMap {
                    iova,
                    size,
                    source: io::Error::last_os_error(),
                });
            }
            mappings.mapped.push((iova, size));
        }
        Ok(mappings)
    }
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        for &(iova, size) in &self.mapped {
            let unmap = vfio_iommu_type1_dma_unmap {
                argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
                iova,
                size,
                ..Default::default()
            };
            // SAFETY: the kernel reads and updates the unmap request only.
            let ret = unsafe {
                ioctl_with_ref(&self.container, requests::VFIO_IOMMU_UNMAP_DMA(), &unmap)
            };
            if ret < 0 {
                log::warn!(
                    "vfio-pci: unmapping DMA at {iova:#x}: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// A BAR region mapped from the device file into a KVM memory slot.
struct MappedBar {
    wiring: Arc<PassthroughWiring>,
    slot: u32,
    host: *mut libc::c_void,
    len: usize,
}

// SAFETY: the pointer is only passed back to munmap; the mapping belongs to this value.
unsafe impl Send for MappedBar {}

impl Drop for MappedBar {
    fn drop(&mut self) {
        if let Err(e) = self.wiring.set_slot(self.slot, 0, 0, 0) {
            // KVM may still map the guest onto these pages: the mapping and the slot number
            // are left as they are rather than unmapped under it.
            log::warn!(
                "vfio-pci: deleting memory slot {}: {e}; its mapping is kept",
                self.slot
            );
            return;
        }
        self.wiring.release_slot(self.slot);
        // SAFETY: `host` and `len` are the mapping made in `PlacedBar::promote`, in no memory
        // slot any more (deleting the slot succeeded just above).
        unsafe { libc::munmap(self.host, self.len) };
    }
}

/// What a placed BAR is now.
enum BarState {
    /// On the MMIO bus: accesses exit and are forwarded. `promotable` until the first one.
    Trapped { promotable: bool },
    /// A memory slot, deleted when this state is left: accesses reach the device without an
    /// exit.
    Mapped { _slot: MappedBar },
    /// Taken out of the guest; a late access (begun before) is still forwarded.
    Retired,
}

/// A memory BAR where the guest placed it.
///
/// It starts trapped. The first access maps the region from the device file (when VFIO allows
/// it), makes that access through the mapping, which faults the mapping in from the VMM's own
/// context, and turns the BAR into a memory slot, so that every later access reaches the
/// device directly. Faulting the mapping in from KVM's page-fault path instead, on a region
/// never touched, has hung the host kernel in the nested lab; and the guest's own first access
/// is the only one the device sees (nothing is read to prefault it).
struct PlacedBar {
    file: Arc<DeviceFile>,
    wiring: Arc<PassthroughWiring>,
    index: u32,
    base: u64,
    size: u64,
    state: Mutex<BarState>,
    /// The MSI-X table or pending bits in this BAR, which keep it trapped.
    msix: Option<MsixWindow>,
}

impl PlacedBar {
    fn lock(&self) -> std::sync::MutexGuard<'_, BarState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps the region and makes it a memory slot at the BAR's base, doing `first` through
    /// the mapping in between. `None` (and `first` not done) when VFIO does not allow the
    /// mapping; `Some(None)` when `first` was done but the slot could not be made.
    fn promote(&self, first: impl FnOnce(*mut u8)) -> Option<Option<MappedBar>> {
        let region = self.file.region(self.index)?;
        let page = 4096;
        if region.flags & VFIO_REGION_INFO_FLAG_MMAP == 0
            || self.size < page
            || !self.base.is_multiple_of(page)
        {
            return None;
        }
        let len = usize::try_from(self.size).ok()?;
        let offset = libc::off_t::try_from(region.offset).ok()?;
        // SAFETY: a new shared mapping of the device file at a kernel-chosen address; nothing
        // else is affected. The result is checked below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.file.as_raw_fd(),
                offset,
            )
        };
        if host == libc::MAP_FAILED {
            log::info!(
                "vfio-pci: BAR {} stays trapped (mmap: {})",
                self.index,
                io::Error::last_os_error()
            );
            return None;
        }
        first(host.cast());
        let unmap = || {
            // SAFETY: the mapping just made, in no memory slot.
            unsafe { libc::munmap(host, len) };
        };
        let Some(slot) = self.wiring.allocate_slot() else {
            unmap();
            return Some(None);
        };
        if let Err(e) = self
            .wiring
            .set_slot(slot, self.base, self.size, host as u64)
        {
            log::info!(
                "vfio-pci: BAR {} stays trapped (memory slot: {e})",
                self.index
            );
            self.wiring.release_slot(slot);
            unmap();
            return Some(None);
        }
        Some(Some(MappedBar {
            wiring: self.wiring.clone(),
            slot,
            host,
            len,
        }))
    }

    /// Makes the guest's first access at `offset` through the mapping (with `access`) and
    /// promotes the BAR (see above). False when the access is still to be made: not the
    /// first, or a BAR VFIO does not let us map; the caller then forwards it.
    fn first_access(&self, offset: u64, access: impl FnOnce(*mut u8)) -> bool {
        let mut state = self.lock();
        let BarState::Trapped { promotable: true } = *state else {
            return false;
        };
        *state = BarState::Trapped { promotable: false };
        // SAFETY (in the closure): the bus only dispatches accesses inside the BAR, which the
        // mapping covers whole.
        match self.promote(|mapping| access(unsafe { mapping.add(offset as usize) })) {
            Some(Some(mapped)) => {
                if let Err(e) = self.wiring.mmio.remove(self.base) {
                    log::warn!("vfio-pci: BAR {} at {:#x}: {e}", self.index, self.base);
                }
                log::info!(
                    "vfio-pci: BAR {} at {:#x} mapped into the guest (memory slot {})",
                    self.index,
                    self.base,
                    mapped.slot
                );
                *state = BarState::Mapped { _slot: mapped };
                true
            }
            Some(None) => true,
            None => false,
        }
    }

    /// Takes the BAR out of the guest.
    fn retire(&self) {
        let mut state = self.lock();
        if let BarState::Trapped { .. } = *state {
            if let Err(e) = self.wiring.mmio.remove(self.base) {
                log::warn!("vfio-pci: BAR {} at {:#x}: {e}", self.index, self.base);
            }
        }
        *state = BarState::Retired;
    }
}

impl MmioDevice for PlacedBar {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if self.msix.as_ref().is_some_and(|w| w.read(offset, data))
            || self.first_access(offset, |at| volatile_read(at, data))
        {
            return;
        }
        self.file.read(self.index, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if self.msix.as_ref().is_some_and(|w| w.write(offset, data))
            || self.first_access(offset, |at| volatile_write(at, data))
        {
            return;
        }
        self.file.write(self.index, offset, data);
    }
}

/// Whether an access of `len` bytes at `at` can be one access of that width: 1, 2, 4 or 8
/// bytes (MMIO exits are), naturally aligned. Anything else goes byte by byte.
fn one_access(at: *mut u8, len: usize) -> Option<usize> {
    matches!(len, 1 | 2 | 4 | 8)
        .then_some(len)
        .filter(|&len| (at as usize).is_multiple_of(len))
}

/// Reads `data.len()` bytes of device memory at `at` (see [`one_access`]).
fn volatile_read(at: *mut u8, data: &mut [u8]) {
    // SAFETY (all arms): `at..at + data.len()` lies inside a live mapping of the BAR (see
    // `PlacedBar::first_access`), and a wide access is aligned to its width; device registers
    // are read with the guest's own width.
    unsafe {
        match one_access(at, data.len()) {
            Some(1) => data[0] = std::ptr::read_volatile(at),
            Some(2) => {
                data.copy_from_slice(&std::ptr::read_volatile(at.cast::<u16>()).to_le_bytes())
            }
            Some(4) => {
                data.copy_from_slice(&std::ptr::read_volatile(at.cast::<u32>()).to_le_bytes())
            }
            Some(8) => {
                data.copy_from_slice(&std::ptr::read_volatile(at.cast::<u64>()).to_le_bytes())
            }
            _ => {
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = std::ptr::read_volatile(at.add(i));
                }
            }
        }
    }
}

/// Writes `data` to device memory at `at` (see [`one_access`]).
fn volatile_write(at: *mut u8, data: &[u8]) {
    // SAFETY (all arms): as in `volatile_read`.
    unsafe {
        match (one_access(at, data.len()), data) {
            (Some(_), &[b]) => std::ptr::write_volatile(at, b),
            (Some(_), &[a, b]) => {
                std::ptr::write_volatile(at.cast::<u16>(), u16::from_le_bytes([a, b]))
            }
            (Some(_), &[a, b, c, d]) => {
                std::ptr::write_volatile(at.cast::<u32>(), u32::from_le_bytes([a, b, c, d]))
            }
            (Some(_), &[a, b, c, d, e, f, g, h]) => std::ptr::write_volatile(
                at.cast::<u64>(),
                u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            ),
            _ => {
                for (i, &byte) in data.iter().enumerate() {
                    std::ptr::write_volatile(at.add(i), byte);
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BarKind {
    Absent,
    Memory {
        bits64: bool,
        prefetch: bool,
    },
    /// The upper half of the 64-bit BAR before it.
    Upper,
}

struct Bar {
    kind: BarKind,
    size: u64,
    address: u64,
    placed: Option<Arc<PlacedBar>>,
}

impl Bar {
    fn low_register(&self) -> u32 {
        match self.kind {
            BarKind::Memory { bits64, prefetch } => {
                let mask = !(self.size - 1) as u32 & !0xf;
                (self.address as u32 & mask) | (u32::from(bits64) << 2) | (u32::from(prefetch) << 3)
            }
            _ => 0,
        }
    }
}

/// The function's INTx: a level-triggered IOAPIC line shared as PCI's are. VFIO signals
/// `trigger` (a KVM irqfd of the line, asserting it) and masks the function's INTx; the
/// guest's EOI deasserts the line and signals `resample`, with which VFIO unmasks it again.
struct Intx {
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
    on: bool,
}

impl Intx {
    /// Turns INTx delivery on or off; a failure is logged and leaves it off.
    fn set(&mut self, on: bool, file: &DeviceFile, vm: &VmFd, host: &str) {
        if on == self.on {
            return;
        }
        if !on {
            if let Err(e) = file.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, []) {
                log::warn!("vfio-pci {host}: disabling INTx: {e}");
            }
            if let Err(e) = vm.unregister_irqfd(&self.trigger, self.gsi) {
                log::warn!("vfio-pci {host}: INTx irqfd: {e}");
            }
            self.on = false;
            return;
        }
        if let Err(e) = vm.register_irqfd_with_resample(&self.trigger, &self.resample, self.gsi) {
            log::warn!("vfio-pci {host}: INTx on GSI {}: {e}", self.gsi);
            return;
        }
        let enabled = file
            .set_irqs(VFIO_PCI_INTX_IRQ_INDEX, [&self.trigger])
            .and_then(|()| {
                file.set_irqs_action(
                    VFIO_PCI_INTX_IRQ_INDEX,
                    VFIO_IRQ_SET_ACTION_UNMASK,
                    [&self.resample],
                )
            });
        match enabled {
            Ok(()) => self.on = true,
            Err(e) => {
                log::warn!("vfio-pci {host}: enabling INTx: {e}");
                let _ = file.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, []);
                let _ = vm.unregister_irqfd(&self.trigger, self.gsi);
            }
        }
    }
}

/// The guest's MSI capability, held here rather than in the device.
struct Msi {
    offset: usize,
    bits64: bool,
    evt: EventFd,
    gsi: Option<u32>,
}

impl Msi {
    fn data_offset(&self) -> usize {
        self.offset + if self.bits64 { 0xc } else { 0x8 }
    }

    fn len(&self) -> usize {
        self.data_offset() + 2 - self.offset
    }
}

/// A host function behind a root port.
pub struct VfioPciCard {
    host: String,
    file: Arc<DeviceFile>,
    shadow: [u8; CONFIG_LEN],
    bars: [Bar; 6],
    memory_enabled: bool,
    msi: Option<Msi>,
    msix: Option<Msix>,
    intx: Option<Intx>,
    routes: Arc<MsiRoutes>,
    wiring: Arc<PassthroughWiring>,
    _dma: DmaMappings,
}

impl std::fmt::Debug for VfioPciCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciCard")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl VfioPciCard {
    /// A card for host function `host`, opened by the launcher as `handle`, in the root port
    /// at bus-0 device `port_device`; all of `memory` is mapped for its DMA, its MSIs go
    /// through `routes`, its BARs and INTx through `wiring`.
    pub fn new(
        host: &str,
        handle: VfioHandle,
        memory: &GuestMemoryMmap,
        routes: Arc<MsiRoutes>,
        wiring: Arc<PassthroughWiring>,
        port_device: u8,
    ) -> Result<Self, VfioCardError> {
        let file = Arc::new(DeviceFile {
            file: handle.device.into(),
            regions: handle.info.regions,
        });
        let config = file
            .region(VFIO_PCI_CONFIG_REGION_INDEX)
            .ok_or(VfioCardError::NoConfigSpace)?;
        let mut shadow = [0u8; CONFIG_LEN];
        let len = CONFIG_LEN.min(config.size as usize);
        file.file
            .read_exact_at(&mut shadow[..len], config.offset)
            .map_err(VfioCardError::ReadConfig)?;
        let header = shadow[usize::from(HEADER_TYPE)];
        if header & 0x7f != 0 {
            return Err(VfioCardError::NotEndpoint(header));
        }
        // One function is passed through, whatever the host device has beside it.
        shadow[usize::from(HEADER_TYPE)] = 0;
        let bars = discover_bars(&file, &shadow);
        let found = capabilities(&shadow);
        let mut kept = Vec::new();
        let (mut msi, mut msix) = (None, None);
        for &(at, id) in &found {
            match id {
                // VFIO's interrupt counts are what the host can deliver: a capability it
                // cannot back is unlinked.
                MSI_CAPABILITY | msix::CAPABILITY_ID
                    if (id == MSI_CAPABILITY && handle.info.msi_vectors == 0)
                        || (id == msix::CAPABILITY_ID && handle.info.msix_vectors == 0) =>
                {
                    log::warn!("vfio-pci {host}: the host offers no vector for capability {id:#x}; not offered");
                    continue;
                }
                MSI_CAPABILITY if msi.is_none() && at + 14 <= CONFIG_LEN => {
                    let control = u16::from_le_bytes([shadow[at + 2], shadow[at + 3]]);
                    // One vector, no per-vector masking, disabled; the 64-bit flag as the
                    // device has it.
                    let shown = control & MSI_64BIT;
                    shadow[at + 2..at + 4].copy_from_slice(&shown.to_le_bytes());
                    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VfioCardError::EventFd)?;
                    msi = Some(Msi {
                        offset: at,
                        bits64: shown != 0,
                        evt,
                        gsi: None,
                    });
                }
                msix::CAPABILITY_ID if msix.is_none() => {
                    match Msix::parse(&shadow, at, &bars, &routes, handle.info.msix_vectors) {
                        Ok(parsed) => {
                            // Disabled and not masked, as after a reset.
                            shadow[at + 3] &=
                                !((msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK) >> 8) as u8;
                            msix = Some(parsed);
                        }
                        Err(why) => {
                            log::warn!("vfio-pci {host}: MSI-X not offered: {why}");
                            continue;
                        }
                    }
                }
                _ => {}
            }
            kept.push(at);
        }
        relink(&mut shadow, &kept);
        // The card is device 0 behind its port: its pin reaches the port's pin of the same
        // letter (the bridge swizzle), and so the port's line.
        let pin = shadow[usize::from(INTERRUPT_PIN)];
        let intx = match pin {
            1..=4 => {
                let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VfioCardError::EventFd);
                Some(Intx {
                    gsi: crate::boot::layout::pci_intx_gsi(port_device, pin - 1),
                    trigger: evt()?,
                    resample: evt()?,
                    on: false,
                })
            }
            _ => None,
        };
        if msi.is_none() && msix.is_none() && intx.is_none() {
            log::warn!("vfio-pci {host}: the function has no interrupt the guest can use");
        }
        let dma = DmaMappings::map(handle.container, memory)?;
        let mut card = VfioPciCard {
            host: host.to_string(),
            file,
            shadow,
            bars,
            memory_enabled: false,
            msi,
            msix,
            intx,
            routes,
            wiring,
            _dma: dma,
        };
        card.sync_intx();
        Ok(card)
    }

    /// Turns INTx off, before MSI or MSI-X is enabled on the function.
    fn intx_off(&mut self) {
        if let Some(intx) = self.intx.as_mut() {
            intx.set(false, &self.file, &self.wiring.vm, &self.host);
        }
    }

    /// INTx delivers while neither MSI nor MSI-X does, as on a real function.
    fn sync_intx(&mut self) {
        let msi = self.msi.as_ref().is_some_and(|m| m.gsi.is_some());
        let msix = self.msix.as_ref().is_some_and(|m| m.in_device);
        if let Some(intx) = self.intx.as_mut() {
            intx.set(!msi && !msix, &self.file, &self.wiring.vm, &self.host);
        }
    }

    fn live_config(&self, offset: u16, data: &mut [u8]) {
        self.file
            .read(VFIO_PCI_CONFIG_REGION_INDEX, u64::from(offset), data);
    }

    /// The 32-bit register at dword-aligned `at`, as the guest sees it.
    fn register(&self, at: u16) -> u32 {
        let at_usize = usize::from(at);
        let shadow = || {
            u32::from_le_bytes([
                self.shadow[at_usize],
                self.shadow[at_usize + 1],
                self.shadow[at_usize + 2],
                self.shadow[at_usize + 3],
            ])
        };
        match at {
            COMMAND => {
                let mut live = [0u8; 4];
                self.live_config(COMMAND, &mut live);
                u32::from_le_bytes(live)
            }
            BAR0..BAR_END => {
                let index = usize::from((at - BAR0) / 4);
                match self.bars[index].kind {
                    BarKind::Upper => {
                        (self.bars[index - 1].address >> 32) as u32 & self.upper_mask(index - 1)
                    }
                    _ => self.bars[index].low_register(),
                }
            }
            ROM => 0,
            INTERRUPT_LINE if self.intx.is_none() => {
                // No INTx pin offered: the function interrupts with MSI or MSI-X only.
                shadow() & !(0xff << ((INTERRUPT_PIN - INTERRUPT_LINE) * 8))
            }
            _ => shadow(),
        }
    }

    fn upper_mask(&self, index: usize) -> u32 {
        (!(self.bars[index].size - 1) >> 32) as u32
    }

    fn write_register(&mut self, at: u16, old: u32, new: u32) {
        match at {
            COMMAND => {
                let command = (new as u16 & COMMAND_WRITABLE) | (old as u16 & !COMMAND_WRITABLE);
                self.file.write(
                    VFIO_PCI_CONFIG_REGION_INDEX,
                    u64::from(COMMAND),
                    &command.to_le_bytes(),
                );
                // Status bits are write-1-to-clear on the device itself.
                let status = (new >> 16) as u16;
                if status != 0 {
                    self.file.write(
                        VFIO_PCI_CONFIG_REGION_INDEX,
                        u64::from(STATUS),
                        &status.to_le_bytes(),
                    );
                }
                let memory = command & COMMAND_MEMORY != 0;
                if memory != self.memory_enabled {
                    self.memory_enabled = memory;
                    self.place_bars();
                }
            }
            BAR0..BAR_END => {
                let index = usize::from((at - BAR0) / 4);
                match self.bars[index].kind {
                    BarKind::Absent => return,
                    BarKind::Upper => {
                        let mask = self.upper_mask(index - 1);
                        let bar = &mut self.bars[index - 1];
                        bar.address = (bar.address & 0xffff_ffff) | (u64::from(new & mask) << 32);
                    }
                    BarKind::Memory { .. } => {
                        let bar = &mut self.bars[index];
                        let mask = !(bar.size - 1) as u32 & !0xf;
                        bar.address = (bar.address & !0xffff_ffff) | u64::from(new & mask);
                    }
                }
                if self.memory_enabled {
                    self.place_bars();
                }
            }
            INTERRUPT_LINE => self.shadow[usize::from(INTERRUPT_LINE)] = new as u8,
            _ => {}
        }
    }

    /// Places every memory BAR where the guest put it while memory decoding is on, and takes
    /// them all out of the guest while it is off.
    fn place_bars(&mut self) {
        for index in 0..self.bars.len() {
            let BarKind::Memory { .. } = self.bars[index].kind else {
                continue;
            };
            let bar = &self.bars[index];
            let wanted = (self.memory_enabled && bar.address != 0).then_some(bar.address);
            if bar.placed.as_ref().map(|p| p.base) == wanted {
                continue;
            }
            self.unplace(index);
            if let Some(base) = wanted {
                self.place(index, base);
            }
        }
    }

    fn unplace(&mut self, index: usize) {
        if let Some(placed) = self.bars[index].placed.take() {
            placed.retire();
        }
    }

    fn place(&mut self, index: usize, base: u64) {
        let msix = self.msix.as_ref().and_then(|m| m.window(index));
        let placed = Arc::new(PlacedBar {
            file: self.file.clone(),
            wiring: self.wiring.clone(),
            index: index as u32,
            base,
            size: self.bars[index].size,
            state: Mutex::new(BarState::Trapped {
                promotable: msix.is_none(),
            }),
            msix,
        });
        match self.wiring.mmio.insert(base, placed.size, placed.clone()) {
            Ok(()) => self.bars[index].placed = Some(placed),
            // Where a BAR goes is the guest's choice, made as often as it likes.
            Err(e) => log::debug!(
                "vfio-pci {}: BAR {index} cannot be placed at {base:#x}: {e}",
                self.host
            ),
        }
    }

    fn msi_read(&self, at: usize) -> Option<u8> {
        let msi = self.msi.as_ref()?;
        (msi.offset..msi.offset + msi.len())
            .contains(&at)
            .then(|| self.shadow[at])
    }

    /// A write of `data` at `offset`, inside the MSI capability: the message and the enable
    /// bit are taken, then the route, irqfd and device follow.
    fn msi_write(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some(msi) = self.msi.as_ref() else {
            return false;
        };
        let (start, end) = (msi.offset, msi.offset + msi.len());
        if offset + data.len() <= start || offset >= end {
            return false;
        }
        let control = msi.offset + 2;
        let address = msi.offset + 4;
        let data_at = msi.data_offset();
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i;
            let mask = match at {
                a if a == control => MSI_ENABLE as u8,
                a if a == address => 0xfc,
                a if (address + 1..data_at + 2).contains(&a) => 0xff,
                _ => 0,
            };
            if (start..end).contains(&at) {
                self.shadow[at] = (self.shadow[at] & !mask) | (byte & mask);
            }
        }
        self.sync_msi();
        true
    }

    /// A write of `data` at `offset` that touches the MSI-X capability's message control:
    /// only Enable and Function Mask are the guest's; the table and the function follow.
    fn msix_write(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some(msix) = self.msix.as_ref() else {
            return false;
        };
        let (start, end) = (msix.offset, msix.offset + 12);
        if offset + data.len() <= start || offset >= end {
            return false;
        }
        let high = msix.offset + 3;
        if let Some(&byte) = (offset..offset + data.len())
            .position(|at| at == high)
            .and_then(|i| data.get(i))
        {
            let mask = ((msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK) >> 8) as u8;
            self.shadow[high] = (self.shadow[high] & !mask) | (byte & mask);
        }
        self.sync_msix();
        true
    }

    fn sync_msix(&mut self) {
        let Some(msix) = self.msix.as_mut() else {
            // Without MSI-X, INTx still follows MSI (after a reset, too).
            self.sync_intx();
            return;
        };
        let control =
            u16::from_le_bytes([self.shadow[msix.offset + 2], self.shadow[msix.offset + 3]]);
        let enabled = control & msix::CONTROL_ENABLE != 0;
        if enabled && !msix.in_device {
            self.intx_off();
        }
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        msix.interrupt
            .set_control(enabled, control & msix::CONTROL_FUNCTION_MASK != 0);
        if enabled != msix.in_device {
            let evts: Vec<&EventFd> = if enabled {
                msix.interrupt.vector_eventfds().collect()
            } else {
                Vec::new()
            };
            match self.file.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, evts) {
                Ok(()) => msix.in_device = enabled,
                Err(e) => log::warn!(
                    "vfio-pci {}: {} MSI-X: {e}",
                    self.host,
                    if enabled { "enabling" } else { "disabling" }
                ),
            }
        }
        self.sync_intx();
    }

    fn msi_message(&self, msi: &Msi) -> (bool, u64, u32) {
        let u16_at = |at: usize| u16::from_le_bytes([self.shadow[at], self.shadow[at + 1]]);
        let u32_at = |at: usize| u32::from(u16_at(at)) | (u32::from(u16_at(at + 2)) << 16);
        let enabled = u16_at(msi.offset + 2) & MSI_ENABLE != 0;
        let high = if msi.bits64 {
            u32_at(msi.offset + 8)
        } else {
            0
        };
        let address = (u64::from(high) << 32) | u64::from(u32_at(msi.offset + 4));
        (enabled, address, u32::from(u16_at(msi.data_offset())))
    }

    fn sync_msi(&mut self) {
        let Some(msi) = self.msi.as_ref() else {
            return;
        };
        let (enabled, address, data) = self.msi_message(msi);
        if enabled && msi.gsi.is_none() {
            self.intx_off();
        }
        self.route_msi(enabled, address, data);
        self.sync_intx();
    }

    /// Makes the function's MSI what the guest's capability says: routed, delivering, or off.
    fn route_msi(&mut self, enabled: bool, address: u64, data: u32) {
        let host = &self.host;
        let msi = self.msi.as_mut().expect("checked above");
        match (enabled, msi.gsi) {
            (true, Some(gsi)) => {
                if let Err(e) = self.routes.set(gsi, Some((address, data))) {
                    log::warn!("vfio-pci {host}: MSI: {e}");
                }
            }
            (true, None) => {
                let Some(gsi) = self.routes.allocate() else {
                    log::warn!("vfio-pci {host}: MSI: no GSI left");
                    return;
                };
                let started = self
                    .routes
                    .set(gsi, Some((address, data)))
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        self.routes
                            .assign_irqfd(&msi.evt, gsi)
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|()| {
                        self.file
                            .set_irqs(VFIO_PCI_MSI_IRQ_INDEX, [&msi.evt])
                            .map_err(|e| e.to_string())
                    });
                match started {
                    Ok(()) => msi.gsi = Some(gsi),
                    Err(e) => {
                        log::warn!("vfio-pci {host}: enabling MSI: {e}");
                        let _ = self.routes.deassign_irqfd(&msi.evt, gsi);
                        let _ = self.routes.release(gsi);
                    }
                }
            }
            (false, Some(_)) => stop_msi(&self.file, &self.routes, msi, host),
            (false, None) => {}
        }
    }
}

/// Stops the function's MSI and frees its GSI.
fn stop_msi(file: &DeviceFile, routes: &MsiRoutes, msi: &mut Msi, host: &str) {
    let Some(gsi) = msi.gsi.take() else {
        return;
    };
    if let Err(e) = file.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, []) {
        log::warn!("vfio-pci {host}: disabling MSI: {e}");
    }
    if let Err(e) = routes.deassign_irqfd(&msi.evt, gsi) {
        log::warn!("vfio-pci {host}: {e}");
    }
    if let Err(e) = routes.release(gsi) {
        log::warn!("vfio-pci {host}: {e}");
    }
}

/// The function's BARs: VFIO gives their sizes, the device's own registers their types.
fn discover_bars(file: &DeviceFile, shadow: &[u8; CONFIG_LEN]) -> [Bar; 6] {
    let mut bars: [Bar; 6] = std::array::from_fn(|_| Bar {
        kind: BarKind::Absent,
        size: 0,
        address: 0,
        placed: None,
    });
    let mut index = 0;
    while index < bars.len() {
        let at = usize::from(BAR0) + index * 4;
        let register =
            u32::from_le_bytes([shadow[at], shadow[at + 1], shadow[at + 2], shadow[at + 3]]);
        let size = file.region(index as u32).map_or(0, |r| r.size);
        if size == 0 {
            index += 1;
            continue;
        }
        if register & 1 != 0 {
            log::warn!("vfio-pci: BAR {index} is port I/O, which is not passed through");
            index += 1;
            continue;
        }
        if !size.is_power_of_two() {
            log::warn!("vfio-pci: BAR {index} has a size ({size:#x}) that is not a power of two");
            index += 1;
            continue;
        }
        let bits64 = (register >> 1) & 3 == 2 && index + 1 < bars.len();
        bars[index].kind = BarKind::Memory {
            bits64,
            prefetch: register & 8 != 0,
        };
        bars[index].size = size.max(16);
        if bits64 {
            bars[index + 1].kind = BarKind::Upper;
            index += 2;
        } else {
            index += 1;
        }
    }
    bars
}

/// The capability list in `shadow`: offset and id of each, in list order. A list that loops
/// or leaves the header's 256 bytes ends there.
fn capabilities(shadow: &[u8; CONFIG_LEN]) -> Vec<(usize, u8)> {
    let mut found = Vec::new();
    let mut next = usize::from(shadow[usize::from(CAPABILITIES)] & 0xfc);
    while next >= 0x40 && next + 1 < CONFIG_LEN && found.len() < MAX_CAPABILITIES {
        if found.iter().any(|&(at, _)| at == next) {
            break;
        }
        found.push((next, shadow[next]));
        next = usize::from(shadow[next + 1] & 0xfc);
    }
    found
}

/// Makes `kept` (offsets of capabilities, in order) the whole capability list of `shadow`.
fn relink(shadow: &mut [u8; CONFIG_LEN], kept: &[usize]) {
    shadow[usize::from(CAPABILITIES)] = kept.first().map_or(0, |&first| first as u8);
    for (i, &at) in kept.iter().enumerate() {
        shadow[at + 1] = kept.get(i + 1).map_or(0, |&n| n as u8);
    }
}

/// Where an MSI-X structure (table or pending bits) lies: a BAR, an offset in it, a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsixPlace {
    bar: usize,
    offset: u64,
    len: u64,
}

impl MsixPlace {
    /// The place a Table or PBA Offset/BIR register names for `len` bytes, if it lies inside
    /// a memory BAR of `bars`.
    fn from_register(register: u32, len: u64, bars: &[Bar; 6]) -> Option<MsixPlace> {
        let bar = (register & 7) as usize;
        let offset = u64::from(register & !7);
        let bar_ok = bars.get(bar).is_some_and(|b| {
            matches!(b.kind, BarKind::Memory { .. })
                && offset.checked_add(len).is_some_and(|end| end <= b.size)
        });
        bar_ok.then_some(MsixPlace { bar, offset, len })
    }

    fn contains(&self, offset: u64, len: usize) -> bool {
        offset >= self.offset && offset + len as u64 <= self.offset + self.len
    }
}

/// The function's MSI-X: its capability, the table and pending bits Citadel keeps for the
/// guest (the function's own table is the host kernel's), and one eventfd per vector, which
/// VFIO signals and which are KVM irqfds while their vector is unmasked.
struct Msix {
    offset: usize,
    interrupt: Arc<MsixInterrupt>,
    table: MsixPlace,
    pba: MsixPlace,
    /// The function has been told to signal the eventfds.
    in_device: bool,
}

impl Msix {
    /// The MSI-X capability at `offset` of `shadow`, when its table and pending bits lie in
    /// memory BARs of `bars`.
    fn parse(
        shadow: &[u8; CONFIG_LEN],
        offset: usize,
        bars: &[Bar; 6],
        routes: &Arc<MsiRoutes>,
        host_vectors: u32,
    ) -> Result<Msix, String> {
        if offset + 12 > CONFIG_LEN {
            return Err("its capability does not fit the header".into());
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([shadow[at], shadow[at + 1], shadow[at + 2], shadow[at + 3]])
        };
        let control = u16::from_le_bytes([shadow[offset + 2], shadow[offset + 3]]);
        let vectors = (control & 0x7ff) + 1;
        if u32::from(vectors) > host_vectors {
            return Err(format!(
                "its table has {vectors} vectors, the host delivers {host_vectors}"
            ));
        }
        let table = MsixPlace::from_register(
            u32_at(offset + 4),
            u64::from(vectors) * MSIX_ENTRY_SIZE,
            bars,
        )
        .ok_or("its table is not inside a memory BAR")?;
        let pba = MsixPlace::from_register(
            u32_at(offset + 8),
            u64::from(vectors).div_ceil(64) * 8,
            bars,
        )
        .ok_or("its pending bits are not inside a memory BAR")?;
        let interrupt =
            MsixInterrupt::new(routes.clone(), vectors, 0).map_err(|e| e.to_string())?;
        Ok(Msix {
            offset,
            interrupt: Arc::new(interrupt),
            table,
            pba,
            in_device: false,
        })
    }

    /// The table and pending bits that lie in BAR `bar`.
    fn window(&self, bar: usize) -> Option<MsixWindow> {
        let table = (self.table.bar == bar).then_some(self.table);
        let pba = (self.pba.bar == bar).then_some(self.pba);
        (table.is_some() || pba.is_some()).then(|| MsixWindow {
            interrupt: self.interrupt.clone(),
            table,
            pba,
        })
    }
}

/// The MSI-X structures of one BAR, served by Citadel rather than the function.
struct MsixWindow {
    interrupt: Arc<MsixInterrupt>,
    table: Option<MsixPlace>,
    pba: Option<MsixPlace>,
}

impl MsixWindow {
    /// Serves a read that falls in the table or pending bits; false for any other.
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        if let Some(table) = self.table.filter(|t| t.contains(offset, data.len())) {
            self.interrupt.table_read(offset - table.offset, data);
        } else if let Some(pba) = self.pba.filter(|p| p.contains(offset, data.len())) {
            self.interrupt.pba_read(offset - pba.offset, data);
        } else {
            return false;
        }
        true
    }

    /// Serves a write that falls in the table (pending bits are read-only); false for any
    /// other.
    fn write(&self, offset: u64, data: &[u8]) -> bool {
        if let Some(table) = self.table.filter(|t| t.contains(offset, data.len())) {
            self.interrupt.table_write(offset - table.offset, data);
        } else if !self.pba.is_some_and(|p| p.contains(offset, data.len())) {
            return false;
        }
        true
    }
}

impl Function for VfioPciCard {
    fn read(&self, offset: u16, data: &mut [u8]) {
        if usize::from(offset) + data.len() > CONFIG_LEN {
            data.fill(0);
            return;
        }
        // One register read per dword touched: a live register is read from the device
        // once, so a wide read is not torn.
        let mut dword: Option<(u16, u32)> = None;
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u16;
            *byte = match self.msi_read(usize::from(at)) {
                Some(value) => value,
                None => {
                    let value = match dword {
                        Some((base, value)) if base == at & !3 => value,
                        _ => self.register(at & !3),
                    };
                    dword = Some((at & !3, value));
                    (value >> ((at & 3) * 8)) as u8
                }
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if usize::from(offset) + data.len() > CONFIG_LEN || data.is_empty() {
            return;
        }
        if self.msi_write(usize::from(offset), data) || self.msix_write(usize::from(offset), data) {
            return;
        }
        let at = offset & !3;
        if usize::from(offset & 3) + data.len() > 4 {
            return;
        }
        let old = self.register(at);
        let mut bytes = old.to_le_bytes();
        let start = usize::from(offset & 3);
        bytes[start..start + data.len()].copy_from_slice(data);
        let mut new = u32::from_le_bytes(bytes);
        if at == COMMAND {
            // Status bits are write-1-to-clear: a status byte the guest did not write is
            // passed on as 0, which clears nothing.
            for lane in 2..4 {
                if !(start..start + data.len()).contains(&lane) {
                    new &= !(0xff << (lane * 8));
                }
            }
        }
        self.write_register(at, old, new);
    }

    fn multifunction(&self) -> bool {
        false
    }

    fn reset(&mut self) {
        if let Some(msi) = self.msi.as_mut() {
            stop_msi(&self.file, &self.routes, msi, &self.host);
            let control = msi.offset + 2;
            self.shadow[control] &= !(MSI_ENABLE as u8);
        }
        if let Some(msix) = self.msix.as_ref() {
            let high = msix.offset + 3;
            self.shadow[high] &= !((msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK) >> 8) as u8;
            msix.interrupt.reset_table();
        }
        self.sync_msix();
        self.memory_enabled = false;
        for index in 0..self.bars.len() {
            self.unplace(index);
            self.bars[index].address = 0;
        }
        self.file.reset();
        self.file.write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            u64::from(COMMAND),
            &0u16.to_le_bytes(),
        );
    }
}

impl Drop for VfioPciCard {
    fn drop(&mut self) {
        if let Some(msi) = self.msi.as_mut() {
            stop_msi(&self.file, &self.routes, msi, &self.host);
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.in_device) {
            msix.interrupt.set_control(false, false);
            if let Err(e) = self.file.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, []) {
                log::warn!("vfio-pci {}: disabling MSI-X: {e}", self.host);
            }
        }
        self.intx_off();
        for index in 0..self.bars.len() {
            self.unplace(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::OwnedFd;

    use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

    use super::*;
    use crate::devices::msi_routes::fake::FakeRouting;
    use citadel_launcher::protocol::VfioInfo;

    /// Where the fake device file keeps BAR 0.
    const BAR0_AT: u64 = 0x10000;

    /// A function's configuration space as a device would have it: 1234:11e8, multi-function
    /// header, a 4 KiB 32-bit memory BAR 0, interrupt pin A, and the capabilities power
    /// management (0x40) → MSI, 64-bit with per-vector masking and 8 vectors (0x50) → MSI-X,
    /// 4 vectors, table at 0x800 and pending bits at 0xc00 of `msix_bar` (0x70) → PCI Express
    /// (0x90).
    fn config_space_with_msix_in(msix_bar: u32) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        c[6] = 0x10;
        c[0x0b] = 0xff;
        c[usize::from(HEADER_TYPE)] = 0x80;
        c[usize::from(CAPABILITIES)] = 0x40;
        c[0x3d] = 1;
        c[0x40..0x42].copy_from_slice(&[0x01, 0x50]);
        c[0x50..0x54].copy_from_slice(&[0x05, 0x70, 0x86, 0x01]);
        c[0x70..0x74].copy_from_slice(&[0x11, 0x90, 0x03, 0x00]);
        c[0x74..0x78].copy_from_slice(&(0x800 | msix_bar).to_le_bytes());
        c[0x78..0x7c].copy_from_slice(&(0xc00 | msix_bar).to_le_bytes());
        c[0x90..0x92].copy_from_slice(&[0x10, 0x00]);
        c
    }

    /// A card over a plain file standing in for the VFIO device: configuration space at 0,
    /// BAR 0 at [`BAR0_AT`], neither mmap'able, so every BAR access is forwarded to the file.
    fn card(routing: Arc<FakeRouting>) -> Option<(VfioPciCard, File, Arc<MmioBus>)> {
        card_with(routing, config_space_with_msix_in(0), 8)
    }

    /// A card over `config`, the host delivering `msix_vectors` MSI-X vectors.
    fn card_with(
        routing: Arc<FakeRouting>,
        config: [u8; CONFIG_LEN],
        msix_vectors: u32,
    ) -> Option<(VfioPciCard, File, Arc<MmioBus>)> {
        let kvm = crate::test_kvm::kvm_or_skip("vfio_pci card")?;
        let vm = Arc::new(kvm.create_vm().expect("a VM"));
        let file = tempfile_with(&config);
        let device: OwnedFd = file.try_clone().unwrap().into();
        let container: OwnedFd = File::open("/dev/null").unwrap().into();
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let handle = VfioHandle {
            container,
            device,
            info: VfioInfo {
                regions: vec![
                    VfioRegion {
                        index: 0,
                        flags: rw,
                        size: 0x1000,
                        offset: BAR0_AT,
                    },
                    VfioRegion {
                        index: VFIO_PCI_CONFIG_REGION_INDEX,
                        flags: rw,
                        size: CONFIG_LEN as u64,
                        offset: 0,
                    },
                ],
                msi_vectors: 1,
                msix_vectors,
            },
        };
        let mmio = Arc::new(MmioBus::new());
        let wiring = Arc::new(PassthroughWiring::new(mmio.clone(), vm));
        let routes = Arc::new(MsiRoutes::new(routing));
        let card = VfioPciCard::new(
            "0000:00:01.0",
            handle,
            &GuestMemoryMmap::default(),
            routes,
            wiring,
            1,
        )
        .expect("a card");
        Some((card, file, mmio))
    }

    fn tempfile_with(config: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "citadel-vfio-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(BAR0_AT + 0x1000).unwrap();
        file.write_all_at(config, 0).unwrap();
        file
    }

    fn read32(card: &VfioPciCard, offset: u16) -> u32 {
        let mut data = [0; 4];
        card.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// The capability list as the guest walks it: (offset, id, message control).
    fn chain(card: &VfioPciCard) -> Vec<(u8, u8, u16)> {
        let mut chain = Vec::new();
        let mut next = read32(card, CAPABILITIES) as u8;
        while next != 0 && chain.len() < 8 {
            let header = read32(card, u16::from(next));
            chain.push((next, header as u8, (header >> 16) as u16));
            next = (header >> 8) as u8;
        }
        chain
    }

    #[test]
    fn the_guest_sees_one_function_with_plain_msi_and_msi_x() {
        let Some((card, _, _)) = card(Arc::default()) else {
            return;
        };
        assert_eq!(read32(&card, 0), 0x11e8_1234);
        assert_eq!(
            read32(&card, 0x0c) >> 16 & 0xff,
            0,
            "single function, type 0"
        );
        assert_eq!(read32(&card, 0x30), 0, "no option ROM");
        assert_eq!(read32(&card, 0x3c) >> 8 & 0xff, 1, "INTx on pin A");
        assert_eq!(read32(&card, 0x100), 0, "no extended capabilities");
        assert_eq!(
            chain(&card),
            [
                (0x40, 0x01, 0),
                (0x50, MSI_CAPABILITY, MSI_64BIT),
                (0x70, msix::CAPABILITY_ID, 3),
                (0x90, 0x10, 0)
            ],
            "MSI: one vector, no masking"
        );
    }

    #[test]
    fn msi_x_whose_table_is_in_no_bar_is_not_offered() {
        let Some((card, _, _)) = card_with(Arc::default(), config_space_with_msix_in(2), 8) else {
            return;
        };
        let ids: Vec<u8> = chain(&card).iter().map(|c| c.1).collect();
        assert_eq!(ids, [0x01, MSI_CAPABILITY, 0x10]);
    }

    #[test]
    fn msi_x_the_host_cannot_deliver_is_not_offered() {
        for host_vectors in [0, 3] {
            let Some((card, _, _)) =
                card_with(Arc::default(), config_space_with_msix_in(0), host_vectors)
            else {
                return;
            };
            let ids: Vec<u8> = chain(&card).iter().map(|c| c.1).collect();
            assert_eq!(ids, [0x01, MSI_CAPABILITY, 0x10], "{host_vectors} vectors");
        }
    }

    #[test]
    fn the_msi_x_table_is_the_guests_and_the_rest_of_its_bar_the_devices() {
        let routing = Arc::new(FakeRouting::default());
        let Some((mut card, file, mmio)) = card(routing.clone()) else {
            return;
        };
        card.write(0x10, &0xd000_0000u32.to_le_bytes());
        card.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        // Vector 2's entry, written and read back through the BAR; the device file's bytes
        // there stay as they were.
        let entry = 0xd000_0800 + 2 * 16;
        assert!(mmio.write(entry, &0xfee0_1000u32.to_le_bytes()));
        assert!(mmio.write(entry + 8, &0x4041u32.to_le_bytes()));
        assert!(mmio.write(entry + 12, &0u32.to_le_bytes()));
        let mut data = [0; 4];
        assert!(mmio.read(entry + 8, &mut data));
        assert_eq!(u32::from_le_bytes(data), 0x4041);
        let mut device = [0xaa; 16];
        file.read_exact_at(&mut device, BAR0_AT + 0x800 + 2 * 16)
            .unwrap();
        assert_eq!(device, [0; 16], "the table never reaches the function");
        assert!(mmio.read(0xd000_0c00, &mut data));
        assert_eq!(u32::from_le_bytes(data), 0, "nothing pending");
        // Enabling MSI-X: the vector is routed as its entry says; the plain file refuses
        // VFIO_DEVICE_SET_IRQS, which only costs a log line.
        card.write(0x72, &msix::CONTROL_ENABLE.to_le_bytes());
        assert_eq!(
            read32(&card, 0x70) >> 16,
            u32::from(msix::CONTROL_ENABLE | 3)
        );
        let table = routing.last_table().unwrap_or_default();
        assert!(
            table
                .iter()
                .any(|&(_, a, d)| (a, d) == (0xfee0_1000, 0x4041)),
            "{table:?}"
        );
        assert!(card.msix.as_ref().is_some_and(|m| !m.in_device));
        // The rest of BAR 0 still reaches the device.
        file.write_all_at(&7u32.to_le_bytes(), BAR0_AT + 0x10)
            .unwrap();
        assert!(mmio.read(0xd000_0010, &mut data));
        assert_eq!(u32::from_le_bytes(data), 7);
    }

    /// Status bits are write-1-to-clear on the device: a byte of the command/status dword
    /// the guest did not write reaches the device as 0, never as the value it holds.
    #[test]
    fn only_the_status_bytes_the_guest_writes_reach_the_device() {
        let Some((mut card, file, _mmio)) = card(Arc::default()) else {
            return;
        };
        let status = |file: &File| {
            let mut bytes = [0; 2];
            file.read_exact_at(&mut bytes, u64::from(STATUS)).unwrap();
            bytes
        };
        file.write_all_at(&[0x10, 0xf9], u64::from(STATUS)).unwrap();
        card.write(STATUS + 1, &[0x01]);
        assert_eq!(status(&file), [0x00, 0x01], "the low byte clears nothing");
        file.write_all_at(&[0x10, 0xf9], u64::from(STATUS)).unwrap();
        card.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            status(&file),
            [0x10, 0xf9],
            "a command write leaves status alone"
        );
    }

    #[test]
    fn a_bar_is_sized_placed_and_forwarded_only_while_memory_decoding_is_on() {
        let Some((mut card, file, mmio)) = card(Arc::default()) else {
            return;
        };
        card.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(
            read32(&card, 0x10),
            0xffff_f000,
            "4 KiB, 32-bit, not prefetchable"
        );
        card.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&card, 0x14), 0, "no BAR 1");
        card.write(0x10, &0xd000_0000u32.to_le_bytes());
        file.write_all_at(&0xcafe_f00du32.to_le_bytes(), BAR0_AT + 8)
            .unwrap();
        let mut data = [0; 4];
        assert!(!mmio.read(0xd000_0008, &mut data), "decoding is off");
        card.write(COMMAND, &(COMMAND_MEMORY | 1).to_le_bytes());
        let mut command = [0; 2];
        file.read_exact_at(&mut command, u64::from(COMMAND))
            .unwrap();
        assert_eq!(
            u16::from_le_bytes(command),
            COMMAND_MEMORY,
            "I/O decoding is never passed on"
        );
        assert!(mmio.read(0xd000_0008, &mut data));
        assert_eq!(u32::from_le_bytes(data), 0xcafe_f00d);
        assert!(mmio.write(0xd000_0010, &[1, 2, 3, 4]));
        let mut written = [0; 4];
        file.read_exact_at(&mut written, BAR0_AT + 0x10).unwrap();
        assert_eq!(written, [1, 2, 3, 4]);
        card.write(COMMAND, &0u16.to_le_bytes());
        assert!(!mmio.read(0xd000_0008, &mut data), "taken out again");
    }

    #[test]
    fn an_msi_the_device_refuses_leaves_no_route_or_irqfd() {
        let routing = Arc::new(FakeRouting::default());
        let Some((mut card, _, _)) = card(routing.clone()) else {
            return;
        };
        card.write(0x54, &0xfee0_0003u32.to_le_bytes());
        assert_eq!(
            read32(&card, 0x54),
            0xfee0_0000,
            "the address is dword aligned"
        );
        card.write(0x5c, &0x4023u16.to_le_bytes());
        card.write(0x52, &MSI_ENABLE.to_le_bytes());
        // The file is no VFIO device: VFIO_DEVICE_SET_IRQS fails, and the GSI it routed is
        // let go again.
        assert!(routing.irqfds.lock().unwrap().is_empty());
        assert_eq!(routing.last_table(), Some(Vec::new()));
        assert!(card.msi.as_ref().is_some_and(|m| m.gsi.is_none()));
    }

    #[test]
    fn any_sequence_of_guest_accesses_leaves_the_card_answering() {
        let Some((mut card, _, mmio)) = card(Arc::default()) else {
            return;
        };
        // A fixed xorshift sequence: configuration writes and reads of every width anywhere
        // in (and past) the 4 KiB space, with BAR 0 and memory decoding switched on now and
        // then, and accesses of every width across the BAR's window.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let r = next();
            let len = [1usize, 2, 4, 8][(r & 3) as usize];
            let offset = ((r >> 8) % 0x1100) as u16;
            let value = next().to_le_bytes();
            match round % 7 {
                0 => card.write(0x10, &0xd000_0000u32.to_le_bytes()),
                1 => card.write(COMMAND, &((r >> 40) as u16 & 0x7).to_le_bytes()),
                2 | 3 => card.write(offset, &value[..len]),
                4 => {
                    let mut data = [0u8; 8];
                    card.read(offset, &mut data[..len]);
                }
                5 => {
                    let mut data = [0u8; 8];
                    mmio.read(0xd000_0000 + (r >> 20) % 0x1010, &mut data[..len]);
                }
                _ => {
                    mmio.write(0xd000_0000 + (r >> 20) % 0x1010, &value[..len]);
                }
            }
        }
        // Still itself: the identity reads back, and a reset leaves nothing placed.
        assert_eq!(read32(&card, 0), 0x11e8_1234);
        card.reset();
        let mut data = [0u8; 4];
        assert!(!mmio.read(0xd000_0000, &mut data));
    }
}
