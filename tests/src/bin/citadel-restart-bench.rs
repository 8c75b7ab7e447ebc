//! `citadel-restart-bench`: how long a disk's I/O stops when its backend is killed.
//!
//! ```text
//! citadel-restart-bench [--rounds N]
//! ```
//!
//! Each round (default 20) boots the `virtio_blk` guest program in `restart` mode, plugs a
//! disk over QMP, lets the guest write numbered sectors (one request at a time, 3 ms apart),
//! then kills its citadel-blk with SIGKILL and times, from just before the kill, until a
//! sector the guest wrote after it lands in the image: the guest's write that waited in the
//! ring through the outage, completed by the new backend. The image is read only once the
//! killed process is a zombie, so no write of the dead backend is mistaken for one of the new.
//! Also collects the time Citadel itself logs from noticing the hang-up to the new backend
//! taking over. Prints the median and the 90th percentile of each.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use citadel_tests::guest_program;
use citadel_tests::procfs::blk_backends;
use citadel_tests::vm::{Qmp, TempDir, Vm};
use serde_json::json;

const STEP: Duration = Duration::from_secs(30);
const IMAGE_LEN: usize = 1 << 20;
/// Sectors the guest writes.
const SECTORS: usize = 1024;
const TOOK_OVER: &str = "citadel-blk[";
const TOOK_OVER_IN: &str = "took over in ";

fn usage(why: &str) -> ExitCode {
    eprintln!("citadel-restart-bench: {why}\nusage: citadel-restart-bench [--rounds N]");
    ExitCode::from(2)
}

/// The highest sector number the guest wrote, as the image shows it (0 when none).
fn frontier(img: &Path) -> Result<u64, String> {
    let image = std::fs::read(img).map_err(|e| format!("reading {}: {e}", img.display()))?;
    Ok(image
        .chunks(512)
        .take(SECTORS)
        .enumerate()
        .filter(|(n, s)| {
            u64::from_le_bytes(s[..8].try_into().unwrap_or_default()) == *n as u64
                && s[8] == (*n as u8) ^ 0x5a
        })
        .map(|(n, _)| n as u64)
        .max()
        .unwrap_or(0))
}

/// Whether `pid` has exited (a zombie, or reaped already).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// One round: (kill to the guest's next write in the image, Citadel's takeover time).
fn round() -> Result<(Duration, Duration), String> {
    let dir = TempDir::new("restart-bench");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; IMAGE_LEN]).map_err(|e| e.to_string())?;
    let mut vm = Vm::start(
        &guest_program("virtio_blk"),
        &[
            "-m",
            "32",
            "-append",
            "virtio_mmio.device=4K@0xd0000000:5 restart",
        ],
    );
    vm.wait_serial("citadel-guest: restart waiting-for-plug", STEP);
    let mut qmp = Qmp::negotiated(&vm.qmp_path);
    for (command, arguments) in [
        (
            "blockdev-add",
            json!({"node-name": "d0", "file": {"driver": "file", "filename": img}}),
        ),
        (
            "device_add",
            json!({"id": "d0", "driver": "virtio-blk-mmio", "addr": "0", "drive": "d0"}),
        ),
    ] {
        let reply = qmp.execute(command, Some(arguments));
        if reply.get("return").is_none() {
            return Err(format!("{command}: {reply}"));
        }
    }
    vm.wait_serial("citadel-guest: restart progress=128", STEP);
    let pids = blk_backends(vm.pid());
    let [pid] = pids[..] else {
        return Err(format!("expected one citadel-blk, found {pids:?}"));
    };
    let start = Instant::now();
    // SAFETY: kill has no memory preconditions; the pid is the VM's backend.
    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
        return Err(format!("kill: {}", std::io::Error::last_os_error()));
    }
    while !dead(pid) {
        std::hint::spin_loop();
    }
    let before = frontier(&img)?;
    let deadline = start + Duration::from_secs(10);
    while frontier(&img)? <= before {
        if Instant::now() > deadline {
            return Err(format!("no write landed within 10 s\n{}", vm.transcript()));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let flowing = start.elapsed();
    // Citadel logs the takeover once the new backend serves, which may be after its first
    // completion.
    let line = loop {
        let log = vm.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(TOOK_OVER) && l.contains(TOOK_OVER_IN))
        {
            break line.to_string();
        }
        if Instant::now() > deadline {
            return Err(format!("Citadel did not log the takeover\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let ms: u64 = line
        .split(TOOK_OVER_IN)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("unreadable takeover line: {line}"))?;
    Ok((flowing, Duration::from_millis(ms)))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let mut rounds = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => rounds = n,
                _ => return usage("--rounds takes a positive number"),
            },
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    let mut flowing = Vec::new();
    let mut takeover = Vec::new();
    for _ in 0..rounds {
        match round() {
            Ok((f, t)) => {
                flowing.push(f);
                takeover.push(t);
            }
            Err(e) => {
                eprintln!("citadel-restart-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    flowing.sort();
    takeover.sort();
    println!("backend restart, {rounds} rounds: median / p90");
    println!(
        "  kill -9 to the guest's next write in the image: {:.1} / {:.1} ms",
        ms(percentile(&flowing, 50)),
        ms(percentile(&flowing, 90))
    );
    println!(
        "  hang-up noticed to new backend serving (Citadel's log, whole ms): {:.0} / {:.0} ms",
        ms(percentile(&takeover, 50)),
        ms(percentile(&takeover, 90))
    );
    ExitCode::SUCCESS
}
