//! The jailer's error: one line naming the step that failed and the path or value involved.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The step of the jail construction an error happened in, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Command-line parsing and validation.
    Args,
    /// Closing inherited descriptors and clearing the environment.
    Sanitize,
    /// Creating the jail directory and copying the executables in.
    Copy,
    /// Joining or creating the network namespace.
    Netns,
    /// Setting resource limits.
    Rlimit,
    /// Creating the cgroups, writing their values and moving the process.
    Cgroup,
    /// New mount, IPC and UTS namespaces, pivot_root and the device nodes.
    Mount,
    /// The optional user namespace.
    Userns,
    /// Forking for the PID namespace or daemonizing, and the pid file.
    Process,
    /// Dropping identities, capabilities, no_new_privs and Landlock.
    Privileges,
    /// Executing the VMM.
    Exec,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Step::Args => "arguments",
            Step::Sanitize => "sanitize",
            Step::Copy => "copy",
            Step::Netns => "netns",
            Step::Rlimit => "rlimit",
            Step::Cgroup => "cgroup",
            Step::Mount => "mount",
            Step::Userns => "userns",
            Step::Process => "process",
            Step::Privileges => "privileges",
            Step::Exec => "exec",
        };
        f.write_str(name)
    }
}

/// A failure of one step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a path failed.
    #[error("{step}: {what} {}: {source}", path.display())]
    Path {
        /// The step.
        step: Step,
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// A system call without a path failed.
    #[error("{step}: {what}: {source}")]
    Sys {
        /// The step.
        step: Step,
        /// What was being done.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// A failure reported by a forked jailer process over the status pipe, already formatted.
    #[error("{0}")]
    Reported(String),
    /// A step carried out by `citadel-sandbox` failed; its error names what was being done.
    #[error("{step}: {source}")]
    Sandbox {
        /// The step.
        step: Step,
        /// What the sandbox reported.
        source: citadel_sandbox::Error,
    },
    /// Something was refused on purpose (bad argument, unsafe file at a destination...).
    #[error("{step}: {message}")]
    Refused {
        /// The step.
        step: Step,
        /// Why.
        message: String,
    },
}

impl Error {
    /// A path operation that failed with the current `errno`.
    pub fn path(step: Step, what: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Path {
            step,
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A syscall that failed with the last OS error.
    pub fn last(step: Step, what: &'static str) -> Error {
        Error::Sys {
            step,
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Wraps a `citadel-sandbox` failure, naming the step it happened in.
    pub fn sandbox(step: Step) -> impl FnOnce(citadel_sandbox::Error) -> Error {
        move |source| Error::Sandbox { step, source }
    }

    /// A deliberate refusal.
    pub fn refused(step: Step, message: impl Into<String>) -> Error {
        Error::Refused {
            step,
            message: message.into(),
        }
    }
}

/// Turns a `-1` return of a libc call into the last OS error.
pub fn check(ret: libc::c_int, step: Step, what: &'static str) -> Result<libc::c_int, Error> {
    if ret == -1 {
        Err(Error::last(step, what))
    } else {
        Ok(ret)
    }
}
