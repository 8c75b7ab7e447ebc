//! citadel-jailer: builds a jail and execs the Citadel VMM inside it, unprivileged.
//!
//! The steps run in a fixed order, each one failing with a single line that names the step
//! and the path or value involved:
//!
//! 1. close inherited descriptors above 2, clear the environment, validate the arguments;
//! 2. create `<base>/citadel/<id>/root` and copy the VMM and its backends in;
//! 3. join or create the network namespace, set rlimits, create the cgroups and move in;
//! 4. new mount, IPC and UTS namespaces, pivot_root into the jail, a minimal `/dev`;
//! 5. optionally a user namespace, optionally a PID namespace in which the VMM is PID 1;
//! 6. drop to uid:gid with every capability set empty, no_new_privs, optionally Landlock and
//!    daemonizing, then exec.
//!
//! With `--new-pid-ns` the VMM is PID 1 of the new namespace, so when it exits the kernel
//! kills whatever it started. Without `--daemonize` the jailer stays in the foreground as its
//! parent, unprivileged, passes termination signals on to it and exits with its exit code;
//! with `--daemonize` it returns once the VMM has been executed. In every case
//! `<base>/citadel/<id>/citadel.pid` holds the VMM's pid as seen from the jailer's PID
//! namespace.

mod cgroup;
mod cli;
mod error;
mod jail;
mod privileges;
mod process;

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

/// Builds the jail and execs the VMM; returns only in a process that stays behind as a
/// parent, with the exit code it should leave with.
fn run() -> Result<i32, Error> {
    sanitize()?;
    let args = cli::parse(std::env::args_os().skip(1))?;
    let (uid, gid) = (args.uid, args.gid);
    // SAFETY: umask takes an integer; new files and directories start private.
    unsafe { libc::umask(0o077) };

    let mut jail = Jail::create(&args.base, &args.id, uid, gid)?;
    let mut executables = vec![jail.copy_in(&args.exec_file, uid, gid)?];
    for backend in &args.backend_files {
        executables.push(jail.copy_in(backend, uid, gid)?);
    }
    let mut pid_file = jail.open_pid_file()?;

    if let Some(netns) = &args.netns {
        privileges::network(netns)?;
    }
    privileges::rlimits(args.no_file, args.fsize)?;
    let mut cgroups = Cgroups::create(
        &args.cgroups,
        args.cgroup_version,
        &args.parent_cgroup.join(&args.id),
    )?;
    cgroups.enter()?;

    let proc_dir = if args.userns {
        Some(process::open_proc()?)
    } else {
        None
    };
    jail::enter(&mut jail, uid, gid)?;
    if let Some(proc_dir) = proc_dir {
        process::enter_user_namespace(&proc_dir, uid, gid)?;
    }

    let mut status = StatusPipe::new()?;
    let mut forked = false;
    if args.daemonize {
        if let Some(child) = process::daemonize()? {
            let failure = status.wait();
            process::wait_exit_code(child)?;
            return match failure {
                Some(message) => Err(Error::Reported(message)),
                None => Ok(0),
            };
        }
        forked = true;
    }
    if args.new_pid_ns {
        // SAFETY: unshare takes no pointers; the next child is PID 1 of the new namespace.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWPID) },
            Step::Process,
            "create PID namespace",
        )?;
        let child = process::fork()?;
        if child > 0 {
            return stay_as_parent(&args, child, &mut pid_file, &mut status, forked);
        }
        forked = true;
    } else {
        process::write_pid(&mut pid_file, std::process::id() as libc::pid_t)?;
    }
    drop(pid_file);
    status.become_writer();

    match finish(&args, &executables) {
        Ok(never) => match never {},
        Err(e) if forked => {
            status.report(&e.to_string());
            // SAFETY: ends a forked process whose failure has been reported to the waiter.
            unsafe { libc::_exit(1) }
        }
        Err(e) => Err(e),
    }
}

/// The process left behind by the PID-namespace fork: it records the VMM's pid, then either
/// exits (daemonized) or waits for the VMM unprivileged and hands on its exit code.
fn stay_as_parent(
    args: &Args,
    child: libc::pid_t,
    pid_file: &mut std::fs::File,
    status: &mut StatusPipe,
    forked: bool,
) -> Result<i32, Error> {
    if let Err(e) = process::write_pid(pid_file, child) {
        // SAFETY: kill takes integers; the child must not run without a pid file.
        unsafe { libc::kill(child, libc::SIGKILL) };
        return Err(e);
    }
    if forked {
        // Daemonized: the original jailer waits on the status pipe; nothing to do here.
        // SAFETY: ends the intermediate process without running the jail guards.
        unsafe { libc::_exit(0) };
    }
    process::forward_signals(child)?;
    privileges::drop_to(args.uid, args.gid)?;
    privileges::no_new_privs()?;
    let failure = status.wait();
    let code = process::wait_exit_code(child)?;
    match failure {
        Some(message) => Err(Error::Reported(message)),
        None => Ok(code),
    }
}

/// The last steps in the process that becomes the VMM.
fn finish(args: &Args, executables: &[PathBuf]) -> Result<Infallible, Error> {
    if args.daemonize {
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
    let name: OsString = exe.file_name().map(OsString::from).unwrap_or_default();
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
