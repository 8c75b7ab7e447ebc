//! QMP `migrate` to a snapshot directory, and `query-migrate`.
//!
//! The snapshot is written before `migrate` replies, on the event loop, as StratoVirt writes
//! its own: the vCPUs are paused first (STOP), and stay paused afterwards whether it worked or
//! not, for the management to `cont` or `quit`. So a `migrate` never finds another one under
//! way. The VMM, confined, may create no file: the device launcher creates the directory and
//! the two files and hands them over, and removes them again when writing failed. A request
//! refused before anything is paused (a machine that cannot be snapshotted, a directory that
//! is not empty or cannot be made) leaves the VM running.

use std::time::Instant;

use citadel_launcher::{Launcher, LauncherError};
use citadel_qmp::error::QmpError;
use citadel_qmp::event::Event;
use citadel_qmp::migration::{MigrationInfo, MigrationStatus};
use citadel_qmp::reply::RunState;

use crate::machine::Machine;
use crate::qmp_server::Response;

/// The last snapshot's progress, for `query-migrate`.
pub struct Migration {
    info: MigrationInfo,
}

impl Default for Migration {
    fn default() -> Self {
        Migration {
            info: MigrationInfo::NONE,
        }
    }
}

impl Migration {
    /// What `query-migrate` returns.
    pub fn info(&self) -> &MigrationInfo {
        &self.info
    }

    fn set(&mut self, status: MigrationStatus) {
        self.info = MigrationInfo {
            status,
            total_time: None,
            error_desc: None,
        };
    }

    /// Records the failure and builds the reply: the error, after the STOP event when the
    /// VM was paused for it.
    fn fail(&mut self, why: String, events_before: Vec<Event>) -> Response {
        log::warn!("migrate: {why}");
        self.info = MigrationInfo {
            status: MigrationStatus::Failed,
            total_time: None,
            error_desc: Some(why.clone()),
        };
        Response {
            events_before,
            result: Err(QmpError::generic(why)),
            events_after: Vec::new(),
        }
    }

    /// Runs `migrate` to directory `dir` (resolved by the launcher from its "/", the jail's
    /// root when jailed).
    pub fn migrate(
        &mut self,
        machine: &Machine,
        launcher: Result<&Launcher, &str>,
        state: &mut RunState,
        dir: &str,
    ) -> Response {
        let started = Instant::now();
        if let Err(e) = machine.check_snapshot() {
            return self.fail(e.to_string(), Vec::new());
        }
        let launcher = match launcher {
            Ok(launcher) => launcher,
            Err(why) => return self.fail(format!("Snapshots are unavailable: {why}"), Vec::new()),
        };
        self.set(MigrationStatus::Setup);
        let files = match launcher.create_snapshot(dir) {
            Ok(files) => files,
            Err(e) => return self.fail(launcher_text(e), Vec::new()),
        };
        let mut events_before = Vec::new();
        if *state == RunState::Running {
            if let Err(e) = machine.pause() {
                remove(launcher, dir, files.created_dir);
                return self.fail(format!("pausing the VM: {e}"), Vec::new());
            }
            *state = RunState::Paused;
            events_before.push(Event::stop());
        }
        self.set(MigrationStatus::Active);
        if let Err(e) = machine.write_snapshot_into(&files) {
            let created_dir = files.created_dir;
            drop(files);
            remove(launcher, dir, created_dir);
            return self.fail(e.to_string(), events_before);
        }
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        log::info!("migrate: snapshot written to {dir} in {ms} ms");
        self.info = MigrationInfo {
            status: MigrationStatus::Completed,
            total_time: Some(ms),
            error_desc: None,
        };
        Response {
            events_before,
            result: Ok(serde_json::Value::Object(Default::default())),
            events_after: Vec::new(),
        }
    }
}

/// The launcher's refusal as the user reads it: its own line, or what went wrong reaching it.
fn launcher_text(e: LauncherError) -> String {
    match e {
        LauncherError::Refused(message) => message,
        other => format!("Snapshots are unavailable: {other}"),
    }
}

/// Removes the partial snapshot in `dir`; a failure is only logged, the reply already says
/// the snapshot failed.
fn remove(launcher: &Launcher, dir: &str, created_dir: bool) {
    if let Err(e) = launcher.remove_snapshot(dir, created_dir) {
        log::warn!(
            "migrate: removing the partial snapshot in {dir}: {}",
            launcher_text(e)
        );
    }
}
