//! citadel-jailer: builds a jail and execs the Citadel VMM inside it, unprivileged.
//!
//! The steps run in a fixed order, each one failing with a single line that names the step
//! and the path or value involved:
//!
//! 1. close inherited descriptors above 2, clear the environment, validate the arguments;
//! 2. walk to `<base>/citadel/<id>/root` by descriptor, creating what is missing, and copy the
//!    VMM and its backends in (root-owned, 0555); open the pid file; create the cgroups and
//!    write their values;
//! 3. fork: the child enters the network namespace (a new one unless told otherwise), sets
//!    rlimits and moves into the cgroups;
//! 4. new mount, IPC and UTS namespaces, the executables bind-mounted read-only, pivot_root
//!    into the jail, a minimal `/dev`;
//! 5. optionally a user namespace, optionally daemonizing, optionally a PID namespace in which
//!    the VMM is PID 1;
//! 6. drop to uid:gid with every capability set empty, no_new_privs, stdio to `/dev/null`
//!    unless kept, optionally Landlock, then exec.
//!
//! The jailer process itself never leaves the host's namespaces: it waits until the child has
//! executed the VMM or reported a failure, and on a failure removes everything this run created
//! before reporting it. With `--new-pid-ns` the VMM is PID 1 of the new namespace, so when it
//! exits the kernel kills whatever it started. Without `--daemonize` the jailer stays in the
//! foreground as the VMM's parent, unprivileged once the VMM runs, passes termination signals
//! on to it and exits with its exit code; with `--daemonize` it returns once the VMM has been
//! executed. In every case `<base>/citadel/<id>/citadel.pid` holds the VMM's pid as seen from
//! the jailer's PID namespace.

mod cgroup;
mod cli;
mod error;
mod jail;
mod privileges;
mod process;
mod vfio;

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use cgroup::Cgroups;
use cli::Args;
use error::{check, Error, Step};
use jail::Jail;
use process::StatusPipe;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("citadel-jailer: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Closes every descriptor above 2 and empties the environment, so that nothing the caller
/// left open or set reaches the VMM.
fn sanitize() -> Result<(), Error> {
    // SAFETY: close_range takes integers only; the jailer holds no descriptor above 2 yet.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if ret != 0 {
        return Err(Error::last(Step::Sanitize, "close inherited descriptors"));
    }
    // SAFETY: the jailer is single-threaded, so nothing reads the environment concurrently.
    check(
        unsafe { libc::clearenv() },
        Step::Sanitize,
        "clear the environment",
    )?;
    Ok(())
}

/// Builds the jail and execs the VMM; returns only in the jailer process, with the exit code
/// it should leave with.
///
/// The jailer forks once the jail's files and cgroups exist: the child enters the namespaces
/// and the cgroups and becomes the VMM, while the jailer stays outside, as root, until the
/// child has executed the VMM (the close-on-exec status pipe reaches end of file) or reported
/// a failure. On a failure it reaps every process the child started (it is their subreaper)
/// and removes the cgroups and the jail files this run created, which it can, because it never
/// left the host's namespaces; only then does it report.
fn run() -> Result<i32, Error> {
    sanitize()?;
    let args = cli::parse(std::env::args_os().skip(1))?;
    let (uid, gid) = (args.uid, args.gid);
    // SAFETY: umask takes an integer; new files and directories start private.
    unsafe { libc::umask(0o077) };

    let mut jail = Jail::create(&args.base, &args.id, uid, gid)?;
    let mut executables = vec![jail.copy_in(&args.exec_file)?];
    for backend in &args.backend_files {
        executables.push(jail.copy_in(backend)?);
    }
    if !args.vfio_devices.is_empty() {
        jail.make_sys_dir()?;
    }
    let pid_file = jail.open_pid_file()?;
    let mut cgroups = Cgroups::create(
        &args.cgroups,
        args.default_pids_max,
        args.cgroup_version,
        &args.parent_cgroup.join(&args.id),
    )?;

    let mut status = StatusPipe::new()?;
    process::become_subreaper()?;
    process::hold_forwarded_signals(true)?;
    let child = process::fork()?;
    if child == 0 {
        status.become_writer();
        let released = process::hold_forwarded_signals(false);
        let Err(e) = released
            .and_then(|()| jail_side(&args, &jail, &cgroups, &executables, pid_file, &mut status));
        status.report(&e.to_string());
        // SAFETY: ends the forked child without running the jail guards, which belong to the
        // jailer process.
        unsafe { libc::_exit(1) };
    }
    // The pid file is the child's to write; the jailer keeps nothing it does not need.
    drop(pid_file);
    if let Some(message) = status.wait() {
        process::reap_all();
        drop(cgroups);
        drop(jail);
        return Err(Error::Reported(message));
    }
    jail.keep();
    cgroups.keep();
    drop(jail);
    if args.daemonize {
        // The child only forked the daemon and left.
        process::hold_forwarded_signals(false)?;
        process::wait_exit_code(child)?;
        return Ok(0);
    }
    process::forward_signals(child)?;
    privileges::drop_to(uid, gid)?;
    privileges::no_new_privs()?;
    process::wait_exit_code(child)
}

/// The forked child: namespaces, limits, cgroups, the pivot, the process structure, then
/// [`finish`]. Returns only on failure, which the caller reports to the jailer.
fn jail_side(
    args: &Args,
    jail: &Jail,
    cgroups: &Cgroups,
    executables: &[PathBuf],
    mut pid_file: std::fs::File,
    status: &mut StatusPipe,
) -> Result<Infallible, Error> {
    let (uid, gid) = (args.uid, args.gid);
    privileges::network(&args.netns)?;
    privileges::rlimits(args.no_file, args.fsize, args.memlock)?;
    cgroups.enter()?;
    let vfio = vfio::VfioExposure::prepare(&args.vfio_devices)?;
    let proc_dir = if args.userns {
        Some(process::open_proc()?)
    } else {
        None
    };
    jail::enter(jail, executables, uid, gid, vfio)?;
    if let Some(proc_dir) = proc_dir {
        process::enter_user_namespace(&proc_dir, uid, gid)?;
    }
    if args.daemonize && process::daemonize()?.is_some() {
        // The jailer waits on the status pipe and reaps the daemon if it fails.
        // SAFETY: ends this intermediate process without running any destructor.
        unsafe { libc::_exit(0) };
    }
    if args.new_pid_ns {
        // SAFETY: unshare takes no pointers; the next child is PID 1 of the new namespace.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWPID) },
            Step::Process,
            "create PID namespace",
        )?;
        process::hold_forwarded_signals(true)?;
        let child = process::fork()?;
        if child > 0 {
            // Only the VMM's side reports; this process must not hold the pipe open.
            status.close();
            let code = stay_as_parent(args, child, pid_file);
            // SAFETY: ends the PID namespace's parent with the VMM's exit code.
            unsafe { libc::_exit(code) };
        }
        process::hold_forwarded_signals(false)?;
    } else {
        process::write_pid(&mut pid_file, std::process::id() as libc::pid_t)?;
    }
    drop(pid_file);
    finish(args, executables)
}

/// The process left behind by the PID-namespace fork: it records the VMM's pid, then either
/// leaves (daemonized) or waits for the VMM unprivileged, passing signals on, and returns its
/// exit code. Failures of the VMM's own last steps reach the jailer through the status pipe,
/// which this process does not read.
fn stay_as_parent(args: &Args, child: libc::pid_t, mut pid_file: std::fs::File) -> i32 {
    if let Err(e) = process::write_pid(&mut pid_file, child) {
        eprintln!("citadel-jailer: {e}");
        // SAFETY: kill takes integers; the child must not run without a pid file.
        unsafe { libc::kill(child, libc::SIGKILL) };
        return 1;
    }
    drop(pid_file);
    // SAFETY: close_range takes integers. This process only waits and then leaves with
    // _exit, so the descriptors inherited from the jailer (the jail's directories, held as
    // OwnedFd by a value that is never used or dropped here) are not touched again.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if args.daemonize {
        return 0;
    }
    let waited = process::forward_signals(child)
        .and_then(|()| privileges::drop_to(args.uid, args.gid))
        .and_then(|()| privileges::no_new_privs())
        .and_then(|()| process::wait_exit_code(child));
    match waited {
        Ok(code) => code,
        Err(e) => {
            eprintln!("citadel-jailer: {e}");
            1
        }
    }
}

/// The last steps in the process that becomes the VMM.
fn finish(args: &Args, executables: &[PathBuf]) -> Result<Infallible, Error> {
    if !args.keep_stdio {
        process::stdio_to_null()?;
    }
    privileges::drop_to(args.uid, args.gid)?;
    privileges::no_new_privs()?;
    if args.landlock {
        privileges::landlock(executables)?;
    }
    let exe = &executables[0];
    let path = CString::new(exe.as_os_str().as_bytes())
        .map_err(|_| Error::refused(Step::Exec, format!("{} contains NUL", exe.display())))?;
    // argv[0] is the executable's path in the jail: the VMM finds the backends next to it
    // there, where /proc (and so /proc/self/exe) is not mounted.
    let name: OsString = exe.as_os_str().to_os_string();
    let argv: Vec<CString> = std::iter::once(name)
        .chain(args.vmm_args.iter().cloned())
        .map(|arg| CString::new(arg.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| Error::refused(Step::Exec, "a citadel argument contains NUL"))?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: path, argv and envp are NUL-terminated strings in NULL-terminated arrays that
    // live until the call, which only returns on failure.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    Err(Error::path(
        Step::Exec,
        "execve",
        exe,
        std::io::Error::last_os_error(),
    ))
}
