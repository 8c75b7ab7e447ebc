//! KVM's GSI routing table for MSI: every MSI-X vector of a PCI device gets a GSI of its own
//! whose route carries the vector's message (address and data), so that an irqfd on that GSI
//! delivers the message without the VMM being involved.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so each change pushes every MSI route
//! together with the interrupt controller routes KVM installs by default with the in-kernel
//! irqchip, which the PIT, the serial ports and the virtio-mmio slots raise their lines
//! through.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this one are the IOAPIC's pins (the first 16 also the PICs'); MSI GSIs start
/// here.
pub const FIRST_MSI_GSI: u32 = 24;

/// One past the last MSI GSI handed out. KVM accepts GSIs below `KVM_MAX_IRQ_ROUTES` (4096);
/// a thousand vectors is more than the machine's PCI slots can use, and bounds the table
/// pushed on every change.
pub const MSI_GSI_END: u32 = 1024;

/// GSIs 0 to 15 are wired to both the PICs and the IOAPIC, as on a PC.
const PIC_GSIS: u32 = 16;

/// Interrupt routing calls to KVM. Implemented by the VM; tests record the calls instead.
pub trait GsiRouting: Send + Sync {
    /// Sets the routing table to the machine's interrupt controller routes plus one MSI route
    /// per `(gsi, address, data)`.
    fn set_gsi_routes(&self, msi: &[(u32, u64, u32)]) -> Result<(), kvm_ioctls::Error>;

    /// Makes a write to `evt` raise `gsi` (KVM_IRQFD). KVM delivers at once a count `evt`
    /// already holds.
    fn assign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;

    /// Undoes [`GsiRouting::assign_irqfd`]; once it returns, writes to `evt` raise nothing and
    /// stay in `evt`.
    fn deassign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;

    /// Delivers one MSI message (KVM_SIGNAL_MSI).
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), kvm_ioctls::Error>;
}

impl GsiRouting for VmFd {
    fn set_gsi_routes(&self, msi: &[(u32, u64, u32)]) -> Result<(), kvm_ioctls::Error> {
        // Only a table longer than KVM_MAX_IRQ_ROUTES is refused, which MSI_GSI_END rules out;
        // KVM would say the same.
        let table = KvmIrqRouting::from_entries(&routing_table(msi))
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        self.set_gsi_routing(&table)
    }

    fn assign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.register_irqfd(evt, gsi)
    }

    fn deassign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.unregister_irqfd(evt, gsi)
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), kvm_ioctls::Error> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // 0 means the guest's interrupt controller blocked the message (say a software
        // disabled LAPIC): the same as a device whose message lands while the CPU ignores it.
        // A message for an APIC no vCPU has fails with EPERM.
        if VmFd::signal_msi(self, msi)? == 0 {
            log::debug!("MSI {address:#x}/{data:#x} was blocked by the guest");
        }
        Ok(())
    }
}

/// KVM's default x86 routing with an in-kernel irqchip (`kvm_setup_default_irq_routing`),
/// which `KVM_SET_GSI_ROUTING` would otherwise drop, followed by the MSI routes `msi`
/// (`(gsi, address, data)`).
///
/// Like KVM, GSI `n` goes to IOAPIC pin `n` (GSI 2 included) and, for `n` below 16, to pin
/// `n % 8` of the master or slave PIC.
fn routing_table(msi: &[(u32, u64, u32)]) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        // Writing a union field is safe; the entry starts zeroed, so the bytes of the union
        // beyond this member are defined too.
        entry.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
        entry
    };
    // Two routes for each PIC GSI, one for each other IOAPIC GSI.
    let mut table = Vec::with_capacity((FIRST_MSI_GSI + PIC_GSIS) as usize + msi.len());
    for gsi in 0..FIRST_MSI_GSI {
        table.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_GSIS {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            table.push(irqchip(gsi, pic, gsi % 8));
        }
    }
    table.extend(msi.iter().map(|&(gsi, address, data)| {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        // As above: a safe write of a zeroed union.
        entry.u.msi = kvm_irq_routing_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        entry
    }));
    table
}

/// Why a routing change failed.
#[derive(Debug, thiserror::Error)]
pub enum MsiRoutesError {
    /// The GSI is not one [`MsiRoutes::allocate`] handed out.
    #[error("GSI {gsi} is not an allocated MSI GSI")]
    NotAllocated {
        /// The GSI.
        gsi: u32,
    },
    /// KVM refused the routing table.
    #[error("KVM_SET_GSI_ROUTING ({what} GSI {gsi}): {source}")]
    Routing {
        /// The GSI whose route was changing.
        gsi: u32,
        /// What was being done to it.
        what: &'static str,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// KVM refused to assign or deassign an irqfd.
    #[error("KVM_IRQFD ({what} GSI {gsi}): {source}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// Whether it was being assigned or deassigned.
        what: &'static str,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// KVM refused to deliver a message.
    #[error("KVM_SIGNAL_MSI (address {address:#x}, data {data:#x}): {source}")]
    Signal {
        /// The message address.
        address: u64,
        /// The message data.
        data: u32,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
}

/// The MSI GSIs handed out and the routes set on them.
#[derive(Debug, Default)]
struct Table {
    allocated: BTreeSet<u32>,
    /// Address and data of each routed GSI; always a subset of `allocated`.
    routes: BTreeMap<u32, (u64, u32)>,
}

impl Table {
    fn msi_routes(&self) -> Vec<(u32, u64, u32)> {
        self.routes
            .iter()
            .map(|(&gsi, &(address, data))| (gsi, address, data))
            .collect()
    }
}

/// The machine's MSI routes, shared (as `Arc<MsiRoutes>`) by every device that raises MSIs.
pub struct MsiRoutes {
    vm: Arc<dyn GsiRouting>,
    table: Mutex<Table>,
}

impl std::fmt::Debug for MsiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRoutes")
            .field("table", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl MsiRoutes {
    /// No MSI GSI allocated yet; KVM's table is the default one it set up with the irqchip.
    pub fn new(vm: Arc<dyn GsiRouting>) -> MsiRoutes {
        MsiRoutes {
            vm,
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every change to the table is made whole before anything that can fail or panic, so
        // a panicking holder leaves it consistent.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lowest free MSI GSI, without a route yet; `None` once all of
    /// [`FIRST_MSI_GSI`]..[`MSI_GSI_END`] are taken.
    pub fn allocate(&self) -> Option<u32> {
        let mut table = self.lock();
        let gsi = (FIRST_MSI_GSI..MSI_GSI_END).find(|gsi| !table.allocated.contains(gsi))?;
        table.allocated.insert(gsi);
        Some(gsi)
    }

    /// Frees `gsi` and drops its route. The GSI is free again even if KVM refuses the new
    /// table: the stale route it keeps is raised by nothing (the caller has deassigned its
    /// irqfds) and goes with the next table pushed.
    pub fn release(&self, gsi: u32) -> Result<(), MsiRoutesError> {
        let mut table = self.lock();
        if !table.allocated.remove(&gsi) {
            return Err(MsiRoutesError::NotAllocated { gsi });
        }
        if table.routes.remove(&gsi).is_none() {
            return Ok(());
        }
        self.vm
            .set_gsi_routes(&table.msi_routes())
            .map_err(|source| MsiRoutesError::Routing {
                gsi,
                what: "dropping the route of released",
                source,
            })
    }

    /// Routes `gsi` to the MSI message `(address, data)`, or nowhere with `None`. Pushes the
    /// table only if that changes it. When KVM refuses the new table it keeps the old one,
    /// and so does this.
    pub fn set(&self, gsi: u32, message: Option<(u64, u32)>) -> Result<(), MsiRoutesError> {
        let mut table = self.lock();
        if !table.allocated.contains(&gsi) {
            return Err(MsiRoutesError::NotAllocated { gsi });
        }
        let old = match message {
            Some(message) => table.routes.insert(gsi, message),
            None => table.routes.remove(&gsi),
        };
        if old == message {
            return Ok(());
        }
        let pushed = self.vm.set_gsi_routes(&table.msi_routes());
        if let Err(source) = pushed {
            match old {
                Some(old) => table.routes.insert(gsi, old),
                None => table.routes.remove(&gsi),
            };
            return Err(MsiRoutesError::Routing {
                gsi,
                what: if message.is_some() {
                    "routing"
                } else {
                    "unrouting"
                },
                source,
            });
        }
        Ok(())
    }

    /// Makes a write to `evt` raise `gsi`, an allocated GSI; a count `evt` already holds is
    /// delivered at once.
    pub fn assign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), MsiRoutesError> {
        self.check_allocated(gsi)?;
        self.vm
            .assign_irqfd(evt, gsi)
            .map_err(|source| MsiRoutesError::Irqfd {
                gsi,
                what: "assigning",
                source,
            })
    }

    /// Stops writes to `evt` raising `gsi`: from then on they accumulate in `evt`.
    pub fn deassign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), MsiRoutesError> {
        self.check_allocated(gsi)?;
        self.vm
            .deassign_irqfd(evt, gsi)
            .map_err(|source| MsiRoutesError::Irqfd {
                gsi,
                what: "deassigning",
                source,
            })
    }

    fn check_allocated(&self, gsi: u32) -> Result<(), MsiRoutesError> {
        if self.lock().allocated.contains(&gsi) {
            Ok(())
        } else {
            Err(MsiRoutesError::NotAllocated { gsi })
        }
    }

    /// Delivers one message without a route, for events too rare to hold a GSI (a root
    /// port's hotplug event).
    pub fn signal(&self, address: u64, data: u32) -> Result<(), MsiRoutesError> {
        self.vm
            .signal_msi(address, data)
            .map_err(|source| MsiRoutesError::Signal {
                address,
                data,
                source,
            })
    }
}

/// A [`GsiRouting`] that records what KVM would have been told, for tests of the devices
/// raising MSIs.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::BTreeMap;
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use vmm_sys_util::eventfd::EventFd;

    use super::GsiRouting;

    /// Records the tables pushed and keeps the irqfds assigned, refusing what KVM refuses.
    #[derive(Default)]
    pub(crate) struct FakeRouting {
        /// Every MSI list pushed, in order.
        pub(crate) tables: Mutex<Vec<Vec<(u32, u64, u32)>>>,
        /// The assigned irqfds: GSI → descriptor.
        pub(crate) irqfds: Mutex<BTreeMap<u32, RawFd>>,
        /// Every message signalled.
        pub(crate) signals: Mutex<Vec<(u64, u32)>>,
        /// Refuse the next tables.
        pub(crate) refuse_tables: AtomicBool,
    }

    impl FakeRouting {
        /// The last MSI list pushed.
        pub(crate) fn last_table(&self) -> Option<Vec<(u32, u64, u32)>> {
            self.tables.lock().unwrap().last().cloned()
        }

        /// How many tables were pushed.
        pub(crate) fn pushes(&self) -> usize {
            self.tables.lock().unwrap().len()
        }

        /// The descriptor assigned to `gsi`.
        pub(crate) fn irqfd(&self, gsi: u32) -> Option<RawFd> {
            self.irqfds.lock().unwrap().get(&gsi).copied()
        }
    }

    impl GsiRouting for FakeRouting {
        fn set_gsi_routes(&self, msi: &[(u32, u64, u32)]) -> Result<(), kvm_ioctls::Error> {
            if self.refuse_tables.load(Ordering::SeqCst) {
                return Err(kvm_ioctls::Error::new(libc::EINVAL));
            }
            self.tables.lock().unwrap().push(msi.to_vec());
            Ok(())
        }

        fn assign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            let mut irqfds = self.irqfds.lock().unwrap();
            if irqfds.contains_key(&gsi) {
                return Err(kvm_ioctls::Error::new(libc::EBUSY));
            }
            irqfds.insert(gsi, evt.as_raw_fd());
            Ok(())
        }

        fn deassign_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            let mut irqfds = self.irqfds.lock().unwrap();
            if irqfds.get(&gsi) != Some(&evt.as_raw_fd()) {
                return Err(kvm_ioctls::Error::new(libc::ENOENT));
            }
            irqfds.remove(&gsi);
            Ok(())
        }

        fn signal_msi(&self, address: u64, data: u32) -> Result<(), kvm_ioctls::Error> {
            self.signals.lock().unwrap().push((address, data));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use kvm_bindings::kvm_irqchip;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::fake::FakeRouting;
    use super::*;

    fn routes() -> (Arc<FakeRouting>, MsiRoutes) {
        let fake = Arc::new(FakeRouting::default());
        (fake.clone(), MsiRoutes::new(fake))
    }

    #[test]
    fn gsis_are_allocated_lowest_first_and_reused_once_released() {
        let (_, routes) = routes();
        assert_eq!(routes.allocate(), Some(24));
        assert_eq!(routes.allocate(), Some(25));
        assert_eq!(routes.allocate(), Some(26));
        routes.release(25).unwrap();
        assert_eq!(routes.allocate(), Some(25));
        assert_eq!(routes.allocate(), Some(27));
    }

    #[test]
    fn allocation_stops_at_the_cap() {
        let (_, routes) = routes();
        for expected in FIRST_MSI_GSI..MSI_GSI_END {
            assert_eq!(routes.allocate(), Some(expected));
        }
        assert_eq!(routes.allocate(), None);
        routes.release(500).unwrap();
        assert_eq!(routes.allocate(), Some(500));
        assert_eq!(routes.allocate(), None);
    }

    #[test]
    fn releasing_or_routing_a_gsi_not_allocated_is_refused() {
        let (fake, routes) = routes();
        assert!(matches!(
            routes.release(24),
            Err(MsiRoutesError::NotAllocated { gsi: 24 })
        ));
        assert!(matches!(
            routes.set(4, Some((0xfee0_0000, 0x41))),
            Err(MsiRoutesError::NotAllocated { gsi: 4 })
        ));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(routes.assign_irqfd(&evt, 24).is_err());
        assert!(routes.deassign_irqfd(&evt, 24).is_err());
        let gsi = routes.allocate().unwrap();
        routes.release(gsi).unwrap();
        assert!(routes.release(gsi).is_err());
        assert_eq!(fake.pushes(), 0);
    }

    #[test]
    fn every_change_pushes_all_the_msi_routes() {
        let (fake, routes) = routes();
        let a = routes.allocate().unwrap();
        let b = routes.allocate().unwrap();
        // Allocating alone routes nothing.
        assert_eq!(fake.pushes(), 0);
        routes.set(b, Some((0xfee0_1000, 0x4022))).unwrap();
        assert_eq!(fake.last_table().unwrap(), vec![(b, 0xfee0_1000, 0x4022)]);
        routes.set(a, Some((0x1_fee0_0000, 0x31))).unwrap();
        assert_eq!(
            fake.last_table().unwrap(),
            vec![(a, 0x1_fee0_0000, 0x31), (b, 0xfee0_1000, 0x4022)]
        );
        routes.set(b, None).unwrap();
        assert_eq!(fake.last_table().unwrap(), vec![(a, 0x1_fee0_0000, 0x31)]);
        routes.release(a).unwrap();
        assert_eq!(fake.last_table().unwrap(), vec![]);
        assert_eq!(fake.pushes(), 4);
    }

    #[test]
    fn an_unchanged_route_is_not_pushed_again() {
        let (fake, routes) = routes();
        let gsi = routes.allocate().unwrap();
        routes.set(gsi, None).unwrap();
        assert_eq!(fake.pushes(), 0);
        routes.set(gsi, Some((0xfee0_0000, 0x30))).unwrap();
        routes.set(gsi, Some((0xfee0_0000, 0x30))).unwrap();
        assert_eq!(fake.pushes(), 1);
        routes.set(gsi, None).unwrap();
        routes.set(gsi, None).unwrap();
        assert_eq!(fake.pushes(), 2);
        // Releasing a GSI without a route changes nothing either.
        routes.release(gsi).unwrap();
        assert_eq!(fake.pushes(), 2);
    }

    #[test]
    fn a_refused_table_leaves_the_old_routes() {
        let (fake, routes) = routes();
        let gsi = routes.allocate().unwrap();
        routes.set(gsi, Some((0xfee0_0000, 0x30))).unwrap();
        fake.refuse_tables.store(true, Ordering::SeqCst);
        let err = routes.set(gsi, Some((0xfee0_0000, 0x31))).unwrap_err();
        assert!(matches!(err, MsiRoutesError::Routing { gsi: g, .. } if g == gsi));
        assert!(err.to_string().contains(&format!("GSI {gsi}")));
        fake.refuse_tables.store(false, Ordering::SeqCst);
        // The old route is still what the table holds: setting it again pushes nothing.
        routes.set(gsi, Some((0xfee0_0000, 0x30))).unwrap();
        assert_eq!(fake.pushes(), 1);
        routes.set(gsi, Some((0xfee0_0000, 0x31))).unwrap();
        assert_eq!(fake.pushes(), 2);
    }

    #[test]
    fn irqfds_and_signals_reach_kvm() {
        let (fake, routes) = routes();
        let gsi = routes.allocate().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        routes.assign_irqfd(&evt, gsi).unwrap();
        assert!(fake.irqfd(gsi).is_some());
        routes.deassign_irqfd(&evt, gsi).unwrap();
        assert!(fake.irqfd(gsi).is_none());
        routes.signal(0xfee0_0000, 0x4030).unwrap();
        assert_eq!(*fake.signals.lock().unwrap(), vec![(0xfee0_0000, 0x4030)]);
    }

    #[test]
    fn the_table_keeps_kvms_default_routes_before_the_msi_ones() {
        let table = routing_table(&[(24, 0x1_fee0_1000, 0x4041), (30, 0xfee0_0000, 0x22)]);
        assert_eq!(table.len(), 16 * 2 + 8 + 2);
        let irqchip: Vec<(u32, u32, u32)> = table[..40]
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
                // SAFETY: the entry's type says the union holds its irqchip member.
                let chip = unsafe { e.u.irqchip };
                (e.gsi, chip.irqchip, chip.pin)
            })
            .collect();
        let mut expected = Vec::new();
        for gsi in 0..24 {
            expected.push((gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                expected.push((gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                expected.push((gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        assert_eq!(irqchip, expected);
        // GSI 2 is IOAPIC pin 2 and master PIC pin 2, as KVM sets it up.
        assert!(irqchip.contains(&(2, KVM_IRQCHIP_IOAPIC, 2)));
        assert!(irqchip.contains(&(2, KVM_IRQCHIP_PIC_MASTER, 2)));
        let msi: Vec<(u32, u32, u32, u32)> = table[40..]
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
                assert_eq!(e.flags, 0);
                // SAFETY: the entry's type says the union holds its msi member.
                let m = unsafe { e.u.msi };
                (e.gsi, m.address_hi, m.address_lo, m.data)
            })
            .collect();
        assert_eq!(
            msi,
            vec![(24, 1, 0xfee0_1000, 0x4041), (30, 0, 0xfee0_0000, 0x22)]
        );
    }

    /// The IRRs of the IOAPIC, the master PIC and the slave PIC, read from KVM.
    fn pending_lines(vm: &VmFd) -> (u32, u8, u8) {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).unwrap();
            chip
        };
        let (ioapic, master, slave) = (
            chip(KVM_IRQCHIP_IOAPIC),
            chip(KVM_IRQCHIP_PIC_MASTER),
            chip(KVM_IRQCHIP_PIC_SLAVE),
        );
        // SAFETY: chip 2 is the IOAPIC and chips 0 and 1 the PICs, so these are the union's
        // live members.
        unsafe {
            (
                ioapic.chip.ioapic.irr,
                master.chip.pic.irr,
                slave.chip.pic.irr,
            )
        }
    }

    #[test]
    fn kvm_takes_the_table_and_still_routes_the_legacy_lines() {
        let Some(kvm) = crate::test_kvm::kvm_or_skip(
            "devices::msi_routes::kvm_takes_the_table_and_still_routes_the_legacy_lines",
        ) else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        // The messages go to APIC 0: without it KVM_SIGNAL_MSI fails with EPERM.
        let _vcpu = vm.create_vcpu(0).unwrap();
        let routes = MsiRoutes::new(vm.clone());
        let gsi = routes.allocate().unwrap();
        routes.set(gsi, Some((0xfee0_0000, 0x4031))).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        routes.assign_irqfd(&evt, gsi).unwrap();
        evt.write(1).unwrap();
        routes.signal(0xfee0_0000, 0x4032).unwrap();
        routes.deassign_irqfd(&evt, gsi).unwrap();

        // The legacy lines still reach both interrupt controllers, as with KVM's own table:
        // GSI 2 is IOAPIC pin 2 and master PIC pin 2, GSI 12 slave PIC pin 4, GSI 20 an
        // IOAPIC pin only.
        assert_eq!(pending_lines(&vm), (0, 0, 0));
        for gsi in [2, 4, 12, 20] {
            vm.set_irq_line(gsi, true).unwrap();
        }
        assert_eq!(
            pending_lines(&vm),
            (1 << 2 | 1 << 4 | 1 << 12 | 1 << 20, 1 << 2 | 1 << 4, 1 << 4)
        );

        routes.release(gsi).unwrap();
    }
}
