//! Seccomp roles of a running `citadel`, checked from outside.
//!
//! Every task of the VMM must carry a filter, the VM must keep working under them (QMP, vCPU
//! exits, pause and resume, quit), and a forbidden syscall made by any thread must kill the
//! whole process with SIGSYS. The forbidden syscalls are made the way injected code would make
//! them: the test stops a thread with ptrace, points it back at the `syscall` instruction it
//! was blocked in, with another syscall number and arguments, and lets it run. An allowed
//! syscall injected the same way leaves the VM running, which shows the deaths come from the
//! filters and not from the injection.
//!
//! The device launcher, started the way the VMM starts it, is checked the same way: a
//! forbidden syscall injected into it kills it (and its backends with it), an allowed one and
//! `clone3` (ENOSYS) leave it serving.
//!
//! The same checks on each role's allowlist in isolation (fork, install, call) are unit tests
//! of the citadel-seccomp crate.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use citadel_tests::vm::Qmp;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running citadel with a QMP connection; killed on drop.
struct Vmm {
    child: Child,
    qmp: Qmp,
    dir: PathBuf,
}

fn prerequisites(test: &str) -> Option<(PathBuf, PathBuf)> {
    let citadel = citadel_tests::profile_dir().join("citadel");
    let guest = citadel_tests::profile_dir()
        .parent()
        .map(|p| p.join("guest").join("smp.elf"))?;
    if !citadel.exists() || !guest.exists() {
        citadel_tests::skip(
            test,
            "citadel or guest/smp.elf not built (cargo build -p citadel; make -C guest)",
            true,
        );
        return None;
    }
    if !Path::new("/dev/kvm").exists() {
        citadel_tests::skip(test, "no /dev/kvm", false);
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        citadel_tests::skip(test, "ptrace of the VMM needs root", false);
        return None;
    }
    Some((citadel, guest))
}

fn scratch_dir() -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir =
        std::env::temp_dir().join(format!("citadel-seccomp-roles-{}-{n}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

impl Vmm {
    fn start(citadel: &Path, guest: &Path) -> Vmm {
        Vmm::start_with(citadel, guest, &[])
    }

    fn start_with(citadel: &Path, guest: &Path, extra: &[&str]) -> Vmm {
        let dir = scratch_dir();
        let socket = dir.join("qmp.sock");
        let child = Command::new(citadel)
            .args(["-machine", "microvm", "-kernel"])
            .arg(guest)
            .args(["-m", "64", "-smp", "2", "-serial", "null", "-qmp"])
            .arg(format!("unix:{},server,nowait", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start citadel");
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(20));
        assert!(qmp.greeting["QMP"].is_object());
        assert!(qmp.execute("qmp_capabilities", None)["return"].is_object());
        Vmm { child, qmp, dir }
    }

    fn execute(&mut self, command: &str) -> serde_json::Value {
        self.qmp.execute(command, None)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Thread ids of the vCPUs, from QMP.
    fn vcpu_threads(&mut self) -> Vec<i32> {
        let cpus = self.execute("query-cpus");
        cpus["return"]
            .as_array()
            .expect("query-cpus list")
            .iter()
            .map(|cpu| cpu["thread_id"].as_i64().expect("thread_id") as i32)
            .collect()
    }

    /// Waits for the VMM to end and returns the signal that killed it, if any.
    fn wait_signal(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.signal();
            }
            assert!(Instant::now() < deadline, "VMM still running");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A syscall to inject: number and up to three arguments.
#[derive(Clone, Copy, Debug)]
struct Syscall {
    name: &'static str,
    nr: i64,
    args: [u64; 3],
}

const EXECVE: Syscall = Syscall {
    name: "execve",
    nr: libc::SYS_execve,
    args: [0, 0, 0],
};
const INET_SOCKET: Syscall = Syscall {
    name: "socket(AF_INET)",
    nr: libc::SYS_socket,
    args: [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
};
const PTRACE: Syscall = Syscall {
    name: "ptrace(PTRACE_TRACEME)",
    nr: libc::SYS_ptrace,
    args: [libc::PTRACE_TRACEME as u64, 0, 0],
};
/// KVM_CREATE_VM on descriptor 0: the event loop may use some KVM ioctls, never this one.
const CREATE_VM: Syscall = Syscall {
    name: "ioctl(KVM_CREATE_VM)",
    nr: libc::SYS_ioctl,
    args: [0, 0xae01, 0],
};
/// openat with a NULL path: the filter decides before the kernel would read it.
const OPENAT: Syscall = Syscall {
    name: "openat",
    nr: libc::SYS_openat,
    args: [libc::AT_FDCWD as u64, 0, libc::O_RDONLY as u64],
};
/// Signal 0 to process 1: the event loop signals only its own threads.
const TGKILL_OTHER: Syscall = Syscall {
    name: "tgkill(1, 1, 0)",
    nr: libc::SYS_tgkill,
    args: [1, 1, 0],
};
const GETPID: Syscall = Syscall {
    name: "getpid",
    nr: libc::SYS_getpid,
    args: [0, 0, 0],
};

fn ptrace_call(request: libc::c_uint, tid: i32, addr: u64, data: u64) -> i64 {
    // SAFETY: the requests passed here take plain integers as address and data.
    unsafe {
        libc::ptrace(
            request,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    }
}

fn get_regs(tid: i32) -> libc::user_regs_struct {
    // SAFETY: user_regs_struct is plain integers; zeroed is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: GETREGS writes one user_regs_struct to the live `regs`.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            &mut regs as *mut libc::user_regs_struct,
        )
    };
    assert_eq!(ret, 0, "GETREGS {tid}");
    regs
}

fn set_regs(tid: i32, regs: &libc::user_regs_struct) {
    // SAFETY: SETREGS reads one user_regs_struct from the live `regs`.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGS,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            regs as *const libc::user_regs_struct,
        )
    };
    assert_eq!(ret, 0, "SETREGS {tid}");
}

fn wait_stop(tid: i32) {
    let mut status = 0;
    // SAFETY: waits for a traced thread with a valid status pointer.
    let ret = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(ret, tid, "waitpid on traced thread {tid}");
    assert!(
        libc::WIFSTOPPED(status),
        "thread {tid} not stopped: {status:#x}"
    );
}

/// Seizes thread `tid` and stops it inside a syscall, right after its `syscall` instruction.
/// Returns its registers.
fn stop_in_syscall(tid: i32) -> libc::user_regs_struct {
    assert_eq!(ptrace_call(libc::PTRACE_SEIZE, tid, 0, 0), 0, "seize {tid}");
    for _ in 0..100 {
        assert_eq!(
            ptrace_call(libc::PTRACE_INTERRUPT, tid, 0, 0),
            0,
            "interrupt {tid}"
        );
        wait_stop(tid);
        let regs = get_regs(tid);
        // Only a thread stopped inside a blocking syscall sits right after a `syscall`
        // instruction with the kernel's restart code in rax; one stopped just after a syscall
        // that completed has its result there instead, and re-running that syscall on restore
        // would repeat it (a second send of the same QMP reply, say). KVM_RUN reports EINTR
        // itself, and citadel runs it again after EINTR anyway.
        let rax = regs.rax as i64;
        let restartable = matches!(-rax, 4 | 512 | 513 | 514 | 516);
        if regs.orig_rax as i64 >= 0 && restartable {
            let word = ptrace_call(libc::PTRACE_PEEKTEXT, tid, regs.rip - 2, 0) as u64;
            if word & 0xffff == 0x050f {
                return regs;
            }
        }
        assert_eq!(ptrace_call(libc::PTRACE_CONT, tid, 0, 0), 0);
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("thread {tid} never caught inside a syscall");
}

/// Registers that make the thread execute `call` from the `syscall` instruction at rip - 2.
fn with_call(mut regs: libc::user_regs_struct, call: Syscall) -> libc::user_regs_struct {
    regs.rip -= 2;
    // No restart of the interrupted syscall on the way back to user space.
    regs.orig_rax = u64::MAX;
    regs.rax = call.nr as u64;
    regs.rdi = call.args[0];
    regs.rsi = call.args[1];
    regs.rdx = call.args[2];
    regs
}

/// Makes thread `tid` execute `call` from the `syscall` instruction it is blocked in, then
/// releases it.
fn inject(tid: i32, call: Syscall) {
    let regs = stop_in_syscall(tid);
    set_regs(tid, &with_call(regs, call));
    assert_eq!(ptrace_call(libc::PTRACE_DETACH, tid, 0, 0), 0);
}

/// Like `inject`, but runs the thread only through `call`, returns its result and puts the
/// thread back into the syscall it was interrupted in.
fn inject_and_restore(tid: i32, call: Syscall) -> i64 {
    let saved = stop_in_syscall(tid);
    run_and_restore(tid, saved, call)
}

/// Runs `call` on the stopped thread `tid` (stopped with `saved` registers), returns its
/// result and puts the thread back into the syscall it was interrupted in.
fn run_and_restore(tid: i32, saved: libc::user_regs_struct, call: Syscall) -> i64 {
    set_regs(tid, &with_call(saved, call));
    for _ in 0..2 {
        // Entry, then exit of the injected syscall.
        assert_eq!(ptrace_call(libc::PTRACE_SYSCALL, tid, 0, 0), 0);
        wait_stop(tid);
    }
    let result = get_regs(tid).rax as i64;
    let mut restart = saved;
    restart.rip -= 2;
    restart.rax = saved.orig_rax;
    restart.orig_rax = u64::MAX;
    set_regs(tid, &restart);
    assert_eq!(ptrace_call(libc::PTRACE_DETACH, tid, 0, 0), 0);
    result
}

/// Stops `tid` in a syscall, writes `bytes` below its stack pointer, where nothing live is
/// kept while it waits in the kernel, and makes it run the call `make` builds from their
/// address. Returns the result and resumes the thread.
fn inject_with_memory_and_restore(tid: i32, bytes: &[u8], make: impl Fn(u64) -> Syscall) -> i64 {
    let saved = stop_in_syscall(tid);
    let addr = (saved.rsp - 1024) & !7;
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let at = addr + 8 * i as u64;
        assert_eq!(
            ptrace_call(libc::PTRACE_POKEDATA, tid, at, u64::from_ne_bytes(word)),
            0,
            "poke {at:#x}"
        );
    }
    run_and_restore(tid, saved, make(addr))
}

/// `unlink(path)` made by the event loop.
fn inject_unlink(vmm: &Vmm, path: &Path) -> i64 {
    let mut bytes = path.as_os_str().as_encoded_bytes().to_vec();
    bytes.push(0);
    inject_with_memory_and_restore(vmm.pid(), &bytes, |addr| Syscall {
        name: "unlink",
        nr: libc::SYS_unlink,
        args: [addr, 0, 0],
    })
}

/// Makes `tid` call `clone3` for a plain new process (first-version `struct clone_args`,
/// exit signal SIGCHLD); returns the result.
fn inject_clone3_and_restore(tid: i32) -> i64 {
    let mut args = [0u64; 8];
    args[4] = libc::SIGCHLD as u64;
    let bytes: Vec<u8> = args.iter().flat_map(|w| w.to_ne_bytes()).collect();
    inject_with_memory_and_restore(tid, &bytes, |addr| Syscall {
        name: "clone3",
        nr: libc::SYS_clone3,
        args: [addr, 64, 0],
    })
}

/// Child processes of any task of `pid`, from /proc/<pid>/task/*/children.
fn children(pid: i32) -> String {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let tid = e.unwrap().file_name().to_string_lossy().into_owned();
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).ok()
        })
        .collect::<String>()
        .trim()
        .to_string()
}

fn assert_killed(citadel: &Path, guest: &Path, role: &str, call: Syscall, on_vcpu: bool) {
    let mut vmm = Vmm::start(citadel, guest);
    let tid = if on_vcpu {
        vmm.vcpu_threads()[0]
    } else {
        vmm.pid()
    };
    inject(tid, call);
    let signal = vmm.wait_signal();
    assert_eq!(
        signal,
        Some(libc::SIGSYS),
        "{} on the {role} thread: expected the VMM to die of SIGSYS",
        call.name
    );
}

fn task_status(pid: i32) -> Vec<(String, String)> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| {
            let tid = e.unwrap().file_name().to_string_lossy().into_owned();
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            (tid, status)
        })
        .collect()
}

#[test]
fn every_thread_is_filtered_and_the_vm_keeps_working() {
    let test = "every_thread_is_filtered_and_the_vm_keeps_working";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    let mut vmm = Vmm::start(&citadel, &guest);
    let vcpus = vmm.vcpu_threads();
    assert_eq!(vcpus.len(), 2);
    let tasks = task_status(vmm.pid());
    for vcpu in &vcpus {
        assert!(
            tasks.iter().any(|(tid, _)| *tid == vcpu.to_string()),
            "vCPU {vcpu} is not a task"
        );
    }
    for (tid, status) in &tasks {
        assert!(
            status.contains("Seccomp:\t2\n"),
            "task {tid} unfiltered:\n{status}"
        );
        assert!(status.contains("NoNewPrivs:\t1\n"), "task {tid}");
    }
    // The filtered VMM still does its job: pause, resume, report, quit cleanly.
    for command in [
        "stop",
        "cont",
        "query-status",
        "query-hotpluggable-cpus",
        "query-cpus",
    ] {
        let reply = vmm.execute(command);
        assert!(reply.get("return").is_some(), "{command}: {reply}");
    }
    assert_eq!(vmm.execute("query-status")["return"]["running"], true);
    assert!(vmm.execute("quit").get("return").is_some());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = vmm.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "VMM did not quit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "quit under the filters: {status:?}");
}

#[test]
fn forbidden_syscalls_on_a_vcpu_thread_kill_the_vmm() {
    let test = "forbidden_syscalls_on_a_vcpu_thread_kill_the_vmm";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    for call in [EXECVE, INET_SOCKET, PTRACE, CREATE_VM] {
        assert_killed(&citadel, &guest, "vcpu", call, true);
    }
}

#[test]
fn forbidden_syscalls_on_the_event_loop_kill_the_vmm() {
    let test = "forbidden_syscalls_on_the_event_loop_kill_the_vmm";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    for call in [EXECVE, INET_SOCKET, PTRACE, CREATE_VM, OPENAT, TGKILL_OTHER] {
        assert_killed(&citadel, &guest, "event loop", call, false);
    }
}

/// fallocate on descriptor 0: the balloon punches guest RAM through its mapping, never
/// through a descriptor.
const FALLOCATE: Syscall = Syscall {
    name: "fallocate(PUNCH_HOLE)",
    nr: libc::SYS_fallocate,
    args: [
        0,
        (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
        0,
    ],
};

/// What the balloon needs on the event loop, `madvise(MADV_REMOVE)` on guest RAM, works on a
/// running VMM's event loop; `fallocate`, which it does not need, kills the VMM.
#[test]
fn the_event_loop_returns_guest_ram_with_madv_remove_and_may_not_fallocate() {
    let test = "the_event_loop_returns_guest_ram_with_madv_remove_and_may_not_fallocate";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    let mut vmm = Vmm::start_with(&citadel, &guest, &["-device", "virtio-balloon-device"]);
    let maps = fs::read_to_string(format!("/proc/{}/maps", vmm.pid())).unwrap();
    let range = maps
        .lines()
        .find(|l| l.contains("citadel-guest-ram"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|r| r.split_once('-'))
        .expect("a guest RAM mapping");
    let end = u64::from_str_radix(range.1, 16).unwrap();
    // The last page of guest RAM: the idle guest never touches it.
    let rc = inject_and_restore(
        vmm.pid(),
        Syscall {
            name: "madvise(MADV_REMOVE)",
            nr: libc::SYS_madvise,
            args: [end - 4096, 4096, libc::MADV_REMOVE as u64],
        },
    );
    assert_eq!(rc, 0, "madvise(MADV_REMOVE) on the event loop");
    std::thread::sleep(Duration::from_millis(100));
    assert!(vmm.child.try_wait().unwrap().is_none(), "VMM died");
    let status = vmm.execute("query-status");
    assert_eq!(status["return"]["running"], true, "{status}");
    assert_killed(&citadel, &guest, "event loop", FALLOCATE, false);
}

#[test]
fn an_allowed_syscall_injected_the_same_way_is_harmless() {
    let test = "an_allowed_syscall_injected_the_same_way_is_harmless";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    let mut vmm = Vmm::start(&citadel, &guest);
    let vcpu = vmm.vcpu_threads()[0];
    let pid = i64::from(vmm.pid());
    assert_eq!(
        inject_and_restore(vcpu, GETPID),
        pid,
        "getpid on a vCPU thread"
    );
    assert_eq!(
        inject_and_restore(vmm.pid(), GETPID),
        pid,
        "getpid on the event loop"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(vmm.child.try_wait().unwrap().is_none(), "VMM died");
    let status = vmm.execute("query-status");
    assert_eq!(status["return"]["running"], true, "{status}");
}

#[test]
fn clone3_returns_enosys_on_every_thread_and_creates_no_process() {
    let test = "clone3_returns_enosys_on_every_thread_and_creates_no_process";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    let mut vmm = Vmm::start(&citadel, &guest);
    let vcpu = vmm.vcpu_threads()[0];
    // The device launcher, forked before the filters went in, is the VMM's only child.
    let launcher = children(vmm.pid());
    assert_eq!(launcher.split_whitespace().count(), 1, "{launcher:?}");
    let enosys = -i64::from(libc::ENOSYS);
    assert_eq!(inject_clone3_and_restore(vcpu), enosys, "clone3 on a vCPU");
    assert_eq!(
        inject_clone3_and_restore(vmm.pid()),
        enosys,
        "clone3 on the event loop"
    );
    assert_eq!(children(vmm.pid()), launcher, "clone3 created a process");
    std::thread::sleep(Duration::from_millis(100));
    assert!(vmm.child.try_wait().unwrap().is_none(), "VMM died");
    let status = vmm.execute("query-status");
    assert_eq!(status["return"]["running"], true, "{status}");
}

#[test]
fn landlock_keeps_the_running_vmm_from_removing_files_outside_its_own_directories() {
    let test = "landlock_keeps_the_running_vmm_from_removing_files_outside_its_own_directories";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    // At the kernel's own ABI, and capped at ABI 1 (Linux 5.13) as on an older kernel: the
    // event loop's one path syscall, unlink, is confined the same way at every level.
    for extra in [&[][..], &["-sandbox", "landlock=on,landlock-abi=1"][..]] {
        let mut vmm = Vmm::start_with(&citadel, &guest, extra);
        let elsewhere = scratch_dir();
        let victim = elsewhere.join("victim");
        fs::write(&victim, b"host file").unwrap();
        assert_eq!(
            inject_unlink(&vmm, &victim),
            -i64::from(libc::EACCES),
            "unlink outside the QMP socket's directory ({extra:?})"
        );
        assert!(victim.exists(), "{extra:?}: the file is gone");
        // The grant it keeps: its own directory, where the QMP socket lives.
        let own = vmm.dir.join("stale");
        fs::write(&own, b"").unwrap();
        assert_eq!(inject_unlink(&vmm, &own), 0, "unlink in its own directory");
        let status = vmm.execute("query-status");
        assert_eq!(status["return"]["running"], true, "{extra:?}: {status}");
        let _ = fs::remove_dir_all(&elsewhere);
    }
}

#[test]
fn without_landlock_the_event_loop_may_not_remove_any_file() {
    let test = "without_landlock_the_event_loop_may_not_remove_any_file";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    // Turned off explicitly, the VM runs, quits cleanly and leaves its socket behind, since
    // the stricter allowlist has no unlink.
    let mut vmm = Vmm::start_with(&citadel, &guest, &["-sandbox", "landlock=off"]);
    assert_eq!(vmm.execute("query-status")["return"]["running"], true);
    assert!(vmm.execute("quit").get("return").is_some());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = vmm.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "VMM did not quit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        vmm.dir.join("qmp.sock").exists(),
        "socket removed without unlink?"
    );

    // And an unlink made by injected code kills it.
    let mut vmm = Vmm::start_with(&citadel, &guest, &["-sandbox", "landlock=off"]);
    let victim = vmm.dir.join("victim");
    fs::write(&victim, b"").unwrap();
    let saved = stop_in_syscall(vmm.pid());
    let unlink = Syscall {
        name: "unlink",
        nr: libc::SYS_unlink,
        args: [0, 0, 0],
    };
    set_regs(vmm.pid(), &with_call(saved, unlink));
    assert_eq!(ptrace_call(libc::PTRACE_DETACH, vmm.pid(), 0, 0), 0);
    assert_eq!(vmm.wait_signal(), Some(libc::SIGSYS));
    assert!(victim.exists());
}

#[test]
fn without_landlock_citadel_refuses_to_start_unless_told() {
    let test = "without_landlock_citadel_refuses_to_start_unless_told";
    let Some((citadel, guest)) = prerequisites(test) else {
        return;
    };
    // landlock-abi=0 makes this kernel look like one without Landlock: the cap can lower what
    // is enforced, never skip it, so this is a refusal, before any file is created.
    let dir = scratch_dir();
    let socket = dir.join("qmp.sock");
    let out = Command::new(&citadel)
        .args(["-machine", "microvm", "-kernel"])
        .arg(&guest)
        .args(["-m", "64", "-serial", "null", "-sandbox", "landlock-abi=0"])
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", socket.display()))
        .arg("-pidfile")
        .arg(dir.join("pid"))
        .stdin(Stdio::null())
        .output()
        .expect("run citadel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("Landlock is not available") && stderr.contains("-sandbox landlock=off"),
        "{stderr}"
    );
    assert!(dir_is_empty(&dir), "citadel left files behind");
    let _ = fs::remove_dir_all(&dir);
}

fn dir_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}

/// A launcher started from this test, with one citadel-blk serving a 1 MiB scratch image.
fn launcher_with_a_backend(
    test: &str,
) -> (
    citadel_launcher::Launcher,
    citadel_launcher::Backend,
    PathBuf,
) {
    let dir = scratch_dir();
    let image = dir.join("disk.raw");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let launcher = citadel_launcher::Launcher::start(citadel_launcher::LauncherConfig {
        blk_binary: citadel_tests::binary("citadel-blk"),
        net_binary: citadel_tests::binary("citadel-net"),
        seccomp_action: citadel_seccomp::Mode::Kill,
        landlock: true,
    })
    .unwrap_or_else(|e| panic!("{test}: starting the launcher: {e}"));
    let backend = launcher
        .spawn_blk(citadel_launcher::BlkSpec {
            id: "disk0".into(),
            image: citadel_launcher::ImageSource::Path(image),
            read_only: true,
            direct: false,
            serial: None,
        })
        .unwrap_or_else(|e| panic!("{test}: starting citadel-blk: {e}"));
    (launcher, backend, dir)
}

/// mount(NULL, NULL, NULL, 0, NULL): the filter decides before the kernel reads anything.
const MOUNT: Syscall = Syscall {
    name: "mount",
    nr: libc::SYS_mount,
    args: [0, 0, 0],
};

#[test]
fn forbidden_syscalls_in_the_launcher_kill_it_and_its_backends() {
    let test = "forbidden_syscalls_in_the_launcher_kill_it_and_its_backends";
    for call in [INET_SOCKET, PTRACE, CREATE_VM, MOUNT] {
        let (launcher, backend, dir) = launcher_with_a_backend(test);
        let (pid, backend) = (launcher.pid(), backend.pid);
        inject(pid, call);
        let mut status = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: the launcher is this test's child; a valid status pointer.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            assert!(
                Instant::now() < deadline,
                "{} in the launcher: it is still running",
                call.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{} in the launcher: expected death by SIGSYS, wait status {status:#x}",
            call.name
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{backend}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !Path::new(&format!("/proc/{backend}")).exists(),
            "citadel-blk {backend} outlived its launcher"
        );
        drop(launcher);
        fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn the_launcher_survives_allowed_calls_and_gets_enosys_for_clone3() {
    let test = "the_launcher_survives_allowed_calls_and_gets_enosys_for_clone3";
    let (launcher, backend, dir) = launcher_with_a_backend(test);
    let (pid, backend) = (launcher.pid(), backend.pid);
    assert_eq!(inject_and_restore(pid, GETPID), i64::from(pid));
    assert_eq!(
        inject_clone3_and_restore(pid),
        -i64::from(libc::ENOSYS),
        "clone3 in the launcher"
    );
    assert_eq!(
        children(pid),
        backend.to_string(),
        "clone3 created a process"
    );
    // Still serving requests.
    launcher.stop(backend).expect("stop after the injections");
    assert_eq!(children(pid), "");
    drop(launcher);
    fs::remove_dir_all(dir).unwrap();
}
