//! Seccomp allowlists, one per role of a Citadel process or thread.
//!
//! Each role module lists the syscalls (with argument conditions where it matters, such as
//! ioctl request numbers) that the role needs and nothing else. Policies are compiled with
//! seccompiler into a BPF program and installed on the calling thread only, so that every
//! thread of the VMM can carry its own filter.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub mod blk;
pub mod net;

/// A rule table: syscall number → conditions (an empty list allows the syscall outright).
pub type Rules = Vec<(i64, Vec<SeccompRule>)>;

/// The roles that have their own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The citadel-blk vhost-user backend process.
    Blk,
    /// The citadel-net vhost-user backend process.
    Net,
}

impl Role {
    /// Name used in logs and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::Blk => "blk",
            Role::Net => "net",
        }
    }

    fn rules(self) -> Result<Rules, Error> {
        match self {
            Role::Blk => blk::rules(),
            Role::Net => net::rules(),
        }
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

/// Compiles the allowlist of `role` into a BPF program.
pub fn compile(role: Role, mode: Mode) -> Result<BpfProgram, Error> {
    let map: BTreeMap<i64, Vec<SeccompRule>> = role.rules()?.into_iter().collect();
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| Error::Filter {
            role: role.name(),
            source,
        })?;
    filter.try_into().map_err(|source| Error::Filter {
        role: role.name(),
        source,
    })
}

/// Compiles and installs the allowlist of `role` on the calling thread.
///
/// The caller must already have set no_new_privs (or hold CAP_SYS_ADMIN).
pub fn apply_to_current_thread(role: Role, mode: Mode) -> Result<(), Error> {
    let program = compile(role, mode)?;
    seccompiler::apply_filter(&program).map_err(|source| Error::Install {
        role: role.name(),
        source,
    })?;
    log::info!(
        "seccomp: {} filter installed ({} instructions, mode {:?})",
        role.name(),
        program.len(),
        mode
    );
    Ok(())
}
