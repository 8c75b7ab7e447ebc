//! Serves a hostile frontend session with citadel-net's own stack, as the backend serves a
//! connection: the message relay (its framing, memory-region checks and SET_VRING_ENABLE
//! quirk), vhost-user-backend's daemon around citadel-net's `NetBackend`, and the queue
//! worker moving frames between the guest's rings and a tap. The session is any messages,
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
#[path = "../../src/proxy.rs"]
mod proxy;
#[allow(dead_code)]
#[path = "../../src/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "../../src/tap.rs"]
mod tap;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use citadel_sandbox::memory_file::MemoryFilePolicy;
use citadel_tests::vhost_user_script::{decode, Session, Step};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::{NetBackend, NetConfig};
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

/// A listener on a fresh abstract address and a client connected to it: the daemon accepts
/// its connection through a listener, and this needs no file system.
fn channel() -> (UnixListener, UnixStream) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "citadel-net-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    let client = UnixStream::connect_addr(&addr).unwrap();
    (listener, client)
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
    let backend = Arc::new(NetBackend::new(Arc::clone(&fixture.config)));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("citadel-net-fuzz".into(), backend.clone(), mem).unwrap();
    let handlers = daemon.get_epoll_handlers();
    for (i, handler) in handlers.iter().enumerate() {
        handler
            .register_listener(
                backend.tap_fd(i),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.tap_event_id(),
            )
            .unwrap();
    }
    let (listener, client) = channel();
    daemon.start(&mut Listener::from(listener)).unwrap();
    let (frontend, relay_end) = UnixStream::pair().unwrap();
    let relay = proxy::Relay::start(
        relay_end,
        client,
        backend.num_queues(),
        MemoryFilePolicy::SealedOnly,
    )
    .unwrap();
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
    drop(session);
    let _ = daemon.wait();
    let _ = relay.stop();
    for handler in &handlers {
        handler.send_exit_event();
    }
    backend.discard_pending();
    // As citadel-net ends a connection: workers joined, epoll sets closed, then the exit
    // events the library leaves open closed.
    drop(daemon);
    drop(handlers);
    // SAFETY: the daemon and its epoll handlers are gone.
    unsafe { backend.close_exit_events() };
    drain_transmitted(&fixture.net);
});
