//! The monitor: owns the machine and its run state, executes QMP commands, and runs the event
//! loop that serves QMP clients, serial input, guest reset requests, vCPU events and host
//! signals on one thread.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use citadel_qmp::balloon::BalloonInfo;
use citadel_qmp::command::{command_names, Command, Request};
use citadel_qmp::error::QmpError;
use citadel_qmp::event::{Event, ShutdownReason};
use citadel_qmp::reply::{
    CommandInfo, CpuInfo, CpuProps, HotpluggableCpu, RunState, StatusInfo, UuidInfo,
};
use serde_json::Value;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::balloon::change_events::ChangeEvents;
use crate::hotplug::{Deletion, Hotplug};
use crate::machine::Machine;
use crate::migration::Migration;
use crate::qmp_server::{QmpServer, Response};
use crate::vcpu::VcpuEvent;

const TOKEN_SIGNAL: u64 = 1;
const TOKEN_VCPU: u64 = 3;
const TOKEN_STDIN: u64 = 4;
const TOKEN_QMP_LISTENER: u64 = 5;
const TOKEN_DEVICE_START: u64 = 6;
const TOKEN_SLOT_KICKS: u64 = 7;
const TOKEN_BALLOON: u64 = 8;
const TOKEN_BACKEND_HANGUPS: u64 = 9;
const TOKEN_PCI_EJECTS: u64 = 10;
const TOKEN_QMP_FIRST_CLIENT: u64 = 16;

/// How long queued QMP output may take to drain at exit.
const EXIT_DRAIN: Duration = Duration::from_millis(200);

/// Why the VM ended; decides the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// `quit` over QMP.
    Quit,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
    /// The guest reset or powered off the machine.
    Guest(ShutdownReason),
    /// KVM could not run the guest.
    Fatal(String),
}

impl ExitReason {
    /// The process exit code: 0 for orderly ends, 1 when the VM failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Fatal(_) => 1,
            _ => 0,
        }
    }
}

/// Errors that stop the event loop itself.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// epoll or an eventfd failed.
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
    /// The QMP socket could not be set up.
    #[error(transparent)]
    Qmp(#[from] crate::qmp_server::ServerError),
    /// The vCPUs could not be started.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_exit_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of the right
        // size; the eventfd outlives the handler's registration (it is owned by the Monitor
        // for the life of the process).
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
}

/// The event loop's sources, created before the machine so that the machine can be wired
/// to them.
pub struct Channels {
    /// Signalled when a vCPU event is queued.
    pub vcpu_ready: EventFd,
    /// Host signal notifications.
    signal: EventFd,
}

impl Channels {
    /// Creates the eventfds.
    pub fn new() -> Result<Channels, MonitorError> {
        Ok(Channels {
            vcpu_ready: EventFd::new(libc::EFD_NONBLOCK)?,
            signal: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
}

/// The monitor and its event loop.
pub struct Monitor {
    machine: Machine,
    hotplug: Hotplug,
    /// What `query-uuid` reports.
    uuid: String,
    state: RunState,
    exit: Option<ExitReason>,
    epoll: Epoll,
    qmp: Option<QmpServer>,
    channels: Channels,
    vcpu_events: Receiver<VcpuEvent>,
    stdin: Option<RawFd>,
    pending_input: Vec<u8>,
    /// `BALLOON_CHANGE` reports, when the machine has a balloon.
    balloon_events: Option<ChangeEvents>,
    /// The last snapshot's progress.
    migration: Migration,
}

impl Monitor {
    /// Sets up the event loop around a built machine. `qmp_path` is where clients connect;
    /// `serial_stdin` says whether host stdin feeds the guest's UART.
    pub fn new(
        machine: Machine,
        hotplug: Hotplug,
        channels: Channels,
        vcpu_events: Receiver<VcpuEvent>,
        qmp: Option<(QmpServer, Epoll)>,
        serial_stdin: bool,
        start_paused: bool,
    ) -> Result<Monitor, MonitorError> {
        let (qmp, epoll) = match qmp {
            Some((server, epoll)) => (Some(server), epoll),
            None => (None, Epoll::new()?),
        };
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(channels.signal.as_raw_fd(), TOKEN_SIGNAL)?;
        add(channels.vcpu_ready.as_raw_fd(), TOKEN_VCPU)?;
        add(
            machine.virtio().activation_event().as_raw_fd(),
            TOKEN_DEVICE_START,
        )?;
        add(machine.virtio().slot_kicks_fd(), TOKEN_SLOT_KICKS)?;
        let balloon_events = match machine.virtio().balloon() {
            Some(balloon) => {
                add(balloon.events_fd(), TOKEN_BALLOON)?;
                Some(ChangeEvents::new(balloon.actual_bytes()))
            }
            None => None,
        };
        add(machine.virtio().backend_hangups_fd(), TOKEN_BACKEND_HANGUPS)?;
        if let Some(pci) = machine.virtio().pci() {
            add(pci.host().eject_event().as_raw_fd(), TOKEN_PCI_EJECTS)?;
        }
        let stdin = if serial_stdin {
            // stdin may be /dev/null or a file, which epoll refuses; then there is no input.
            match add(libc::STDIN_FILENO, TOKEN_STDIN) {
                Ok(()) => Some(libc::STDIN_FILENO),
                Err(e) => {
                    log::debug!("serial input disabled: {e}");
                    None
                }
            }
        } else {
            None
        };
        SIGNAL_FD.store(channels.signal.as_raw_fd(), Ordering::SeqCst);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            vmm_sys_util::signal::register_signal_handler(sig, on_exit_signal)
                .map_err(MonitorError::Signal)?;
        }
        Ok(Monitor {
            machine,
            hotplug,
            uuid: UuidInfo::NONE.to_string(),
            state: if start_paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            },
            exit: None,
            epoll,
            qmp,
            channels,
            vcpu_events,
            stdin,
            pending_input: Vec::new(),
            balloon_events,
            migration: Migration::default(),
        })
    }

    /// The monitor reporting `uuid` (`-uuid`) to `query-uuid`.
    pub fn with_uuid(self, uuid: String) -> Monitor {
        Monitor { uuid, ..self }
    }

    /// Creates the epoll set and binds the QMP socket in it; done before the machine exists
    /// so that a bad socket path fails early.
    pub fn bind_qmp(path: &std::path::Path, mode: u32) -> Result<(QmpServer, Epoll), MonitorError> {
        let epoll = Epoll::new()?;
        let server = QmpServer::bind(
            path,
            mode,
            &epoll,
            TOKEN_QMP_LISTENER,
            TOKEN_QMP_FIRST_CLIENT,
        )?;
        Ok((server, epoll))
    }

    /// Starts the guest and serves events until the VM ends.
    pub fn run(mut self) -> Result<ExitReason, MonitorError> {
        if self.state == RunState::Running {
            self.machine.start();
        }
        self.machine.wait_locked_down()?;
        let mut events = vec![EpollEvent::default(); 32];
        while self.exit.is_none() {
            // A rate-limited BALLOON_CHANGE waiting for its turn bounds the sleep.
            let timeout = self
                .balloon_events
                .as_ref()
                .and_then(|e| e.timeout(Instant::now()))
                .map_or(-1, |t| i32::try_from(t.as_millis() + 1).unwrap_or(i32::MAX));
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                self.dispatch(ev.data(), ev.event_set());
                if self.exit.is_some() {
                    break;
                }
            }
            self.report_balloon(false);
        }
        let reason = self.exit.take().unwrap_or(ExitReason::Quit);
        self.finish(&reason);
        Ok(reason)
    }

    fn dispatch(&mut self, token: u64, set: EventSet) {
        match token {
            TOKEN_SIGNAL => {
                // Drain the counter; the value is irrelevant.
                let _ = self.channels.signal.read();
                let sig = LAST_SIGNAL.load(Ordering::SeqCst);
                log::info!("signal {sig}: shutting down");
                self.end(
                    ExitReason::Signal(sig),
                    Event::shutdown(false, ShutdownReason::HostSignal),
                );
            }
            TOKEN_VCPU => {
                let _ = self.channels.vcpu_ready.read();
                while let Ok(ev) = self.vcpu_events.try_recv() {
                    self.on_vcpu_event(ev);
                }
            }
            TOKEN_STDIN => self.on_stdin(set),
            TOKEN_DEVICE_START => self.machine.virtio().run_pending_activations(),
            TOKEN_SLOT_KICKS => self.machine.virtio().serve_empty_slots(),
            TOKEN_BALLOON => {
                if let Some(balloon) = self.machine.virtio().balloon() {
                    balloon.serve();
                }
                self.report_balloon(true);
            }
            TOKEN_BACKEND_HANGUPS => self.hotplug.restart_backends(self.machine.virtio()),
            TOKEN_PCI_EJECTS => {
                let deleted = self.hotplug.pci_ejected(self.machine.virtio());
                if let Some(server) = self.qmp.as_mut() {
                    for id in &deleted {
                        server.broadcast(&Event::device_deleted(id, id));
                    }
                    // Nothing else is on its way to the clients: the events are sent now.
                    server.flush_all(&self.epoll);
                }
            }
            _ => {
                let Some(server) = self.qmp.as_mut() else {
                    return;
                };
                if server.owns(token) {
                    let machine = &self.machine;
                    let hotplug = &mut self.hotplug;
                    let state = &mut self.state;
                    let exit = &mut self.exit;
                    let migration = &mut self.migration;
                    let uuid = self.uuid.as_str();
                    server.on_ready(&self.epoll, token, set, &mut |req, fd| {
                        let session = Session {
                            machine,
                            hotplug: &mut *hotplug,
                            uuid,
                            state: &mut *state,
                            exit: &mut *exit,
                            migration: &mut *migration,
                        };
                        execute(session, req, fd)
                    });
                }
            }
        }
    }

    /// Sends `BALLOON_CHANGED` and `BALLOON_CHANGE` when the guest's size moved (`changed`) or a rate-limited
    /// report is due.
    fn report_balloon(&mut self, changed: bool) {
        let (Some(events), Some(balloon)) = (
            self.balloon_events.as_mut(),
            self.machine.virtio().balloon(),
        ) else {
            return;
        };
        let actual = balloon.actual_bytes();
        let now = Instant::now();
        let report = if changed {
            events.changed(actual, now)
        } else {
            events.due(actual, now)
        };
        if let Some(actual) = report {
            log::info!(
                "balloon: the guest has {actual} bytes; {} bytes returned to the host so far",
                balloon.returned_bytes()
            );
        }
        if let (Some(actual), Some(server)) = (report, self.qmp.as_mut()) {
            // StratoVirt's clients wait for its name, QEMU's and libvirt's for theirs.
            server.broadcast(&Event::balloon_changed(actual));
            server.broadcast(&Event::balloon_change(actual));
            // Nothing else is on its way to the clients: the event is sent now.
            server.flush_all(&self.epoll);
        }
    }

    fn on_vcpu_event(&mut self, ev: VcpuEvent) {
        match ev {
            VcpuEvent::GuestReset => self.end(
                ExitReason::Guest(ShutdownReason::GuestReset),
                Event::shutdown(true, ShutdownReason::GuestReset),
            ),
            VcpuEvent::GuestShutdown => self.end(
                ExitReason::Guest(ShutdownReason::GuestShutdown),
                Event::shutdown(true, ShutdownReason::GuestShutdown),
            ),
            VcpuEvent::InternalError { index, reason } => self.internal_error(index, &reason),
            VcpuEvent::Fatal { index, reason } => {
                log::error!("vCPU {index}: {reason}");
                self.end(
                    ExitReason::Fatal(format!("vCPU {index}: {reason}")),
                    Event::shutdown(true, ShutdownReason::GuestPanic),
                );
            }
        }
    }

    /// As QEMU does: the VM stops in the `internal-error` state (STOP event) and stays there,
    /// for the management to inspect and quit; `cont` is refused.
    fn internal_error(&mut self, index: u8, reason: &str) {
        log::error!("vCPU {index}: {reason}; VM stopped in the internal-error state");
        if let Err(e) = self.machine.pause() {
            self.end(
                ExitReason::Fatal(format!("vCPU {index}: {reason}; stopping the VM: {e}")),
                Event::shutdown(false, ShutdownReason::HostError),
            );
            return;
        }
        let was_running = self.state == RunState::Running;
        self.state = RunState::InternalError;
        if was_running {
            if let Some(server) = self.qmp.as_mut() {
                server.broadcast(&Event::stop());
                // A client that only listens for events has nothing else coming to carry it.
                server.flush_all(&self.epoll);
            }
        }
    }

    fn end(&mut self, reason: ExitReason, event: Event) {
        if self.exit.is_some() {
            return;
        }
        if let Some(server) = self.qmp.as_mut() {
            server.broadcast(&event);
        }
        self.exit = Some(reason);
    }

    fn on_stdin(&mut self, set: EventSet) {
        let Some(fd) = self.stdin else { return };
        if set.intersects(EventSet::IN) && self.pending_input.is_empty() {
            let mut buf = [0u8; 64];
            // SAFETY: fd 0 stays open for the life of the process; ManuallyDrop keeps the
            // temporary File from closing it.
            let mut file = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            match file.read(&mut buf) {
                Ok(0) | Err(_) => {
                    self.stop_stdin();
                    return;
                }
                Ok(n) => self.pending_input.extend_from_slice(&buf[..n]),
            }
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.stop_stdin();
            return;
        }
        let taken = self.machine.devices().serial_input(&self.pending_input);
        self.pending_input.drain(..taken);
    }

    fn stop_stdin(&mut self) {
        if let Some(fd) = self.stdin.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn finish(&mut self, reason: &ExitReason) {
        log::info!("VM ends: {reason:?}");
        // Clients hear about the end before anything else is torn down.
        if let Some(server) = self.qmp.as_mut() {
            server.flush_all(&self.epoll);
            server.drain(EXIT_DRAIN);
        }
        self.machine.shutdown();
    }
}

/// What a QMP command may read or change.
struct Session<'a> {
    machine: &'a Machine,
    hotplug: &'a mut Hotplug,
    uuid: &'a str,
    state: &'a mut RunState,
    exit: &'a mut Option<ExitReason>,
    migration: &'a mut Migration,
}

/// Executes one negotiated QMP command.
fn execute(session: Session<'_>, req: &Request, fd: Option<OwnedFd>) -> Response {
    let Session {
        machine,
        hotplug,
        uuid,
        state,
        exit,
        migration,
    } = session;
    match &req.command {
        Command::QmpCapabilities { .. } => Response::reply(Ok(Value::Object(Default::default()))),
        Command::QueryStatus => Response::reply(to_value(&StatusInfo {
            running: *state == RunState::Running,
            singlestep: false,
            status: *state,
        })),
        Command::QueryCpus => Response::reply(
            machine
                .vcpu_info()
                .map_err(|e| QmpError::generic(e.to_string()))
                .and_then(|infos| {
                    let cpus: Vec<CpuInfo> = infos
                        .iter()
                        .map(|i| CpuInfo {
                            cpu: u32::from(i.index),
                            arch: "x86".to_string(),
                            current: i.index == 0,
                            halted: i.halted,
                            props: props(i.index),
                            qom_path: qom_path(i.index),
                            thread_id: i.tid,
                        })
                        .collect();
                    to_value(&cpus)
                }),
        ),
        Command::QueryHotpluggableCpus => {
            let cpus: Vec<HotpluggableCpu> = (0..machine.vcpu_count() as u8)
                .map(|i| HotpluggableCpu {
                    props: props(i),
                    qom_path: qom_path(i),
                    cpu_type: "host-x86-cpu".to_string(),
                    vcpus_count: 1,
                })
                .collect();
            Response::reply(to_value(&cpus))
        }
        Command::Stop => {
            if *state != RunState::Running {
                return Response::reply(Ok(empty()));
            }
            match machine.pause() {
                Ok(()) => {
                    *state = RunState::Paused;
                    Response {
                        events_before: vec![Event::stop()],
                        result: Ok(empty()),
                        events_after: Vec::new(),
                    }
                }
                Err(e) => Response::reply(Err(QmpError::generic(e.to_string()))),
            }
        }
        Command::Cont => {
            match *state {
                RunState::Paused => machine.resume(),
                RunState::Prelaunch => machine.start(),
                // QEMU's answer: the vCPU that failed cannot go on.
                RunState::InternalError => {
                    return Response::reply(Err(QmpError::generic(
                        "Resetting the Virtual Machine is required",
                    )))
                }
                _ => return Response::reply(Ok(empty())),
            }
            *state = RunState::Running;
            Response {
                events_before: vec![Event::resume()],
                result: Ok(empty()),
                events_after: Vec::new(),
            }
        }
        Command::Quit => {
            *exit = Some(ExitReason::Quit);
            Response {
                events_before: Vec::new(),
                result: Ok(empty()),
                events_after: vec![Event::shutdown(false, ShutdownReason::HostQmpQuit)],
            }
        }
        Command::SystemReset => {
            let event = Event::reset(false, ShutdownReason::HostQmpSystemReset);
            // Before the first `cont` (-S) the guest has not run: there is nothing to undo.
            if *state == RunState::Prelaunch {
                return Response {
                    events_before: vec![event],
                    result: Ok(empty()),
                    events_after: Vec::new(),
                };
            }
            let was_running = *state == RunState::Running;
            if was_running {
                if let Err(e) = machine.pause() {
                    return Response::reply(Err(QmpError::generic(e.to_string())));
                }
            }
            match machine.reset() {
                Ok(()) => {
                    if was_running {
                        machine.resume();
                    }
                    Response {
                        events_before: vec![event],
                        result: Ok(empty()),
                        events_after: Vec::new(),
                    }
                }
                Err(e) => {
                    // The guest may be half reset (or its kernel is no longer the one it was
                    // started with): it must not run again, so the VM ends, its vCPUs never
                    // resumed.
                    log::error!("system_reset failed, ending the VM: {e}");
                    *exit = Some(ExitReason::Fatal(format!("system_reset failed: {e}")));
                    Response {
                        events_before: Vec::new(),
                        result: Err(QmpError::generic(e.to_string())),
                        events_after: vec![Event::shutdown(false, ShutdownReason::HostError)],
                    }
                }
            }
        }
        Command::QueryUuid => Response::reply(to_value(&UuidInfo {
            uuid: uuid.to_string(),
        })),
        Command::QueryVersion => Response::reply(to_value(&crate::qmp_server::version())),
        Command::BlockdevAdd(add) => Response::reply(hotplug.blockdev_add(add)),
        Command::BlockdevDel { node_name } => Response::reply(hotplug.blockdev_del(node_name)),
        Command::DeviceAdd(add) => Response::reply(hotplug.device_add(machine.virtio(), add)),
        // As on StratoVirt's lightweight machine, a slot's device is gone before the reply:
        // the event comes first. A PCI card goes once the guest has released it: its event
        // comes from the event loop then.
        Command::DeviceDel { id } => match hotplug.device_del(machine.virtio(), id) {
            Ok(Deletion::Done(id)) => Response {
                events_before: vec![Event::device_deleted(&id, &id)],
                result: Ok(empty()),
                events_after: Vec::new(),
            },
            Ok(Deletion::Requested) => Response::reply(Ok(empty())),
            Err(e) => Response::reply(Err(e)),
        },
        Command::NetdevAdd(add) => Response::reply(hotplug.netdev_add(add)),
        Command::NetdevDel { id } => Response::reply(hotplug.netdev_del(id)),
        Command::QueryBlock => Response::reply(Ok(hotplug.query_block(machine.virtio()))),
        Command::Getfd { fdname } => Response::reply(hotplug.fds_mut().getfd(fdname, fd)),
        Command::Closefd { fdname } => Response::reply(hotplug.fds_mut().closefd(fdname)),
        Command::AddFd(add) => Response::reply(
            hotplug
                .fds_mut()
                .add_fd(add, fd)
                .and_then(|info| to_value(&info)),
        ),
        Command::RemoveFd(remove) => Response::reply(hotplug.fds_mut().remove_fd(remove)),
        Command::QueryFdsets => Response::reply(to_value(&hotplug.fds().query_fdsets())),
        Command::Balloon { value } => Response::reply(match machine.virtio().balloon() {
            Some(balloon) => balloon.set_target(*value).map(|()| empty()).map_err(|e| {
                QmpError::generic(format!("Cannot raise the balloon's interrupt: {e}"))
            }),
            None => Err(QmpError::device_not_active("balloon")),
        }),
        Command::QueryBalloon => Response::reply(match machine.virtio().balloon() {
            Some(balloon) => to_value(&BalloonInfo {
                actual: balloon.actual_bytes(),
            }),
            None => Err(QmpError::device_not_active("balloon")),
        }),
        Command::ChardevAdd(add) => Response::reply(hotplug.chardev_add(add)),
        Command::ChardevRemove { id } => Response::reply(hotplug.chardev_remove(id)),
        Command::QueryChardev => Response::reply(to_value(&hotplug.query_chardev())),
        Command::Migrate { dir } => migration.migrate(machine, hotplug.launcher(), state, dir),
        Command::QueryMigrate => Response::reply(to_value(migration.info())),
        Command::QueryCommands => {
            let list: Vec<CommandInfo> = command_names()
                .iter()
                .map(|n| CommandInfo {
                    name: (*n).to_string(),
                })
                .collect();
            Response::reply(to_value(&list))
        }
    }
}

fn empty() -> Value {
    Value::Object(Default::default())
}

fn props(index: u8) -> CpuProps {
    CpuProps {
        core_id: u32::from(index),
        socket_id: 0,
        thread_id: 0,
    }
}

fn qom_path(index: u8) -> String {
    format!("/machine/unattached/device[{index}]")
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|e| QmpError::generic(format!("encoding reply: {e}")))
}
