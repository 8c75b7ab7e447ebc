//! citadel-blk: a sandboxed vhost-user-blk backend serving a raw disk image.
//!
//! Exit status: 0 after SIGTERM/SIGINT or when the frontend of `--fd` leaves, 1 on a runtime
//! error, 2 on a command-line error. Every error is one line on stderr.

mod cli;
mod device;
mod disk;
mod inflight;
mod request;
mod server;
mod stats;
mod watchdog;

use std::process::ExitCode;

fn main() -> ExitCode {
    // First of all, so that no crash, even during setup, writes guest data to a core file.
    if let Err(e) = citadel_sandbox::core_dump::disable_core_dumps() {
        eprintln!("citadel-blk: error: {e}");
        return ExitCode::from(1);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("citadel-blk: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    let args = match command {
        cli::Command::Help => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        cli::Command::Run(args) => args,
    };
    match server::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("citadel-blk: error: {e}");
            ExitCode::from(1)
        }
    }
}
