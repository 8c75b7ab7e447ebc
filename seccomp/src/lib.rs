//! Seccomp allowlists, one per role of a Citadel process or thread.
//!
//! Each role module lists the syscalls (with argument conditions where it matters, such as
//! ioctl request numbers, socket domains and memory protections) that the role needs and
//! nothing else. Policies are compiled with seccompiler into a BPF program and installed on the
//! calling thread only, so that every thread of the VMM can carry its own filter.
//!
//! Filters stack: a thread created after its parent installed a filter inherits it, and a
//! program started by `execve` keeps every filter of the process that started it. So the VMM
//! spawns its vCPU threads before any filter is in place and each thread then installs its own
//! role.
//!
//! A syscall outside the allowlist kills the whole process with `SIGSYS` ([`Mode::Kill`], the
//! default). [`Mode::Log`] lets it through and logs it to the kernel audit log; it exists to
//! find a missing entry and is never the default.
//!
//! `clone3` fails with `ENOSYS` in every role, whatever its allowlist: it passes its flags in
//! memory, where a filter cannot look, so allowing it would allow new processes and
//! namespaces. glibc then falls back to `clone`, whose flags the roles that start threads
//! filter (`CLONE_THREAD` required).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub mod blk;
pub mod kvm;
pub mod launcher;
pub mod net;
pub mod vcpu;
pub mod vfio;
pub mod vmm;

/// A rule table: syscall number → conditions (an empty list allows the syscall outright).
pub type Rules = Vec<(i64, Vec<SeccompRule>)>;

/// The roles that have their own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The VMM's event loop and QMP thread once the VM is built.
    Vmm,
    /// The same without Landlock (`-sandbox landlock=off`): no syscall that takes a path.
    VmmWithoutLandlock,
    /// A vCPU thread once its vCPU is configured.
    Vcpu,
    /// The citadel-blk vhost-user backend process.
    Blk,
    /// The citadel-net vhost-user backend process.
    Net,
    /// The device launcher, which starts citadel-blk and citadel-net: its own needs merged
    /// with both backends', since its filter stays on them.
    Launcher,
}

impl Role {
    /// Every role, in a fixed order (used by SECURITY.md's table and the tests).
    pub const ALL: [Role; 6] = [
        Role::Vmm,
        Role::VmmWithoutLandlock,
        Role::Vcpu,
        Role::Blk,
        Role::Net,
        Role::Launcher,
    ];

    /// Name used in logs and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::VmmWithoutLandlock => "vmm-without-landlock",
            Role::Vcpu => "vcpu",
            Role::Blk => "blk",
            Role::Net => "net",
            Role::Launcher => "launcher",
        }
    }

    /// The rule table of this role.
    pub fn rules(self) -> Result<Rules, Error> {
        match self {
            Role::Vmm => vmm::rules(),
            Role::VmmWithoutLandlock => vmm::rules_without_landlock(),
            Role::Vcpu => vcpu::rules(),
            Role::Blk => blk::rules(),
            Role::Net => net::rules(),
            Role::Launcher => launcher::rules(),
        }
    }

    /// How many distinct syscalls the role may make at all (with or without argument
    /// conditions). This is the figure SECURITY.md reports per role.
    pub fn allowed_syscalls(self) -> Result<usize, Error> {
        Ok(merge(self.rules()?).len())
    }

    /// How many of the allowed syscalls are further restricted by argument conditions.
    pub fn argument_filtered_syscalls(self) -> Result<usize, Error> {
        Ok(merge(self.rules()?)
            .values()
            .filter(|rules| !rules.is_empty())
            .count())
    }
}

/// What a syscall outside the allowlist does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Kill the whole process (SIGSYS). The default.
    #[default]
    Kill,
    /// Allow the syscall but log it through the kernel audit log. For diagnosis only.
    Log,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            other => Err(Error::BadMode(other.to_string())),
        }
    }
}

/// Errors while building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused a rule (a bug in a policy table).
    #[error("seccomp policy for {role}: {source}")]
    Rule {
        /// The role whose table is wrong.
        role: &'static str,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// seccompiler refused a filter.
    #[error("seccomp filter for {role}: {source}")]
    Filter {
        /// The role whose filter is wrong.
        role: &'static str,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// Installing the filter failed.
    #[error("installing seccomp filter for {role}: {source}")]
    Install {
        /// The role being installed.
        role: &'static str,
        /// What the kernel said.
        source: seccompiler::Error,
    },
    /// An unknown mode name.
    #[error("unknown seccomp mode {0:?} (expected kill or log)")]
    BadMode(String),
}

/// Merges a table that may name a syscall more than once: the rules of each entry are
/// alternatives, and an entry without rules allows the syscall outright.
fn merge(rules: Rules) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, conditions) in rules {
        let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), conditions.is_empty()) {
            (None, _) => {}
            (Some(_), true) => *entry = None,
            (Some(existing), false) => existing.extend(conditions),
        }
    }
    map.into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect()
}

/// Entries allowing each of `syscalls` without conditions.
pub(crate) fn allow(syscalls: &[libc::c_long]) -> Rules {
    syscalls.iter().map(|&nr| (nr, Vec::new())).collect()
}

/// An entry allowing `syscall` only when argument `arg` equals one of `values`.
pub(crate) fn arg_in(
    role: &'static str,
    syscall: libc::c_long,
    arg: u8,
    values: &[u64],
) -> Result<(i64, Vec<SeccompRule>), Error> {
    let rules = values
        .iter()
        .map(|&value| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
                .and_then(|condition| SeccompRule::new(vec![condition]))
                .map_err(|source| Error::Rule { role, source })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((syscall, rules))
}

/// An entry allowing `syscall` only when the bits `mask` of argument `arg` are all clear.
pub(crate) fn arg_clear(
    role: &'static str,
    syscall: libc::c_long,
    arg: u8,
    mask: u64,
) -> Result<(i64, Vec<SeccompRule>), Error> {
    let rule = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
    .and_then(|condition| SeccompRule::new(vec![condition]))
    .map_err(|source| Error::Rule { role, source })?;
    Ok((syscall, vec![rule]))
}

/// The `clone` flags that make a new namespace. `CLONE_NEWTIME` is left out: its bit is part
/// of the exit signal in `clone`'s flags and only means a namespace to `clone3` and `unshare`.
pub const NEW_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// Entries allowing new threads and never new processes: `clone` only with `CLONE_THREAD`
/// set and no namespace flag (a process holding CAP_SYS_ADMIN could otherwise give a thread
/// namespaces of its own). `clone3` is answered with ENOSYS before the allowlist is consulted
/// (see [`compile`]), which makes glibc's `pthread_create` fall back to this `clone`.
pub(crate) fn threads_only(role: &'static str) -> Result<Rules, Error> {
    let thread = libc::CLONE_THREAD as u64;
    let rule = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread | NEW_NAMESPACES),
        thread,
    )
    .and_then(|condition| SeccompRule::new(vec![condition]))
    .map_err(|source| Error::Rule { role, source })?;
    Ok(vec![(libc::SYS_clone, vec![rule])])
}

/// An entry allowing `setsockopt` only for the `SOL_SOCKET` options in `options` (the
/// per-connection timeouts), and no other socket option.
///
/// Level and option name are C `int`s, of which the kernel reads the low 32 bits only, so only
/// those are compared: a caller passing them through a variadic `syscall()` may leave the upper
/// half undefined.
pub(crate) fn socket_options(
    role: &'static str,
    options: &[libc::c_int],
) -> Result<(i64, Vec<SeccompRule>), Error> {
    let int_eq = |arg: u8, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
    };
    let rules = options
        .iter()
        .map(|&option| {
            int_eq(1, libc::SOL_SOCKET)
                .and_then(|level| Ok(vec![level, int_eq(2, option)?]))
                .and_then(SeccompRule::new)
                .map_err(|source| Error::Rule { role, source })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((libc::SYS_setsockopt, rules))
}

/// An entry allowing `getsockopt` only to read a connected peer's credentials
/// (`SOL_SOCKET`/`SO_PEERCRED`), which a backend checks on every frontend it accepts.
pub(crate) fn peer_credentials(role: &'static str) -> Result<(i64, Vec<SeccompRule>), Error> {
    let int_eq = |arg: u8, value: libc::c_int| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
    };
    let rule = int_eq(1, libc::SOL_SOCKET)
        .and_then(|level| Ok(vec![level, int_eq(2, libc::SO_PEERCRED)?]))
        .and_then(SeccompRule::new)
        .map_err(|source| Error::Rule { role, source })?;
    Ok((libc::SYS_getsockopt, vec![rule]))
}

/// An entry allowing `prctl` only to name the calling thread, which the Rust runtime does for
/// every named thread it starts.
pub(crate) fn thread_names(role: &'static str) -> Result<(i64, Vec<SeccompRule>), Error> {
    arg_in(role, libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64])
}

/// An entry allowing `fcntl` for descriptor and status flags (O_NONBLOCK on eventfds),
/// close-on-exec duplicates and reading memfd seals, plus the commands in `extra`; never
/// locks, leases, owners, signals or a plain `F_DUPFD`.
pub(crate) fn descriptor_control(
    role: &'static str,
    extra: &[libc::c_int],
) -> Result<(i64, Vec<SeccompRule>), Error> {
    let commands: Vec<u64> = [
        libc::F_DUPFD_CLOEXEC,
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_GET_SEALS,
    ]
    .iter()
    .chain(extra)
    .map(|&command| command as u64)
    .collect();
    arg_in(role, libc::SYS_fcntl, 1, &commands)
}

/// Syscalls answered with ENOSYS in every role, before the allowlist is consulted: calls
/// whose arguments a filter cannot inspect and that have an older, filterable equivalent the
/// C library falls back to.
pub const ENOSYS_SYSCALLS: [i64; 1] = [libc::SYS_clone3];

/// `AUDIT_ARCH_X86_64`, the architecture tag of the syscalls the filters are written for.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// A prologue that returns ENOSYS for each of [`ENOSYS_SYSCALLS`] on x86_64 and otherwise
/// falls through to the instruction right after it.
///
/// seccompiler gives every matched rule of one filter the same action, so a different action
/// for a few syscalls needs either a second filter or a few instructions of its own; BPF jumps
/// are relative, so the allowlist program that follows works unchanged. Another architecture
/// falls through to the allowlist's own check, which kills.
fn enosys_prologue() -> BpfProgram {
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JEQ | BPF_K and BPF_RET | BPF_K.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    let insn = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let n = ENOSYS_SYSCALLS.len() as u8;
    // Layout: [load arch] [arch?] [load nr] n × [nr == x?] [return ENOSYS] | allowlist...
    let mut program = vec![
        insn(LD_W_ABS, 0, 0, ARCH_OFFSET),
        // Not x86_64: skip the loads, the comparisons and the return.
        insn(JEQ_K, 0, n + 2, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, NR_OFFSET),
    ];
    for (i, nr) in ENOSYS_SYSCALLS.iter().enumerate() {
        let i = i as u8;
        // A match jumps to the return below; the last miss skips it.
        let to_return = n - 1 - i;
        let jf = if i + 1 == n { 1 } else { 0 };
        program.push(insn(JEQ_K, to_return, jf, *nr as u32));
    }
    program.push(insn(
        RET_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    program
}

/// Compiles the allowlist of `role` into a BPF program, behind the ENOSYS prologue.
pub fn compile(role: Role, mode: Mode) -> Result<BpfProgram, Error> {
    let map = merge(role.rules()?);
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| Error::Filter {
            role: role.name(),
            source,
        })?;
    let allowlist: BpfProgram = filter.try_into().map_err(|source| Error::Filter {
        role: role.name(),
        source,
    })?;
    let mut program = enosys_prologue();
    program.extend(allowlist);
    Ok(program)
}

/// A role's filter compiled ahead of time, so that a thread about to handle untrusted input
/// installs it with a single syscall (compiling takes longer than installing).
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    role: Role,
    mode: Mode,
    program: BpfProgram,
}

impl CompiledFilter {
    /// Compiles the allowlist of `role`.
    pub fn new(role: Role, mode: Mode) -> Result<Self, Error> {
        Ok(CompiledFilter {
            role,
            mode,
            program: compile(role, mode)?,
        })
    }

    /// Installs the filter on the calling thread.
    ///
    /// The caller must already have set no_new_privs (or hold CAP_SYS_ADMIN).
    pub fn install(&self) -> Result<(), Error> {
        seccompiler::apply_filter(&self.program).map_err(|source| Error::Install {
            role: self.role.name(),
            source,
        })?;
        log::info!(
            "seccomp: {} filter installed ({} instructions, mode {:?})",
            self.role.name(),
            self.program.len(),
            self.mode
        );
        Ok(())
    }
}

/// Compiles and installs the allowlist of `role` on the calling thread.
///
/// The caller must already have set no_new_privs (or hold CAP_SYS_ADMIN).
pub fn apply_to_current_thread(role: Role, mode: Mode) -> Result<(), Error> {
    CompiledFilter::new(role, mode)?.install()
}

/// What any Rust thread of Citadel needs to keep running: memory allocation (never
/// executable: `mmap` and `mprotect` with `PROT_EXEC` are refused, so injected code cannot be
/// made runnable), futexes, signal return, clocks, randomness for hash maps and thread exit.
pub(crate) fn thread_runtime(role: &'static str) -> Result<Rules, Error> {
    let mut rules = allow(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_restart_syscall,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    rules.push(arg_clear(role, libc::SYS_mmap, 2, libc::PROT_EXEC as u64)?);
    rules.push(arg_clear(
        role,
        libc::SYS_mprotect,
        2,
        libc::PROT_EXEC as u64,
    )?);
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child under `role`'s filter and returns the child's wait status.
    /// The program is compiled before the fork so that the child only makes raw syscalls.
    pub(crate) fn run_confined(role: Role, body: fn() -> i32) -> i32 {
        let program = compile(role, Mode::Kill).expect("policy compiles");
        // SAFETY: the child only calls prctl, the seccomp install (no allocation) and `body`,
        // which makes raw syscalls, then leaves with _exit; the parent just waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain prctl and _exit calls in the forked child.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(100);
                }
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(101);
                }
                libc::_exit(body());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        status
    }

    /// Asserts that the confined child of `role` died of SIGSYS (wait status `status`).
    fn assert_sigsys_status(role: Role, what: &str, status: i32) {
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{what} under the {} filter: expected death by SIGSYS, wait status {status:#x}",
            role.name()
        );
    }

    /// Asserts that the confined child of `role` exited with 0 (wait status `status`).
    fn assert_clean_status(role: Role, what: &str, status: i32) {
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{what} under the {} filter: expected exit 0, wait status {status:#x}",
            role.name()
        );
    }

    fn assert_killed_by_sigsys(role: Role, what: &str, body: fn() -> i32) {
        assert_sigsys_status(role, what, run_confined(role, body));
    }

    fn assert_exits_cleanly(role: Role, what: &str, body: fn() -> i32) {
        assert_clean_status(role, what, run_confined(role, body));
    }

    fn ptrace() -> i32 {
        // SAFETY: PTRACE_TRACEME takes no pointers.
        unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        0
    }

    fn execve() -> i32 {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated path and NULL-terminated argv/envp arrays that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        0
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket takes no pointers.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        0
    }

    fn create_vm() -> i32 {
        // SAFETY: the descriptor is invalid on purpose; the filter decides before the kernel
        // looks at it, and no memory is passed.
        unsafe { libc::ioctl(-1, kvm::KVM_CREATE_VM(), 0) };
        0
    }

    fn exec_mapping() -> i32 {
        // SAFETY: an anonymous mapping request; the result is not used.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        0
    }

    /// Returns 0 when `ioctl(-1, request)` reaches the kernel (and fails with EBADF).
    fn ioctl_reaches_kernel(request: u64) -> i32 {
        // SAFETY: invalid descriptor on purpose, no memory passed.
        let ret = unsafe { libc::ioctl(-1, request, 0) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if ret == -1 && errno == Some(libc::EBADF) {
            0
        } else {
            1
        }
    }

    #[test]
    fn ptrace_kills_every_role() {
        for role in Role::ALL {
            assert_killed_by_sigsys(role, "ptrace", ptrace);
        }
    }

    #[test]
    fn vcpu_cannot_exec_open_sockets_or_create_vms() {
        assert_killed_by_sigsys(Role::Vcpu, "execve", execve);
        assert_killed_by_sigsys(Role::Vcpu, "socket(AF_INET)", inet_socket);
        assert_killed_by_sigsys(Role::Vcpu, "KVM_CREATE_VM", create_vm);
        assert_killed_by_sigsys(Role::Vcpu, "mmap(PROT_EXEC)", exec_mapping);
    }

    #[test]
    fn vmm_cannot_exec_open_inet_sockets_or_create_vms() {
        assert_killed_by_sigsys(Role::Vmm, "execve", execve);
        assert_killed_by_sigsys(Role::Vmm, "socket(AF_INET)", inet_socket);
        assert_killed_by_sigsys(Role::Vmm, "KVM_CREATE_VM", create_vm);
        assert_killed_by_sigsys(Role::Vmm, "mmap(PROT_EXEC)", exec_mapping);
        assert_killed_by_sigsys(
            Role::Vmm,
            "KVM_RUN",
            || ioctl_reaches_kernel(kvm::KVM_RUN()),
        );
    }

    #[test]
    fn vcpu_allows_what_a_vcpu_needs() {
        assert_exits_cleanly(Role::Vcpu, "KVM_RUN and serial output", || {
            let byte = b"\n";
            // SAFETY: writes one byte from a live buffer to stderr.
            let written = unsafe { libc::write(2, byte.as_ptr().cast(), 1) };
            if written != 1 {
                return 2;
            }
            ioctl_reaches_kernel(kvm::KVM_RUN())
                | ioctl_reaches_kernel(kvm::KVM_GET_REGS())
                | pci_ioctls_reach_kernel()
        });
    }

    /// What PCI cards and root ports need at run time: MSI routes and injection, irqfds,
    /// notification ioeventfds. Memory slots stay out of reach.
    fn pci_ioctls_reach_kernel() -> i32 {
        ioctl_reaches_kernel(kvm::KVM_SIGNAL_MSI())
            | ioctl_reaches_kernel(kvm::KVM_SET_GSI_ROUTING())
            | ioctl_reaches_kernel(kvm::KVM_IRQFD())
            | ioctl_reaches_kernel(kvm::KVM_IOEVENTFD())
    }

    /// Like `run_confined`, but the filter is compiled in the child, for roles whose rules
    /// name the process that installs them (the `vmm` roles' `tgkill`). glibc's malloc is
    /// usable after fork, which compiling needs.
    fn run_compiled_in_child(role: Role, body: fn() -> i32) -> i32 {
        // SAFETY: the child compiles (allocating through glibc's fork-safe malloc), installs
        // the filter, runs `body` and leaves with _exit; the parent just waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let Ok(program) = compile(role, Mode::Kill) else {
                // SAFETY: ends the forked child.
                unsafe { libc::_exit(102) };
            };
            // SAFETY: plain prctl and _exit calls in the forked child.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(100);
                }
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(101);
                }
                libc::_exit(body());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        status
    }

    /// A call made in the confined child; returns its exit code.
    type Body = fn() -> i32;

    fn assert_vmm_kills(role: Role, what: &str, body: fn() -> i32) {
        assert_sigsys_status(role, what, run_compiled_in_child(role, body));
    }

    fn assert_vmm_allows(role: Role, what: &str, body: fn() -> i32) {
        assert_clean_status(role, what, run_compiled_in_child(role, body));
    }

    /// Returns 0 when `result` is -1 with `errno`, i.e. the call reached the kernel.
    fn failed_with(result: libc::c_long, errno: libc::c_int) -> i32 {
        let last = std::io::Error::last_os_error().raw_os_error();
        i32::from(!(result == -1 && last == Some(errno)))
    }

    #[test]
    fn vmm_allows_what_the_event_loop_needs() {
        for role in [Role::Vmm, Role::VmmWithoutLandlock] {
            assert_vmm_allows(role, "epoll, reset ioctls, kicking its own thread", || {
                // SAFETY: syscalls on invalid descriptors or on the calling thread itself,
                // with no memory passed.
                unsafe {
                    let kick = libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0);
                    if kick != 0 {
                        return 3;
                    }
                    failed_with(
                        libc::epoll_ctl(-1, libc::EPOLL_CTL_DEL, -1, std::ptr::null_mut()).into(),
                        libc::EBADF,
                    ) | ioctl_reaches_kernel(kvm::KVM_SET_IRQCHIP())
                        | ioctl_reaches_kernel(kvm::KVM_SET_PIT2())
                        | ioctl_reaches_kernel(kvm::FIONBIO)
                        | pci_ioctls_reach_kernel()
                }
            });
        }
        assert_vmm_allows(Role::Vmm, "unlink (Landlock confines it)", || {
            // SAFETY: NUL-terminated path; nothing exists there.
            let ret = unsafe { libc::unlink(c"/nonexistent/citadel-qmp.sock".as_ptr()) };
            failed_with(ret.into(), libc::ENOENT)
        });
    }

    /// The shared memfd mapping the balloon test punches, made before the fork: address and
    /// descriptor.
    static GUEST_RAM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static GUEST_RAM_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
    const GUEST_RAM_LEN: usize = 1 << 20;

    /// 512-byte blocks allocated to the memfd, or -1.
    fn guest_ram_blocks() -> i64 {
        let fd = GUEST_RAM_FD.load(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: an all-zero stat is a valid out buffer; fstat writes only into it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above. glibc's fstat() is newfstatat, which the role does not allow; the
        // role allows the plain fstat.
        if unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) } != 0 {
            return -1;
        }
        st.st_blocks
    }

    /// The balloon returns guest pages to the host from the event loop with
    /// madvise(MADV_REMOVE) on the shared guest RAM mapping: no new syscall in the role.
    #[test]
    fn vmm_returns_ballooned_guest_ram_to_the_host() {
        // SAFETY: a new memfd, sized and mapped shared here; the mapping lives until the
        // process exits and is touched only through this pointer.
        unsafe {
            let fd = libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, GUEST_RAM_LEN as i64), 0);
            let addr = libc::mmap(
                std::ptr::null_mut(),
                GUEST_RAM_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            std::ptr::write_bytes(addr.cast::<u8>(), 0xa5, GUEST_RAM_LEN);
            GUEST_RAM.store(addr as usize, std::sync::atomic::Ordering::SeqCst);
            GUEST_RAM_FD.store(fd, std::sync::atomic::Ordering::SeqCst);
        }
        for role in [Role::Vmm, Role::VmmWithoutLandlock] {
            assert_vmm_allows(role, "madvise(MADV_REMOVE) on shared guest RAM", || {
                let addr = GUEST_RAM.load(std::sync::atomic::Ordering::SeqCst);
                let before = guest_ram_blocks();
                // SAFETY: the mapping made above, inherited across fork; MADV_REMOVE frees
                // its file pages and leaves it mapped.
                let rc = unsafe {
                    libc::madvise(addr as *mut libc::c_void, GUEST_RAM_LEN, libc::MADV_REMOVE)
                };
                let after = guest_ram_blocks();
                i32::from(!(rc == 0 && before >= (GUEST_RAM_LEN / 512) as i64 && after == 0))
            });
            // The child's punch freed the shared file: fill it again for the next role.
            let addr = GUEST_RAM.load(std::sync::atomic::Ordering::SeqCst);
            // SAFETY: the live mapping made above.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0xa5, GUEST_RAM_LEN) };
        }
        // fallocate stays out: the balloon needs no descriptor-based punching.
        assert_vmm_kills(Role::Vmm, "fallocate", || {
            // SAFETY: an invalid descriptor; the filter decides first.
            unsafe {
                libc::fallocate(
                    -1,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                )
            };
            0
        });
    }

    #[test]
    fn vmm_opens_nothing_connects_nowhere_and_signals_no_other_process() {
        let forbidden: [(&str, Body); 8] = [
            ("openat", || {
                // SAFETY: NUL-terminated path, result unused.
                unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
                0
            }),
            ("socket(AF_UNIX)", || {
                // SAFETY: socket takes no pointers.
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                0
            }),
            ("connect", || {
                // SAFETY: invalid descriptor and no address; the filter decides first.
                unsafe { libc::connect(-1, std::ptr::null(), 0) };
                0
            }),
            ("ftruncate", || {
                // SAFETY: invalid descriptor on purpose.
                unsafe { libc::ftruncate(-1, 0) };
                0
            }),
            ("mkdirat", || {
                // SAFETY: NUL-terminated path, result unused.
                unsafe { libc::mkdirat(libc::AT_FDCWD, c"/nonexistent/d".as_ptr(), 0o700) };
                0
            }),
            ("tgkill(another process)", || {
                // SAFETY: signal 0 to the parent's main thread: nothing is delivered.
                unsafe {
                    let parent = libc::getppid();
                    libc::syscall(libc::SYS_tgkill, parent, parent, 0)
                };
                0
            }),
            ("kill", || {
                // SAFETY: signal 0 to the parent: nothing is delivered.
                unsafe { libc::kill(libc::getppid(), 0) };
                0
            }),
            ("epoll_create1", || {
                // SAFETY: no pointers; made before the filter in the VMM.
                unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                0
            }),
        ];
        for role in [Role::Vmm, Role::VmmWithoutLandlock] {
            for (what, body) in forbidden {
                assert_vmm_kills(role, what, body);
            }
        }
        assert_vmm_kills(Role::VmmWithoutLandlock, "unlink", || {
            // SAFETY: NUL-terminated path; nothing exists there.
            unsafe { libc::unlink(c"/nonexistent/citadel-qmp.sock".as_ptr()) };
            0
        });
    }

    /// `clone3` asking for a plain new process (exit signal SIGCHLD, no flags). Returns 0 when
    /// it fails with ENOSYS; a child that came into being leaves at once with status 77.
    fn clone3_fork() -> i32 {
        // struct clone_args, first version (64 bytes): flags, pidfd, child_tid, parent_tid,
        // exit_signal, stack, stack_size, tls.
        let mut args = [0u64; 8];
        args[4] = libc::SIGCHLD as u64;
        // SAFETY: a valid clone_args of the size given; a child created by it only _exits.
        let ret = unsafe { libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 64usize) };
        match ret {
            // SAFETY: leaving the new child without touching anything of the parent's.
            0 => unsafe { libc::_exit(77) },
            -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => 0,
            -1 => 2,
            _ => 3,
        }
    }

    extern "C" fn thread_body(arg: *mut libc::c_void) -> *mut libc::c_void {
        arg
    }

    /// Starts and joins one thread through glibc's `pthread_create`, which tries `clone3`
    /// first and falls back to `clone` on ENOSYS. Returns 0 when the thread ran.
    fn pthread_roundtrip() -> i32 {
        let mut thread: libc::pthread_t = 0;
        let token = 0x5eed_usize as *mut libc::c_void;
        // SAFETY: `thread` is a valid out-pointer; the body only returns its argument.
        if unsafe { libc::pthread_create(&mut thread, std::ptr::null(), thread_body, token) } != 0 {
            return 1;
        }
        let mut back = std::ptr::null_mut();
        // SAFETY: joining the thread just created, once.
        if unsafe { libc::pthread_join(thread, &mut back) } != 0 || back != token {
            return 2;
        }
        0
    }

    #[test]
    fn clone3_fails_with_enosys_in_every_role_and_creates_no_process() {
        // Unconfined, this kernel does create the process: ENOSYS below comes from the filter.
        let mut args = [0u64; 8];
        args[4] = libc::SIGCHLD as u64;
        // SAFETY: a valid clone_args; the child only _exits, the parent reaps it.
        let pid = unsafe { libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 64usize) };
        if pid == 0 {
            // SAFETY: leaving the new child at once.
            unsafe { libc::_exit(0) };
        }
        assert!(
            pid > 0,
            "clone3 unconfined: {}",
            std::io::Error::last_os_error()
        );
        let mut status = 0;
        // SAFETY: reaping our own child.
        assert_eq!(
            unsafe { libc::waitpid(pid as i32, &mut status, 0) },
            pid as i32
        );
        for role in Role::ALL {
            assert_exits_cleanly(role, "clone3 answered ENOSYS", clone3_fork);
        }
    }

    #[test]
    fn threads_still_start_where_the_role_allows_them() {
        for role in [Role::Blk, Role::Net, Role::Launcher] {
            assert_exits_cleanly(
                role,
                "pthread_create falling back to clone",
                pthread_roundtrip,
            );
        }
        // The VMM's event loop and vCPUs start no threads once confined.
        for role in [Role::Vmm, Role::Vcpu] {
            assert_killed_by_sigsys(role, "pthread_create", pthread_roundtrip);
        }
    }

    #[test]
    fn log_mode_lets_a_forbidden_syscall_through() {
        let program = compile(Role::Vcpu, Mode::Log).expect("policy compiles");
        // SAFETY: as in run_confined.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain prctl, socket and _exit calls in the forked child.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(101);
                }
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(if fd >= 0 { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn every_role_compiles_and_counts() {
        for role in Role::ALL {
            compile(role, Mode::Kill).expect("policy compiles");
            let total = role.allowed_syscalls().expect("rules build");
            let filtered = role.argument_filtered_syscalls().expect("rules build");
            assert!(filtered <= total);
            eprintln!(
                "{:<8} {total:>3} syscalls, {filtered:>2} of them with argument filters",
                role.name()
            );
        }
        assert!(Role::Vcpu.allowed_syscalls().unwrap() < Role::Vmm.allowed_syscalls().unwrap());
    }

    #[test]
    fn merge_keeps_alternatives_and_unconditional_wins() {
        let conditional = arg_in("t", libc::SYS_socket, 0, &[1]).unwrap();
        let other = arg_in("t", libc::SYS_socket, 0, &[2]).unwrap();
        let merged = merge(vec![conditional.clone(), other]);
        assert_eq!(merged[&libc::SYS_socket].len(), 2);
        let merged = merge(vec![conditional, (libc::SYS_socket, Vec::new())]);
        assert!(merged[&libc::SYS_socket].is_empty());
    }
}
