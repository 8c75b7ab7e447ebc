//! MSI-X for a virtio-pci function: the MSI-X table and pending bit array the driver programs,
//! and the virtio interrupt state (ISR, vector registers, configuration generation) on top of
//! them.
//!
//! Each vector has a GSI of its own and an eventfd. While the vector is active (MSI-X enabled,
//! function not masked, entry not masked) the eventfd is a KVM irqfd on the GSI, whose route
//! carries the entry's message, so a write to it (by the device, or by a backend process that
//! was handed it) interrupts the guest without the VMM. While the vector is inactive the
//! eventfd is no irqfd: the count written to it stays there, which is the vector's pending
//! bit, and KVM delivers it when the irqfd is assigned again. So no interrupt raised while
//! masked is lost, whoever raised it.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::interrupt::{InterruptStatus, TransportInterrupt, VirtioInterrupt};
use super::msi_routes::MsiRoutes;
use crate::snapshot::pci::MsixSnapshot;

/// The MSI-X capability's id.
pub const CAPABILITY_ID: u8 = 0x11;
/// MSI-X message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// MSI-X message control: every vector masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// The vector register value meaning "no vector" (virtio 1.2 section 4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;

/// Bytes of one MSI-X table entry: message address low and high, message data, vector
/// control.
pub const MSIX_ENTRY_SIZE: u64 = 16;

/// The MSI-X capability's Table Size field has 11 bits: at most 2048 vectors.
const MAX_VECTORS: u16 = 2048;

/// Vector control bit: the vector is masked.
const ENTRY_MASKED: u32 = 1;

/// An entry as reset leaves it: no message, masked.
const RESET_ENTRY: [u32; 4] = [0, 0, 0, ENTRY_MASKED];

/// Why an MSI-X interrupt could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    /// The vector count is not one an MSI-X capability can declare.
    #[error("an MSI-X table has 1 to {MAX_VECTORS} vectors, not {vectors}")]
    VectorCount {
        /// The count asked for.
        vectors: u16,
    },
    /// Every MSI GSI is taken.
    #[error("no MSI GSI left for MSI-X vector {vector}")]
    NoGsi {
        /// The vector.
        vector: u16,
    },
    /// eventfd() failed.
    #[error("creating the eventfd of MSI-X vector {vector}: {source}")]
    EventFd {
        /// The vector, or [`NO_VECTOR`] for the eventfd of queues without one.
        vector: u16,
        /// What eventfd() said.
        source: io::Error,
    },
}

/// The KVM side of one vector.
#[derive(Debug)]
struct Vector {
    gsi: u32,
    evt: EventFd,
}

/// What the driver programs, and which vectors are irqfds now.
#[derive(Debug)]
struct TableState {
    /// Per vector: address low, address high, data, vector control (only the mask bit kept).
    entries: Vec<[u32; 4]>,
    /// Message Control: MSI-X Enable.
    enabled: bool,
    /// Message Control: Function Mask.
    function_masked: bool,
    /// Per vector: its eventfd is assigned as an irqfd.
    active: Vec<bool>,
}

/// The interrupts of one virtio-pci function, shared by the transport (vector registers, ISR,
/// MSI-X table) and the device (which raises them).
///
/// Routes are kept when a vector goes inactive: nothing raises a GSI without its irqfd, and
/// the usual mask, unmask of an unchanged entry then costs no routing table push.
#[derive(Debug)]
pub struct MsixInterrupt {
    routes: Arc<MsiRoutes>,
    vectors: Vec<Vector>,
    /// What [`VirtioInterrupt::queue_irqfd`] hands out for a queue without a vector: no irqfd,
    /// so writes to it go nowhere.
    unrouted: EventFd,
    table: Mutex<TableState>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    status: InterruptStatus,
}

/// The index of the first dword an access touches, if it is an aligned 4- or 8-byte access
/// inside a region of `region` bytes.
fn first_dword(offset: u64, len: usize, region: u64) -> Option<usize> {
    let size = match len {
        4 | 8 => len as u64,
        _ => return None,
    };
    if !offset.is_multiple_of(size) || offset.checked_add(size)? > region {
        return None;
    }
    // Inside a region of at most 2048 entries: the index fits.
    Some((offset / 4) as usize)
}

/// Whether `evt` holds a count, left as it was. Only meaningful while no irqfd consumes it.
fn holds_count(evt: &EventFd) -> bool {
    match evt.read() {
        Ok(count) => {
            if let Err(e) = evt.write(count) {
                log::warn!("MSI-X: a pending interrupt could not be put back and is lost: {e}");
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => {
            log::warn!("MSI-X: reading a vector's eventfd: {e}");
            false
        }
    }
}

/// Empties `evt`.
fn drain(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            log::warn!("MSI-X: clearing a vector's eventfd: {e}");
        }
    }
}

impl MsixInterrupt {
    /// `vectors` vectors (1 to 2048), each with a GSI from `routes` and an eventfd, and the
    /// vector registers of `queues` queues; every entry masked, MSI-X disabled, every vector
    /// register [`NO_VECTOR`].
    pub fn new(
        routes: Arc<MsiRoutes>,
        vectors: u16,
        queues: usize,
    ) -> Result<MsixInterrupt, MsixError> {
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(MsixError::VectorCount { vectors });
        }
        let unrouted = EventFd::new(EFD_NONBLOCK).map_err(|source| MsixError::EventFd {
            vector: NO_VECTOR,
            source,
        })?;
        let mut built = Vec::with_capacity(usize::from(vectors));
        for vector in 0..vectors {
            let made = routes
                .allocate()
                .ok_or(MsixError::NoGsi { vector })
                .and_then(|gsi| {
                    EventFd::new(EFD_NONBLOCK)
                        .map(|evt| Vector { gsi, evt })
                        .map_err(|source| {
                            release(&routes, gsi);
                            MsixError::EventFd { vector, source }
                        })
                });
            match made {
                Ok(made) => built.push(made),
                Err(e) => {
                    // No irqfd is assigned yet: the GSIs only need freeing.
                    for vector in &built {
                        release(&routes, vector.gsi);
                    }
                    return Err(e);
                }
            }
        }
        Ok(MsixInterrupt {
            routes,
            vectors: built,
            unrouted,
            table: Mutex::new(TableState {
                entries: vec![RESET_ENTRY; usize::from(vectors)],
                enabled: false,
                function_masked: false,
                active: vec![false; usize::from(vectors)],
            }),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            status: InterruptStatus::default(),
        })
    }

    /// Bytes of the MSI-X table.
    pub fn table_len(&self) -> u64 {
        self.vectors.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// The table and vector registers, for a snapshot.
    pub fn save_table(&self) -> MsixSnapshot {
        MsixSnapshot {
            entries: self.lock().entries.clone(),
            config_vector: self.config_vector(),
            queue_vectors: (0..self.queue_vectors.len())
                .map(|q| self.queue_vector(q))
                .collect(),
        }
    }

    /// Puts a saved table and vector registers back, each entry's route and irqfd following
    /// it as after a driver's write (Message Control is [`MsixInterrupt::set_control`]'s).
    /// Refuses another vector or queue count; a vector register naming no vector becomes
    /// [`NO_VECTOR`].
    pub fn restore_table(&self, saved: &MsixSnapshot) -> Result<(), String> {
        if saved.entries.len() != self.vectors.len()
            || saved.queue_vectors.len() != self.queue_vectors.len()
        {
            return Err(format!(
                "{} MSI-X vectors and {} queues where the function has {} and {}",
                saved.entries.len(),
                saved.queue_vectors.len(),
                self.vectors.len(),
                self.queue_vectors.len()
            ));
        }
        let mut table = self.lock();
        for (vector, entry) in saved.entries.iter().enumerate() {
            let [address_lo, address_hi, data, control] = *entry;
            table.entries[vector] = [address_lo, address_hi, data, control & ENTRY_MASKED];
            self.sync(&mut table, vector);
        }
        drop(table);
        self.set_config_vector(saved.config_vector);
        for (queue, &vector) in saved.queue_vectors.iter().enumerate() {
            self.set_queue_vector(queue, vector);
        }
        Ok(())
    }

    /// Each vector's eventfd, in vector order: what a function that raises its vectors itself
    /// (one passed through) is told to signal.
    pub fn vector_eventfds(&self) -> impl Iterator<Item = &EventFd> {
        self.vectors.iter().map(|v| &v.evt)
    }

    /// Bytes of the pending bit array: one bit per vector, in 64-bit words.
    pub fn pba_len(&self) -> u64 {
        self.vectors.len().div_ceil(64) as u64 * 8
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        // Each field is written whole, and `active` only once KVM agreed: a panicking holder
        // leaves a state that says what KVM has.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read of the MSI-X table at `offset`. Aligned 4- and 8-byte reads inside the table
    /// are served; anything else reads zero.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let Some(first) = first_dword(offset, data.len(), self.table_len()) else {
            log::debug!(
                "MSI-X: {}-byte table read at {offset:#x} not served",
                data.len()
            );
            data.fill(0);
            return;
        };
        let table = self.lock();
        for (k, chunk) in data.chunks_exact_mut(4).enumerate() {
            let dword = first + k;
            chunk.copy_from_slice(&table.entries[dword / 4][dword % 4].to_le_bytes());
        }
    }

    /// A write of the MSI-X table at `offset`. Aligned 4- and 8-byte writes inside the table
    /// are taken (of the vector control, only the mask bit); anything else is ignored. An
    /// active vector follows a new message at once.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let Some(first) = first_dword(offset, data.len(), self.table_len()) else {
            log::debug!(
                "MSI-X: {}-byte table write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        // An aligned 8-byte access stays inside one 16-byte entry.
        let vector = first / 4;
        let mut table = self.lock();
        for (k, chunk) in data.chunks_exact(4).enumerate() {
            let mut value = [0; 4];
            value.copy_from_slice(chunk);
            let value = u32::from_le_bytes(value);
            let field = (first + k) % 4;
            table.entries[vector][field] = if field == 3 {
                value & ENTRY_MASKED
            } else {
                value
            };
        }
        self.sync(&mut table, vector);
    }

    /// A read of the pending bit array at `offset`: aligned 4- and 8-byte reads inside it are
    /// served, anything else reads zero. An inactive vector is pending while its eventfd holds
    /// a count, whoever wrote it; an active vector never is, KVM delivering at once.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = first_dword(offset, data.len(), self.pba_len()) else {
            log::debug!(
                "MSI-X: {}-byte PBA read at {offset:#x} not served",
                data.len()
            );
            return;
        };
        // Holding the lock keeps the irqfds as they are while the eventfds are looked at.
        let table = self.lock();
        for (k, chunk) in data.chunks_exact_mut(4).enumerate() {
            let base = (first + k) * 32;
            let mut bits = 0u32;
            for bit in 0..32 {
                let vector = base + bit;
                let Some(v) = self.vectors.get(vector) else {
                    break;
                };
                if !table.active[vector] && holds_count(&v.evt) {
                    bits |= 1 << bit;
                }
            }
            chunk.copy_from_slice(&bits.to_le_bytes());
        }
    }

    /// The MSI-X capability's Message Control, MSI-X Enable and Function Mask bits, as the
    /// driver last wrote them. Vectors start or stop delivering accordingly.
    pub fn set_control(&self, enabled: bool, function_masked: bool) {
        let mut table = self.lock();
        table.enabled = enabled;
        table.function_masked = function_masked;
        for vector in 0..self.vectors.len() {
            self.sync(&mut table, vector);
        }
    }

    /// Function reset: every entry back to no message and masked, so no vector delivers.
    /// Message Control is [`MsixInterrupt::set_control`]'s.
    pub fn reset_table(&self) {
        let mut table = self.lock();
        for vector in 0..self.vectors.len() {
            table.entries[vector] = RESET_ENTRY;
            self.sync(&mut table, vector);
        }
    }

    /// Makes `vector`'s irqfd and route what its entry and Message Control say. A failure is
    /// logged (the guest access that caused it cannot fail) and leaves the vector inactive, or
    /// still active on its old message when only the message changed.
    fn sync(&self, table: &mut TableState, vector: usize) {
        let [address_lo, address_hi, data, control] = table.entries[vector];
        let wanted = table.enabled && !table.function_masked && control & ENTRY_MASKED == 0;
        let v = &self.vectors[vector];
        let synced = if wanted {
            let address = u64::from(address_hi) << 32 | u64::from(address_lo);
            self.routes
                .set(v.gsi, Some((address, data)))
                .and_then(|()| {
                    if !table.active[vector] {
                        self.routes.assign_irqfd(&v.evt, v.gsi)?;
                        table.active[vector] = true;
                    }
                    Ok(())
                })
        } else if table.active[vector] {
            self.routes.deassign_irqfd(&v.evt, v.gsi).map(|()| {
                table.active[vector] = false;
            })
        } else {
            Ok(())
        };
        if let Err(e) = synced {
            log::warn!("MSI-X vector {vector}: {e}");
        }
    }

    /// The vector a value written to a vector register selects: itself if it exists,
    /// otherwise [`NO_VECTOR`], which the driver reads back to learn of the failure.
    fn valid_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.vectors.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The config_msix_vector register.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::SeqCst)
    }

    /// A write of config_msix_vector; returns what it now reads.
    pub fn set_config_vector(&self, vector: u16) -> u16 {
        let vector = self.valid_vector(vector);
        self.config_vector.store(vector, Ordering::SeqCst);
        vector
    }

    /// Queue `queue`'s queue_msix_vector register; [`NO_VECTOR`] for a queue that does not
    /// exist.
    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// A write of queue `queue`'s queue_msix_vector; returns what it now reads
    /// ([`NO_VECTOR`], and nothing stored, for a queue that does not exist).
    pub fn set_queue_vector(&self, queue: usize, vector: u16) -> u16 {
        let Some(register) = self.queue_vectors.get(queue) else {
            return NO_VECTOR;
        };
        let vector = self.valid_vector(vector);
        register.store(vector, Ordering::SeqCst);
        vector
    }

    /// Raises `vector`, if it is one: delivered now if active, pending otherwise.
    fn raise(&self, vector: u16) -> io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some(v) => v.evt.write(1),
            None => Ok(()),
        }
    }
}

/// Frees `gsi` for good, logging a failure: there is no one left to report it to.
fn release(routes: &MsiRoutes, gsi: u32) {
    if let Err(e) = routes.release(gsi) {
        log::warn!("MSI-X: {e}");
    }
}

impl Drop for MsixInterrupt {
    /// Deassigns the irqfds and gives the GSIs back. Should KVM refuse a deassignment, the
    /// irqfd still goes away once the last descriptor of its eventfd is closed: here, or in
    /// the backend it was handed to.
    fn drop(&mut self) {
        let table = self.table.get_mut().unwrap_or_else(|e| e.into_inner());
        for (v, active) in self.vectors.iter().zip(&table.active) {
            if *active {
                if let Err(e) = self.routes.deassign_irqfd(&v.evt, v.gsi) {
                    log::warn!("MSI-X: {e}");
                }
            }
            release(&self.routes, v.gsi);
        }
    }
}

impl VirtioInterrupt for MsixInterrupt {
    /// Raises the queue's vector; nothing when it has none (the driver polls that queue, or
    /// gets no interrupts from it).
    fn signal_used_queue(&self, queue: usize) -> io::Result<()> {
        // The bit goes first: a handler reading the ISR must find it.
        self.status.queue_raised();
        self.raise(self.queue_vector(queue))
    }

    /// Bumps the configuration generation first, so a driver that was reading the
    /// configuration across the change sees a different generation and reads it again.
    fn signal_config_change(&self) -> io::Result<()> {
        self.status.config_raised();
        self.raise(self.config_vector())
    }

    /// The eventfd of the queue's vector as it is now; one that raises nothing when the queue
    /// has no vector. A driver changing vectors after handing the queue to a backend is not
    /// followed.
    fn queue_irqfd(&self, queue: usize) -> &EventFd {
        self.vectors
            .get(usize::from(self.queue_vector(queue)))
            .map_or(&self.unrouted, |v| &v.evt)
    }

    /// While set, the ISR always reports its queue bit
    /// ([`STATUS_QUEUE`](super::interrupt::STATUS_QUEUE)), as the backend's interrupts never
    /// set it. Cleared by a device reset.
    fn set_vring_signalled_externally(&self, external: bool) {
        self.status.set_vring_external(external);
    }
}

impl TransportInterrupt for MsixInterrupt {
    fn interrupt_status(&self) -> &InterruptStatus {
        &self.status
    }

    /// Also puts every vector register back to [`NO_VECTOR`] and drops the interrupts still
    /// pending in the eventfds. The MSI-X table is the function's, not the device's: it stays
    /// (see [`MsixInterrupt::reset_table`]). The generation keeps counting, so it never
    /// repeats a value a driver may still hold.
    fn reset(&self) {
        self.status.reset();
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for register in &self.queue_vectors {
            register.store(NO_VECTOR, Ordering::SeqCst);
        }
        for v in &self.vectors {
            drain(&v.evt);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::super::msi_routes::fake::FakeRouting;
    use super::super::msi_routes::{FIRST_MSI_GSI, MSI_GSI_END};
    use super::*;
    use crate::devices::interrupt::{STATUS_CONFIG, STATUS_QUEUE};

    const VECTORS: u16 = 3;
    const QUEUES: usize = 2;

    fn msix() -> (Arc<FakeRouting>, Arc<MsiRoutes>, MsixInterrupt) {
        let fake = Arc::new(FakeRouting::default());
        let routes = Arc::new(MsiRoutes::new(fake.clone()));
        let msix = MsixInterrupt::new(routes.clone(), VECTORS, QUEUES).unwrap();
        (fake, routes, msix)
    }

    fn read32(msix: &MsixInterrupt, offset: u64) -> u32 {
        let mut data = [0; 4];
        msix.table_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(msix: &MsixInterrupt, offset: u64, value: u32) {
        msix.table_write(offset, &value.to_le_bytes());
    }

    fn pba(msix: &MsixInterrupt) -> u64 {
        let mut data = [0; 8];
        msix.pba_read(0, &mut data);
        u64::from_le_bytes(data)
    }

    /// Programs `vector`'s message, leaving its mask as it is.
    fn program(msix: &MsixInterrupt, vector: u64, address: u64, data: u32) {
        msix.table_write(vector * MSIX_ENTRY_SIZE, &address.to_le_bytes());
        write32(msix, vector * MSIX_ENTRY_SIZE + 8, data);
    }

    fn unmask(msix: &MsixInterrupt, vector: u64) {
        write32(msix, vector * MSIX_ENTRY_SIZE + 12, 0);
    }

    /// The eventfd descriptor of `vector`, found through a queue pointed at it.
    fn vector_fd(msix: &MsixInterrupt, vector: u16) -> i32 {
        let old = msix.queue_vector(0);
        msix.set_queue_vector(0, vector);
        let fd = msix.queue_irqfd(0).as_raw_fd();
        msix.set_queue_vector(0, old);
        fd
    }

    #[test]
    fn the_table_starts_masked_and_routes_nothing() {
        let (fake, _, msix) = msix();
        assert_eq!(msix.table_len(), 48);
        assert_eq!(msix.pba_len(), 8);
        for vector in 0..u64::from(VECTORS) {
            let base = vector * MSIX_ENTRY_SIZE;
            assert_eq!(read32(&msix, base), 0);
            assert_eq!(read32(&msix, base + 4), 0);
            assert_eq!(read32(&msix, base + 8), 0);
            assert_eq!(read32(&msix, base + 12), 1);
        }
        msix.set_control(true, false);
        assert_eq!(fake.pushes(), 0);
        assert!(fake.irqfds.lock().unwrap().is_empty());
    }

    #[test]
    fn an_unmasked_vector_gets_its_route_and_irqfd() {
        let (fake, _, msix) = msix();
        msix.set_control(true, false);
        program(&msix, 1, 0xfee0_2000, 0x4041);
        assert_eq!(fake.pushes(), 0);
        assert!(fake.irqfds.lock().unwrap().is_empty());
        assert_eq!(read32(&msix, 16), 0xfee0_2000);
        assert_eq!(read32(&msix, 24), 0x4041);

        unmask(&msix, 1);
        let gsi = FIRST_MSI_GSI + 1;
        assert_eq!(fake.last_table().unwrap(), vec![(gsi, 0xfee0_2000, 0x4041)]);
        assert_eq!(fake.irqfd(gsi), Some(vector_fd(&msix, 1)));
        assert_eq!(fake.irqfds.lock().unwrap().len(), 1);
        assert_eq!(read32(&msix, 28), 0);
    }

    #[test]
    fn eight_byte_accesses_cover_two_fields() {
        let (fake, _, msix) = msix();
        msix.set_control(true, false);
        msix.table_write(32, &0x1_fee0_3000u64.to_le_bytes());
        // Data and vector control together: message and unmask in one write.
        msix.table_write(40, &(0x4055u64).to_le_bytes());
        assert_eq!(
            fake.last_table().unwrap(),
            vec![(FIRST_MSI_GSI + 2, 0x1_fee0_3000, 0x4055)]
        );
        let mut data = [0; 8];
        msix.table_read(32, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x1_fee0_3000);
        msix.table_read(40, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x4055);
    }

    #[test]
    fn only_the_mask_bit_of_vector_control_is_kept() {
        let (_, _, msix) = msix();
        write32(&msix, 12, 0xffff_fffe);
        assert_eq!(read32(&msix, 12), 0);
        write32(&msix, 12, 0xffff_ffff);
        assert_eq!(read32(&msix, 12), 1);
    }

    #[test]
    fn a_new_message_moves_the_route_of_an_active_vector() {
        let (fake, _, msix) = msix();
        msix.set_control(true, false);
        program(&msix, 0, 0xfee0_0000, 0x30);
        unmask(&msix, 0);
        write32(&msix, 8, 0x31);
        assert_eq!(
            fake.last_table().unwrap(),
            vec![(FIRST_MSI_GSI, 0xfee0_0000, 0x31)]
        );
        // Still the same irqfd: the fake refuses a second assignment of the GSI.
        assert_eq!(fake.irqfds.lock().unwrap().len(), 1);
        // Rewriting the same data pushes nothing.
        let pushes = fake.pushes();
        write32(&msix, 8, 0x31);
        assert_eq!(fake.pushes(), pushes);
    }

    #[test]
    fn masking_disabling_or_function_masking_deassigns_the_irqfd() {
        let (fake, _, msix) = msix();
        program(&msix, 0, 0xfee0_0000, 0x30);
        unmask(&msix, 0);
        assert!(fake.irqfds.lock().unwrap().is_empty(), "MSI-X disabled");
        msix.set_control(true, true);
        assert!(fake.irqfds.lock().unwrap().is_empty(), "function masked");
        msix.set_control(true, false);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_some());
        msix.set_control(true, true);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_none());
        msix.set_control(true, false);
        msix.set_control(false, false);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_none());
        msix.set_control(true, false);
        write32(&msix, 12, 1);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_none());
        // The route stayed: unmasking the unchanged entry pushes no table.
        let pushes = fake.pushes();
        unmask(&msix, 0);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_some());
        assert_eq!(fake.pushes(), pushes);
    }

    #[test]
    fn a_refused_route_leaves_the_vector_inactive() {
        let (fake, _, msix) = msix();
        msix.set_control(true, false);
        fake.refuse_tables.store(true, Ordering::SeqCst);
        program(&msix, 0, 0xfee0_0000, 0x30);
        unmask(&msix, 0);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_none());
        fake.refuse_tables.store(false, Ordering::SeqCst);
        msix.set_control(true, false);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_some());
    }

    #[test]
    fn a_function_reset_masks_every_entry() {
        let (fake, _, msix) = msix();
        msix.set_control(true, false);
        program(&msix, 2, 0xfee0_0000, 0x30);
        unmask(&msix, 2);
        msix.reset_table();
        assert!(fake.irqfds.lock().unwrap().is_empty());
        assert_eq!(read32(&msix, 32), 0);
        assert_eq!(read32(&msix, 40), 0);
        assert_eq!(read32(&msix, 44), 1);
    }

    #[test]
    fn malformed_accesses_read_zero_and_write_nothing() {
        let (fake, _, msix) = msix();
        msix.set_control(true, false);
        let accesses: &[(u64, usize)] = &[
            (0, 0),
            (12, 1),
            (12, 2),
            (12, 3),
            (8, 16),
            (13, 4),
            (4, 8),
            (48, 4),
            (44, 8),
            (u64::MAX - 3, 4),
            (u64::MAX - 7, 8),
            (u64::MAX, 1),
        ];
        for &(offset, len) in accesses {
            let mut data = vec![0xaa; len];
            msix.table_read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "table read {offset:#x}/{len}");
            let mut data = vec![0xaa; len];
            msix.pba_read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "PBA read {offset:#x}/{len}");
            msix.table_write(offset, &vec![0; len]);
        }
        // Every entry still masked, nothing routed.
        for vector in 0..u64::from(VECTORS) {
            assert_eq!(read32(&msix, vector * MSIX_ENTRY_SIZE + 12), 1);
        }
        assert_eq!(fake.pushes(), 0);
        // The PBA has a single word.
        let mut data = [0xaa; 4];
        msix.pba_read(8, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn vector_registers_take_only_existing_vectors() {
        let (_, _, msix) = msix();
        assert_eq!(msix.config_vector(), NO_VECTOR);
        assert_eq!(msix.queue_vector(0), NO_VECTOR);
        assert_eq!(msix.set_config_vector(2), 2);
        assert_eq!(msix.config_vector(), 2);
        assert_eq!(msix.set_config_vector(VECTORS), NO_VECTOR);
        assert_eq!(msix.config_vector(), NO_VECTOR);
        assert_eq!(msix.set_queue_vector(1, 0), 0);
        assert_eq!(msix.queue_vector(1), 0);
        assert_eq!(msix.set_queue_vector(1, 0x8000), NO_VECTOR);
        assert_eq!(msix.queue_vector(1), NO_VECTOR);
        assert_eq!(msix.set_queue_vector(0, NO_VECTOR), NO_VECTOR);
        // Queues that do not exist.
        assert_eq!(msix.set_queue_vector(QUEUES, 0), NO_VECTOR);
        assert_eq!(msix.queue_vector(QUEUES), NO_VECTOR);
        assert_eq!(msix.queue_vector(usize::MAX), NO_VECTOR);

        msix.set_config_vector(1);
        msix.set_queue_vector(0, 1);
        msix.reset();
        assert_eq!(msix.config_vector(), NO_VECTOR);
        assert_eq!(msix.queue_vector(0), NO_VECTOR);
    }

    #[test]
    fn a_signal_writes_the_eventfd_of_the_queues_vector() {
        let (_, _, msix) = msix();
        msix.set_queue_vector(0, 2);
        msix.set_queue_vector(1, 0);
        msix.set_config_vector(1);
        // Each queue's irqfd is its vector's eventfd, three distinct ones.
        let fds = [
            vector_fd(&msix, 0),
            vector_fd(&msix, 1),
            vector_fd(&msix, 2),
        ];
        assert_eq!(msix.queue_irqfd(0).as_raw_fd(), fds[2]);
        assert_eq!(msix.queue_irqfd(1).as_raw_fd(), fds[0]);

        msix.signal_used_queue(0).unwrap();
        assert_eq!(msix.isr_status(), STATUS_QUEUE);
        assert_eq!(msix.queue_irqfd(0).read().unwrap(), 1);
        assert!(msix.queue_irqfd(1).read().is_err());

        let generation = msix.config_generation();
        msix.signal_config_change().unwrap();
        assert_eq!(msix.config_generation(), generation + 1);
        assert_eq!(msix.isr_status(), STATUS_QUEUE | STATUS_CONFIG);
        msix.set_queue_vector(1, 1);
        assert_eq!(msix.queue_irqfd(1).read().unwrap(), 1);
        assert!(msix.queue_irqfd(0).read().is_err());

        msix.acknowledge(STATUS_QUEUE | STATUS_CONFIG | 0x80);
        assert_eq!(msix.isr_status(), 0);
    }

    #[test]
    fn a_queue_without_a_vector_signals_nothing() {
        let (_, _, msix) = msix();
        msix.signal_used_queue(1).unwrap();
        msix.signal_used_queue(QUEUES + 5).unwrap();
        msix.signal_config_change().unwrap();
        assert_eq!(msix.isr_status(), STATUS_QUEUE | STATUS_CONFIG);
        let unrouted = msix.queue_irqfd(1).as_raw_fd();
        assert_eq!(msix.queue_irqfd(QUEUES + 5).as_raw_fd(), unrouted);
        assert!(!(0..VECTORS).any(|v| vector_fd(&msix, v) == unrouted));
        for v in 0..VECTORS {
            msix.set_queue_vector(0, v);
            assert!(msix.queue_irqfd(0).read().is_err(), "vector {v}");
        }
    }

    #[test]
    fn an_interrupt_raised_while_masked_is_pending_until_unmasked() {
        let (fake, _, msix) = msix();
        msix.set_queue_vector(0, 1);
        program(&msix, 1, 0xfee0_0000, 0x30);
        msix.signal_used_queue(0).unwrap();
        // Reading the PBA leaves the interrupt pending.
        assert_eq!(pba(&msix), 1 << 1);
        assert_eq!(pba(&msix), 1 << 1);
        let mut low = [0; 4];
        msix.pba_read(0, &mut low);
        assert_eq!(u32::from_le_bytes(low), 1 << 1);
        // A backend writing the eventfd directly is seen too.
        msix.set_queue_vector(1, 2);
        msix.queue_irqfd(1).write(1).unwrap();
        assert_eq!(pba(&msix), 1 << 1 | 1 << 2);

        // Once the irqfd is assigned, KVM delivers the count and owns it: not pending.
        msix.set_control(true, false);
        unmask(&msix, 1);
        assert_eq!(fake.irqfd(FIRST_MSI_GSI + 1), Some(vector_fd(&msix, 1)));
        assert_eq!(pba(&msix), 1 << 2);
        // The fake takes nothing from the eventfd; KVM would have delivered the count at
        // assignment.
        assert_eq!(msix.queue_irqfd(0).read().unwrap(), 1);
    }

    #[test]
    fn a_device_reset_drops_pending_interrupts_and_the_external_flag() {
        let (_, _, msix) = msix();
        msix.set_queue_vector(0, 0);
        msix.signal_used_queue(0).unwrap();
        msix.set_vring_signalled_externally(true);
        assert_eq!(pba(&msix), 1);
        msix.acknowledge(STATUS_QUEUE);
        assert_eq!(msix.isr_status(), STATUS_QUEUE, "external signaller");
        let generation = msix.config_generation();
        msix.reset();
        assert_eq!(pba(&msix), 0);
        assert_eq!(msix.isr_status(), 0);
        assert_eq!(msix.config_generation(), generation);
    }

    #[test]
    fn the_status_and_generation_survive_a_save_and_restore() {
        let (_, _, msix) = msix();
        msix.signal_config_change().unwrap();
        msix.signal_config_change().unwrap();
        let (status, generation) = msix.saved();
        assert_eq!((status, generation), (STATUS_CONFIG, 2));
        let (_, _, other) = super::tests::msix();
        other.restore(status | 0xf0, generation);
        assert_eq!(other.saved(), (STATUS_CONFIG, 2));
    }

    #[test]
    fn dropping_it_deassigns_the_irqfds_and_frees_the_gsis() {
        let (fake, routes, msix) = msix();
        msix.set_control(true, false);
        program(&msix, 0, 0xfee0_0000, 0x30);
        unmask(&msix, 0);
        assert!(fake.irqfd(FIRST_MSI_GSI).is_some());
        drop(msix);
        assert!(fake.irqfds.lock().unwrap().is_empty());
        assert_eq!(fake.last_table().unwrap(), vec![]);
        assert_eq!(routes.allocate(), Some(FIRST_MSI_GSI));
        assert_eq!(routes.allocate(), Some(FIRST_MSI_GSI + 1));
    }

    #[test]
    fn the_vector_count_is_checked() {
        let routes = Arc::new(MsiRoutes::new(Arc::new(FakeRouting::default())));
        assert!(matches!(
            MsixInterrupt::new(routes.clone(), 0, 1),
            Err(MsixError::VectorCount { vectors: 0 })
        ));
        assert!(matches!(
            MsixInterrupt::new(routes.clone(), 2049, 1),
            Err(MsixError::VectorCount { vectors: 2049 })
        ));
        // Only so many GSIs: the first vector without one fails the whole, and the GSIs the
        // others took are given back.
        let err = MsixInterrupt::new(routes.clone(), 2048, 1).unwrap_err();
        let fits = (MSI_GSI_END - FIRST_MSI_GSI) as u16;
        assert!(matches!(err, MsixError::NoGsi { vector } if vector == fits));
        assert_eq!(routes.allocate(), Some(FIRST_MSI_GSI));
    }

    #[test]
    fn kvm_follows_masking_and_unmasking() {
        let Some(kvm) =
            crate::test_kvm::kvm_or_skip("devices::msix::kvm_follows_masking_and_unmasking")
        else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let _vcpu = vm.create_vcpu(0).unwrap();
        let routes = Arc::new(MsiRoutes::new(vm));
        let msix = MsixInterrupt::new(routes.clone(), VECTORS, QUEUES).unwrap();
        let active = |msix: &MsixInterrupt| msix.lock().active.clone();
        msix.set_queue_vector(0, 1);
        program(&msix, 1, 0xfee0_0000, 0x4031);
        msix.signal_used_queue(0).unwrap();
        msix.set_control(true, false);
        unmask(&msix, 1);
        assert_eq!(active(&msix), [false, true, false]);
        msix.signal_used_queue(0).unwrap();
        // KVM deassigns synchronously: the same eventfd can be assigned again at once.
        for _ in 0..3 {
            msix.set_control(true, true);
            assert_eq!(active(&msix), [false; 3]);
            msix.set_control(true, false);
            assert_eq!(active(&msix), [false, true, false]);
        }
        write32(&msix, 24, 0x4032);
        assert_eq!(active(&msix), [false, true, false]);
        drop(msix);
        assert_eq!(routes.allocate(), Some(FIRST_MSI_GSI));
    }

    #[test]
    fn the_pending_bits_span_words() {
        let routes = Arc::new(MsiRoutes::new(Arc::new(FakeRouting::default())));
        let msix = MsixInterrupt::new(routes, 70, 1).unwrap();
        assert_eq!(msix.pba_len(), 16);
        assert_eq!(msix.table_len(), 70 * 16);
        msix.set_queue_vector(0, 69);
        msix.signal_used_queue(0).unwrap();
        let mut data = [0; 8];
        msix.pba_read(8, &mut data);
        assert_eq!(u64::from_le_bytes(data), 1 << 5);
        msix.pba_read(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0);
        let mut high = [0; 4];
        msix.pba_read(12, &mut high);
        assert_eq!(high, [0; 4]);
        // The last entry is reachable, the next one is not.
        write32(&msix, 69 * 16 + 8, 7);
        assert_eq!(read32(&msix, 69 * 16 + 8), 7);
        assert_eq!(read32(&msix, 70 * 16), 0);
    }
}
