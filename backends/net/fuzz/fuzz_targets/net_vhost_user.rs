//! Serves a hostile frontend session with citadel-net's own stack, as the backend serves a
//! connection: the shared `citadel-vhost-user` session (early SET_VRING_ENABLE) and the vhost
//! crate's dispatcher in front of citadel-net's message handler (`handler::Connection`: memory
//! table, rings, features), and the queue-pair worker moving frames between the guest's rings
//! and a tap. The session is any messages,
//! framing and payloads, a sealed memfd as guest memory (and an unsealed one that must be
//! refused), kick and call eventfds, guest memory written between messages, and kicks. The tap
//! is one end of a SOCK_SEQPACKET pair: frames the input puts on the other end reach the RX
//! ring, frames the guest transmits are read off it.
//!
//! Checks that nothing panics or touches memory out of bounds, in any of the threads, and
//! that every transmitted frame fits the largest frame the backend accepts.
//!
//! Run with `scripts/fuzz.sh`, or from `backends/net/fuzz` with `cargo fuzz run net_vhost_user`.

#![no_main]

// citadel-net is a binary crate: its modules are compiled into this target, at the crate
// root where their `crate::` paths expect them.
#[allow(dead_code)]
#[path = "../../src/device.rs"]
mod device;
#[allow(dead_code)]
#[path = "../../src/handler.rs"]
mod handler;
#[allow(dead_code)]
#[path = "../../src/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "../../src/tap.rs"]
mod tap;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_tests::vhost_user_script::{decode, Session, Step};
use citadel_vhost_user::session::{recoverable, Session as Served};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::Error as VhostError;

use crate::device::NetConfig;
use crate::handler::Connection;
use crate::stats::Stats;
use crate::tap::TapQueue;

/// Most kicks per input that wait for the worker (each may wait for a call).
const MAX_WAITED_KICKS: usize = 4;
/// Largest frame the backend hands the tap: a 64 KiB GSO frame, its Ethernet header and the
/// largest virtio-net header.
const MAX_TX: usize = 65535 + 14 + 12;

/// The device configuration outlives connections, as in the backend; `net` is the network's
/// end of the tap.
struct Fixture {
    config: Arc<NetConfig>,
    net: OwnedFd,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into a live two-element array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (tap, net) = seqpacket_pair();
        let config = Arc::new(NetConfig {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            taps: vec![TapQueue::from_frame_socket(File::from(tap))],
            stats: Arc::new(Stats::default()),
            memory_files: MemoryFilePolicy::SealedOnly,
        });
        Fixture { config, net }
    })
}

/// Serves the frontend's messages until it leaves or breaks the framing, as citadel-net's
/// `serve` does; dropping the connection at the end stops and joins its workers.
fn serve(config: &Arc<NetConfig>, stream: UnixStream) {
    let conn = Connection::new(Arc::clone(config)).unwrap();
    let rings = conn.rings();
    let mut session = Served::new(stream, Arc::new(Mutex::new(conn)), rings).unwrap();
    loop {
        match session.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected | VhostError::PartialMessage) => return,
            Err(e) if recoverable(&e) => {}
            Err(_) => return,
        }
    }
}

/// Sends `frame` to the backend through the tap, if the tap has room.
fn receive(net: &OwnedFd, frame: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: sends from a live buffer of the given length on our own socket.
    unsafe {
        libc::send(
            net.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
        )
    };
}

/// Reads every frame the backend transmitted and checks its size.
fn drain_transmitted(net: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; MAX_TX + 1];
    loop {
        // SAFETY: reads into a live buffer of the given length from our own socket; MSG_TRUNC
        // makes the kernel report the frame's real length.
        let n = unsafe {
            libc::recv(
                net.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return;
        }
        assert!(n as usize <= MAX_TX, "transmitted a frame of {n} bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte sizes a frame waiting on the tap for the guest's RX ring.
    let Some((&frame_len, rest)) = data.split_first() else {
        return;
    };
    let steps = decode(rest);
    let fixture = fixture();
    let (frontend, backend) = UnixStream::pair().unwrap();
    let config = Arc::clone(&fixture.config);
    let server = std::thread::spawn(move || serve(&config, backend));
    let session = Session::new(frontend);
    receive(&fixture.net, &vec![0u8; usize::from(frame_len) * 8]);
    let mut waited_kicks = 0;
    for step in &steps {
        session.perform(step);
        if matches!(step, Step::Kick) && waited_kicks < MAX_WAITED_KICKS {
            waited_kicks += 1;
            session.wait_call(2);
        }
        session.drain_replies();
    }
    // The frontend leaves; the server reads what is left up to the end of the stream.
    drop(session);
    server.join().unwrap();
    drain_transmitted(&fixture.net);
});
