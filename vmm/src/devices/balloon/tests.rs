use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::mmio_bus::MmioDevice;
use crate::devices::virtio_mmio::{Interrupt, QueueConfig, CONFIG_SPACE_OFFSET};
use crate::memory::{create_guest_ram, GuestRam};

const RAM: u64 = 16 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const ARRAY: u64 = 0x4000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Setup {
    balloon: Balloon,
    ram: GuestRam,
    notify: Vec<EventFd>,
    irqfd: EventFd,
    kicks: Arc<SlotKicks>,
}

fn options(free_page_reporting: bool) -> BalloonOptions {
    BalloonOptions {
        free_page_reporting,
        ..BalloonOptions::default()
    }
}

/// A balloon whose driver started every queue (8 entries each, rings 0x10000 apart), with
/// `features` negotiated.
fn started(features: u64, opts: &BalloonOptions) -> Setup {
    started_with(features, opts, |_| {}, false)
}

/// A balloon started as by [`started`] on RAM that `prepare` wrote first, resumed from a
/// snapshot when `resume` is set.
fn started_with(
    features: u64,
    opts: &BalloonOptions,
    prepare: impl FnOnce(&GuestMemoryMmap),
    resume: bool,
) -> Setup {
    let ram = create_guest_ram(RAM).unwrap();
    prepare(&ram.memory);
    let (mut balloon, kicks) = BalloonHandle::device(ram.memory.clone(), opts).unwrap();
    let notify: Vec<EventFd> = (0..QUEUES)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let queues = (0..QUEUES as u64)
        .map(|i| QueueConfig {
            size: 8,
            desc: DESC + i * 0x10000,
            avail: AVAIL + i * 0x10000,
            used: USED + i * 0x10000,
            ready: true,
        })
        .collect();
    balloon
        .activate(ActivateParams {
            features: (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) | features,
            queues,
            notify: notify.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(irqfd.try_clone().unwrap())),
            resume,
        })
        .unwrap();
    // The used rings are backed from the start, so that completing a buffer allocates
    // nothing the tests would see in the memfd.
    for i in 0..QUEUES as u64 {
        ram.memory
            .write_obj(0u16, GuestAddress(USED + i * 0x10000))
            .unwrap();
    }
    // Activation kicks every ring once, for buffers queued before it.
    for n in &notify {
        let _ = n.read();
    }
    Setup {
        balloon,
        ram,
        notify,
        irqfd,
        kicks,
    }
}

impl Setup {
    fn descriptor(&self, queue: u64, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + queue * 0x10000 + 16 * index;
        let m = &self.ram.memory;
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Offers the chain at `head` as the `n`-th buffer of `queue` and kicks it.
    fn offer(&self, queue: u64, n: u16, head: u16) {
        let avail = AVAIL + queue * 0x10000;
        let m = &self.ram.memory;
        m.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(n % 8)))
            .unwrap();
        m.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
        self.notify[queue as usize].write(1).unwrap();
    }

    fn used_idx(&self, queue: u64) -> u16 {
        self.ram
            .memory
            .read_obj(GuestAddress(USED + queue * 0x10000 + 2))
            .unwrap()
    }

    fn pfns(&self, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.ram
            .memory
            .write_slice(&bytes, GuestAddress(ARRAY))
            .unwrap();
    }
}

fn allocated(ram: &GuestRam) -> u64 {
    // SAFETY: an all-zero stat is a valid out buffer for fstat on an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fstat writes only into `st`.
    assert_eq!(unsafe { libc::fstat(ram.memfd.as_raw_fd(), &mut st) }, 0);
    st.st_blocks as u64 * 512
}

#[test]
fn inflated_pages_return_to_the_host_and_frames_outside_ram_are_ignored() {
    let mut s = started(0, &options(false));
    s.ram
        .memory
        .write_slice(&vec![0x5au8; 4 << 20], GuestAddress(8 << 20))
        .unwrap();
    // 4 MiB at 8 MiB, in two descriptors, backwards, plus frames in the MMIO gap, past RAM
    // and at the top of the 32-bit range.
    let mut pfns: Vec<u32> = (2048..3072).rev().collect();
    pfns.extend([0xc0000, (RAM >> 12) as u32, u32::MAX]);
    s.pfns(&pfns);
    s.descriptor(0, 0, ARRAY, 2048, F_NEXT, 1);
    s.descriptor(0, 1, ARRAY + 2048, (pfns.len() * 4 - 2048) as u32, 0, 0);
    s.offer(0, 0, 0);
    let before = allocated(&s.ram);
    s.balloon.serve_queue(INFLATE);
    assert_eq!(s.used_idx(0), 1);
    assert_eq!(s.irqfd.read().unwrap(), 1);
    assert!(s.notify[0].read().is_err(), "the kick was consumed");
    assert_eq!(s.balloon.returned, 4 << 20);
    assert_eq!(before - allocated(&s.ram), 4 << 20);
    let mut page = [0xffu8; 4096];
    s.ram
        .memory
        .read_slice(&mut page, GuestAddress(10 << 20))
        .unwrap();
    assert_eq!(page, [0; 4096]);
}

/// A balloon restored from a snapshot goes on from the used indices in guest memory: the
/// buffers it completed before the machine was saved are not taken again, the one the driver
/// queued after them is.
#[test]
fn a_resumed_balloon_serves_from_the_used_index_on() {
    const COMPLETED: u32 = 0x77;
    let used = USED + 0x10000;
    let mut s = started_with(
        0,
        &options(false),
        |m| {
            m.write_obj(4u16, GuestAddress(used + 2)).unwrap();
            for entry in 0..8 {
                m.write_obj(COMPLETED, GuestAddress(used + 4 + 8 * entry))
                    .unwrap();
            }
        },
        true,
    );
    s.pfns(&[2048]);
    s.descriptor(1, 0, ARRAY, 4, 0, 0);
    s.offer(1, 4, 0);
    s.balloon.serve_queue(DEFLATE);
    assert_eq!(s.used_idx(1), 5);
    for entry in 0..4 {
        let id: u32 = s
            .ram
            .memory
            .read_obj(GuestAddress(used + 4 + 8 * entry))
            .unwrap();
        assert_eq!(id, COMPLETED, "used entry {entry} was written again");
    }
}

#[test]
fn deflated_pages_are_acknowledged_and_left_alone() {
    let mut s = started(0, &options(false));
    s.ram
        .memory
        .write_slice(&[7u8; 4096], GuestAddress(8 << 20))
        .unwrap();
    s.pfns(&[2048]);
    s.descriptor(1, 0, ARRAY, 4, 0, 0);
    s.offer(1, 0, 0);
    s.balloon.serve_queue(DEFLATE);
    assert_eq!(s.used_idx(1), 1);
    let mut page = [0u8; 4096];
    s.ram
        .memory
        .read_slice(&mut page, GuestAddress(8 << 20))
        .unwrap();
    assert_eq!(page, [7; 4096]);
}

#[test]
fn reported_free_ranges_return_to_the_host_only_when_negotiated() {
    let opts = options(true);
    let mut s = started(1 << VIRTIO_BALLOON_F_REPORTING, &opts);
    assert_ne!(s.balloon.features() & (1 << VIRTIO_BALLOON_F_REPORTING), 0);
    s.ram
        .memory
        .write_slice(&vec![1u8; 2 << 20], GuestAddress(4 << 20))
        .unwrap();
    // One 2 MiB range, and one wrapping the address space.
    s.descriptor(2, 0, 4 << 20, 2 << 20, F_WRITE | F_NEXT, 1);
    s.descriptor(2, 1, u64::MAX - 4095, 8192, F_WRITE, 0);
    s.offer(2, 0, 0);
    let before = allocated(&s.ram);
    s.balloon.serve_queue(REPORTING);
    assert_eq!(s.used_idx(2), 1);
    assert_eq!(before - allocated(&s.ram), 2 << 20);

    // Offered but not accepted: the third queue is not served.
    let mut s = started(0, &opts);
    s.ram
        .memory
        .write_slice(&vec![1u8; 2 << 20], GuestAddress(4 << 20))
        .unwrap();
    s.descriptor(2, 0, 4 << 20, 2 << 20, F_WRITE, 0);
    s.offer(2, 0, 0);
    s.balloon.serve_queue(REPORTING);
    assert_eq!(s.used_idx(2), 0);
    assert_eq!(s.balloon.returned, 0);
}

/// While guest RAM is pinned for a passed-through function, inflated and reported pages are
/// acknowledged and keep their host pages and contents.
#[test]
fn nothing_is_discarded_while_discarding_is_inhibited() {
    let mut s = started(1 << VIRTIO_BALLOON_F_REPORTING, &options(true));
    s.balloon.discard_inhibited = true;
    s.ram
        .memory
        .write_slice(&vec![3u8; 4 << 20], GuestAddress(4 << 20))
        .unwrap();
    let pfns: Vec<u32> = (1024..1536).collect();
    s.pfns(&pfns);
    s.descriptor(0, 0, ARRAY, (pfns.len() * 4) as u32, 0, 0);
    s.offer(0, 0, 0);
    s.descriptor(2, 0, 6 << 20, 2 << 20, F_WRITE, 0);
    s.offer(2, 0, 0);
    let before = allocated(&s.ram);
    s.balloon.serve_queue(INFLATE);
    s.balloon.serve_queue(REPORTING);
    assert_eq!((s.used_idx(0), s.used_idx(2)), (1, 1));
    assert_eq!(s.balloon.returned, 0);
    assert_eq!(allocated(&s.ram), before);
    let mut bytes = vec![0u8; 4 << 20];
    s.ram
        .memory
        .read_slice(&mut bytes, GuestAddress(4 << 20))
        .unwrap();
    assert!(bytes.iter().all(|&b| b == 3));
}

#[test]
fn a_flood_of_frames_is_served_in_bounded_slices() {
    let mut s = started(0, &options(false));
    // Eight buffers of 4096 frames each (past what one wake-up serves), all the same page.
    s.pfns(&[2048; MAX_PFNS_PER_CHAIN]);
    for i in 0..8u16 {
        s.descriptor(
            0,
            u64::from(i),
            ARRAY,
            (MAX_PFNS_PER_CHAIN * 4 + 64) as u32,
            0,
            0,
        );
        s.offer(0, i, i);
    }
    s.balloon.serve_queue(INFLATE);
    assert_eq!(
        usize::from(s.used_idx(0)),
        MAX_WORK_PER_WAKE / MAX_PFNS_PER_CHAIN
    );
    // The device kicked itself for the rest.
    assert_eq!(s.notify[0].read().unwrap(), 1);
    s.notify[0].write(1).unwrap();
    s.balloon.serve_queue(INFLATE);
    assert_eq!(s.used_idx(0), 8);
}

#[test]
fn after_a_reset_kicks_are_dropped_and_the_queue_left_alone() {
    let mut s = started(0, &options(false));
    s.pfns(&[2048]);
    s.descriptor(0, 0, ARRAY, 4, 0, 0);
    s.offer(0, 0, 0);
    s.balloon.reset();
    assert_eq!(s.kicks.ready(), vec![0]);
    s.balloon.serve_queue(INFLATE);
    assert_eq!(s.used_idx(0), 0);
    assert!(s.balloon.watched[INFLATE].fd().is_none());
}

#[test]
fn the_target_is_clamped_and_the_guests_size_reported() {
    let ram = create_guest_ram(RAM).unwrap();
    let (balloon, kicks) = BalloonHandle::device(ram.memory.clone(), &options(false)).unwrap();
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let transport = Arc::new(
        VirtioMmioTransport::new(
            balloon,
            Arc::new(Interrupt::new(irqfd.try_clone().unwrap())),
        )
        .unwrap(),
    );
    let handle = BalloonHandle::attach(Arc::clone(&transport), kicks, RAM);
    let config = |offset: u64| {
        let mut word = [0u8; 4];
        transport.read(CONFIG_SPACE_OFFSET + offset, &mut word);
        u32::from_le_bytes(word)
    };
    assert_eq!(handle.actual_bytes(), RAM);
    assert_eq!(config(0), 0);
    handle.set_target(RAM / 4).unwrap();
    assert_eq!(config(0), (RAM * 3 / 4 / 4096) as u32);
    assert_eq!(irqfd.read().unwrap(), 1);
    handle.set_target(RAM * 2).unwrap();
    assert_eq!(config(0), 0);
    handle.set_target(1).unwrap();
    assert_eq!(config(0), (RAM / 4096 - 1) as u32);

    // The driver's `actual`: only a 4-byte write at its offset counts, and each change
    // reaches the event loop.
    transport.write(CONFIG_SPACE_OFFSET, &100u32.to_le_bytes());
    transport.write(CONFIG_SPACE_OFFSET + 4, &[1, 0]);
    assert_eq!(handle.actual_bytes(), RAM);
    assert!(handle.kicks.ready().is_empty());
    transport.write(CONFIG_SPACE_OFFSET + 4, &1024u32.to_le_bytes());
    assert_eq!(config(4), 1024);
    assert_eq!(handle.actual_bytes(), RAM - (4 << 20));
    assert_eq!(handle.kicks.ready(), vec![TOKEN_ACTUAL]);
    handle.serve();
    assert!(handle.kicks.ready().is_empty());
    // A guest claiming more pages than it has reports a size of zero.
    transport.write(CONFIG_SPACE_OFFSET + 4, &u32::MAX.to_le_bytes());
    assert_eq!(handle.actual_bytes(), 0);

    // A machine reset forgets the target and the balloon.
    handle.set_target(RAM / 2).unwrap();
    transport.reset();
    handle.reset_target();
    assert_eq!((config(0), config(4)), (0, 0));
    assert_eq!(handle.actual_bytes(), RAM);
}

#[test]
fn a_saved_configuration_comes_back_and_one_beyond_ram_is_refused() {
    let handle = |ram: &GuestRam| {
        let (balloon, kicks) = BalloonHandle::device(ram.memory.clone(), &options(false)).unwrap();
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport =
            Arc::new(VirtioMmioTransport::new(balloon, Arc::new(Interrupt::new(irqfd))).unwrap());
        BalloonHandle::attach(transport, kicks, RAM)
    };
    let ram = create_guest_ram(RAM).unwrap();
    let from = handle(&ram);
    from.set_target(RAM / 2).unwrap();
    let (num_pages, actual) = from.config();
    assert_eq!(num_pages, (RAM / 2 / 4096) as u32);

    let to = handle(&ram);
    to.restore_config(num_pages, actual).unwrap();
    assert_eq!(to.config(), (num_pages, actual));
    let pages = (RAM / 4096) as u32;
    assert_eq!(
        to.restore_config(pages + 1, 0).unwrap_err(),
        format!(
            "balloon of {} target and 0 held pages exceeds the {pages} pages of RAM",
            pages + 1
        )
    );
    assert!(to.restore_config(0, pages + 1).is_err());
    assert_eq!(to.config(), (num_pages, actual));
}
