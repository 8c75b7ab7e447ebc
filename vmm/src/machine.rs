//! The microvm machine: the KVM VM with its in-kernel irqchip and PIT, guest RAM, the boot
//! image, the legacy devices and one thread per vCPU.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootFiles, BootSource, EntryPoint};
use crate::cpu::{self, CpuTemplate, VcpuState};
use crate::devices::balloon::{BalloonHandle, BalloonOptions};
use crate::devices::legacy::{LegacyDevices, SerialOut, COM1_IRQ};
use crate::devices::manager::{DeviceManager, DeviceManagerError};
use crate::devices::pcie::{PciDevices, RootPortSpec};
use crate::devices::vhost_user::VhostUserError;
use crate::devices::vhost_user_blk::VhostUserBlk;
use crate::memory::{self, GuestRam};
use crate::snapshot::files::CheckedSnapshot;
use crate::snapshot::format::FormatError;
use crate::snapshot::pci::PciSnapshot;
use crate::snapshot::vcpu_state::VcpuSnapshot;
use crate::snapshot::{self, MachineState, VmState, VmStateError};
use crate::vcpu::{ThreadLockdown, Vcpu, VcpuContext, VcpuError, VcpuEvent, VcpuInfo};

/// Guest-physical address of the 3-page TSS region KVM needs on Intel hosts; inside the
/// 32-bit MMIO gap, below the IOAPIC and LAPIC windows.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors while building or driving the machine. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// /dev/kvm could not be used.
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    /// The running kernel's KVM is too old.
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApi(i32),
    /// A KVM ioctl failed during setup.
    #[error("{step}: {source}")]
    Setup {
        /// The setup step.
        step: &'static str,
        /// What KVM said.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU configuration.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The process could not be confined before the vCPU threads start.
    #[error("{0}")]
    Lockdown(String),
    /// The kernel file no longer matches the one the machine booted.
    #[error("reset: {0} changed since boot (different entry point)")]
    KernelChanged(String),
    /// A boot file held open since start was modified in place.
    #[error("reset: {0} was modified since boot; refusing to boot it")]
    BootFileModified(String),
    /// A boot file held open since start could not be examined.
    #[error("reset: examining {path}: {source}")]
    BootFileStat {
        /// The file.
        path: String,
        /// What fstat said.
        source: std::io::Error,
    },
    /// An eventfd could not be created or duplicated.
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    /// A device could not be attached.
    #[error(transparent)]
    Device(#[from] DeviceManagerError),
    /// The VM-wide state could not be read or written for a snapshot.
    #[error("snapshot: {0}")]
    Snapshot(#[from] VmStateError),
    /// A snapshot's state does not fit the command line's machine.
    #[error(transparent)]
    SnapshotFormat(#[from] FormatError),
    /// A snapshot cannot be taken of this machine, or its state cannot be put back.
    #[error("snapshot refused: {0}")]
    SnapshotRefused(String),
    /// The snapshot directory could not be written.
    #[error(transparent)]
    SnapshotWrite(#[from] snapshot::files::WriteError),
    /// A vhost-user disk could not be given guest memory.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

/// What tells that a file held open was written: every write or truncation moves its
/// modification time (the change time would also move when the file is merely unlinked or
/// renamed over, which does not change what the held descriptor reads). Someone able to write
/// the file and set its modification time back goes unnoticed, which is why the kernel should
/// not be writable by the VMM's uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    size: i64,
    mtime: (i64, i64),
}

impl FileStamp {
    fn of(file: &std::fs::File, path: &std::path::Path) -> Result<FileStamp, MachineError> {
        use std::os::fd::AsRawFd;
        // SAFETY: `stat` is plain integers, so all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // The fstat syscall itself: std's metadata() uses statx and glibc's fstat() uses
        // newfstatat, both of which take a path and are not in the running VMM's allowlist.
        // SAFETY: fstat on a descriptor we own, writing one `stat` into the live `st`.
        let ret = unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), &mut st) };
        if ret != 0 {
            return Err(MachineError::BootFileStat {
                path: path.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(FileStamp {
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        })
    }
}

/// The boot files held open since start, with the stamps they had when the machine was built.
struct HeldBootFiles {
    files: BootFiles,
    stamps: Vec<FileStamp>,
}

impl HeldBootFiles {
    fn open(src: &BootSource) -> Result<HeldBootFiles, MachineError> {
        let files = BootFiles::open(src)?;
        let stamps = Self::stamp(&files, src)?;
        Ok(HeldBootFiles { files, stamps })
    }

    fn stamp(files: &BootFiles, src: &BootSource) -> Result<Vec<FileStamp>, MachineError> {
        let mut stamps = vec![FileStamp::of(&files.kernel, &src.kernel)?];
        if let (Some(file), Some(path)) = (&files.initrd, &src.initrd) {
            stamps.push(FileStamp::of(file, path)?);
        }
        Ok(stamps)
    }

    /// Refuses when a file was written since the machine was built.
    fn check_unchanged(&self, src: &BootSource) -> Result<(), MachineError> {
        let now = Self::stamp(&self.files, src)?;
        let paths = std::iter::once(&src.kernel).chain(src.initrd.as_ref());
        for ((then, now), path) in self.stamps.iter().zip(&now).zip(paths) {
            if then != now {
                return Err(MachineError::BootFileModified(path.display().to_string()));
            }
        }
        Ok(())
    }
}

/// What the machine is built from.
pub struct MachineSpec<'a> {
    /// Kernel, initrd, command line.
    pub boot: &'a BootSource,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// CPUID template.
    pub cpu_template: CpuTemplate,
    /// The balloon, if the machine has one.
    pub balloon: Option<&'a BalloonOptions>,
    /// A checked snapshot the machine is restored from instead of booting; its RAM size and
    /// vCPU count are the ones above.
    pub incoming: Option<Incoming<'a>>,
    /// The q35 machine's PCI Express segment and its root ports; `None` on microvm.
    pub pcie: Option<&'a [RootPortSpec]>,
}

/// A snapshot to restore, and how its memory is loaded.
#[derive(Clone, Copy)]
pub struct Incoming<'a> {
    /// The checked snapshot.
    pub snapshot: &'a CheckedSnapshot,
    /// Read all of guest RAM from the memory file before the machine starts, rather than
    /// each page when the guest first touches it.
    pub prefault: bool,
    /// Copy the memory file into the shared guest RAM memfd, which backend processes can
    /// map, instead of mapping it privately.
    pub share: bool,
}

/// How the machine talks back to the event loop.
pub struct MachineWiring {
    /// Guest serial output.
    pub serial_out: SerialOut,
    /// vCPU terminal events.
    pub events: Sender<VcpuEvent>,
    /// Signalled after each vCPU event.
    pub events_ready: EventFd,
    /// Builds the per-thread lockdown step each vCPU thread runs before entering the guest.
    pub vcpu_lockdown: Box<dyn Fn(u8) -> ThreadLockdown>,
    /// Runs once the VM is built and before the vCPU threads exist, so that process-wide
    /// restrictions (Landlock, no_new_privs) are inherited by every vCPU thread.
    pub before_vcpu_threads: Box<dyn FnOnce() -> Result<(), String>>,
    /// Disks served by vhost-user backends, already connected; each takes the next
    /// virtio-mmio slot.
    pub disks: Vec<VhostUserBlk>,
}

/// A built machine whose vCPU threads wait to be started.
pub struct Machine {
    // Field order is drop order: vCPU threads stop before the VM and memory go away.
    vcpus: Vec<Vcpu>,
    devices: Arc<LegacyDevices>,
    virtio: DeviceManager,
    vm: Arc<VmFd>,
    ram: GuestRam,
    _kvm: Kvm,
    boot: BootSource,
    boot_files: HeldBootFiles,
    entry: EntryPoint,
    chips: ChipState,
    /// A restored q35 machine's PCI segment, put back once its cards are plugged.
    pending_pci: Option<PciSnapshot>,
}

/// The in-kernel PICs, IOAPIC and PIT as they were when the machine was built.
struct ChipState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

// KVM_IRQCHIP_* chip ids: both 8259 PICs and the IOAPIC.
const IRQCHIP_IDS: [u32; 3] = [0, 1, 2];

impl ChipState {
    fn save(vm: &VmFd) -> Result<ChipState, MachineError> {
        let irqchips = IRQCHIP_IDS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map(|()| chip)
                    .map_err(setup("saving the irqchip state"))
            })
            .collect::<Result<_, _>>()?;
        let pit = vm.get_pit2().map_err(setup("saving the PIT state"))?;
        Ok(ChipState { irqchips, pit })
    }

    fn restore(&self, vm: &VmFd) -> Result<(), MachineError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(setup("restoring the irqchip state"))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(setup("restoring the PIT state"))
    }
}

/// Hot-replace disk slots every lightweight machine has (`device_add` `addr` 0 to 5).
pub const DISK_SLOTS: u64 = 6;

/// Hot-replace NIC slots every lightweight machine has (`device_add` `addr` 0 and 1), right
/// after the disk slots.
pub const NIC_SLOTS: u64 = 2;

fn setup(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Setup { step, source }
}

impl Machine {
    /// Creates the VM, loads the kernel and spawns the vCPU threads (parked until
    /// [`Machine::start`]). With [`MachineSpec::incoming`], guest RAM is the snapshot's memory
    /// file and the vCPUs, interrupt controllers, timers, UART and transports take the saved
    /// state; a state that does not fit the machine is refused before any vCPU thread exists.
    pub fn create(spec: &MachineSpec<'_>, wiring: MachineWiring) -> Result<Machine, MachineError> {
        let kvm = Kvm::new().map_err(MachineError::Kvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(MachineError::KvmApi(api));
        }
        let vm = Arc::new(kvm.create_vm().map_err(setup("creating the VM"))?);
        // Memory goes in before anything else: once the VM has in-kernel devices, every
        // memslot change waits for an SRCU grace period (several ms on a nested host), while
        // on an empty VM it is nearly free.
        let ram = match spec.incoming {
            Some(incoming) if incoming.share => {
                snapshot::memory::copy_snapshot_memory(&incoming.snapshot.memory, spec.mem_bytes)?
            }
            Some(incoming) => snapshot::memory::map_snapshot_memory(
                &incoming.snapshot.memory,
                spec.mem_bytes,
                incoming.prefault,
            )?,
            None => memory::create_guest_ram(spec.mem_bytes)?,
        };
        memory::register(&vm, &ram)?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(setup("setting the TSS address"))?;

        // Sequential on purpose: with memory registered first, each step takes microseconds,
        // less than waking a helper thread on a nested host.
        let fds = Self::create_chips_and_vcpus(&vm, spec.vcpus)?;
        // After the irqchip, which the slots' irqfds need.
        let mut virtio = DeviceManager::new().map_err(MachineError::EventFd)?;
        // The hot-replace slots come first, so that `addr` N is always the guest's N-th disk
        // or NIC slot whatever the command line adds. The q35 machine plugs disks and NICs
        // into its root ports instead.
        if spec.pcie.is_none() {
            virtio.add_disk_slots(vm.as_ref(), &ram.memory, DISK_SLOTS)?;
            virtio.add_nic_slots(vm.as_ref(), &ram.memory, NIC_SLOTS)?;
        }
        for mut disk in wiring.disks {
            disk.set_memory(&ram.memory)?;
            virtio.add_virtio_mmio(vm.as_ref(), Box::new(disk))?;
        }
        if let Some(options) = spec.balloon {
            virtio.add_balloon(vm.as_ref(), &ram.memory, spec.mem_bytes, options)?;
        }
        let pcie = spec
            .pcie
            .map(|root_ports| virtio.add_pcie(vm.clone(), &ram.memory, root_ports))
            .transpose()?;
        // The guest learns of the slots (and the PCI segment) from the DSDT, which a reset
        // writes again.
        let mut boot = spec.boot.clone();
        boot.virtio_mmio = virtio.acpi_nodes();
        boot.pcie = pcie.is_some();
        let boot_files = HeldBootFiles::open(&boot)?;
        // A restored machine's RAM is the snapshot's: its kernel and boot tables go into
        // scratch RAM, only to learn the entry point and the vCPUs' boot state that a reset
        // needs. Untouched scratch pages are never allocated.
        let scratch = match spec.incoming {
            Some(_) => Some(memory::create_guest_ram(spec.mem_bytes)?),
            None => None,
        };
        let boot_memory = scratch.as_ref().map_or(&ram.memory, |s| &s.memory);
        let entry = boot::load_from(boot_memory, &boot, &boot_files.files, spec.vcpus)?;
        let mut boot_states = Vec::with_capacity(fds.len());
        for (index, fd) in (0..spec.vcpus).zip(&fds) {
            let cpuid = cpu::cpuid(&kvm, spec.cpu_template, index, spec.vcpus)?;
            cpu::configure(fd, boot_memory, &entry, index, &cpuid)?;
            boot_states.push(VcpuState::save(fd, index)?);
        }
        drop(scratch);
        let chips = ChipState::save(&vm)?;
        let snapshot_msrs: Arc<[u32]> = kvm
            .get_msr_index_list()
            .map_err(setup("listing the MSRs a snapshot saves"))?
            .as_slice()
            .into();
        let restored = match spec.incoming {
            Some(Incoming { snapshot: snap, .. }) => Some(Self::restore_kvm_state(
                &vm,
                &fds,
                &virtio,
                snap,
                &snapshot_msrs,
            )?),
            None => None,
        };

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(setup("wiring the serial interrupt"))?;
        let mut devices = LegacyDevices::new(serial_irq, wiring.serial_out);
        if let Some(pcie) = pcie {
            devices = devices.with_pcie(pcie);
        }
        let devices = Arc::new(devices);
        if let Some(state) = &restored {
            devices
                .restore_serial(&state.serial.clone().into())
                .map_err(|e| MachineError::SnapshotRefused(format!("serial port: {e}")))?;
        }

        (wiring.before_vcpu_threads)().map_err(MachineError::Lockdown)?;

        let mut vcpus = Vec::with_capacity(usize::from(spec.vcpus));
        let mmio = virtio.mmio_bus();
        for ((index, fd), boot_state) in (0..spec.vcpus).zip(fds).zip(boot_states) {
            let ctx = VcpuContext {
                boot_state,
                snapshot_msrs: snapshot_msrs.clone(),
                devices: devices.clone(),
                mmio: mmio.clone(),
                events: wiring.events.clone(),
                events_ready: wiring
                    .events_ready
                    .try_clone()
                    .map_err(MachineError::EventFd)?,
                lockdown: (wiring.vcpu_lockdown)(index),
            };
            vcpus.push(Vcpu::spawn(index, fd, ctx)?);
        }
        Ok(Machine {
            vcpus,
            devices,
            virtio,
            vm,
            ram,
            _kvm: kvm,
            boot,
            boot_files,
            entry,
            chips,
            pending_pci: restored.and_then(|state| state.pci),
        })
    }

    /// Parses a checked snapshot's state against the machine being built and puts its
    /// VM-wide state, every vCPU's and every slot transport's back; the UART is left to the
    /// caller, which builds it later. Devices the guest driver had started are started again
    /// by the event loop, as after a driver's DRIVER_OK (see
    /// [`DeviceManager::run_pending_activations`]): only then, with the balloon's
    /// configuration back, do their rings resume.
    fn restore_kvm_state(
        vm: &VmFd,
        fds: &[VcpuFd],
        virtio: &DeviceManager,
        snap: &CheckedSnapshot,
        msrs: &[u32],
    ) -> Result<MachineState, MachineError> {
        let types: Vec<u32> = virtio
            .save_transports()
            .iter()
            .map(|t| t.device_type)
            .collect();
        let state = MachineState::parse(&snap.state, fds.len() as u32, &types)?;
        state.vm.restore(vm)?;
        for (index, (fd, saved)) in fds.iter().zip(&state.vcpus).enumerate() {
            saved.restore(fd, index as u8, msrs)?;
        }
        virtio
            .restore_transports(&state.transports)
            .map_err(MachineError::SnapshotRefused)?;
        // The device list matched, so both have a balloon or neither does.
        if let (Some(balloon), Some((num_pages, actual))) = (virtio.balloon(), state.balloon) {
            balloon
                .restore_config(num_pages, actual)
                .map_err(MachineError::SnapshotRefused)?;
        }
        Ok(state)
    }

    /// Creates the in-kernel irqchip and PIT, then the vCPUs.
    fn create_chips_and_vcpus(vm: &VmFd, vcpus: u8) -> Result<Vec<VcpuFd>, MachineError> {
        vm.create_irq_chip()
            .map_err(setup("creating the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(setup("creating the PIT"))?;
        (0..vcpus)
            .map(|index| {
                vm.create_vcpu(u64::from(index))
                    .map_err(setup("creating a vCPU"))
            })
            .collect()
    }

    /// Returns once every vCPU thread has installed its seccomp filter, so that no thread is
    /// seen unfiltered once QMP clients are served.
    pub fn wait_locked_down(&self) -> Result<(), VcpuError> {
        self.vcpus.iter().try_for_each(Vcpu::wait_locked_down)
    }

    /// Lets every vCPU enter the guest.
    pub fn start(&self) {
        for v in &self.vcpus {
            v.release();
        }
    }

    /// Stops every vCPU; returns once none is executing guest code.
    pub fn pause(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            if let Err(e) = v.pause() {
                // Leave no vCPU half-stopped: a failed stop resumes the ones already paused.
                self.resume();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Puts the paused machine back into its boot state: every virtio device reset (its
    /// backend stops using guest memory), the kernel, boot data and boot
    /// tables written again into guest memory (the rest of memory is left as it is, as on a
    /// real reset), the interrupt controllers and timer as built, and every vCPU's registers,
    /// local APIC and MSRs as configured for boot.
    ///
    /// The kernel and initrd are the files opened at start, so a file replaced on disk since
    /// then does not change what boots; one modified in place is refused before anything is
    /// written. After an error the machine may be half reset and must not run again.
    pub fn reset(&self) -> Result<(), MachineError> {
        self.boot_files.check_unchanged(&self.boot)?;
        // Before guest memory is written again: backends stop using the rings first.
        self.virtio.reset();
        let entry = boot::load_from(
            &self.ram.memory,
            &self.boot,
            &self.boot_files.files,
            self.vcpus.len() as u8,
        )?;
        if entry != self.entry {
            return Err(MachineError::KernelChanged(
                self.boot.kernel.display().to_string(),
            ));
        }
        cpu::rewrite_boot_tables(&self.ram.memory, &entry)?;
        self.chips.restore(&self.vm)?;
        for v in &self.vcpus {
            v.reset()?;
        }
        Ok(())
    }

    /// Reads the KVM state of the paused machine for a snapshot: every vCPU, the interrupt
    /// controllers, the PIT and kvmclock. Fails if a vCPU is running or has stopped for good.
    pub fn save_kvm_state(&self) -> Result<(VmState, Vec<VcpuSnapshot>), MachineError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(Vcpu::save_snapshot)
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmState::save(&self.vm)?;
        Ok((vm, vcpus))
    }

    /// Refuses a snapshot of a machine with a vhost-user-blk device of the command line: its
    /// backend is not stopped for one, and a restored machine could not find it again; and of
    /// a q35 machine with a passed-through host function, whose state is the hardware's.
    /// Checked before the machine is paused for a snapshot, and again after.
    pub fn check_snapshot(&self) -> Result<(), MachineError> {
        if let Some(pci) = self.virtio.pci() {
            pci.check_snapshot()
                .map_err(MachineError::SnapshotRefused)?;
        }
        let devices = self.virtio.unsnapshottable_devices();
        if devices > 0 {
            return Err(MachineError::SnapshotRefused(format!(
                "{devices} vhost-user-blk device(s) of the command line cannot be kept in a \
                 snapshot; plug disks into the disk slots (-drive, blockdev-add) instead"
            )));
        }
        Ok(())
    }

    /// Reads the whole state of the paused machine for a snapshot (see
    /// [`Machine::check_snapshot`] for what is refused).
    ///
    /// Devices the guest driver started are saved as they are. The VMM completes each chain
    /// it takes on the event loop, and the backends of plugged disk and NIC slots are
    /// stopped at their used indices before guest RAM is written (see
    /// [`DeviceManager::quiesce_backends`]), so with the vCPUs paused each ring's position is
    /// the used index in guest memory, saved with it. The restored machine starts them again
    /// from there, with the backends its command line plugs into the same slots.
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        self.check_snapshot()?;
        let transports = self.virtio.save_transports();
        let (vm, vcpus) = self.save_kvm_state()?;
        let (plugged_disks, plugged_nics) = self.virtio.plugged_slots();
        Ok(MachineState {
            vm,
            vcpus,
            serial: self.devices.serial_state().into(),
            transports,
            balloon: self.virtio.balloon().map(BalloonHandle::config),
            plugged_disks,
            plugged_nics,
            pci: self
                .virtio
                .pci()
                .map(PciDevices::save)
                .transpose()
                .map_err(MachineError::SnapshotRefused)?,
        })
    }

    /// Puts a restored q35 machine's PCI segment back, once the command line's cards are
    /// plugged (they are, when the snapshot was checked against it) and before its vCPUs
    /// first run; nothing for any other machine.
    pub fn restore_pci(&mut self) -> Result<(), MachineError> {
        match (self.pending_pci.take(), self.virtio.pci()) {
            (Some(saved), Some(pci)) => pci.restore(&saved).map_err(MachineError::SnapshotRefused),
            (Some(_), None) => Err(MachineError::SnapshotRefused(
                "the snapshot has a PCI segment, the machine none".into(),
            )),
            (None, _) => Ok(()),
        }
    }

    /// Runs `write` with the device backends stopped, so that no backend writes guest RAM
    /// while it is copied, and starts them again afterwards.
    fn with_backends_stopped(
        &self,
        write: impl FnOnce() -> Result<(), MachineError>,
    ) -> Result<(), MachineError> {
        self.virtio.quiesce_backends().map_err(|why| {
            MachineError::SnapshotRefused(format!("stopping the device backends: {why}"))
        })?;
        let written = write();
        self.virtio.unquiesce_backends();
        written
    }

    /// The serialised state of the paused machine and its RAM, as a snapshot writes them.
    fn snapshot_json(&self) -> Result<Vec<u8>, MachineError> {
        let state = self.save_state()?;
        serde_json::to_vec(&state)
            .map_err(|e| MachineError::SnapshotRefused(format!("encoding the state: {e}")))
    }

    fn snapshot_data<'a>(&'a self, json: &'a [u8]) -> snapshot::files::SnapshotData<'a> {
        snapshot::files::SnapshotData {
            state: json,
            memory: &self.ram.memory,
            vcpus: self.vcpus.len() as u32,
        }
    }

    /// Writes a snapshot of the paused machine into `dir`, creating it from this process (see
    /// [`snapshot::files::write`]).
    pub fn write_snapshot(&self, dir: &std::path::Path) -> Result<(), MachineError> {
        let json = self.snapshot_json()?;
        self.with_backends_stopped(|| {
            snapshot::files::write(dir, &self.snapshot_data(&json))?;
            Ok(())
        })
    }

    /// Writes a snapshot of the paused machine into files prepared by the device launcher
    /// (see [`snapshot::files::write_into`]); the caller removes them on failure.
    pub fn write_snapshot_into(
        &self,
        files: &citadel_launcher::snapshot_dir::SnapshotFiles,
    ) -> Result<(), MachineError> {
        let json = self.snapshot_json()?;
        self.with_backends_stopped(|| {
            snapshot::files::write_into(files, &self.snapshot_data(&json))?;
            Ok(())
        })
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// Thread ids and halted state of every vCPU.
    pub fn vcpu_info(&self) -> Result<Vec<VcpuInfo>, VcpuError> {
        self.vcpus.iter().map(Vcpu::info).collect()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The virtio devices (device starts are run by the event loop).
    pub fn virtio(&self) -> &DeviceManager {
        &self.virtio
    }

    /// The legacy devices (for serial input).
    pub fn devices(&self) -> &LegacyDevices {
        &self.devices
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.devices.flush_serial();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::test_kernel::{self, ElfSpec, LOAD_ADDR};
    use crate::devices::legacy::Discard;
    use crate::snapshot::files;
    use vm_memory::Bytes;

    /// The test kernel (a PVH ELF) and a boot source for it; the file lives as long as the
    /// first value.
    fn test_boot() -> (vmm_sys_util::tempfile::TempFile, BootSource) {
        let kernel = test_kernel::file(&test_kernel::elf(&ElfSpec {
            pvh_note: true,
            ..Default::default()
        }));
        let boot = BootSource {
            kernel: kernel.as_path().to_path_buf(),
            pcie: false,
            initrd: None,
            cmdline: String::new(),
            virtio_mmio: Vec::new(),
        };
        (kernel, boot)
    }

    #[test]
    fn a_paused_machine_writes_a_snapshot_the_same_command_line_restores() {
        let Some(_kvm) = crate::test_kvm::kvm_or_skip(
            "machine::a_paused_machine_writes_a_snapshot_the_same_command_line_restores",
        ) else {
            return;
        };
        crate::vcpu::register_kick_handler().unwrap();
        let (_kernel, boot) = test_boot();
        let spec = MachineSpec {
            boot: &boot,
            pcie: None,
            vcpus: 2,
            mem_bytes: 32 << 20,
            cpu_template: CpuTemplate::Host,
            balloon: None,
            incoming: None,
        };
        let mut machine = Machine::create(&spec, wiring()).unwrap();
        machine.start();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let dir = std::env::temp_dir().join(format!("citadel-machine-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(
            machine.write_snapshot(&dir),
            Err(MachineError::Vcpu(VcpuError::NotPaused(_)))
        ));
        assert!(!dir.exists());
        machine.pause().unwrap();
        machine.write_snapshot(&dir).unwrap();

        let checked = files::read(&dir, 32 << 20, 2, true).unwrap();
        let memory = std::fs::read(dir.join(files::MEMORY_FILE)).unwrap();
        let code = test_kernel::probe_code();
        let at = LOAD_ADDR as usize;
        assert_eq!(&memory[at..at + code.len()], &code[..]);
        let slots: Vec<u32> = [2; DISK_SLOTS as usize]
            .into_iter()
            .chain([1; NIC_SLOTS as usize])
            .collect();
        let state = MachineState::parse(&checked.state, 2, &slots).unwrap();
        assert_eq!(state.transports.len(), slots.len());
        let mut with_balloon = slots.clone();
        with_balloon.push(5);
        assert_eq!(
            MachineState::parse(&checked.state, 2, &with_balloon)
                .err()
                .map(|e| e.to_string()),
            Some(
                "snapshot devices [blk,blk,blk,blk,blk,blk,net,net] differ from the command \
                 line's [blk,blk,blk,blk,blk,blk,net,net,balloon]"
                    .to_string()
            )
        );
        assert!(matches!(
            MachineState::parse(&checked.state, 3, &slots),
            Err(FormatError::VcpuMismatch {
                snapshot: 2,
                command_line: 3
            })
        ));
        assert!(matches!(
            machine.write_snapshot(&dir),
            Err(MachineError::SnapshotWrite(files::WriteError::Directory(
                citadel_launcher::snapshot_dir::SnapshotDirError::NotEmpty(_)
            )))
        ));

        // The same command line restores it: same vCPU states, devices and RAM.
        let saved = machine.save_state().unwrap();
        machine.shutdown();
        let incoming = MachineSpec {
            incoming: Some(Incoming {
                snapshot: &checked,
                prefault: false,
                share: false,
            }),
            ..spec
        };
        let mut restored = Machine::create(&incoming, wiring()).unwrap();
        restored.pause().unwrap();
        let back = restored.save_state().unwrap();
        assert_eq!(format!("{:?}", back.vcpus), format!("{:?}", saved.vcpus));
        assert_eq!(back.transports, saved.transports);
        assert_eq!(back.serial, saved.serial);
        let mut buf = vec![0u8; code.len()];
        restored
            .ram
            .memory
            .read_slice(&mut buf, vm_memory::GuestAddress(LOAD_ADDR))
            .unwrap();
        assert_eq!(buf, code);

        // A snapshot of the restored machine holds what its guest wrote since, which lives
        // only in its private mapping of the first snapshot's memory file.
        let marker = b"written-after-the-restore";
        restored
            .ram
            .memory
            .write_slice(marker, vm_memory::GuestAddress(0x80_0000))
            .unwrap();
        let again = dir.with_extension("again");
        let _ = std::fs::remove_dir_all(&again);
        restored.write_snapshot(&again).unwrap();
        let memory = std::fs::read(again.join(files::MEMORY_FILE)).unwrap();
        assert_eq!(&memory[0x80_0000..0x80_0000 + marker.len()], marker);
        assert_eq!(&memory[at..at + code.len()], &code[..]);
        std::fs::remove_dir_all(&again).unwrap();
        let first = std::fs::read(dir.join(files::MEMORY_FILE)).unwrap();
        assert_ne!(&first[0x80_0000..0x80_0000 + marker.len()], marker);

        restored.shutdown();

        // Another device list is refused before any vCPU exists.
        let balloon = BalloonOptions::default();
        let other = MachineSpec {
            balloon: Some(&balloon),
            ..incoming
        };
        let err = Machine::create(&other, wiring()).err().unwrap();
        assert!(err.to_string().starts_with("snapshot devices ["), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guest-physical addresses of the ring a test driver sets up on disk slot 0, of its
    /// requests' headers and of their status bytes (one per request).
    const DESC: u64 = 0x40_0000;
    const AVAIL: u64 = 0x40_1000;
    const USED: u64 = 0x40_2000;
    const HEADER: u64 = 0x40_3000;
    const STATUS: u64 = 0x40_4000;
    const RING: u16 = 8;

    /// Drives virtio-mmio slot `slot` of `machine` the way a guest driver does, up to
    /// DRIVER_OK: VIRTIO_F_VERSION_1 only, and queue `i` an 8-entry ring whose descriptor
    /// table is at `rings[i]`, its driver area 4 KiB above and its device area 8 KiB above.
    fn start_slot(machine: &Machine, slot: u64, rings: &[u64]) {
        use virtio_bindings::virtio_mmio::*;
        let bus = machine.virtio().mmio_bus();
        let base = crate::boot::layout::virtio_mmio_slot(slot).unwrap().0;
        let w32 = |reg: u32, value: u32| {
            assert!(bus.write(base + u64::from(reg), &value.to_le_bytes()));
        };
        w32(VIRTIO_MMIO_STATUS, 1);
        w32(VIRTIO_MMIO_STATUS, 3);
        w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        w32(VIRTIO_MMIO_STATUS, 11);
        for (index, &ring) in (0..).zip(rings) {
            w32(VIRTIO_MMIO_QUEUE_SEL, index);
            w32(VIRTIO_MMIO_QUEUE_NUM, u32::from(RING));
            w32(VIRTIO_MMIO_QUEUE_DESC_LOW, ring as u32);
            w32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (ring + 0x1000) as u32);
            w32(VIRTIO_MMIO_QUEUE_USED_LOW, (ring + 0x2000) as u32);
            w32(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        w32(VIRTIO_MMIO_STATUS, 15);
    }

    /// Queues request `n` (a header and a status byte, on descriptors 2n and 2n + 1) on disk
    /// slot 0's ring and, with `kick`, notifies the queue through its register.
    fn queue_request(machine: &Machine, n: u16, kick: bool) {
        let memory = &machine.ram.memory;
        let w = |value: u64, addr: u64, len: usize| {
            memory
                .write_slice(&value.to_le_bytes()[..len], vm_memory::GuestAddress(addr))
                .unwrap();
        };
        let head = u64::from(n * 2 % RING);
        let status = STATUS + u64::from(n);
        // Header: readable, chained to the status byte; status: device-writable.
        for (index, addr, len, flags, next) in
            [(head, HEADER, 16, 1, head + 1), (head + 1, status, 1, 2, 0)]
        {
            let at = DESC + 16 * index;
            w(addr, at, 8);
            w(len, at + 8, 4);
            w(flags, at + 12, 2);
            w(next, at + 14, 2);
        }
        w(0xff, status, 1);
        w(head, AVAIL + 4 + 2 * u64::from(n % RING), 2);
        w(u64::from(n + 1), AVAIL + 2, 2);
        if kick {
            let notify = crate::boot::layout::VIRTIO_MMIO_BASE
                + crate::devices::virtio_mmio::QUEUE_NOTIFY_OFFSET;
            assert!(machine
                .virtio()
                .mmio_bus()
                .write(notify, &0u32.to_le_bytes()));
        }
    }

    /// The used index of disk slot 0's ring and the status byte of request `n`.
    fn answered(machine: &Machine, n: u16) -> (u16, u8) {
        let memory = &machine.ram.memory;
        let used: u16 = memory.read_obj(vm_memory::GuestAddress(USED + 2)).unwrap();
        let status: u8 = memory
            .read_obj(vm_memory::GuestAddress(STATUS + u64::from(n)))
            .unwrap();
        (used, status)
    }

    /// An empty disk slot its driver started is snapshotted with the machine and answers
    /// again on the restored one: a request queued and kicked just before the pause, which
    /// the event loop had not served, is answered once the device resumes (IOERR, used index
    /// one further), and so are the driver's requests after that.
    #[test]
    fn a_started_empty_disk_slot_resumes_on_the_restored_machine() {
        let Some(_kvm) = crate::test_kvm::kvm_or_skip(
            "machine::a_started_empty_disk_slot_resumes_on_the_restored_machine",
        ) else {
            return;
        };
        crate::vcpu::register_kick_handler().unwrap();
        let (_kernel, boot) = test_boot();
        let spec = MachineSpec {
            boot: &boot,
            pcie: None,
            vcpus: 1,
            mem_bytes: 32 << 20,
            cpu_template: CpuTemplate::Host,
            balloon: None,
            incoming: None,
        };
        let mut machine = Machine::create(&spec, wiring()).unwrap();
        start_slot(&machine, 0, &[DESC]);
        machine.virtio().run_pending_activations();
        queue_request(&machine, 0, true);
        machine.virtio().serve_empty_slots();
        assert_eq!(answered(&machine, 0), (1, 1));
        // Queued and kicked, but the event loop does not get to it before the pause.
        queue_request(&machine, 1, true);
        machine.pause().unwrap();
        let dir = std::env::temp_dir().join(format!("citadel-resume-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        machine.write_snapshot(&dir).unwrap();
        let saved = machine.save_state().unwrap();
        assert_eq!(saved.transports[0].status, 15);
        machine.shutdown();
        drop(machine);

        let checked = files::read(&dir, 32 << 20, 1, true).unwrap();
        let incoming = MachineSpec {
            incoming: Some(Incoming {
                snapshot: &checked,
                prefault: false,
                share: false,
            }),
            ..spec
        };
        let mut restored = Machine::create(&incoming, wiring()).unwrap();
        restored.pause().unwrap();
        assert_eq!(restored.save_state().unwrap().transports, saved.transports);
        // The device starts on the event loop, not while the machine is built.
        restored.virtio().serve_empty_slots();
        assert_eq!(answered(&restored, 1), (1, 0xff));
        restored.virtio().run_pending_activations();
        restored.virtio().serve_empty_slots();
        assert_eq!(answered(&restored, 1), (2, 1));
        assert_eq!(answered(&restored, 0), (2, 1));
        queue_request(&restored, 2, true);
        restored.virtio().serve_empty_slots();
        assert_eq!(answered(&restored, 2), (3, 1));
        restored.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A balloon its driver started, with a target set, pages held and a deflate buffer
    /// queued and kicked just before the pause, comes back with its target and held pages and
    /// completes the buffer once the event loop resumes it.
    #[test]
    fn a_balloon_target_survives_a_snapshot() {
        let Some(_kvm) =
            crate::test_kvm::kvm_or_skip("machine::a_balloon_target_survives_a_snapshot")
        else {
            return;
        };
        crate::vcpu::register_kick_handler().unwrap();
        let (_kernel, boot) = test_boot();
        let balloon = BalloonOptions::default();
        let spec = MachineSpec {
            boot: &boot,
            pcie: None,
            vcpus: 1,
            mem_bytes: 32 << 20,
            cpu_template: CpuTemplate::Host,
            balloon: Some(&balloon),
            incoming: None,
        };
        let mut machine = Machine::create(&spec, wiring()).unwrap();
        machine
            .virtio()
            .balloon()
            .unwrap()
            .set_target(16 << 20)
            .unwrap();
        // The balloon takes the slot after the disk and NIC slots; its driver starts the
        // inflate and deflate queues and says it holds 100 pages.
        let slot = DISK_SLOTS + NIC_SLOTS;
        let (inflate, deflate, pfns) = (0x50_0000, 0x51_0000, 0x52_0000);
        start_slot(&machine, slot, &[inflate, deflate]);
        machine.virtio().run_pending_activations();
        let base = crate::boot::layout::virtio_mmio_slot(slot).unwrap().0;
        let bus = machine.virtio().mmio_bus();
        assert!(bus.write(base + 0x104, &100u32.to_le_bytes()));
        // One frame to deflate, queued and kicked but not served before the pause.
        let memory = &machine.ram.memory;
        let at = vm_memory::GuestAddress;
        memory.write_obj(2048u32, at(pfns)).unwrap();
        memory.write_obj(pfns, at(deflate)).unwrap();
        memory.write_obj(4u32, at(deflate + 8)).unwrap();
        memory.write_obj(0u16, at(deflate + 0x1004)).unwrap();
        memory.write_obj(1u16, at(deflate + 0x1002)).unwrap();
        assert!(bus.write(
            base + crate::devices::virtio_mmio::QUEUE_NOTIFY_OFFSET,
            &1u32.to_le_bytes()
        ));
        machine.pause().unwrap();
        let dir = std::env::temp_dir().join(format!("citadel-balloon-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        machine.write_snapshot(&dir).unwrap();
        machine.shutdown();
        let checked = files::read(&dir, 32 << 20, 1, true).unwrap();
        let incoming = MachineSpec {
            incoming: Some(Incoming {
                snapshot: &checked,
                prefault: false,
                share: false,
            }),
            ..spec
        };
        let mut restored = Machine::create(&incoming, wiring()).unwrap();
        let balloon = restored.virtio().balloon().unwrap();
        assert_eq!(balloon.config(), ((16 << 20) / 4096, 100));
        let deflate_used = || -> u16 {
            restored
                .ram
                .memory
                .read_obj(vm_memory::GuestAddress(deflate + 0x2002))
                .unwrap()
        };
        balloon.serve();
        assert_eq!(deflate_used(), 0);
        restored.virtio().run_pending_activations();
        balloon.serve();
        assert_eq!(deflate_used(), 1);
        assert_eq!(balloon.config(), ((16 << 20) / 4096, 100));
        restored.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guest serial output, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// The whole line of output that starts with `prefix`, if the guest printed it to its
        /// end (a line still being printed may lack its value).
        fn line(&self, prefix: &str) -> Option<String> {
            let out = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let text = String::from_utf8_lossy(&out);
            let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
            complete
                .lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_string)
        }

        /// Waits up to 20 s for the line starting with `prefix`, meanwhile doing what the
        /// event loop does for the slots when `serve` is set: starting the devices their
        /// drivers asked for and answering the empty slots' requests.
        fn wait_line(&self, machine: &Machine, prefix: &str, serve: bool) -> String {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                if let Some(line) = self.line(prefix) {
                    return line;
                }
                let out = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
                assert!(
                    std::time::Instant::now() < deadline,
                    "no `{prefix}` from the guest; it printed:\n{}",
                    String::from_utf8_lossy(&out)
                );
                if serve {
                    machine.virtio().run_pending_activations();
                    machine.virtio().serve_empty_slots();
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// The `virtio_blk` guest program starts the empty disk slot and reads from it; with the
    /// slot's kicks left unserved, it queues another read and the machine is paused and
    /// snapshotted. Restored into a new machine, whose event loop resumes the slot, the
    /// program gets its queued read answered (IOERR: the slot is empty) and reads once more.
    #[test]
    fn a_guest_program_goes_on_using_its_disk_slot_after_a_restore() {
        let Some(_kvm) = crate::test_kvm::kvm_or_skip(
            "machine::a_guest_program_goes_on_using_its_disk_slot_after_a_restore",
        ) else {
            return;
        };
        crate::vcpu::register_kick_handler().unwrap();
        let boot = BootSource {
            kernel: citadel_tests::guest_program("virtio_blk"),
            pcie: false,
            initrd: None,
            cmdline: "virtio_mmio.device=4K@0xd0000000:5 snapshot".to_string(),
            virtio_mmio: Vec::new(),
        };
        let spec = MachineSpec {
            boot: &boot,
            pcie: None,
            vcpus: 1,
            mem_bytes: 32 << 20,
            cpu_template: CpuTemplate::Host,
            balloon: None,
            incoming: None,
        };
        let out = Captured::default();
        let mut machine = Machine::create(&spec, wiring_to(Box::new(out.clone()))).unwrap();
        machine.start();
        let line = out.wait_line(&machine, "citadel-guest: snapshot first-read status=", true);
        assert_eq!(line, "citadel-guest: snapshot first-read status=1");
        // The go-ahead; from here on the slot's kicks wait.
        assert_eq!(machine.devices().serial_input(b"g"), 1);
        out.wait_line(&machine, "citadel-guest: snapshot queued", false);
        machine.pause().unwrap();
        let dir = std::env::temp_dir().join(format!("citadel-guest-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        machine.write_snapshot(&dir).unwrap();
        assert_eq!(out.line("citadel-guest: snapshot queued-read"), None);
        machine.shutdown();
        drop(machine);

        let checked = files::read(&dir, 32 << 20, 1, true).unwrap();
        let incoming = MachineSpec {
            incoming: Some(Incoming {
                snapshot: &checked,
                prefault: false,
                share: false,
            }),
            ..spec
        };
        let after = Captured::default();
        let mut restored = Machine::create(&incoming, wiring_to(Box::new(after.clone()))).unwrap();
        restored.start();
        let last = after.wait_line(&restored, "citadel-guest: snapshot last-read status=", true);
        assert_eq!(
            after.line("citadel-guest: snapshot queued-read status="),
            Some("citadel-guest: snapshot queued-read status=1".to_string())
        );
        assert_eq!(last, "citadel-guest: snapshot last-read status=1");
        restored.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn wiring() -> MachineWiring {
        wiring_to(Box::new(Discard))
    }

    fn wiring_to(serial_out: SerialOut) -> MachineWiring {
        let (events, _rx) = std::sync::mpsc::channel();
        MachineWiring {
            serial_out,
            events,
            events_ready: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            vcpu_lockdown: Box::new(|_| Box::new(|| Ok(()))),
            before_vcpu_threads: Box::new(|| Ok(())),
            disks: Vec::new(),
        }
    }
}
