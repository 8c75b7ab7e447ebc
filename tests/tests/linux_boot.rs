//! The project's guest kernel and initramfs (scripts/guest-kernel.sh): booted by QEMU with TCG
//! to user space on both machine types, with a test script run by the guest's /init; and
//! booted by Citadel, which on this kind of host (no hardware virtualization) gets as far as
//! starting init.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use citadel_tests::kernel::{
    guest_kernel, hardware_virtualization, initramfs_with_script, qemu, ConsoleProcess, GuestKernel,
};
use citadel_tests::vm::TempDir;
use citadel_tests::{binary, skip};

/// QEMU with TCG reaches user space in about a second; leave room for a loaded host.
const TCG_TIMEOUT: Duration = Duration::from_secs(120);
/// Under KVM on a host without VMX/SVM the kernel runs through an instruction emulator and
/// reaches init after about two minutes.
const EMULATED_KVM_TIMEOUT: Duration = Duration::from_secs(480);

/// CPU features Linux must not use where KVM emulates guest instructions in software, and
/// the boot-time int3 self-test that trips the same emulator (see DESIGN.md). Also the
/// TSC-deadline timer: there the guest runs several times slower than real time, and until
/// it switches to high-resolution timers Linux drives its periodic tick from that one-shot
/// timer, replaying each missed tick in a loop (tick_handle_periodic) that then never
/// catches up with the clock; in the local APIC's periodic mode it handles one tick per
/// interrupt.
const CONSERVATIVE_CPU_CMDLINE: &str = "noxsave clearcpuid=smap,smep,umip,popcnt,avx,avx2,\
avx512f,bmi1,bmi2,erms,fsrm,movbe,aes,pclmulqdq,rdrand,rdseed,sha_ni,xsave,fma,f16c,sse4_1,\
sse4_2,ssse3,pcid,invpcid,fsgsbase,rdpid,clflushopt,clwb,adx,abm,lzcnt citadel.no_int3_selftest \
lapic=notscdeadline";

const DISK_MARKER: &[u8] = b"citadel-disk-marker";
const DISK_SIZE: usize = 1 << 20;
/// Filled with a pattern by the host, discarded by the guest, read back as zeros.
const DISCARD_OFFSET: usize = 64 * 1024;
const DISCARD_LEN: usize = 64 * 1024;
/// Where the guest writes GUEST_MARKER for the host to find after the run.
const GUEST_WRITE_OFFSET: usize = 4096;
const GUEST_MARKER: &str = "written-by-the-guest";

fn kernel_or_skip(test: &str) -> Option<GuestKernel> {
    let kernel = guest_kernel();
    if kernel.is_none() {
        skip(
            test,
            "the guest kernel is not built (run scripts/guest-kernel.sh)",
            true,
        );
    }
    kernel
}

fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    let qemu = qemu();
    if qemu.is_none() {
        skip(test, "qemu-system-x86_64 is not installed", true);
    }
    qemu
}

/// A raw disk: the marker at offset 0, a pattern in the range the guest discards.
fn make_disk(path: &Path) {
    let mut disk = vec![0u8; DISK_SIZE];
    disk[..DISK_MARKER.len()].copy_from_slice(DISK_MARKER);
    disk[DISCARD_OFFSET..DISCARD_OFFSET + DISCARD_LEN].fill(0xa5);
    std::fs::write(path, disk).expect("write disk image");
}

/// The guest side: read the marker, write one back, discard a range, then exit with a
/// status /init must report.
fn disk_script(device: &str) -> String {
    format!(
        "echo \"citadel-test: disk=$(dd if={device} bs={len} count=1 2>/dev/null)\"\n\
         echo -n {GUEST_MARKER} | dd of={device} bs=4096 seek={seek} conv=notrunc,fsync \
         2>/dev/null\n\
         echo \"citadel-test: write rc=$?\"\n\
         blkdiscard -o {DISCARD_OFFSET} -l {DISCARD_LEN} {device}\n\
         echo \"citadel-test: discard rc=$?\"\n\
         sync\n",
        len = DISK_MARKER.len(),
        seek = GUEST_WRITE_OFFSET / 4096,
    )
}

fn check_disk_after_run(path: &Path) {
    let disk = std::fs::read(path).expect("read disk image");
    assert_eq!(
        &disk[GUEST_WRITE_OFFSET..GUEST_WRITE_OFFSET + GUEST_MARKER.len()],
        GUEST_MARKER.as_bytes(),
        "the guest's write did not reach the disk image"
    );
    assert!(
        disk[DISCARD_OFFSET..DISCARD_OFFSET + DISCARD_LEN]
            .iter()
            .all(|&b| b == 0),
        "the discarded range still holds data"
    );
}

/// TCG's TSC runs at the host's frequency. Linux calibrates it against the PIT, which fails
/// on a loaded host (timing under TCG is irregular); on microvm, with no HPET or ACPI PM timer
/// to fall back to, the boot then stalls. Telling the kernel the frequency skips that.
fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("cpu MHz"))
                .and_then(|line| line.split(':').nth(1))
                .and_then(|mhz| mhz.trim().parse::<f64>().ok())
        })
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

fn expect(console: &mut ConsoleProcess, needle: &str, timeout: Duration) -> String {
    console
        .wait_for(needle, timeout)
        .unwrap_or_else(|| panic!("no `{needle}` on the console\n{}", console.transcript()))
}

/// Boots the guest under QEMU with TCG and checks the script's disk work and exit status,
/// plus the console lines `expect_lines` that `extra_script` or the kernel print.
fn run_qemu_tcg(
    test: &str,
    machine_args: &[&str],
    kernel: &Path,
    extra_script: &str,
    expect_lines: &[&str],
) {
    let Some(qemu) = qemu_or_skip(test) else {
        return;
    };
    let Some(guest) = kernel_or_skip(test) else {
        return;
    };
    let scratch = TempDir::new(test);
    let disk = scratch.path().join("disk.img");
    make_disk(&disk);
    let script = format!(
        "echo citadel-test: kernel $(uname -r)\n{}{extra_script}exit 7\n",
        disk_script("/dev/vda")
    );
    let initramfs = scratch.path().join("initramfs.cpio.gz");
    initramfs_with_script(&guest.initramfs, &script, &initramfs).expect("write initramfs");

    let mut command = Command::new(qemu);
    command
        .args(["-accel", "tcg", "-m", "256", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .args(machine_args)
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=disk0,format=raw,discard=unmap",
            disk.display()
        ))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 tsc_early_khz={}",
            host_tsc_khz()
        ));
    let mut console = ConsoleProcess::spawn(command).expect("spawn qemu-system-x86_64");

    for line in expect_lines
        .iter()
        .filter(|l| !l.starts_with("citadel-test:"))
    {
        expect(&mut console, line, TCG_TIMEOUT);
    }
    expect(&mut console, "Run /init", TCG_TIMEOUT);
    expect(&mut console, "citadel-init: start", TCG_TIMEOUT);
    expect(&mut console, "citadel-test: kernel 6.1", TCG_TIMEOUT);
    let line = expect(&mut console, "citadel-test: disk=", TCG_TIMEOUT);
    assert_eq!(
        line,
        format!(
            "citadel-test: disk={}",
            String::from_utf8_lossy(DISK_MARKER)
        )
    );
    expect(&mut console, "citadel-test: write rc=0", TCG_TIMEOUT);
    expect(&mut console, "citadel-test: discard rc=0", TCG_TIMEOUT);
    for line in expect_lines
        .iter()
        .filter(|l| l.starts_with("citadel-test:"))
    {
        expect(&mut console, line, TCG_TIMEOUT);
    }
    expect(&mut console, "citadel-init: done rc=7", TCG_TIMEOUT);
    // /init powers the guest off; with ACPI that ends QEMU.
    let code = console.wait_exit(TCG_TIMEOUT);
    assert_eq!(code, Some(0), "{}", console.transcript());
    check_disk_after_run(&disk);
    // Without citadel.no_int3_selftest the kernel behaves as upstream Linux.
    assert!(
        !console.transcript().contains("int3 self-test skipped"),
        "{}",
        console.transcript()
    );
}

#[test]
fn qemu_tcg_boots_guest_kernel_to_init() {
    let Some(guest) = kernel_or_skip("qemu_tcg_microvm") else {
        return;
    };
    // vmlinux through its PVH note; the disk on virtio-mmio, announced on the command line.
    run_qemu_tcg(
        "qemu_tcg_microvm",
        &[
            "-M",
            "microvm,rtc=on",
            "-device",
            "virtio-blk-device,drive=disk0",
        ],
        &guest.vmlinux,
        "",
        &["virtio_blk virtio0: [vda]"],
    );
}

#[test]
fn qemu_tcg_boots_bzimage_on_q35_with_virtio_pci() {
    let Some(guest) = kernel_or_skip("qemu_tcg_q35") else {
        return;
    };
    // bzImage through the Linux boot protocol; the disk on virtio-pci with MSI-X behind a
    // PCIe root port whose hotplug the kernel drives natively (QEMU hands native hotplug to
    // the OS only with its ACPI hotplug off).
    run_qemu_tcg(
        "qemu_tcg_q35",
        &[
            "-M",
            "q35",
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-device",
            "pcie-root-port,id=rp0,chassis=1,slot=1",
            "-device",
            "virtio-blk-pci,bus=rp0,drive=disk0",
            "-device",
            "virtio-balloon-pci",
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
        ],
        &guest.bzimage,
        "echo citadel-test: slots=$(ls /sys/bus/pci/slots)\n\
         grep -q PCI-MSI /proc/interrupts && echo citadel-test: msi=yes\n\
         ls -d /sys/bus/virtio/drivers/virtio_balloon/virtio* >/dev/null && \
         echo citadel-test: balloon=bound\n\
         ip link set eth0 up && echo citadel-test: eth0=up\n",
        &[
            "pciehp: Slot #1",
            "citadel-test: slots=1",
            "citadel-test: msi=yes",
            "citadel-test: balloon=bound",
            "citadel-test: eth0=up",
        ],
    );
}

#[test]
fn citadel_boots_guest_kernel_to_run_init() {
    let test = "citadel_linux_boot";
    let Some(guest) = kernel_or_skip(test) else {
        return;
    };
    let scratch = TempDir::new(test);
    let initramfs = scratch.path().join("initramfs.cpio.gz");
    initramfs_with_script(
        &guest.initramfs,
        "echo citadel-test: user space runs\n",
        &initramfs,
    )
    .expect("write initramfs");
    let qmp = scratch.path().join("qmp.sock");

    let mut command = Command::new(binary("citadel"));
    command
        .args(["-machine", "microvm", "-kernel"])
        .arg(&guest.vmlinux)
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {CONSERVATIVE_CPU_CMDLINE}"))
        .args([
            "-m", "128", "-smp", "1", "-cpu", "baseline", "-serial", "stdio",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", qmp.display()));
    let mut console = ConsoleProcess::spawn(command).expect("spawn citadel");

    expect(&mut console, "Linux version 6.1", EMULATED_KVM_TIMEOUT);
    // The kernel finds Citadel's ACPI tables and takes its CPUs and IOAPIC from the MADT.
    expect(
        &mut console,
        "ACPI: RSDP 0x00000000000E0000",
        EMULATED_KVM_TIMEOUT,
    );
    expect(
        &mut console,
        "Using ACPI (MADT) for SMP configuration information",
        EMULATED_KVM_TIMEOUT,
    );
    // The kernel patch honours the parameter (and only then skips the self-test).
    expect(
        &mut console,
        "int3 self-test skipped (citadel.no_int3_selftest)",
        EMULATED_KVM_TIMEOUT,
    );
    expect(&mut console, "Run /init", EMULATED_KVM_TIMEOUT);
    if hardware_virtualization() {
        expect(&mut console, "citadel-init: start", EMULATED_KVM_TIMEOUT);
        expect(
            &mut console,
            "citadel-test: user space runs",
            EMULATED_KVM_TIMEOUT,
        );
        expect(
            &mut console,
            "citadel-init: done rc=0",
            EMULATED_KVM_TIMEOUT,
        );
    } else {
        skip(
            test,
            "no hardware virtualization (vmx/svm): the kernel reached init, but user space \
             cannot run under this host's emulated KVM",
            false,
        );
    }
}
