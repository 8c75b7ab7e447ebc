//! Feeds citadel-blk's vhost-user request handler (its `Connection`, behind the shared
//! `citadel-vhost-user` session and the vhost crate's request dispatcher, as the backend serves
//! a frontend) with a hostile frontend session: any
//! messages, framing and payloads, a sealed memfd as guest memory (and an unsealed one it must
//! refuse), kick and call eventfds, guest memory written between messages, and kicks that the
//! device's queue workers serve from that memory.
//!
//! Checks that nothing panics or touches memory out of bounds, in the handler or in the queue
//! workers, and that the handler keeps answering until the frontend breaks the framing.
//!
//! Run with `scripts/fuzz.sh`, or from `backends/blk/fuzz` with `cargo fuzz run blk_vhost_user`.

#![no_main]

// citadel-blk is a binary crate: its modules are compiled into this target, at the crate
// root where their `crate::` paths expect them.
#[allow(dead_code)]
#[path = "../../src/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "../../src/device.rs"]
mod device;
#[allow(dead_code)]
#[path = "../../src/disk.rs"]
mod disk;
#[allow(dead_code)]
#[path = "../../src/inflight.rs"]
mod inflight;
#[allow(dead_code)]
#[path = "../../src/request.rs"]
mod request;
#[allow(dead_code)]
#[path = "../../src/stats.rs"]
mod stats;

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_tests::vhost_user_script::{decode, Session, Step};
use citadel_vhost_user::session::{recoverable, Session as Served};
use libfuzzer_sys::fuzz_target;

use crate::cli::ImageSource;
use crate::device::{Connection, Device, DeviceConfig};
use crate::disk::Disk;

/// Most kicks per input that wait for the workers (each may wait for a call).
const MAX_WAITED_KICKS: usize = 4;
/// Largest payload the vhost crate accepts; a header announcing more is refused at once.
const MAX_PAYLOAD: usize = 0x1000;

/// The device outlives connections, as in the backend: one for the whole run, with its
/// queue workers started once.
fn device() -> &'static Arc<Device> {
    static DEVICE: OnceLock<Arc<Device>> = OnceLock::new();
    DEVICE.get_or_init(|| {
        // SAFETY: valid C string, constant flags; the result is checked and then owned.
        let fd =
            unsafe { libc::memfd_create(c"citadel-blk-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptor owned by nobody else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&[0x5a; 64 * 512]).unwrap();
        let disk = Disk::open(&ImageSource::Fd(file.into_raw_fd()), false, false).unwrap();
        let dev = Arc::new(
            Device::new(
                disk,
                &DeviceConfig {
                    num_queues: 2,
                    queue_size: 256,
                    block_size: 512,
                    serial: Some("citadel-fuzz".into()),
                    memory_files: MemoryFilePolicy::SealedOnly,
                },
            )
            .unwrap(),
        );
        // The workers run for the life of the process, as in the backend.
        static WORKERS: OnceLock<Vec<std::thread::JoinHandle<()>>> = OnceLock::new();
        WORKERS.get_or_init(|| dev.spawn_workers().unwrap());
        dev
    })
}

/// Whether a whole message waits on `fd`, or at least a header the handler refuses without
/// reading further (a payload larger than any message). The vhost crate retries a short read
/// until the rest arrives, so the handler is only called when it will not wait.
fn message_ready(fd: i32) -> bool {
    let mut header = [0u8; 12];
    // SAFETY: peeks into a live buffer of the given length on our own socket.
    let n = unsafe {
        libc::recv(
            fd,
            header.as_mut_ptr().cast(),
            header.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != header.len() as isize {
        return false;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let mut waiting: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a pointer to a live int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut waiting) } < 0 {
        return false;
    }
    size > MAX_PAYLOAD || waiting as usize >= header.len() + size
}

/// Bytes waiting to be read on `fd`.
fn pending(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a pointer to a live int.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc < 0 {
        0
    } else {
        n as usize
    }
}

fuzz_target!(|data: &[u8]| {
    let steps = decode(data);
    let dev = device();
    let (frontend, backend) = UnixStream::pair().unwrap();
    // Non-blocking, so that the end of the stream reads as such; the handler is only called
    // when a whole message waits (see `message_ready`).
    backend.set_nonblocking(true).unwrap();
    let backend_fd = backend.as_raw_fd();
    let session = Session::new(frontend);
    let conn = Arc::new(Mutex::new(Connection::new(Arc::clone(dev))));
    let mut handler = Served::new(backend, conn, dev.num_queues()).unwrap();
    let serve = |handler: &mut Served<Mutex<Connection>>, ready: fn(i32) -> bool| {
        while ready(backend_fd) {
            match handler.handle_request() {
                Ok(()) => {}
                Err(e) if recoverable(&e) => {}
                // The backend drops a frontend that broke the framing.
                Err(_) => return false,
            }
            session.drain_replies();
        }
        true
    };
    let mut waited_kicks = 0;
    for step in &steps {
        session.perform(step);
        match step {
            Step::Message { .. } => {
                if !serve(&mut handler, message_ready) {
                    return;
                }
            }
            Step::Kick if waited_kicks < MAX_WAITED_KICKS => {
                waited_kicks += 1;
                session.wait_call(2);
            }
            _ => {}
        }
    }
    // The frontend leaves: whatever is left is read up to the end of the stream.
    let _ = session.frontend.sock.shutdown(Shutdown::Write);
    serve(&mut handler, |fd| pending(fd) > 0);
});
