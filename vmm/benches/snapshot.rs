//! Snapshot write rate and restore-to-running latency of a machine running the `counter`
//! guest, for 256 MiB and 2 GiB of RAM, with guest RAM mapped from the snapshot lazily,
//! prefaulted, or copied into shared memory. Prints figures; asserts nothing about time.
//!
//! Run with `cargo bench -p citadel --bench snapshot` once the guest programs are built
//! (`cargo build -p citadel-tests`). The snapshot goes to `$CITADEL_SNAPSHOT_BENCH_DIR`
//! (default: the temporary directory), which needs room for the largest RAM size.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use citadel::boot::BootSource;
use citadel::cpu::CpuTemplate;
use citadel::devices::legacy::Discard;
use citadel::machine::{Incoming, Machine, MachineSpec, MachineWiring};
use citadel::snapshot::files;
use vmm_sys_util::eventfd::EventFd;

/// A guest program built by `cargo build -p citadel-tests`, next to this bench's target dir.
fn guest(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<triple>/<profile>/deps/<bench>
    let path = exe
        .ancestors()
        .nth(3)
        .expect("target layout")
        .join("guest")
        .join(format!("{name}.elf"));
    assert!(
        path.exists(),
        "{} missing: build the guest programs first",
        path.display()
    );
    path
}

fn wiring() -> MachineWiring {
    let (events, _rx) = std::sync::mpsc::channel();
    MachineWiring {
        serial_out: Box::new(Discard),
        events,
        events_ready: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        vcpu_lockdown: Box::new(|_| Box::new(|| Ok(()))),
        before_vcpu_threads: Box::new(|| Ok(())),
        disks: Vec::new(),
    }
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    (bytes as f64 / f64::from(1 << 20)) / took.as_secs_f64()
}

fn run(boot: &BootSource, mem_bytes: u64, base: &Path) {
    let dir = base.join(format!(
        "citadel-snapshot-bench-{}-{}",
        std::process::id(),
        mem_bytes >> 20
    ));
    let spec = MachineSpec {
        boot,
        vcpus: 1,
        mem_bytes,
        cpu_template: CpuTemplate::Host,
        balloon: None,
        incoming: None,
        pcie: None,
    };
    let mut machine = Machine::create(&spec, wiring()).expect("machine");
    machine.start();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    machine.pause().expect("pause");
    machine.write_snapshot(&dir).expect("snapshot");
    let write = t.elapsed();
    machine.shutdown();
    drop(machine);

    let t = Instant::now();
    let checked = files::read(&dir, mem_bytes, 1, true).expect("read");
    let check = t.elapsed();
    // verify=off: the memory file's length only.
    let t = Instant::now();
    drop(files::read(&dir, mem_bytes, 1, false).expect("read"));
    let check_length = t.elapsed();
    // Lazily mapped (the default), with every page read in first (prefault=on), and copied
    // into shared memory for backend processes (share=on, what a VM with disks or NICs
    // gets).
    let mut builds = [Duration::ZERO; 3];
    let modes = [(false, false), (true, false), (false, true)];
    for (build, (prefault, share)) in builds.iter_mut().zip(modes) {
        let restore_spec = MachineSpec {
            incoming: Some(Incoming {
                snapshot: &checked,
                prefault,
                share,
            }),
            ..spec
        };
        let t = Instant::now();
        let mut restored = Machine::create(&restore_spec, wiring()).expect("restore");
        restored.start();
        *build = t.elapsed();
        restored.shutdown();
    }
    let [build, prefaulted, shared] = builds;
    std::fs::remove_dir_all(&dir).expect("cleanup");

    println!(
        "{:>5} MiB  pause+write {:>8.1} ms ({:>7.0} MiB/s)   checks {:>8.1} ms ({:>7.0} MiB/s)   \
         build+start {:>6.1} ms (prefault {:>6.1} ms, share {:>6.1} ms)   \
         restore-to-running {:>8.1} ms (verify=off {:>6.1} ms)",
        mem_bytes >> 20,
        write.as_secs_f64() * 1e3,
        mib_per_s(mem_bytes, write),
        check.as_secs_f64() * 1e3,
        mib_per_s(mem_bytes, check),
        build.as_secs_f64() * 1e3,
        prefaulted.as_secs_f64() * 1e3,
        shared.as_secs_f64() * 1e3,
        (check + build).as_secs_f64() * 1e3,
        (check_length + build).as_secs_f64() * 1e3,
    );
}

fn main() {
    citadel::vcpu::register_kick_handler().expect("kick handler");
    let boot = BootSource {
        kernel: guest("counter"),
        pcie: false,
        initrd: None,
        cmdline: String::new(),
        virtio_mmio: Vec::new(),
    };
    let base =
        std::env::var_os("CITADEL_SNAPSHOT_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    for mem in [256u64 << 20, 2 << 30] {
        run(&boot, mem, &base);
    }
}
