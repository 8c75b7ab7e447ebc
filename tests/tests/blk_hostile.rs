//! citadel-blk against a frontend that speaks raw vhost-user: first a well-behaved session
//! that writes and reads the image through a split ring, then malformed messages, bad memory
//! tables, wrong sizes and descriptor chains pointing outside guest memory. The backend must
//! refuse each one, stay alive, and serve a well-behaved frontend afterwards.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use citadel_tests::foreign::{ForeignClient, ForeignOutcome, NOBODY};
use citadel_tests::vm::TempDir;

use citadel_tests::vhost_user::{
    eventfd, get_features_request, Frontend, GuestMemory as Memory, GET_FEATURES, GET_INFLIGHT_FD,
    GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_VRING_BASE, NEED_REPLY, SET_FEATURES,
    SET_INFLIGHT_FD, SET_MEM_TABLE, SET_OWNER, SET_PROTOCOL_FEATURES, SET_VRING_ADDR,
    SET_VRING_BASE, SET_VRING_CALL, SET_VRING_ENABLE, SET_VRING_KICK, SET_VRING_NUM, VERSION,
};

const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL: u64 = 1 << 30;
const F_INDIRECT: u64 = 1 << 28;
const PF_MQ: u64 = 1 << 0;
const PF_REPLY_ACK: u64 = 1 << 3;
const PF_CONFIG: u64 = 1 << 9;
const PF_INFLIGHT: u64 = 1 << 12;

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

const IMAGE_SECTORS: u64 = 2048;

/// A citadel-blk process killed on drop.
struct Backend {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    _dir: TempDir,
}

impl Backend {
    fn start(extra: &[&str]) -> Backend {
        Backend::launch(extra, None, None)
    }

    /// Starts the backend with `umask` set (when given) in the child before exec.
    fn start_under_umask(extra: &[&str], umask: Option<libc::mode_t>) -> Backend {
        Backend::launch(extra, umask, None)
    }

    /// Starts the backend on a sparse image of `len` bytes.
    fn start_sparse(len: u64) -> Backend {
        Backend::launch(&[], None, Some(len))
    }

    /// The image is IMAGE_SECTORS of zeroes, or `sparse` bytes of holes.
    fn launch(extra: &[&str], umask: Option<libc::mode_t>, sparse: Option<u64>) -> Backend {
        use std::os::unix::process::CommandExt;
        let dir = TempDir::new("blk-hostile");
        let image = dir.path().join("disk.img");
        match sparse {
            Some(len) => std::fs::File::create(&image)
                .and_then(|f| f.set_len(len))
                .unwrap(),
            None => std::fs::write(&image, vec![0u8; (IMAGE_SECTORS * 512) as usize]).unwrap(),
        }
        let socket = dir.path().join("blk.sock");
        let mut cmd = Command::new(citadel_tests::binary("citadel-blk"));
        if let Some(mask) = umask {
            // SAFETY: umask is async-signal-safe and touches only the child's own mask.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("--image")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn citadel-blk");
        let backend = Backend {
            child,
            socket,
            image,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&backend.socket).is_err() {
            assert!(Instant::now() < deadline, "citadel-blk never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        // That probe connection was a frontend that left at once: the backend must go back
        // to accepting.
        backend
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn connect(&self) -> Frontend {
        Frontend::connect(&self.socket)
    }

    /// `/proc/<pid>/status` once the sandbox is up. The socket accepts connections (into the
    /// backlog) from bind time, slightly before the lockdown that precedes serving them.
    fn status(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
            if status.contains("Seccomp:\t2") || Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("citadel-blk exit status before cleanup: {exited:?}");
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            eprintln!("citadel-blk stderr:\n{err}");
        }
    }
}

/// Descriptor tables in guest memory: queue 0's at DESC, indirect ones anywhere.
trait DescTable {
    fn desc_at(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16);

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(DESC, index, addr, len, flags, next);
    }
}

impl DescTable for Memory {
    fn desc_at(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(table + u64::from(index) * 16, &d);
    }
}

/// The vhost-user-blk steps of a frontend on top of the raw messages.
trait BlkFrontend {
    fn acked(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> bool;
    fn negotiate(&mut self) -> u64;
    fn mem_table(&mut self, regions: &[(u64, u64, u64, u64)], fds: &[RawFd]) -> bool;
    fn vring_state(&mut self, req: u32, index: u32, num: u32) -> bool;
    fn vring_addr(&mut self, index: u32, desc: u64, used: u64, avail: u64) -> bool;
    fn vring_fd(&mut self, req: u32, index: u64, fd: RawFd) -> bool;
}

impl BlkFrontend for Frontend {
    /// Sends a request that asks for an ack; returns true when the backend accepted it.
    fn acked(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        self.ack(req, payload, fds) == 0
    }

    fn negotiate(&mut self) -> u64 {
        let features = self.get_u64(GET_FEATURES);
        let protocol = self.get_u64(GET_PROTOCOL_FEATURES);
        assert_eq!(
            protocol & (PF_MQ | PF_CONFIG | PF_INFLIGHT),
            PF_MQ | PF_CONFIG | PF_INFLIGHT
        );
        self.send(
            SET_PROTOCOL_FEATURES,
            0,
            &(PF_REPLY_ACK | PF_MQ | PF_CONFIG).to_le_bytes(),
            &[],
        )
        .unwrap();
        self.send(SET_OWNER, 0, &[], &[]).unwrap();
        assert!(self.acked(
            SET_FEATURES,
            &(F_VERSION_1 | F_PROTOCOL | F_INDIRECT).to_le_bytes(),
            &[]
        ));
        features
    }

    fn mem_table(&mut self, regions: &[(u64, u64, u64, u64)], fds: &[RawFd]) -> bool {
        let mut p = Vec::new();
        p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for (gpa, size, uaddr, off) in regions {
            for v in [gpa, size, uaddr, off] {
                p.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.acked(SET_MEM_TABLE, &p, fds)
    }

    fn vring_state(&mut self, req: u32, index: u32, num: u32) -> bool {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        self.acked(req, &p, &[])
    }

    fn vring_addr(&mut self, index: u32, desc: u64, used: u64, avail: u64) -> bool {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        for v in [desc, used, avail, 0u64] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        self.acked(SET_VRING_ADDR, &p, &[])
    }

    fn vring_fd(&mut self, req: u32, index: u64, fd: RawFd) -> bool {
        self.acked(req, &index.to_le_bytes(), &[fd])
    }
}

/// A frontend with memory and queue 0 set up.
struct Session {
    fe: Frontend,
    mem: Memory,
    kick: OwnedFd,
    call: OwnedFd,
    next_avail: u16,
}

impl Session {
    fn open(backend: &Backend) -> Session {
        Session::open_sized(backend, MEM_SIZE, QSIZE)
    }

    /// A session with `mem_size` bytes of guest memory and a queue of `qsize` entries (the
    /// request helpers below assume QSIZE).
    fn open_sized(backend: &Backend, mem_size: usize, qsize: u16) -> Session {
        let mut fe = backend.connect();
        fe.negotiate();
        let mem = Memory::new(mem_size);
        assert!(fe.mem_table(&[(0, mem_size as u64, mem.uaddr(), 0)], &[mem.fd()]));
        assert!(fe.vring_state(SET_VRING_NUM, 0, qsize.into()));
        let u = mem.uaddr();
        assert!(fe.vring_addr(0, u + DESC, u + USED, u + AVAIL));
        assert!(fe.vring_state(SET_VRING_BASE, 0, 0));
        let kick = eventfd();
        let call = eventfd();
        assert!(fe.vring_fd(SET_VRING_CALL, 0, call.as_raw_fd()));
        assert!(fe.vring_fd(SET_VRING_KICK, 0, kick.as_raw_fd()));
        assert!(fe.vring_state(SET_VRING_ENABLE, 0, 1));
        Session {
            fe,
            mem,
            kick,
            call,
            next_avail: 0,
        }
    }

    /// Makes the chain starting at `head` available, kicks, and waits for the used entry.
    /// Returns (used length, status byte at `status_gpa`).
    fn submit(&mut self, head: u16, status_gpa: u64) -> (u32, u8) {
        let used_before = self.mem.u16_at(USED + 2);
        let slot = self.next_avail % QSIZE;
        self.mem
            .write(AVAIL + 4 + u64::from(slot) * 2, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem.write(AVAIL + 2, &self.next_avail.to_le_bytes());
        self.mem.write(status_gpa, &[0xee]);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our own eventfd.
        assert_eq!(
            unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) },
            8
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.mem.u16_at(USED + 2) == used_before {
            assert!(Instant::now() < deadline, "request never completed");
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let mut buf = [0u8; 8];
            // SAFETY: draining our own non-blocking eventfd.
            unsafe { libc::read(self.call.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        }
        let idx = u64::from(used_before % QSIZE);
        let elem = self.mem.read(USED + 4 + idx * 8, 8);
        let id = u32::from_le_bytes(elem[0..4].try_into().unwrap());
        assert_eq!(id, u32::from(head), "used entry for another chain");
        let len = u32::from_le_bytes(elem[4..8].try_into().unwrap());
        (len, self.mem.read(status_gpa, 1)[0])
    }

    /// Signals the kick eventfd.
    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our own eventfd.
        assert_eq!(
            unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) },
            8
        );
    }

    /// Returns once the used index reaches `idx` or goes past it (modulo 2^16), or fails after
    /// 60 s.
    fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.mem.u16_at(USED + 2).wrapping_sub(idx) >= 0x8000 {
            assert!(Instant::now() < deadline, "used index never reached {idx}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The size_max and seg_max the backend advertises in its configuration space.
    fn limits(&mut self) -> (u32, u32) {
        let cfg = self.fe.get_config(0, 16);
        let field = |at: usize| u32::from_le_bytes(cfg[12 + at..16 + at].try_into().unwrap());
        (field(8), field(12))
    }

    /// Sends GET_VRING_BASE for queue 0; returns the base it answers.
    fn vring_base(&mut self) -> u32 {
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        self.fe.send(GET_VRING_BASE, 0, &p, &[]).unwrap();
        let (req, base, _) = self.fe.recv().unwrap();
        assert_eq!(req, GET_VRING_BASE);
        u32::from_le_bytes(base[4..8].try_into().unwrap())
    }

    fn header(&self, gpa: u64, kind: u32, sector: u64) {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.mem.write(gpa, &h);
    }

    /// Writes `data` at `sector` through a three-descriptor chain.
    fn write(&mut self, sector: u64, data: &[u8]) -> (u32, u8) {
        self.header(0x8000, 1, sector);
        self.mem.write(0x10000, data);
        self.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
        self.mem.desc(1, 0x10000, data.len() as u32, DESC_F_NEXT, 2);
        self.mem.desc(2, 0x9000, 1, DESC_F_WRITE, 0);
        self.submit(0, 0x9000)
    }

    /// Reads `len` bytes at `sector`.
    fn read(&mut self, sector: u64, len: u32) -> (u32, u8, Vec<u8>) {
        self.header(0x8000, 0, sector);
        self.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
        self.mem
            .desc(1, 0x20000, len, DESC_F_NEXT | DESC_F_WRITE, 2);
        self.mem.desc(2, 0x9000, 1, DESC_F_WRITE, 0);
        let (used, status) = self.submit(0, 0x9000);
        (used, status, self.mem.read(0x20000, len as usize))
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn image_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset as usize..offset as usize + len].to_vec()
}

/// Asserts that a fresh frontend can still write and read back.
fn still_serves(backend: &mut Backend, seed: u8) {
    assert!(backend.alive(), "citadel-blk died");
    let mut s = Session::open(backend);
    let data = pattern(seed, 4096);
    assert_eq!(s.write(100, &data), (1, 0));
    assert_eq!(image_bytes(&backend.image, 100 * 512, 4096), data);
    let (used, status, back) = s.read(100, 4096);
    assert_eq!((used, status), (4097, 0));
    assert_eq!(back, data);
}

/// True (and the test reported as skipped) when citadel-blk has not been built.
fn backend_missing() -> bool {
    let missing = !citadel_tests::profile_dir().join("citadel-blk").exists();
    if missing {
        citadel_tests::skip(
            "blk_hostile",
            "citadel-blk not built (cargo build -p citadel-blk)",
            true,
        );
    }
    missing
}

#[test]
fn well_behaved_frontend_reads_writes_and_sees_config() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&["--num-queues", "2", "--serial", "hostile-serial"]);
    let status = backend.status();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", backend.child.id())).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    assert_eq!(limit("Max core file size"), "0 0", "{limits}");
    assert_eq!(limit("Max locked memory"), "0 0", "{limits}");
    assert_eq!(limit("Max open files"), "72 72", "{limits}");

    let mut fe = backend.connect();
    let features = fe.negotiate();
    assert_ne!(features & F_VERSION_1, 0);
    assert_eq!(fe.get_u64(GET_QUEUE_NUM), 2);
    // GET_CONFIG: capacity, then the queue count at offset 34.
    let cfg = fe.get_config(0, 60);
    assert_eq!(cfg.len(), 12 + 60);
    let cfg = &cfg[12..];
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        IMAGE_SECTORS
    );
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
    drop(fe);

    let mut s = Session::open(&backend);
    let data = pattern(3, 8192);
    assert_eq!(s.write(8, &data), (1, 0));
    assert_eq!(image_bytes(&backend.image, 8 * 512, 8192), data);
    let (used, status, back) = s.read(8, 8192);
    assert_eq!((used, status), (8193, 0));
    assert_eq!(back, data);

    // GET_ID through an indirect table: header, 20-byte id buffer, status.
    s.header(0x8000, 8, 0);
    let table = 0x30000u64;
    s.mem.desc_at(table, 0, 0x8000, 16, DESC_F_NEXT, 1);
    s.mem
        .desc_at(table, 1, 0x20000, 20, DESC_F_NEXT | DESC_F_WRITE, 2);
    s.mem.desc_at(table, 2, 0x9000, 1, DESC_F_WRITE, 0);
    s.mem.desc(3, table, 48, DESC_F_INDIRECT, 0);
    assert_eq!(s.submit(3, 0x9000), (21, 0));
    assert_eq!(&s.mem.read(0x20000, 14), b"hostile-serial");

    // Flush and an unknown request type.
    s.header(0x8000, 4, 0);
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 2);
    s.mem.desc(2, 0x9000, 1, DESC_F_WRITE, 0);
    assert_eq!(s.submit(0, 0x9000), (1, 0));
    s.header(0x8000, 77, 0);
    assert_eq!(s.submit(0, 0x9000), (1, 2), "unknown type answers UNSUPP");

    // GET_VRING_BASE stops the ring and reports where it stopped.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    s.fe.send(GET_VRING_BASE, 0, &p, &[]).unwrap();
    let (_, base, _) = s.fe.recv().unwrap();
    assert_eq!(
        u32::from_le_bytes(base[4..8].try_into().unwrap()),
        u32::from(s.next_avail)
    );

    // Inflight area: a sealed memfd of the advertised size.
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&QSIZE.to_le_bytes());
    p.extend_from_slice(&[0u8; 4]);
    // One frontend at a time: the next one is served once this one leaves.
    drop(s);
    let mut fe = backend.connect();
    fe.get_u64(GET_FEATURES);
    fe.send(
        SET_PROTOCOL_FEATURES,
        0,
        &(PF_INFLIGHT | PF_MQ).to_le_bytes(),
        &[],
    )
    .unwrap();
    fe.send(GET_INFLIGHT_FD, 0, &p, &[]).unwrap();
    let (req, reply, fds) = fe.recv().unwrap();
    assert_eq!(req, GET_INFLIGHT_FD);
    assert_eq!(fds.len(), 1, "inflight reply carries one descriptor");
    let size = u64::from_le_bytes(reply[0..8].try_into().unwrap());
    let file = std::fs::File::from(fds.into_iter().next().unwrap());
    assert!(size > 0 && file.metadata().unwrap().len() >= size);
    drop(fe);
    still_serves(&mut backend, 9);
}

#[test]
fn malformed_messages_are_refused_and_the_backend_keeps_serving() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);

    // An unknown request code, then garbage that is not even a header.
    let fe = backend.connect();
    let _ = fe.send(9999, NEED_REPLY, &[1, 2, 3], &[]);
    let _ = fe.send_raw(&[0xff; 7], &[]);
    drop(fe);
    still_serves(&mut backend, 1);

    // A header announcing a huge payload that never comes.
    let fe = backend.connect();
    let mut raw = GET_FEATURES.to_le_bytes().to_vec();
    raw.extend_from_slice(&VERSION.to_le_bytes());
    raw.extend_from_slice(&0x1000_0000u32.to_le_bytes());
    let _ = fe.send_raw(&raw, &[]);
    drop(fe);
    still_serves(&mut backend, 2);

    // A wrong body size for a fixed-size request, and descriptors on a message that takes none.
    let mut fe = backend.connect();
    fe.negotiate();
    let _ = fe.send(SET_VRING_NUM, NEED_REPLY, &[1, 2, 3], &[]);
    let efd = eventfd();
    let _ = fe.send(GET_QUEUE_NUM, 0, &[], &[efd.as_raw_fd()]);
    drop(fe);
    still_serves(&mut backend, 3);

    // Bad memory tables: larger than the memfd, more regions than descriptors, overlapping,
    // overflowing, zero-sized, not a regular file. Each is refused and the connection lives on.
    let mut fe = backend.connect();
    fe.negotiate();
    let mem = Memory::new(MEM_SIZE);
    let fd = mem.fd();
    let u = mem.uaddr();
    let big = MEM_SIZE as u64 * 4;
    assert!(
        !fe.mem_table(&[(0, big, u, 0)], &[fd]),
        "region beyond the memfd"
    );
    assert!(
        !fe.mem_table(&[(0, 0x1000, u, MEM_SIZE as u64)], &[fd]),
        "offset at the end"
    );
    let half = MEM_SIZE as u64 / 2;
    assert!(
        !fe.mem_table(
            &[(0, half, u, 0), (0x1000, half, u + half, half)],
            &[fd, fd]
        ),
        "overlapping regions"
    );
    let efd = eventfd();
    assert!(
        !fe.mem_table(&[(0, 0x1000, u, 0)], &[efd.as_raw_fd()]),
        "eventfd as memory"
    );
    // Vring setup against a good table but with bad numbers.
    assert!(fe.mem_table(&[(0, MEM_SIZE as u64, u, 0)], &[fd]));
    assert!(
        !fe.vring_state(SET_VRING_NUM, 0, 1000),
        "size not a power of two"
    );
    assert!(
        !fe.vring_state(SET_VRING_NUM, 0, 4096),
        "size above the maximum"
    );
    assert!(
        !fe.vring_state(SET_VRING_NUM, 7, 16),
        "queue index out of range"
    );
    assert!(
        !fe.vring_state(SET_VRING_BASE, 0, 0x1_0000),
        "base beyond u16"
    );
    assert!(
        !fe.vring_addr(0, 0x10, 0x20, 0x30),
        "ring addresses outside the table"
    );
    assert!(fe.vring_state(SET_VRING_NUM, 0, 16));
    // Rings placed at the very end of memory so that they overrun it: the queue refuses to start.
    assert!(fe.vring_addr(0, u + MEM_SIZE as u64 - 16, u + USED, u + AVAIL));
    let kick = eventfd();
    assert!(
        !fe.vring_fd(SET_VRING_KICK, 0, kick.as_raw_fd()),
        "descriptor table overruns memory"
    );
    // A kick without a descriptor (polling mode) is refused too.
    assert!(!fe.acked(SET_VRING_KICK, &(0x100u64).to_le_bytes(), &[]));
    // GET_CONFIG beyond the config space: an empty answer.
    let cfg = fe.get_config(200, 8);
    assert_eq!(
        cfg.len(),
        12,
        "config read beyond the space returns no payload"
    );
    // A message cut in the middle, then the peer goes away.
    let _ = fe.send_raw(&SET_FEATURES.to_le_bytes(), &[]);
    drop(fe);
    still_serves(&mut backend, 4);

    // A region whose guest range overflows: refused (a negative ack or a dropped frontend).
    let mut fe = backend.connect();
    fe.negotiate();
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [u64::MAX - 10, 0x1000, u, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    fe.send(SET_MEM_TABLE, NEED_REPLY, &p, &[fd]).unwrap();
    if let Ok((_, ack, _)) = fe.recv() {
        assert_ne!(ack, 0u64.to_le_bytes(), "overflowing region accepted");
    }
    drop(fe);
    drop(mem);
    still_serves(&mut backend, 8);
}

#[test]
fn hostile_descriptor_chains_fail_with_ioerr_or_are_dropped() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    let mut s = Session::open(&backend);
    let beyond = MEM_SIZE as u64 + 0x1000;

    // Data buffer outside guest memory: IOERR, nothing written to the image.
    s.header(0x8000, 1, 0);
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
    s.mem.desc(1, beyond, 4096, DESC_F_NEXT, 2);
    s.mem.desc(2, 0x9000, 1, DESC_F_WRITE, 0);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    // Data buffer straddling the end of memory.
    s.mem.desc(
        1,
        MEM_SIZE as u64 - 512,
        4096,
        DESC_F_NEXT | DESC_F_WRITE,
        2,
    );
    s.header(0x8000, 0, 0);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    // Sector range beyond the capacity, and one that overflows.
    s.header(0x8000, 1, IMAGE_SECTORS - 1);
    s.mem.desc(1, 0x10000, 4096, DESC_F_NEXT, 2);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    s.header(0x8000, 1, u64::MAX - 2);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    // Length not a multiple of 512.
    s.header(0x8000, 1, 0);
    s.mem.desc(1, 0x10000, 100, DESC_F_NEXT, 2);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    // Header shorter than 16 bytes.
    s.mem.desc(0, 0x8000, 8, DESC_F_NEXT, 2);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    // Write-only data before the header (wrong direction order).
    s.mem.desc(0, 0x10000, 512, DESC_F_NEXT | DESC_F_WRITE, 1);
    s.mem.desc(1, 0x8000, 16, DESC_F_NEXT, 2);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    // Status byte outside memory: the chain is returned with length 0.
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 2);
    s.mem.desc(2, beyond, 1, DESC_F_WRITE, 0);
    s.header(0x8000, 4, 0);
    assert_eq!(s.submit(0, 0x9000).0, 0);
    // A descriptor loop (1 -> 1): cut short, dropped.
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
    s.mem.desc(1, 0x9000, 1, DESC_F_NEXT | DESC_F_WRITE, 1);
    assert_eq!(s.submit(0, 0x9000).0, 0);
    // A next index beyond the queue size.
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 200);
    assert_eq!(s.submit(0, 0x9000).0, 0);
    // Indirect table outside memory, with a length that is not a multiple of 16, and nested.
    s.mem.desc(4, beyond, 48, DESC_F_INDIRECT, 0);
    assert_eq!(s.submit(4, 0x9000).0, 0);
    s.mem.desc(4, 0x30000, 47, DESC_F_INDIRECT, 0);
    assert_eq!(s.submit(4, 0x9000).0, 0);
    let nested = {
        let mut d = 0x30000u64.to_le_bytes().to_vec();
        d.extend_from_slice(&16u32.to_le_bytes());
        d.extend_from_slice(&DESC_F_INDIRECT.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        d
    };
    s.mem.write(0x30000, &nested);
    s.mem.desc(4, 0x30000, 16, DESC_F_INDIRECT, 0);
    assert_eq!(s.submit(4, 0x9000).0, 0);
    // Discard with too many segments and with unknown flags.
    s.header(0x8000, 11, 0);
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
    s.mem.desc(1, 0x10000, 16 * 64, DESC_F_NEXT, 2);
    s.mem.desc(2, 0x9000, 1, DESC_F_WRITE, 0);
    assert_eq!(s.submit(0, 0x9000), (1, 1));
    let mut seg = 0u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0x8000_0000u32.to_le_bytes());
    s.mem.write(0x10000, &seg);
    s.mem.desc(1, 0x10000, 16, DESC_F_NEXT, 2);
    assert_eq!(s.submit(0, 0x9000), (1, 2));
    // An avail index far ahead of the ring: nothing is processed, nothing crashes.
    s.mem
        .write(AVAIL + 2, &(s.next_avail.wrapping_add(1000)).to_le_bytes());
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes to our own eventfd.
    unsafe { libc::write(s.kick.as_raw_fd(), one.as_ptr().cast(), 8) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(backend.alive());
    drop(s);

    // Nothing above touched the image.
    assert!(std::fs::read(&backend.image)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    still_serves(&mut backend, 5);
}

#[test]
fn fd_mode_serves_one_frontend_then_exits_zero() {
    if backend_missing() {
        return;
    }
    let dir = TempDir::new("blk-fd");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut fds = [0; 2];
    // SAFETY: valid out-array of two ints; the descriptors are owned below.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
        0
    );
    // SAFETY: fresh descriptors from socketpair.
    let (ours, theirs) = unsafe {
        (
            UnixStream::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    // Our end must not leak into the child.
    // SAFETY: F_SETFD on our own descriptor.
    unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let image_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    // The image descriptor is inherited too (--image-fd), without CLOEXEC.
    // SAFETY: duplicating our own descriptor without CLOEXEC.
    let image_fd = unsafe { OwnedFd::from_raw_fd(libc::dup(image_file.as_raw_fd())) };
    let mut child = Command::new(citadel_tests::binary("citadel-blk"))
        .arg("--image-fd")
        .arg(image_fd.as_raw_fd().to_string())
        .arg("--fd")
        .arg(theirs.as_raw_fd().to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    drop(theirs);
    drop(image_fd);
    let guard = Kill(&mut child);
    let mut s = Session {
        fe: Frontend::new(ours),
        mem: Memory::new(MEM_SIZE),
        kick: eventfd(),
        call: eventfd(),
        next_avail: 0,
    };
    s.fe.negotiate();
    let (fd, u) = (s.mem.fd(), s.mem.uaddr());
    assert!(s.fe.mem_table(&[(0, MEM_SIZE as u64, u, 0)], &[fd]));
    assert!(s.fe.vring_state(SET_VRING_NUM, 0, QSIZE.into()));
    assert!(s.fe.vring_addr(0, u + DESC, u + USED, u + AVAIL));
    let (kick, call) = (s.kick.as_raw_fd(), s.call.as_raw_fd());
    assert!(s.fe.vring_fd(SET_VRING_CALL, 0, call));
    assert!(s.fe.vring_fd(SET_VRING_KICK, 0, kick));
    assert!(s.fe.vring_state(SET_VRING_ENABLE, 0, 1));
    let data = pattern(7, 1024);
    assert_eq!(s.write(2, &data), (1, 0));
    assert_eq!(image_bytes(&image, 1024, 1024), data);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "citadel-blk did not exit after its frontend left"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("stats: requests=1 reads=0 writes=1"), "{err}");
}

#[test]
fn bad_arguments_exit_with_one_line() {
    if backend_missing() {
        return;
    }
    let run = |args: &[&str]| {
        let out = Command::new(citadel_tests::binary("citadel-blk"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--image"]);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, err) = run(&["--image", "/x", "--socket", "/y", "--num-queues", "99"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--num-queues"), "{err}");
    let (code, err) = run(&[
        "--image",
        "/nonexistent/citadel.img",
        "--socket",
        "/tmp/never.sock",
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/citadel.img"), "{err}");
    let (code, err) = run(&["--image", "/dev/null", "--fd", "250"]);
    assert_eq!(code, Some(1), "{err}");
}

#[test]
fn sigterm_exits_zero_with_stats_and_sigusr1_prints_them() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    still_serves(&mut backend, 6);
    let pid = backend.child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = backend.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    backend
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let stats: Vec<_> = err
        .lines()
        .filter(|l| l.contains("stats: requests="))
        .collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(
        stats[1].contains("requests=2 reads=1 writes=1") && stats[1].contains("written_bytes=4096"),
        "{err}"
    );
}

/// Negotiates with INFLIGHT_SHMFD and sets up queue 0 with the given inflight area and base.
fn inflight_session(
    backend: &Backend,
    mem: Memory,
    area: &std::fs::File,
    size: u64,
    base: u32,
) -> Session {
    let mut fe = backend.connect();
    fe.get_u64(GET_FEATURES);
    fe.get_u64(GET_PROTOCOL_FEATURES);
    let protocol = PF_REPLY_ACK | PF_MQ | PF_CONFIG | PF_INFLIGHT;
    fe.send(SET_PROTOCOL_FEATURES, 0, &protocol.to_le_bytes(), &[])
        .unwrap();
    fe.send(SET_OWNER, 0, &[], &[]).unwrap();
    assert!(fe.acked(SET_FEATURES, &(F_VERSION_1 | F_PROTOCOL).to_le_bytes(), &[]));
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&QSIZE.to_le_bytes());
    p.extend_from_slice(&[0u8; 4]);
    assert!(fe.acked(SET_INFLIGHT_FD, &p, &[area.as_raw_fd()]));
    let u = mem.uaddr();
    assert!(fe.mem_table(&[(0, MEM_SIZE as u64, u, 0)], &[mem.fd()]));
    assert!(fe.vring_state(SET_VRING_NUM, 0, QSIZE.into()));
    assert!(fe.vring_addr(0, u + DESC, u + USED, u + AVAIL));
    assert!(fe.vring_state(SET_VRING_BASE, 0, base));
    let (kick, call) = (eventfd(), eventfd());
    assert!(fe.vring_fd(SET_VRING_CALL, 0, call.as_raw_fd()));
    assert!(fe.vring_fd(SET_VRING_KICK, 0, kick.as_raw_fd()));
    assert!(fe.vring_state(SET_VRING_ENABLE, 0, 1));
    Session {
        fe,
        mem,
        kick,
        call,
        next_avail: base as u16,
    }
}

#[test]
fn inflight_area_resumes_an_interrupted_request() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    // The backend creates the area; the frontend keeps it across backend restarts.
    let mut fe = backend.connect();
    fe.get_u64(GET_FEATURES);
    fe.send(
        SET_PROTOCOL_FEATURES,
        0,
        &(PF_INFLIGHT | PF_MQ).to_le_bytes(),
        &[],
    )
    .unwrap();
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&QSIZE.to_le_bytes());
    p.extend_from_slice(&[0u8; 4]);
    fe.send(GET_INFLIGHT_FD, 0, &p, &[]).unwrap();
    let (_, reply, fds) = fe.recv().unwrap();
    drop(fe);
    let size = u64::from_le_bytes(reply[0..8].try_into().unwrap());
    let area = std::fs::File::from(fds.into_iter().next().expect("inflight descriptor"));

    // First backend life: one write completes normally (avail 0 -> used 1).
    let mut s = inflight_session(&backend, Memory::new(MEM_SIZE), &area, size, 0);
    let first = pattern(1, 512);
    assert_eq!(s.write(10, &first), (1, 0));
    // The guest queues a second write at avail position 1; the backend "dies" while executing
    // it. Its record says so: in flight, head 0, avail position 1, used index 1 when taken.
    let second = pattern(2, 1024);
    s.header(0x8000, 1, 20);
    s.mem.write(0x10000, &second);
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
    s.mem.desc(1, 0x10000, 1024, DESC_F_NEXT, 2);
    s.mem.desc(2, 0x9000, 1, DESC_F_WRITE, 0);
    s.mem.write(0x9000, &[0xee]);
    s.mem.write(AVAIL + 4 + 2, &0u16.to_le_bytes());
    s.mem.write(AVAIL + 2, &2u16.to_le_bytes());
    let mut record = b"CBIF".to_vec();
    for v in [1u16, 0, 1, 1] {
        record.extend_from_slice(&v.to_le_bytes());
    }
    use std::os::unix::fs::FileExt;
    area.write_all_at(&record, 0).unwrap();
    // The frontend connection goes away with the "dead" backend; guest memory stays.
    let Session { fe, mem, .. } = s;
    drop(fe);

    // The next backend life is told a base past the interrupted request (as a frontend that
    // lost track would say). It must resume at avail position 1 anyway, without a kick.
    let s = inflight_session(&backend, mem, &area, size, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.mem.u16_at(USED + 2) != 2 {
        assert!(
            Instant::now() < deadline,
            "interrupted request was not resumed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let elem = s.mem.read(USED + 4 + 8, 8);
    assert_eq!(u32::from_le_bytes(elem[0..4].try_into().unwrap()), 0);
    assert_eq!(s.mem.read(0x9000, 1)[0], 0, "resumed request status");
    assert_eq!(image_bytes(&backend.image, 10 * 512, 512), first);
    assert_eq!(image_bytes(&backend.image, 20 * 512, 1024), second);
    drop(s);
    still_serves(&mut backend, 10);
}

/// Proves from outside that the running backend's filter kills it: the test attaches with
/// ptrace to the main thread (asleep in epoll_wait), rewinds it onto its `syscall`
/// instruction with the registers of `socket(AF_INET, SOCK_STREAM, 0)`, and lets it go. The
/// allowlist has no `socket`, so the process must die of SIGSYS.
#[test]
fn forbidden_syscall_in_the_running_backend_is_killed_by_sigsys() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    still_serves(&mut backend, 11);
    let pid = backend.child.id() as libc::pid_t;
    // SAFETY (ptrace and waitpid calls below): they act on our own child process and pass
    // valid pointers to locals for the register set and the status.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) != 0 {
            let err = std::io::Error::last_os_error();
            return citadel_tests::skip(
                "blk_hostile",
                &format!("ptrace is not permitted here: {err}"),
                false,
            );
        }
        // Catch the main thread asleep in epoll_wait (it may be finishing the last session).
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        let mut attempts = 0;
        let at = loop {
            attempts += 1;
            assert!(attempts < 100, "main thread never seen waiting in epoll");
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
            assert!(libc::WIFSTOPPED(status), "not stopped: {status:#x}");
            assert_eq!(libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs), 0);
            let nr = regs.orig_rax as i64;
            // The two bytes before the resume address are the `syscall` instruction (0f 05).
            let at = regs.rip - 2;
            let word = libc::ptrace(libc::PTRACE_PEEKTEXT, pid, at, 0) as u64;
            if (nr == libc::SYS_epoll_wait || nr == libc::SYS_epoll_pwait)
                && word & 0xffff == 0x050f
            {
                break at;
            }
            assert_eq!(libc::ptrace(libc::PTRACE_CONT, pid, 0, 0), 0);
            std::thread::sleep(Duration::from_millis(20));
        };
        regs.rip = at;
        regs.rax = libc::SYS_socket as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = libc::AF_INET as u64;
        regs.rsi = libc::SOCK_STREAM as u64;
        regs.rdx = 0;
        assert_eq!(libc::ptrace(libc::PTRACE_SETREGS, pid, 0, &regs), 0);
        assert_eq!(libc::ptrace(libc::PTRACE_CONT, pid, 0, 0), 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "backend survived a forbidden syscall"
            );
            let mut status = 0;
            let got = libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG);
            if got == pid && libc::WIFSIGNALED(status) {
                assert_eq!(
                    libc::WTERMSIG(status),
                    libc::SIGSYS,
                    "killed by another signal"
                );
                break;
            }
            if got == pid && libc::WIFSTOPPED(status) {
                // Any other stop (e.g. a signal) is passed on unchanged.
                libc::ptrace(libc::PTRACE_CONT, pid, 0, (status >> 8) & 0xff);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sends SIGTERM, waits for the exit and returns everything the backend logged.
fn stop_and_log(backend: &mut Backend) -> String {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(backend.child.id() as i32, libc::SIGTERM) };
    let status = backend.child.wait().unwrap();
    assert!(status.success(), "citadel-blk exit status {status:?}");
    let mut err = String::new();
    backend
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[test]
fn only_the_allowed_uid_becomes_the_frontend_and_the_socket_is_0600() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    if backend_missing() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        citadel_tests::skip(
            "blk_hostile::only_the_allowed_uid",
            "needs root to act as a second uid",
            false,
        );
        return;
    }
    let mut backend = Backend::start_under_umask(&[], Some(0));
    let dir = backend.socket.parent().unwrap().to_path_buf();
    // The directory lets anyone through, so only the socket's own mode stands in the way.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta = std::fs::symlink_metadata(&backend.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o600, "socket mode under umask 0");
    assert_eq!(
        ForeignClient::spawn(&backend.socket, NOBODY, NOBODY, &get_features_request()).outcome(),
        ForeignOutcome::ConnectFailed(libc::EACCES)
    );

    // With the file opened up, the credential check still keeps the foreign uid out, and
    // the frontend being served does not notice.
    let mut first = Session::open(&backend);
    std::fs::set_permissions(&backend.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let foreign = ForeignClient::spawn(&backend.socket, NOBODY, NOBODY, &get_features_request());
    let data = pattern(7, 4096);
    assert_eq!(first.write(10, &data), (1, 0));
    assert_eq!(first.read(10, 4096), (4097, 0, data));
    drop(first);
    assert_eq!(foreign.outcome(), ForeignOutcome::ClosedWithoutReply);
    still_serves(&mut backend, 8);
    let log = stop_and_log(&mut backend);
    assert!(
        log.contains("refused a connection: peer pid")
            && log.contains(&format!(
                "uid {NOBODY} gid {NOBODY} is not an allowed frontend"
            )),
        "no refusal logged:\n{log}"
    );

    // --allow-uid widens the set: the same foreign process is now served.
    let wide = Backend::start_under_umask(&["--allow-uid", &NOBODY.to_string()], Some(0));
    let dir = wide.socket.parent().unwrap().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&wide.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        ForeignClient::spawn(&wide.socket, NOBODY, NOBODY, &get_features_request()).outcome(),
        ForeignOutcome::Answered
    );
}

/// Shrinks the memfd behind `mem` to nothing. The test must not touch `mem` afterwards: its
/// own mapping would fault too.
fn truncate(mem: &Memory) {
    // SAFETY: resizing a memfd this test owns; nothing reads its mapping afterwards.
    assert_eq!(unsafe { libc::ftruncate(mem.fd(), 0) }, 0);
}

/// SET_INFLIGHT_FD for one queue with an area of `size` bytes in `fd`; true when accepted.
fn set_inflight(backend: &Backend, fd: RawFd, size: u64) -> bool {
    let mut fe = backend.connect();
    fe.get_u64(GET_FEATURES);
    fe.get_u64(GET_PROTOCOL_FEATURES);
    let protocol = PF_REPLY_ACK | PF_MQ | PF_INFLIGHT;
    fe.send(SET_PROTOCOL_FEATURES, 0, &protocol.to_le_bytes(), &[])
        .unwrap();
    fe.send(SET_OWNER, 0, &[], &[]).unwrap();
    assert!(fe.acked(SET_FEATURES, &(F_VERSION_1 | F_PROTOCOL).to_le_bytes(), &[]));
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&QSIZE.to_le_bytes());
    p.extend_from_slice(&[0u8; 4]);
    fe.acked(SET_INFLIGHT_FD, &p, &[fd])
}

#[test]
fn unsealed_memory_is_refused_and_a_truncating_frontend_cannot_kill_the_backend() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    let mut fe = backend.connect();
    fe.negotiate();
    let unsealed = Memory::unsealed(MEM_SIZE);
    let u = unsealed.uaddr();
    assert!(
        !fe.mem_table(&[(0, MEM_SIZE as u64, u, 0)], &[unsealed.fd()]),
        "a memory table in an unsealed memfd was accepted"
    );
    // The frontend shrinks its file and drives a queue at it anyway: with no table mapped,
    // the backend has nothing that could fault.
    truncate(&unsealed);
    assert!(fe.vring_state(SET_VRING_NUM, 0, QSIZE.into()));
    assert!(
        !fe.vring_addr(0, u + DESC, u + USED, u + AVAIL),
        "ring addresses accepted without memory"
    );
    let kick = eventfd();
    fe.vring_fd(SET_VRING_KICK, 0, kick.as_raw_fd());
    fe.vring_state(SET_VRING_ENABLE, 0, 1);
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes to our own eventfd.
    unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(backend.alive(), "citadel-blk died");
    drop(fe);
    // The inflight area is held to the same rule.
    let area = Memory::unsealed(4096);
    assert!(
        !set_inflight(&backend, area.fd(), 4096),
        "an unsealed inflight area was accepted"
    );
    still_serves(&mut backend, 9);

    // --allow-unsealed-memory takes both, with the risk its help text states.
    let wide = Backend::start(&["--allow-unsealed-memory"]);
    let mut fe = wide.connect();
    fe.negotiate();
    let unsealed = Memory::unsealed(MEM_SIZE);
    assert!(fe.mem_table(
        &[(0, MEM_SIZE as u64, unsealed.uaddr(), 0)],
        &[unsealed.fd()]
    ));
    drop(fe);
    assert!(set_inflight(&wide, area.fd(), 4096));
}

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;

/// Writes an indirect table at `table` for one request: the header at `header`, one data
/// descriptor per `(address, length)` (device-writable when `device_writes`), then the status
/// byte at `status`. Returns the table's length in bytes.
fn request_table(
    mem: &Memory,
    table: u64,
    header: u64,
    data: &[(u64, u32)],
    device_writes: bool,
    status: u64,
) -> u32 {
    let data_flags = if device_writes {
        DESC_F_NEXT | DESC_F_WRITE
    } else {
        DESC_F_NEXT
    };
    mem.desc_at(table, 0, header, 16, DESC_F_NEXT, 1);
    for (i, (addr, len)) in data.iter().enumerate() {
        let i = i as u16 + 1;
        mem.desc_at(table, i, *addr, *len, data_flags, i + 1);
    }
    let last = data.len() as u16 + 1;
    mem.desc_at(table, last, status, 1, DESC_F_WRITE, 0);
    (u32::from(last) + 1) * 16
}

#[test]
fn requests_beyond_size_max_or_seg_max_fail_with_ioerr_and_change_nothing() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    let mut s = Session::open(&backend);
    let features = s.fe.get_u64(GET_FEATURES);
    assert_eq!(
        features & (F_SIZE_MAX | F_SEG_MAX),
        F_SIZE_MAX | F_SEG_MAX,
        "size_max and seg_max not offered"
    );
    let (size_max, seg_max) = s.limits();
    assert!(
        size_max >= 4096 && size_max % 512 == 0,
        "size_max {size_max}"
    );
    assert!(seg_max >= 1, "seg_max {seg_max}");
    let over = size_max + 512;
    // Only the limits may refuse what follows: the image holds every request.
    assert!(u64::from(over) <= IMAGE_SECTORS * 512 && u64::from(seg_max + 1) <= IMAGE_SECTORS);
    let (header, status, table, data) = (0x8000u64, 0x9000u64, 0x30000u64, 0x40000u64);
    assert!(data + u64::from(over) <= MEM_SIZE as u64);
    let guest = pattern(7, over as usize);
    s.mem.write(data, &guest);

    // One descriptor of size_max + 512 bytes: a write, then a read into that same buffer.
    s.header(header, 1, 0);
    s.mem.desc(0, header, 16, DESC_F_NEXT, 1);
    s.mem.desc(1, data, over, DESC_F_NEXT, 2);
    s.mem.desc(2, status, 1, DESC_F_WRITE, 0);
    assert_eq!(s.submit(0, status), (1, 1), "write over size_max");
    s.header(header, 0, 0);
    s.mem.desc(1, data, over, DESC_F_NEXT | DESC_F_WRITE, 2);
    assert_eq!(s.submit(0, status), (1, 1), "read over size_max");
    // seg_max + 1 data descriptors of 512 bytes through an indirect table: write, then read.
    let segments = vec![(data, 512u32); seg_max as usize + 1];
    for (kind, device_writes) in [(1, false), (0, true)] {
        s.header(header, kind, 0);
        let len = request_table(&s.mem, table, header, &segments, device_writes, status);
        s.mem.desc(3, table, len, DESC_F_INDIRECT, 0);
        assert_eq!(s.submit(3, status), (1, 1), "type {kind} over seg_max");
    }
    assert!(
        std::fs::read(&backend.image)
            .unwrap()
            .iter()
            .all(|&b| b == 0),
        "a refused request wrote to the image"
    );
    assert_eq!(
        s.mem.read(data, over as usize),
        guest,
        "a refused request wrote guest memory"
    );

    // At the limits exactly, the same requests are served.
    s.header(header, 1, 0);
    s.mem.desc(1, data, size_max, DESC_F_NEXT, 2);
    assert_eq!(s.submit(0, status), (1, 0), "write of size_max");
    assert_eq!(
        image_bytes(&backend.image, 0, size_max as usize),
        guest[..size_max as usize]
    );
    s.header(header, 1, 1024);
    let len = request_table(
        &s.mem,
        table,
        header,
        &segments[..seg_max as usize],
        false,
        status,
    );
    s.mem.desc(3, table, len, DESC_F_INDIRECT, 0);
    assert_eq!(s.submit(3, status), (1, 0), "write of seg_max segments");
    let written = image_bytes(&backend.image, 1024 * 512, seg_max as usize * 512);
    assert!(written.chunks(512).all(|c| c == &guest[..512]));
    drop(s);
    still_serves(&mut backend, 10);
}

/// Queue size and guest memory of the sessions that fill a ring with maximal requests.
const FULL_QSIZE: u16 = 256;
const FULL_MEM: usize = 4 << 20;
/// Where those sessions put indirect tables (4 KiB each), headers, statuses and the one data
/// buffer every segment reads into.
const FULL_TABLES: u64 = 0x10_0000;
const FULL_HEADERS: u64 = 0x20_0000;
const FULL_STATUS: u64 = 0x20_1000;
const FULL_DATA: u64 = 0x21_0000;

/// Makes descriptor `i` of queue 0, for every `i` in the ring, a read of seg_max segments of
/// size_max bytes each (the most one request may ask for), request `i` at its own place on
/// the disk. Returns the bytes one request reads.
fn maximal_reads(s: &mut Session) -> u64 {
    let (size_max, seg_max) = s.limits();
    assert!((seg_max as u64 + 2) * 16 <= 0x1000, "seg_max {seg_max}");
    assert!(FULL_DATA + u64::from(size_max) <= FULL_MEM as u64);
    let segments = vec![(FULL_DATA, size_max); seg_max as usize];
    let bytes = u64::from(seg_max) * u64::from(size_max);
    for i in 0..FULL_QSIZE {
        let table = FULL_TABLES + u64::from(i) * 0x1000;
        let header = FULL_HEADERS + u64::from(i) * 16;
        s.header(header, 0, u64::from(i) * bytes / 512);
        let status = FULL_STATUS + u64::from(i);
        let len = request_table(&s.mem, table, header, &segments, true, status);
        s.mem.desc(i, table, len, DESC_F_INDIRECT, 0);
    }
    bytes
}

/// Makes `count` more requests available (heads 0, 1, ... in order) and kicks.
fn offer(s: &mut Session, count: u16) {
    for head in 0..count {
        let slot = s.next_avail.wrapping_add(head) % FULL_QSIZE;
        s.mem
            .write(AVAIL + 4 + u64::from(slot) * 2, &head.to_le_bytes());
    }
    s.next_avail = s.next_avail.wrapping_add(count);
    s.mem.write(AVAIL + 2, &s.next_avail.to_le_bytes());
    s.kick();
}

#[test]
fn a_ring_of_maximal_requests_keeps_get_vring_base_and_sigterm_prompt() {
    if backend_missing() {
        return;
    }
    // Requests read holes, so the test needs no disk space however large they are.
    let mut backend = Backend::start_sparse(8 << 30);
    let mut s = Session::open_sized(&backend, FULL_MEM, FULL_QSIZE);
    let bytes = maximal_reads(&mut s);
    assert!(
        u64::from(FULL_QSIZE) * bytes <= 8 << 30,
        "the image must hold a ring of requests"
    );

    // What one maximal request costs on this machine now: the median of three alone.
    let mut alone: Vec<Duration> = (0..3)
        .map(|_| {
            let start = Instant::now();
            offer(&mut s, 1);
            s.wait_used(s.next_avail);
            start.elapsed()
        })
        .collect();
    alone.sort();
    let one = alone[1];
    for i in 0..3u64 {
        assert_eq!(s.mem.read(FULL_STATUS + i, 1)[0], 0, "request {i} failed");
    }
    // The message handler waits for at most the request in hand; a worker that kept the queue
    // for its whole turn would make it wait for the rest of the ring (~255 requests). The
    // bound allows ten requests plus 200 ms of scheduling delay on a busy machine.
    let bound = one * 10 + Duration::from_millis(200);
    eprintln!(
        "one request of {bytes} bytes: {one:?} (alone: {alone:?}); bound {bound:?}, a ring {:?}",
        one * u32::from(FULL_QSIZE)
    );

    // A full ring; once the worker is on it, GET_VRING_BASE.
    let start_idx = s.next_avail;
    offer(&mut s, FULL_QSIZE);
    s.wait_used(start_idx.wrapping_add(1));
    let start = Instant::now();
    let base = s.vring_base();
    let waited = start.elapsed();
    let used = s.mem.u16_at(USED + 2);
    eprintln!(
        "GET_VRING_BASE answered in {waited:?}, {} of {FULL_QSIZE} requests done",
        used.wrapping_sub(start_idx)
    );
    assert!(
        base < u32::from(s.next_avail),
        "the worker finished the ring ({base}) before GET_VRING_BASE was answered"
    );
    assert_eq!(
        base,
        u32::from(used),
        "a request was taken but not completed"
    );
    assert!(
        waited <= bound,
        "GET_VRING_BASE took {waited:?} (bound {bound:?})"
    );
    drop(s);

    // The same with SIGTERM: the process ends within the bound, mid-ring.
    let mut s = Session::open_sized(&backend, FULL_MEM, FULL_QSIZE);
    maximal_reads(&mut s);
    offer(&mut s, FULL_QSIZE);
    s.wait_used(1);
    let start = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(backend.child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = backend.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no exit");
        std::thread::sleep(Duration::from_millis(1));
    };
    let waited = start.elapsed();
    let used = s.mem.u16_at(USED + 2);
    eprintln!("SIGTERM ended the backend in {waited:?}, {used} of {FULL_QSIZE} requests done");
    assert_eq!(status.code(), Some(0));
    assert!(used < FULL_QSIZE, "the worker finished the ring first");
    assert!(waited <= bound, "exit took {waited:?} (bound {bound:?})");
}

#[test]
fn set_vring_enable_before_set_features_is_kept_until_the_features_are_acked() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    // QEMU 7.2's order: rings enabled before SET_FEATURES, never again after.
    let mut fe = backend.connect();
    fe.get_u64(GET_FEATURES);
    fe.get_u64(GET_PROTOCOL_FEATURES);
    fe.send(SET_PROTOCOL_FEATURES, 0, &PF_REPLY_ACK.to_le_bytes(), &[])
        .unwrap();
    fe.send(SET_OWNER, 0, &[], &[]).unwrap();
    assert!(
        fe.vring_state(SET_VRING_ENABLE, 0, 1),
        "early enable refused"
    );
    assert!(
        !fe.vring_state(SET_VRING_ENABLE, 0, 2),
        "early enable with a state other than 0 or 1 accepted"
    );
    assert!(fe.acked(SET_FEATURES, &(F_VERSION_1 | F_PROTOCOL).to_le_bytes(), &[]));
    let mem = Memory::new(MEM_SIZE);
    assert!(fe.mem_table(&[(0, MEM_SIZE as u64, mem.uaddr(), 0)], &[mem.fd()]));
    assert!(fe.vring_state(SET_VRING_NUM, 0, QSIZE.into()));
    let u = mem.uaddr();
    assert!(fe.vring_addr(0, u + DESC, u + USED, u + AVAIL));
    assert!(fe.vring_state(SET_VRING_BASE, 0, 0));
    let kick = eventfd();
    let call = eventfd();
    assert!(fe.vring_fd(SET_VRING_CALL, 0, call.as_raw_fd()));
    assert!(fe.vring_fd(SET_VRING_KICK, 0, kick.as_raw_fd()));
    let mut s = Session {
        fe,
        mem,
        kick,
        call,
        next_avail: 0,
    };
    // No SET_VRING_ENABLE since SET_FEATURES: the early one enabled the ring.
    let data = pattern(11, 4096);
    assert_eq!(s.write(16, &data), (1, 0));
    assert_eq!(image_bytes(&backend.image, 16 * 512, 4096), data);
    drop(s);

    // An early disable is kept the same way: the ring stays stopped after SET_FEATURES.
    let mut fe = backend.connect();
    fe.get_u64(GET_FEATURES);
    fe.send(SET_PROTOCOL_FEATURES, 0, &PF_REPLY_ACK.to_le_bytes(), &[])
        .unwrap();
    assert!(fe.vring_state(SET_VRING_ENABLE, 0, 0));
    assert!(fe.acked(SET_FEATURES, &(F_VERSION_1 | F_PROTOCOL).to_le_bytes(), &[]));
    let mem = Memory::new(MEM_SIZE);
    assert!(fe.mem_table(&[(0, MEM_SIZE as u64, mem.uaddr(), 0)], &[mem.fd()]));
    assert!(fe.vring_state(SET_VRING_NUM, 0, QSIZE.into()));
    let u = mem.uaddr();
    assert!(fe.vring_addr(0, u + DESC, u + USED, u + AVAIL));
    let kick = eventfd();
    assert!(fe.vring_fd(SET_VRING_KICK, 0, kick.as_raw_fd()));
    let s = Session {
        fe,
        mem,
        kick,
        call: eventfd(),
        next_avail: 0,
    };
    s.header(0x8000, 4, 0);
    s.mem.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
    s.mem.desc(1, 0x9000, 1, DESC_F_WRITE, 0);
    s.mem.write(AVAIL + 4, &0u16.to_le_bytes());
    s.mem.write(AVAIL + 2, &1u16.to_le_bytes());
    s.kick();
    // The only way to see that nothing happens is to give it time: a served flush takes
    // microseconds (the first part of this test).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.mem.u16_at(USED + 2), 0, "a disabled ring was served");
    drop(s);
    still_serves(&mut backend, 12);
}

/// A frontend that sends half a message header and then nothing is dropped after the
/// backend's 10-second message timeout (its watchdog thread, running under the seccomp
/// filter, shuts the socket down), and the backend serves the next frontend.
#[test]
fn a_frontend_stalled_inside_a_header_is_dropped_and_the_next_one_served() {
    if backend_missing() {
        return;
    }
    let mut backend = Backend::start(&[]);
    let fe = backend.connect();
    fe.send_raw(&GET_FEATURES.to_le_bytes()[..], &[]).unwrap();
    fe.sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let got = (&fe.sock).read(&mut buf);
    let waited = start.elapsed();
    assert!(
        matches!(got, Ok(0)),
        "expected the backend to close the stalled connection, got {got:?} after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(9),
        "dropped after {waited:?}, before the message timeout"
    );
    drop(fe);
    still_serves(&mut backend, 12);
}
