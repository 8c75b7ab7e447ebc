//! citadel-net against a hostile vhost-user frontend: a raw client sends oversized and
//! malformed messages, memory tables that do not match their files, early SET_VRING_ENABLE
//! with bad values, descriptor chains pointing outside guest memory, short virtio-net headers
//! and RX buffers too small for a frame. The backend must refuse or count each one and keep
//! serving well-behaved frontends afterwards.
//!
//! The well-behaved part sends SET_VRING_ENABLE before SET_FEATURES, in the order Debian's
//! QEMU 7.2 uses, and checks that the rings then work.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use citadel_tests::foreign::{ForeignClient, ForeignOutcome, NOBODY};
use citadel_tests::netns::{unique, NetNs};
use citadel_tests::vhost_user::{
    eventfd, get_features_request, Frontend, GuestMemory, GET_FEATURES, GET_PROTOCOL_FEATURES,
    NEED_REPLY, SET_FEATURES, SET_MEM_TABLE, SET_OWNER, SET_PROTOCOL_FEATURES, SET_VRING_ADDR,
    SET_VRING_BASE, SET_VRING_CALL, SET_VRING_ENABLE, SET_VRING_KICK, SET_VRING_NUM,
};
use citadel_tests::vm::TempDir;
use citadel_tests::{binary, skip, Reaped};

const TEST: &str = "net_hostile";
const MAC: [u8; 6] = [0x02, 0xc1, 0x7a, 0xde, 0x00, 0x01];

const PROTOCOL_FEATURES: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;
const PROTO_REPLY_ACK: u64 = 1 << 3;
const PROTO_CONFIG: u64 = 1 << 9;
const PROTO_MQ: u64 = 1;

/// Guest memory of the fake guest.
const MEM_SIZE: usize = 1 << 20;
/// Where the frontend pretends to have guest memory mapped (vhost-user ring addresses are
/// frontend virtual addresses).
const USER_BASE: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;

/// The vhost-user-net steps of a frontend on top of the raw messages.
trait NetFrontend {
    fn set_u64(&self, req: u32, v: u64);
    fn acked(&mut self, req: u32, payload: &[u8]) -> u64;
    fn closed_by_backend(&mut self) -> bool;
    fn table_refused(&mut self, table: &[u8], fds: &[RawFd]) -> bool;
    fn negotiate(&mut self) -> u64;
    fn negotiate_rings(&mut self, rings: u32) -> u64;
    fn config(&mut self) -> Vec<u8>;
}

impl NetFrontend for Frontend {
    fn set_u64(&self, req: u32, v: u64) {
        self.send(req, 0, &v.to_le_bytes(), &[]).expect("send");
    }

    /// Sends a request with NEED_REPLY and returns the ack status (0 = success).
    fn acked(&mut self, req: u32, payload: &[u8]) -> u64 {
        self.ack(req, payload, &[])
    }

    /// True when the backend closes the connection within the read timeout.
    fn closed_by_backend(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.sock.read(&mut b), Ok(0))
            || matches!(self.sock.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }

    /// Sends SET_MEM_TABLE asking for an ack: true when the backend answers with a refusal or
    /// closes the connection (a table whose descriptors do not match its regions cannot be
    /// read whole), false when it accepts the table.
    fn table_refused(&mut self, table: &[u8], fds: &[RawFd]) -> bool {
        self.send(SET_MEM_TABLE, NEED_REPLY, table, fds)
            .expect("send");
        match self.recv() {
            Ok((req, ack, _)) => {
                assert_eq!(req, SET_MEM_TABLE, "reply to another request");
                ack[..8] != [0; 8]
            }
            Err(_) => true,
        }
    }

    /// The negotiation up to SET_FEATURES, enabling the rings before SET_FEATURES as QEMU 7.2
    /// does. Returns the features offered.
    fn negotiate(&mut self) -> u64 {
        self.negotiate_rings(2)
    }

    fn negotiate_rings(&mut self, rings: u32) -> u64 {
        let offered = self.get_u64(GET_FEATURES);
        assert_ne!(offered & PROTOCOL_FEATURES, 0, "{offered:#x}");
        assert_ne!(offered & VERSION_1, 0, "{offered:#x}");
        self.send(SET_OWNER, 0, &[], &[]).expect("set owner");
        let proto = self.get_u64(GET_PROTOCOL_FEATURES);
        assert_ne!(proto & PROTO_REPLY_ACK, 0, "{proto:#x}");
        self.set_u64(
            SET_PROTOCOL_FEATURES,
            proto & (PROTO_MQ | PROTO_REPLY_ACK | PROTO_CONFIG),
        );
        for index in 0..rings {
            assert_eq!(self.acked(SET_VRING_ENABLE, &state(index, 1)), 0);
        }
        assert_eq!(
            self.acked(SET_FEATURES, &(VERSION_1 | PROTOCOL_FEATURES).to_le_bytes()),
            0
        );
        offered
    }

    fn config(&mut self) -> Vec<u8> {
        self.get_config(0, 10)[12..].to_vec()
    }
}

fn state(index: u32, num: u32) -> Vec<u8> {
    let mut v = index.to_le_bytes().to_vec();
    v.extend_from_slice(&num.to_le_bytes());
    v
}

/// A SET_MEM_TABLE payload: one region at guest address 0, mapped at USER_BASE.
fn table(size: u64, offset: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&USER_BASE.to_le_bytes());
    p.extend_from_slice(&offset.to_le_bytes());
    p
}

/// Ring layout of queue `q`: descriptor table, avail ring, used ring.
fn ring(q: u64) -> (u64, u64, u64) {
    let base = 0x1000 + q * 0x1000;
    (base, base + 0x400, base + 0x800)
}

struct Queue {
    index: u32,
    kick: OwnedFd,
    call: OwnedFd,
    avail: u16,
}

fn setup_queue(f: &Frontend, index: u32) -> Queue {
    setup_queue_at(f, index, ring(index as u64))
}

/// Sets queue `index` up with its rings at the given guest addresses.
fn setup_queue_at(f: &Frontend, index: u32, (desc, avail, used): (u64, u64, u64)) -> Queue {
    f.send(SET_VRING_NUM, 0, &state(index, QSIZE as u32), &[])
        .unwrap();
    f.send(SET_VRING_BASE, 0, &state(index, 0), &[]).unwrap();
    let mut addr = Vec::new();
    addr.extend_from_slice(&index.to_le_bytes());
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend_from_slice(&(USER_BASE + desc).to_le_bytes());
    addr.extend_from_slice(&(USER_BASE + used).to_le_bytes());
    addr.extend_from_slice(&(USER_BASE + avail).to_le_bytes());
    addr.extend_from_slice(&0u64.to_le_bytes());
    f.send(SET_VRING_ADDR, 0, &addr, &[]).unwrap();
    let call = eventfd();
    let kick = eventfd();
    for (req, fd) in [(SET_VRING_CALL, &call), (SET_VRING_KICK, &kick)] {
        f.send(req, 0, &u64::from(index).to_le_bytes(), &[fd.as_raw_fd()])
            .unwrap();
    }
    Queue {
        index,
        kick,
        call,
        avail: 0,
    }
}

impl Queue {
    /// Publishes a one-descriptor chain at descriptor slot `slot`.
    fn push(&mut self, mem: &GuestMemory, slot: u16, addr: u64, len: u32, writable: bool) {
        let (desc, avail, _) = ring(self.index as u64);
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&(if writable { 2u16 } else { 0 }).to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        mem.write(desc + 16 * slot as u64, &d);
        mem.write(
            avail + 4 + 2 * (self.avail % QSIZE) as u64,
            &slot.to_le_bytes(),
        );
        self.avail = self.avail.wrapping_add(1);
        mem.write(avail + 2, &self.avail.to_le_bytes());
    }

    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our eventfd.
        let n = unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.u16_at(ring(self.index as u64).2 + 2)
    }

    /// (id, len) of used element `n`.
    fn used(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
        let e = mem.read(ring(self.index as u64).2 + 4 + 8 * (n % QSIZE) as u64, 8);
        (
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        )
    }

    fn wait_used(&self, mem: &GuestMemory, n: u16, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if self.used_idx(mem) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn was_called(&self) -> bool {
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes into a live buffer from our non-blocking eventfd.
        unsafe { libc::read(self.call.as_raw_fd(), v.as_mut_ptr().cast(), 8) == 8 }
    }
}

struct Backend {
    child: Reaped,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Backend {
    fn alive(&mut self) -> bool {
        self.child.0.try_wait().expect("poll backend").is_none()
    }

    fn stats(&mut self) -> String {
        self.lines.extend(self.log.try_iter());
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.lines.push(line.clone());
                    if line.contains("] stats:") {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no stats line after SIGUSR1: {:#?}", self.lines);
    }
}

fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {line}"))
}

#[test]
fn hostile_frontends_are_refused_and_the_backend_keeps_serving() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        skip(
            TEST,
            "needs root and /dev/net/tun for the tap and netns",
            false,
        );
        return;
    }
    let busybox = Command::new("busybox")
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    if !busybox {
        skip(TEST, "busybox (for ping) is not installed", true);
        return;
    }
    let scratch = TempDir::new("net-hostile");
    let ns = NetNs::create(unique("cnh"));
    let tap = "cnh0";
    let socket = scratch.path().join("net.sock");
    let mac = MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut cmd = ns.exec(&[
        binary("citadel-net").to_str().expect("utf-8"),
        "--socket",
        socket.to_str().expect("utf-8"),
        "--tap",
        tap,
        "--mac",
        &mac,
    ]);
    cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    let mut child = Reaped(cmd.spawn().expect("start citadel-net"));
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut backend = Backend {
        child,
        log,
        lines: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.output(&["ip", "addr", "add", "10.78.0.1/24", "dev", tap]);
    ns.output(&["ip", "link", "set", tap, "up"]);

    // 1. A header announcing a payload larger than any vhost-user message.
    let mut f = Frontend::connect(&socket);
    let mut huge = Vec::new();
    huge.extend_from_slice(&SET_MEM_TABLE.to_le_bytes());
    huge.extend_from_slice(&1u32.to_le_bytes());
    huge.extend_from_slice(&0x10_0000u32.to_le_bytes());
    f.send_raw(&huge, &[]).expect("send");
    assert!(f.closed_by_backend(), "oversized message was not refused");
    assert!(backend.alive());

    // 2. A truncated message, then a hang-up.
    let f = Frontend::connect(&socket);
    f.send_raw(&GET_FEATURES.to_le_bytes()[..3], &[])
        .expect("send");
    drop(f);

    // 3. Memory tables that do not match their files.
    let mem = GuestMemory::new(MEM_SIZE);
    for (size, offset, what) in [
        (2 * MEM_SIZE as u64, 0, "region past the end of the memfd"),
        (
            MEM_SIZE as u64,
            4096,
            "offset pushes the region past the end",
        ),
        (u64::MAX, 1, "offset + size overflows"),
    ] {
        let mut f = Frontend::connect(&socket);
        f.negotiate();
        assert!(
            f.table_refused(&table(size, offset), &[mem.fd()]),
            "bad memory table accepted: {what}"
        );
        assert!(backend.alive(), "backend died on: {what}");
    }
    // A table whose region count does not match its fds, and one without any fd.
    for (count, fds) in [(9u32, vec![mem.fd()]), (1, vec![])] {
        let mut f = Frontend::connect(&socket);
        f.negotiate();
        let mut table = table(MEM_SIZE as u64, 0);
        table[..4].copy_from_slice(&count.to_le_bytes());
        assert!(
            f.table_refused(&table, &fds),
            "table with {count} regions and {} fds accepted",
            fds.len()
        );
        assert!(backend.alive());
    }

    // 4. Early SET_VRING_ENABLE with an index or state that does not exist is refused.
    let mut f = Frontend::connect(&socket);
    f.get_u64(GET_FEATURES);
    f.send(SET_OWNER, 0, &[], &[]).unwrap();
    f.set_u64(SET_PROTOCOL_FEATURES, PROTO_REPLY_ACK | PROTO_CONFIG);
    assert_eq!(
        f.acked(SET_VRING_ENABLE, &state(99, 1)),
        1,
        "ring 99 enabled"
    );
    assert_eq!(
        f.acked(SET_VRING_ENABLE, &state(0, 7)),
        1,
        "state 7 accepted"
    );
    drop(f);

    // 5. A used ring that runs off the end of guest memory: the ring is refused when it would
    //    start; the process and the next frontends go on.
    // Separate memory, so that nothing of this ring is left for the next frontend.
    let mem5 = GuestMemory::new(MEM_SIZE);
    let mut f = Frontend::connect(&socket);
    f.negotiate();
    f.send(
        SET_MEM_TABLE,
        NEED_REPLY,
        &table(MEM_SIZE as u64, 0),
        &[mem5.fd()],
    )
    .unwrap();
    assert_eq!(f.recv().expect("mem table ack").1[..8], [0; 8]);
    let (desc, avail, _) = ring(1);
    let _tx = setup_queue_at(&f, 1, (desc, avail, MEM_SIZE as u64 - 8));
    let kick = eventfd();
    assert_ne!(
        f.ack(SET_VRING_KICK, &1u64.to_le_bytes(), &[kick.as_raw_fd()]),
        0,
        "a ring running off guest memory was started"
    );
    assert!(
        backend.alive(),
        "backend died on a used ring outside memory"
    );
    drop(f);

    // 6. A well-behaved frontend (QEMU 7.2 order), then hostile descriptor chains.
    let before = backend.stats();
    let mut f = Frontend::connect(&socket);
    f.negotiate();
    assert_eq!(
        f.config(),
        [&MAC[..], &[1, 0, 1, 0]].concat(),
        "config space"
    );
    f.send(
        SET_MEM_TABLE,
        NEED_REPLY,
        &table(MEM_SIZE as u64, 0),
        &[mem.fd()],
    )
    .unwrap();
    assert_eq!(f.recv().expect("mem table ack").1[..8], [0; 8]);
    let mut rx = setup_queue(&f, 0);
    let mut tx = setup_queue(&f, 1);
    // A running ring keeps its size and base.
    assert_ne!(
        f.acked(SET_VRING_NUM, &state(1, 8)),
        0,
        "SET_VRING_NUM on a running ring accepted"
    );
    assert_ne!(
        f.acked(SET_VRING_BASE, &state(1, 5)),
        0,
        "SET_VRING_BASE on a running ring accepted"
    );

    // TX: a chain outside guest memory, a short header, then a good frame.
    let frame_gpa = 0x10000u64;
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(&[0x5a; 46]);
    mem.write(frame_gpa, &frame);
    // Read before publishing: the worker may process the ring before the kick arrives.
    let tap_rx_before: u64 = ns
        .output(&[
            "cat",
            &format!("/sys/class/net/{tap}/statistics/rx_packets"),
        ])
        .trim()
        .parse()
        .expect("tap counter");
    tx.push(&mem, 0, 0xdead_0000_0000, 100, false);
    tx.push(&mem, 1, frame_gpa, 4, false);
    tx.push(&mem, 2, frame_gpa, frame.len() as u32, false);
    tx.kick();
    assert!(
        tx.wait_used(&mem, 3, Duration::from_secs(10)),
        "TX chains not returned"
    );
    for n in 0..3 {
        assert_eq!(tx.used(&mem, n), (n as u32, 0), "used element {n}");
    }
    assert!(tx.was_called(), "no TX interrupt");
    let tap_rx_after: u64 = ns
        .output(&[
            "cat",
            &format!("/sys/class/net/{tap}/statistics/rx_packets"),
        ])
        .trim()
        .parse()
        .expect("tap counter");
    assert_eq!(
        tap_rx_after,
        tap_rx_before + 1,
        "the good frame did not reach the tap"
    );

    // RX: a buffer outside guest memory, one too small for a frame, then a good one. The host
    // pings a neighbour behind the tap, so frames arrive.
    rx.push(&mem, 0, 0xdead_0000_0000, 2048, true);
    rx.push(&mem, 1, 0x20000, 20, true);
    rx.push(&mem, 2, 0x30000, 2048, true);
    rx.kick();
    let mut ping = Reaped(
        ns.exec(&[
            "busybox",
            "ping",
            "-c",
            "5",
            "-i",
            "0.5",
            "-W",
            "1",
            "10.78.0.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ping"),
    );
    let got = rx.wait_used(&mem, 3, Duration::from_secs(15));
    let _ = ping.0.kill();
    assert!(got, "RX buffers not used: {}", rx.used_idx(&mem));
    assert_eq!(rx.used(&mem, 0), (0, 0), "RX chain outside memory");
    assert_eq!(rx.used(&mem, 1), (1, 0), "RX buffer too small");
    let (id, len) = rx.used(&mem, 2);
    assert_eq!(id, 2);
    assert!(len >= 12 + 42, "RX frame of {len} bytes");
    // The frame (ARP, or IPv6 neighbour discovery of the freshly raised tap) comes from the
    // host's side of the tap.
    let tap_mac: Vec<u8> = ns
        .output(&["cat", &format!("/sys/class/net/{tap}/address")])
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    let got = mem.read(0x30000, len as usize);
    assert_eq!(
        &got[12 + 6..12 + 12],
        &tap_mac[..],
        "source MAC: {got:02x?}"
    );
    assert_eq!(&got[10..12], &[1, 0], "num_buffers");
    assert!(rx.was_called(), "no RX interrupt");

    let after = backend.stats();
    assert!(
        counter(&after, "errors") >= counter(&before, "errors") + 2,
        "{after}\n{:#?}",
        backend.lines
    );
    assert!(
        counter(&after, "tx_drops") > counter(&before, "tx_drops"),
        "{after}"
    );
    assert!(
        counter(&after, "tx_packets") > counter(&before, "tx_packets"),
        "{after}"
    );
    assert!(
        counter(&after, "rx_drops") > counter(&before, "rx_drops"),
        "{after}"
    );
    assert!(
        counter(&after, "rx_packets") > counter(&before, "rx_packets"),
        "{after}"
    );
    drop(f);

    // 7. After all that, the next frontend is served normally.
    let mut f = Frontend::connect(&socket);
    f.negotiate();
    assert_eq!(f.config()[..6], MAC);
    drop(f);
    assert!(backend.alive(), "backend died: {:#?}", backend.lines);

    // SIGTERM ends it cleanly, with its counters.
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(backend.child.0.id() as i32, libc::SIGTERM) };
    let status = backend.child.0.wait().expect("wait backend");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let rest: Vec<String> = backend.log.try_iter().collect();
    let _ = std::io::stderr().flush();
    assert!(rest.iter().any(|l| l.contains("stats:")), "{rest:#?}");
}

/// Opens a fresh tap queue in the test's own network namespace (it disappears with the fd).
fn open_tap(name: &str) -> OwnedFd {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes the live, correctly laid out ifreq.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    OwnedFd::from(file)
}

/// Starts citadel-net with `fds` placed at descriptors 3, 4, ... of the child.
fn spawn_with_fds(args: &[&str], fds: &[RawFd]) -> Child {
    use std::os::unix::process::CommandExt;
    let fds = fds.to_vec();
    let mut cmd = Command::new(binary("citadel-net"));
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) run between fork and exec. The sources
    // are first moved above the targets so that no dup2 overwrites a source still needed.
    unsafe {
        cmd.pre_exec(move || {
            let mut moved = Vec::new();
            for &fd in &fds {
                let high = libc::fcntl(fd, libc::F_DUPFD, 100);
                if high < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved.push(high);
            }
            for (i, &fd) in moved.iter().enumerate() {
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().expect("start citadel-net")
}

#[test]
fn inherited_socket_and_tap_fds_serve_one_frontend_then_exit() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        skip(TEST, "needs root and /dev/net/tun for the tap", false);
        return;
    }
    let tap = open_tap(&format!("cnf{}", std::process::id() % 100_000));
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mac = MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut child = Reaped(spawn_with_fds(
        &["--fd", "3", "--tap-fd", "4", "--mac", &mac],
        &[theirs.as_raw_fd(), tap.as_raw_fd()],
    ));
    drop(theirs);
    drop(tap);
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut f = Frontend { sock: ours };
    f.negotiate();
    assert_eq!(f.config(), [&MAC[..], &[1, 0, 1, 0]].concat());
    let status = fs::read_to_string(format!("/proc/{}/status", child.0.id())).expect("status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.0.try_wait().expect("poll") {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "backend did not exit after its frontend"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("] stats: rx_packets="), "{err}");
}

#[test]
fn bad_arguments_and_bad_fds_fail_with_one_line() {
    for (args, code) in [
        (vec!["--tap", "x"], 2),
        (
            vec!["--socket", "/nonexistent/x", "--tap", "x", "--queues", "99"],
            2,
        ),
        (
            vec!["--fd", "3", "--tap", "x", "--mac", "01:02:03:04:05:06"],
            2,
        ),
        (vec!["--fd", "3", "--tap-fd", "3"], 2),
        (vec!["--frobnicate"], 2),
        // Descriptors that are not what they claim to be.
        (vec!["--fd", "3", "--tap-fd", "4"], 1),
        (vec!["--fd", "40", "--tap-fd", "41"], 1),
    ] {
        let devnull = fs::File::open("/dev/null").expect("/dev/null");
        let (_ours, theirs) = UnixStream::pair().expect("socketpair");
        let child = spawn_with_fds(&args, &[theirs.as_raw_fd(), devnull.as_raw_fd()]);
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        // One line: the argument error, or the logged runtime error after the start-up lines.
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("citadel-net:") || l.contains("ERROR"))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: {err}");
    }
    let out = Command::new(binary("citadel-net"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--tap-fd"));
}

#[test]
fn two_queue_pairs_each_reach_the_multiqueue_tap() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        skip(
            TEST,
            "needs root and /dev/net/tun for the tap and netns",
            false,
        );
        return;
    }
    let scratch = TempDir::new("net-mq");
    let ns = NetNs::create(unique("cnm"));
    let tap = "cnm0";
    let socket = scratch.path().join("net.sock");
    let mut cmd = ns.exec(&[
        binary("citadel-net").to_str().expect("utf-8"),
        "--socket",
        socket.to_str().expect("utf-8"),
        "--tap",
        tap,
        "--queues",
        "2",
    ]);
    cmd.stderr(Stdio::null());
    let _child = Reaped(cmd.spawn().expect("start citadel-net"));
    let mut f = Frontend::connect(&socket);
    ns.output(&["ip", "link", "set", tap, "up"]);
    let offered = f.negotiate_rings(4);
    assert_ne!(offered & (1 << 22), 0, "MQ not offered: {offered:#x}");
    assert_eq!(f.get_u64(17), 4, "GET_QUEUE_NUM");
    assert_eq!(f.config()[8..10], [2, 0], "max_virtqueue_pairs");
    let mem = GuestMemory::new(MEM_SIZE);
    f.send(
        SET_MEM_TABLE,
        NEED_REPLY,
        &table(MEM_SIZE as u64, 0),
        &[mem.fd()],
    )
    .unwrap();
    assert_eq!(f.recv().expect("mem table ack").1[..8], [0; 8]);
    let queues: Vec<Queue> = (0..4).map(|i| setup_queue(&f, i)).collect();
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(&[0x5a; 46]);
    mem.write(0x10000, &frame);
    let counter = || -> u64 {
        ns.output(&[
            "cat",
            &format!("/sys/class/net/{tap}/statistics/rx_packets"),
        ])
        .trim()
        .parse()
        .expect("tap counter")
    };
    let before = counter();
    let mut queues = queues;
    for q in [1usize, 3] {
        queues[q].push(&mem, 0, 0x10000, frame.len() as u32, false);
        queues[q].kick();
        assert!(
            queues[q].wait_used(&mem, 1, Duration::from_secs(10)),
            "TX ring {q} not served"
        );
    }
    assert_eq!(counter(), before + 2, "frames of both pairs on the tap");
}

/// Starts citadel-net in `ns` on `socket` and `tap` with `extra` arguments, under umask 0 (its
/// socket must be private anyway), with stderr piped; returns once the socket exists.
fn start_backend(ns: &NetNs, socket: &Path, tap: &str, extra: &[&str]) -> Reaped {
    use std::os::unix::process::CommandExt;
    let mut args = vec![
        binary("citadel-net").to_str().expect("utf-8").to_string(),
        "--socket".into(),
        socket.to_str().expect("utf-8").into(),
        "--tap".into(),
        tap.into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = ns.exec(&args);
    cmd.stderr(Stdio::piped());
    // SAFETY: umask is async-signal-safe and touches only the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let child = Reaped(cmd.spawn().expect("start citadel-net"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "citadel-net never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn only_the_allowed_uid_becomes_the_frontend_and_the_socket_is_0600() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        skip(
            TEST,
            "needs root and /dev/net/tun for the tap and netns",
            false,
        );
        return;
    }
    let scratch = TempDir::new("net-peer");
    // Anyone may pass through the directory, so only the socket's own mode stands in the way.
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let ns = NetNs::create(unique("cnp"));
    let socket = scratch.path().join("net.sock");
    let mut child = start_backend(&ns, &socket, "cnp0", &[]);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o600, "socket mode under umask 0");
    assert_eq!(
        ForeignClient::spawn(&socket, NOBODY, NOBODY, &get_features_request()).outcome(),
        ForeignOutcome::ConnectFailed(libc::EACCES)
    );

    // With the file opened up, the credential check still keeps the foreign uid out, and
    // the frontend being served does not notice.
    let mut first = Frontend::connect(&socket);
    first.negotiate();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let foreign = ForeignClient::spawn(&socket, NOBODY, NOBODY, &get_features_request());
    assert_ne!(first.get_u64(GET_FEATURES) & VERSION_1, 0);
    assert_eq!(first.config().len(), 10, "config space");
    drop(first);
    assert_eq!(foreign.outcome(), ForeignOutcome::ClosedWithoutReply);
    let mut next = Frontend::connect(&socket);
    next.negotiate();
    drop(next);

    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().expect("wait citadel-net");
    assert!(status.success(), "citadel-net exit status {status:?}");
    let mut log = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("read log");
    assert!(
        log.contains("refused a connection: peer pid")
            && log.contains(&format!(
                "uid {NOBODY} gid {NOBODY} is not an allowed frontend"
            )),
        "no refusal logged:\n{log}"
    );

    // --allow-uid widens the set: the same foreign process is now served.
    let wide_socket = scratch.path().join("wide.sock");
    let wide_ns = NetNs::create(unique("cnw"));
    let _wide = start_backend(
        &wide_ns,
        &wide_socket,
        "cnw0",
        &["--allow-uid", &NOBODY.to_string()],
    );
    fs::set_permissions(&wide_socket, fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        ForeignClient::spawn(&wide_socket, NOBODY, NOBODY, &get_features_request()).outcome(),
        ForeignOutcome::Answered
    );
}

#[test]
fn unsealed_memory_is_refused_and_a_truncating_frontend_cannot_kill_the_backend() {
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        skip(
            TEST,
            "needs root and /dev/net/tun for the tap and netns",
            false,
        );
        return;
    }
    let scratch = TempDir::new("net-unsealed");
    let ns = NetNs::create(unique("cnu"));
    let socket = scratch.path().join("net.sock");
    let mut child = start_backend(&ns, &socket, "cnu0", &[]);
    let mut f = Frontend::connect(&socket);
    f.negotiate();
    let unsealed = GuestMemory::unsealed(MEM_SIZE);
    assert!(
        f.table_refused(&table(MEM_SIZE as u64, 0), &[unsealed.fd()]),
        "a memory table in an unsealed memfd was accepted"
    );
    // Shrinking the file now reaches nothing of the backend's. The test does not touch its
    // own mapping afterwards either.
    // SAFETY: resizing a memfd this test owns.
    assert_eq!(unsafe { libc::ftruncate(unsealed.fd(), 0) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = child.0.try_wait().expect("poll backend") {
        panic!(
            "citadel-net died: {status:?} (signal {:?})",
            status.signal()
        );
    }
    // The same frontend goes on, and its sealed memory is taken.
    let sealed = GuestMemory::new(MEM_SIZE);
    assert!(
        !f.table_refused(&table(MEM_SIZE as u64, 0), &[sealed.fd()]),
        "sealed memory refused after an unsealed table"
    );
    drop(f);

    // --allow-unsealed-memory maps it, with the risk its help text states.
    let wide_socket = scratch.path().join("wide.sock");
    let _wide = start_backend(&ns, &wide_socket, "cnu1", &["--allow-unsealed-memory"]);
    let mut f = Frontend::connect(&wide_socket);
    let unsealed = GuestMemory::unsealed(MEM_SIZE);
    assert_eq!(f.share_memory(&unsealed, unsealed.fd()), 0);
}
