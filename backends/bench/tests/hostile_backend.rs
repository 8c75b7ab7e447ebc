//! citadel-vu-bench against a vhost-user-blk backend that misbehaves on purpose: it must stop
//! with one readable line naming the fault, not hang, panic or count bogus completions.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;

const BENCH: &str = env!("CARGO_BIN_EXE_citadel-vu-bench");
const CAPACITY_SECTORS: u64 = 2048;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Completes requests under a descriptor index outside the queue.
    IdOutOfRange,
    /// Claims to have written far more than the request's buffers hold.
    LengthTooLong,
    /// Completes the first request correctly but with an I/O error status.
    IoError,
    /// Takes requests and never completes them.
    Silent,
}

#[derive(Clone)]
struct HostileBlk {
    fault: Fault,
    mem: Arc<Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>>,
    next_used: Arc<Mutex<u16>>,
}

impl HostileBlk {
    fn new(fault: Fault) -> Self {
        Self {
            fault,
            mem: Arc::new(Mutex::new(None)),
            next_used: Arc::new(Mutex::new(0)),
        }
    }

    fn serve_queue(&self, vring: &VringRwLock) -> std::io::Result<()> {
        let atomic = self.mem.lock().unwrap().clone().expect("memory table set");
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let size = queue.size();
        let used_ring = GuestAddress(queue.used_ring());
        while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            let status = chain.last().expect("chain has descriptors").addr();
            let (id, len) = match self.fault {
                Fault::Silent => continue,
                Fault::IdOutOfRange => (u32::from(size) + 3, 1),
                Fault::LengthTooLong => (u32::from(head), 1 << 20),
                Fault::IoError => {
                    mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status).unwrap();
                    queue.add_used(&*mem, head, 1).unwrap();
                    continue;
                }
            };
            // Written by hand: the queue's own add_used refuses such entries.
            let mut next = self.next_used.lock().unwrap();
            let entry = used_ring.unchecked_add(4 + 8 * u64::from(*next % size));
            mem.write_obj(id, entry).unwrap();
            mem.write_obj(len, entry.unchecked_add(4)).unwrap();
            *next = next.wrapping_add(1);
            mem.store(*next, used_ring.unchecked_add(2), Ordering::Release)
                .unwrap();
        }
        drop(state);
        vring.signal_used_queue()
    }
}

impl VhostUserBackend for HostileBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = [0u8; 60];
        config[..8].copy_from_slice(&CAPACITY_SECTORS.to_le_bytes());
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        *self.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.serve_queue(vring),
            None => Ok(()),
        }
    }
}

/// Serves one frontend connection on a fresh socket from a background thread.
fn start(test: &str, fault: Fault) -> PathBuf {
    let socket = std::env::temp_dir().join(format!(
        "citadel-vu-bench-{}-{test}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&socket);
    let mut daemon = VhostUserDaemon::new(
        test.to_string(),
        HostileBlk::new(fault),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let path = socket.clone();
    std::thread::spawn(move || daemon.serve(&path));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "backend socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    socket
}

/// Runs the benchmark against the faulty backend; returns its stderr after checking it
/// failed with exit status 1, printed nothing on stdout and said one line.
fn run_against(test: &str, fault: Fault, extra: &[&str]) -> String {
    let socket = start(test, fault);
    let started = Instant::now();
    let out = Command::new(BENCH)
        .arg("--socket")
        .arg(&socket)
        .args(["--iodepth", "4", "--ios", "100"])
        .args(extra)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&socket);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{fault:?}: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "{fault:?}: figures printed despite the fault"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{fault:?} took long to notice"
    );
    stderr
}

#[test]
fn used_id_outside_the_queue_is_reported() {
    let stderr = run_against("id-out-of-range", Fault::IdOutOfRange, &[]);
    assert!(
        stderr.contains("queue 0: backend returned used id 131"),
        "{stderr}"
    );
}

#[test]
fn used_length_beyond_the_buffers_is_reported() {
    let stderr = run_against("length-too-long", Fault::LengthTooLong, &[]);
    assert!(stderr.contains("bytes written to chain"), "{stderr}");
    assert!(stderr.contains("1048576"), "{stderr}");
}

#[test]
fn error_status_is_reported_with_its_sector() {
    let stderr = run_against("io-error", Fault::IoError, &[]);
    assert!(stderr.contains("completed with status 1"), "{stderr}");
    assert!(stderr.contains("at sector"), "{stderr}");
}

#[test]
fn a_backend_that_never_completes_is_reported_after_the_timeout() {
    let stderr = run_against("silent", Fault::Silent, &["--timeout", "0.5"]);
    assert!(
        stderr.contains(
            "queue 0: no completion from the backend within 0.500 s with 4 requests in flight"
        ),
        "{stderr}"
    );
}
