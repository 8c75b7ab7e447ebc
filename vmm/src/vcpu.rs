//! vCPU threads: one host thread per vCPU, running `KVM_RUN` and dispatching its exits, with
//! a control point between runs where the thread can be paused, queried or told to exit.
//!
//! The controller (the event loop) never touches a vCPU fd: it sets a request in the shared
//! state and kicks the thread with a signal, which makes `KVM_RUN` return `EINTR`. Because a
//! kick can land just before the thread enters `KVM_RUN` (and a halted guest may then sleep
//! there indefinitely), the controller repeats the kick until the thread acknowledges.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::cpu::VcpuState;
use crate::devices::legacy::{LegacyDevices, PioOutcome};
use crate::devices::mmio_bus::MmioBus;
use crate::snapshot::vcpu_state::VcpuSnapshot;

/// How long one kick waits for an acknowledgement before kicking again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// How long a controller request may take before it is reported as failed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

// KVM_SYSTEM_EVENT_* types of a KVM_EXIT_SYSTEM_EVENT.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is what interrupts KVM_RUN.
}

/// Installs the kick handler. Must run once before any vCPU thread starts.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::Signal)
}

/// Something a vCPU thread reports to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for a reset (i8042 reset line, triple fault, or a system event).
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// KVM stopped the vCPU: a `KVM_EXIT_INTERNAL_ERROR` (such as an instruction its
    /// emulator cannot handle), a failed VM entry, or `KVM_RUN` itself failing. QEMU stops the
    /// VM in the `internal-error` run state for these; the vCPU never runs again.
    InternalError {
        /// Which vCPU.
        index: u8,
        /// The exit and what KVM said about it, one line.
        reason: String,
    },
    /// The vCPU thread could not be set up (its seccomp filter failed to install).
    Fatal {
        /// Which vCPU.
        index: u8,
        /// What happened, one line.
        reason: String,
    },
}

/// Errors of vCPU management.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("registering the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The vCPU thread could not be created.
    #[error("spawning vCPU {index} thread: {source}")]
    Spawn {
        /// Which vCPU.
        index: u8,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A vCPU could not be put back into its boot state.
    #[error("resetting vCPU {index}: {reason}")]
    Reset {
        /// Which vCPU.
        index: u8,
        /// What failed.
        reason: String,
    },
    /// A vCPU's state could not be read for a snapshot.
    #[error("saving vCPU {index}: {reason}")]
    Save {
        /// Which vCPU.
        index: u8,
        /// What failed.
        reason: String,
    },
    /// A vCPU was asked to reset or save its state while running.
    #[error("vCPU {0} must be paused to be reset or saved")]
    NotPaused(u8),
    /// A vCPU did not acknowledge a request in time.
    #[error("vCPU {index} did not {what} within {REQUEST_DEADLINE:?}")]
    Timeout {
        /// Which vCPU.
        index: u8,
        /// The request.
        what: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Not released yet: the thread waits before entering the guest.
    Hold,
    Run,
    Pause,
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Starting,
    Running,
    Paused,
    Exited,
}

#[derive(Debug)]
struct State {
    want: Want,
    at: At,
    tid: i32,
    halted: bool,
    refresh_wanted: u64,
    refresh_done: u64,
    reset_wanted: u64,
    reset_done: u64,
    reset_error: Option<String>,
    save_wanted: u64,
    save_done: u64,
    saved: Option<Result<VcpuSnapshot, String>>,
    locked_down: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    /// Set (under the lock) whenever the controller changes `state`; lets the vCPU skip the
    /// lock on every exit when nothing was asked of it.
    attention: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state for the vCPU thread and tells it so.
    fn request<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.lock();
        let out = change(&mut st);
        self.attention.store(true, Ordering::Release);
        self.cond.notify_all();
        out
    }
}

/// A step a thread runs on itself before it handles untrusted input (installing its seccomp
/// filter); the error is one line for the user.
pub type ThreadLockdown = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// Port-I/O devices.
    pub devices: Arc<LegacyDevices>,
    /// MMIO devices (virtio-mmio transports).
    pub mmio: Arc<MmioBus>,
    /// Where terminal events go.
    pub events: Sender<VcpuEvent>,
    /// Signalled whenever an event is sent, to wake the event loop.
    pub events_ready: EventFd,
    /// Runs on the thread once released and before the first `KVM_RUN`: it installs the
    /// thread's seccomp filter. A failure stops the VM before any guest instruction runs.
    pub lockdown: ThreadLockdown,
    /// The state the vCPU boots with, put back on reset.
    pub boot_state: VcpuState,
    /// The MSRs a snapshot saves (KVM's list for this host).
    pub snapshot_msrs: Arc<[u32]>,
}

/// The controller's handle on one vCPU thread.
pub struct Vcpu {
    index: u8,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A snapshot of one vCPU for `query-cpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuInfo {
    /// vCPU index.
    pub index: u8,
    /// Host thread id.
    pub tid: i32,
    /// Whether the vCPU is in the halted state (waiting for an interrupt).
    pub halted: bool,
}

impl Vcpu {
    /// Starts the thread for `fd`. It waits for [`Vcpu::release`] before entering the guest.
    pub fn spawn(index: u8, fd: VcpuFd, ctx: VcpuContext) -> Result<Vcpu, VcpuError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                want: Want::Hold,
                at: At::Starting,
                tid: 0,
                halted: false,
                refresh_wanted: 0,
                refresh_done: 0,
                reset_wanted: 0,
                reset_done: 0,
                reset_error: None,
                save_wanted: 0,
                save_done: 0,
                saved: None,
                locked_down: false,
            }),
            cond: Condvar::new(),
            // The first pass through the control point records that the thread runs.
            attention: AtomicBool::new(true),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || thread_main(index, fd, ctx, &thread_shared))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(Vcpu {
            index,
            shared,
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t comes from a JoinHandle we still hold, so the thread has
            // not been joined and the id is valid; the kick signal has a handler installed
            // (register_kick_handler) so it cannot terminate the process.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
    }

    /// Kicks until `done` holds or the deadline passes.
    fn wait_until(
        &self,
        what: &'static str,
        done: impl Fn(&State) -> bool,
    ) -> Result<(), VcpuError> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut st = self.shared.lock();
        while !done(&st) {
            if st.at == At::Exited {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VcpuError::Timeout {
                    index: self.index,
                    what,
                });
            }
            drop(st);
            self.kick();
            st = self.shared.lock();
            if done(&st) {
                break;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Stops the vCPU and returns once it is out of the guest.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.shared.request(|st| st.want = Want::Pause);
        self.wait_until("pause", |s| s.at == At::Paused)
    }

    /// Lets a vCPU that has not run yet enter the guest.
    pub fn release(&self) {
        self.shared.request(|st| {
            if st.want == Want::Hold {
                st.want = Want::Run;
            }
        });
    }

    /// Waits until the thread has installed its seccomp filter (or has stopped).
    pub fn wait_locked_down(&self) -> Result<(), VcpuError> {
        self.wait_until("start", |s| s.locked_down || s.at != At::Starting)
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.shared.request(|st| {
            if st.want == Want::Pause {
                st.want = Want::Run;
            }
        });
    }

    /// The vCPU's thread id and current halted state (refreshed from KVM).
    pub fn info(&self) -> Result<VcpuInfo, VcpuError> {
        let wanted = self.shared.request(|st| {
            st.refresh_wanted += 1;
            st.refresh_wanted
        });
        self.wait_until("report its state", |s| s.refresh_done >= wanted)?;
        let tid = self.tid();
        let st = self.shared.lock();
        Ok(VcpuInfo {
            index: self.index,
            tid,
            halted: st.halted,
        })
    }

    /// Puts the paused vCPU back into its boot state.
    pub fn reset(&self) -> Result<(), VcpuError> {
        let wanted = self
            .shared
            .request(|st| {
                if st.at != At::Paused {
                    return None;
                }
                st.reset_wanted += 1;
                st.reset_error = None;
                Some(st.reset_wanted)
            })
            .ok_or(VcpuError::NotPaused(self.index))?;
        self.wait_until("reset", |s| s.reset_done >= wanted)?;
        match self.shared.lock().reset_error.take() {
            Some(reason) => Err(VcpuError::Reset {
                index: self.index,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Reads the whole state of the paused vCPU for a snapshot.
    pub fn save_snapshot(&self) -> Result<VcpuSnapshot, VcpuError> {
        let wanted = self
            .shared
            .request(|st| {
                if st.at != At::Paused {
                    return None;
                }
                st.save_wanted += 1;
                st.saved = None;
                Some(st.save_wanted)
            })
            .ok_or(VcpuError::NotPaused(self.index))?;
        self.wait_until("save its state", |s| s.save_done >= wanted)?;
        match self.shared.lock().saved.take() {
            Some(Ok(state)) => Ok(state),
            Some(Err(reason)) => Err(VcpuError::Save {
                index: self.index,
                reason,
            }),
            None => Err(VcpuError::Timeout {
                index: self.index,
                what: "save its state",
            }),
        }
    }

    /// The host thread id (waits for a thread just spawned to record it).
    pub fn tid(&self) -> i32 {
        let mut st = self.shared.lock();
        while st.tid == 0 && st.at != At::Exited {
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.tid
    }

    /// Tells the thread to leave and joins it.
    pub fn stop(&mut self) {
        self.shared.request(|st| st.want = Want::Exit);
        if let Err(e) = self.wait_until("exit", |s| s.at == At::Exited) {
            log::warn!("{e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Whether the vCPU executes nothing until an interrupt or a startup IPI arrives: halted, or
/// an application processor still waiting for INIT/SIPI (QEMU reports those as halted too).
fn is_halted(fd: &VcpuFd) -> bool {
    fd.get_mp_state()
        .map(|s| {
            matches!(
                s.mp_state,
                KVM_MP_STATE_HALTED | KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED
            )
        })
        .unwrap_or(false)
}

/// What the control point needs besides the vCPU fd.
struct ControlContext<'a> {
    boot_state: &'a VcpuState,
    snapshot_msrs: &'a [u32],
}

/// The control point: handles state refreshes, parks while paused, and says whether to exit.
fn control_point(index: u8, fd: &VcpuFd, ctx: &ControlContext<'_>, shared: &Shared) -> bool {
    // Runs on every exit: only take the lock when the controller asked for something.
    if !shared.attention.load(Ordering::Acquire) {
        return true;
    }
    let mut st = shared.lock();
    loop {
        // Cleared under the lock before the state is read: a request made from here on sets
        // it again.
        shared.attention.store(false, Ordering::Relaxed);
        if st.reset_done < st.reset_wanted {
            st.reset_error = ctx
                .boot_state
                .restore(fd, index)
                .err()
                .map(|e| e.to_string());
            st.reset_done = st.reset_wanted;
            shared.cond.notify_all();
        }
        if st.save_done < st.save_wanted {
            st.saved =
                Some(VcpuSnapshot::save(fd, index, ctx.snapshot_msrs).map_err(|e| e.to_string()));
            st.save_done = st.save_wanted;
            shared.cond.notify_all();
        }
        if st.refresh_done < st.refresh_wanted {
            st.halted = is_halted(fd);
            st.refresh_done = st.refresh_wanted;
            shared.cond.notify_all();
        }
        match st.want {
            Want::Exit => return false,
            Want::Run | Want::Hold => {
                st.at = At::Running;
                return true;
            }
            Want::Pause => {
                if st.at != At::Paused {
                    st.halted = is_halted(fd);
                    st.at = At::Paused;
                    shared.cond.notify_all();
                }
                st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// Outcome of one KVM_RUN.
enum Step {
    Continue,
    Stop(VcpuEvent),
}

fn run_once(index: u8, fd: &mut VcpuFd, devices: &LegacyDevices, mmio: &MmioBus) -> Step {
    match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => match devices.pio_write(port, data) {
            PioOutcome::Continue => Step::Continue,
            PioOutcome::ResetRequested => {
                log::info!("vCPU {index}: guest requested a reset through the i8042");
                Step::Stop(VcpuEvent::GuestReset)
            }
        },
        Ok(VcpuExit::IoIn(port, data)) => {
            devices.pio_read(port, data);
            Step::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !mmio.read(addr, data) {
                log::debug!("vCPU {index}: read of unmapped MMIO {addr:#x}");
            }
            Step::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if !mmio.write(addr, data) {
                log::debug!("vCPU {index}: write to unmapped MMIO {addr:#x}");
            }
            Step::Continue
        }
        Ok(VcpuExit::Shutdown) => {
            // A triple fault: on a PC this resets the machine.
            log::info!("vCPU {index}: triple fault, treating it as a reset request");
            Step::Stop(VcpuEvent::GuestReset)
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            SYSTEM_EVENT_SHUTDOWN => Step::Stop(VcpuEvent::GuestShutdown),
            SYSTEM_EVENT_RESET => Step::Stop(VcpuEvent::GuestReset),
            other => {
                log::warn!("vCPU {index}: ignoring system event {other}");
                Step::Continue
            }
        },
        Ok(VcpuExit::Hlt) => Step::Continue,
        Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Stop(VcpuEvent::InternalError {
            index,
            reason: format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host cpu {cpu}"
            ),
        }),
        Ok(VcpuExit::InternalError) => {
            let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` member
            // of the kvm_run union is the one KVM filled in.
            let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            Step::Stop(VcpuEvent::InternalError {
                index,
                reason: internal_error_reason(suberror, rip),
            })
        }
        Ok(other) => {
            log::warn!("vCPU {index}: unhandled exit {other:?}");
            Step::Continue
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            Step::Continue
        }
        Err(e) => Step::Stop(VcpuEvent::InternalError {
            index,
            reason: format!("KVM_RUN failed: {e}"),
        }),
    }
}

/// One line for a `KVM_EXIT_INTERNAL_ERROR`, naming the suberrors of the KVM API.
fn internal_error_reason(suberror: u32, rip: u64) -> String {
    let what = match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "event delivery failure",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    format!("KVM_EXIT_INTERNAL_ERROR: {what} (suberror {suberror}) at rip {rip:#x}")
}

fn thread_main(index: u8, mut fd: VcpuFd, ctx: VcpuContext, shared: &Shared) {
    {
        let mut st = shared.lock();
        st.tid = current_tid();
        shared.cond.notify_all();
    }
    let VcpuContext {
        devices,
        mmio,
        events,
        events_ready,
        lockdown,
        boot_state,
        snapshot_msrs,
    } = ctx;
    let control = ControlContext {
        boot_state: &boot_state,
        snapshot_msrs: &snapshot_msrs,
    };
    // The filter goes on first: the thread is never seen unfiltered once the VM is built,
    // even while it waits for `cont` under -S.
    if let Err(reason) = lockdown() {
        send_event(&events, &events_ready, VcpuEvent::Fatal { index, reason });
        park_until_exit(shared);
        return;
    }
    {
        let mut st = shared.lock();
        st.locked_down = true;
        shared.cond.notify_all();
    }
    if !wait_for_release(shared) {
        let mut st = shared.lock();
        st.at = At::Exited;
        shared.cond.notify_all();
        return;
    }
    while control_point(index, &fd, &control, shared) {
        if let Step::Stop(event) = run_once(index, &mut fd, &devices, &mmio) {
            send_event(&events, &events_ready, event);
            park_until_exit(shared);
            break;
        }
    }
    let mut st = shared.lock();
    st.at = At::Exited;
    shared.cond.notify_all();
}

/// Waits until the controller releases the thread (true) or tells it to exit first (false).
fn wait_for_release(shared: &Shared) -> bool {
    let mut st = shared.lock();
    while st.want == Want::Hold {
        st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.want != Want::Exit
}

fn send_event(events: &Sender<VcpuEvent>, ready: &EventFd, event: VcpuEvent) {
    if events.send(event).is_ok() {
        if let Err(e) = ready.write(1) {
            log::error!("waking the event loop: {e}");
        }
    }
}

/// After a terminal event the guest must not run again; the thread waits to be told to exit
/// while still answering state queries.
fn park_until_exit(shared: &Shared) {
    let mut st = shared.lock();
    st.at = At::Paused;
    shared.cond.notify_all();
    while st.want != Want::Exit {
        if st.refresh_done < st.refresh_wanted {
            st.refresh_done = st.refresh_wanted;
            shared.cond.notify_all();
        }
        if st.reset_done < st.reset_wanted {
            st.reset_error = Some("the vCPU has stopped for good".to_string());
            st.reset_done = st.reset_wanted;
            shared.cond.notify_all();
        }
        if st.save_done < st.save_wanted {
            st.saved = Some(Err("the vCPU has stopped for good".to_string()));
            st.save_done = st.save_wanted;
            shared.cond.notify_all();
        }
        st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.at = At::Exited;
    shared.cond.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::Discard;
    use kvm_bindings::kvm_userspace_memory_region;

    #[test]
    fn a_paused_vcpu_saves_its_state_and_a_running_one_refuses() {
        let Some(kvm) = crate::test_kvm::kvm_or_skip(
            "vcpu::a_paused_vcpu_saves_its_state_and_a_running_one_refuses",
        ) else {
            return;
        };
        register_kick_handler().unwrap();
        let vm = kvm.create_vm().unwrap();
        // One page of guest code at 0: `jmp $`, a real-mode loop that keeps the vCPU busy
        // at one instruction pointer.
        let code = [0xebu8, 0xfe];
        // SAFETY: an anonymous private mapping of one page, checked below; it is never
        // unmapped, so it outlives the memory slot.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // SAFETY: `mem` is a fresh writable page and `code` is shorter than it.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast(), code.len()) };
        // SAFETY: the region describes the page mapped above, which stays mapped.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: 4096,
                userspace_addr: mem as u64,
                flags: 0,
            })
            .unwrap();
        }
        vm.create_irq_chip().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0;
        regs.rflags = 2;
        fd.set_regs(&regs).unwrap();
        let boot_state = VcpuState::save(&fd, 0).unwrap();
        let (events, _rx) = std::sync::mpsc::channel();
        let ctx = VcpuContext {
            devices: Arc::new(LegacyDevices::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                Box::new(Discard),
            )),
            mmio: Arc::new(MmioBus::new()),
            events,
            events_ready: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            lockdown: Box::new(|| Ok(())),
            boot_state,
            snapshot_msrs: kvm.get_msr_index_list().unwrap().as_slice().into(),
        };
        let mut vcpu = Vcpu::spawn(0, fd, ctx).unwrap();
        vcpu.release();
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(vcpu.save_snapshot(), Err(VcpuError::NotPaused(0))));
        vcpu.pause().unwrap();
        let saved = format!("{:?}", vcpu.save_snapshot().unwrap());
        assert!(saved.contains("rip: 0,"), "{saved}");
        vcpu.stop();
    }
}
