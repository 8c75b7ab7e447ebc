//! What every hot-replace slot does with a ring while no backend serves it: the event loop
//! learns of the driver's kicks through [`SlotKicks`], and the slot answers the chains
//! itself ([`answer_chains`]) from where the last backend stopped ([`empty_ring`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::VirtioInterrupt;
use super::virtio_mmio::{ActivateError, ActivateParams};

/// Chains answered per kick before the slot yields the event loop and kicks itself again: a
/// guest refilling the ring as fast as it is answered cannot keep the loop to itself.
const MAX_CHAINS_PER_KICK: usize = 1024;

/// The epoll set through which the event loop learns of kicks on the rings slots answer
/// themselves, each registered under a token naming its slot. Only the event loop changes it
/// (activation, plug and unplug run there).
#[derive(Debug)]
pub struct SlotKicks {
    epoll: Epoll,
}

impl SlotKicks {
    /// Creates the empty set.
    pub fn new() -> std::io::Result<Self> {
        Ok(SlotKicks {
            epoll: Epoll::new()?,
        })
    }

    /// What the event loop waits on.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The tokens of the slots with pending kicks.
    pub fn ready(&self) -> Vec<u64> {
        let mut events = [EpollEvent::default(); 16];
        match self.epoll.wait(0, &mut events) {
            Ok(n) => events[..n].iter().map(|e| e.data()).collect(),
            Err(e) => {
                log::warn!("hot-replace slots: waiting for kicks: {e}");
                Vec::new()
            }
        }
    }

    /// Reports kicks on `fd` under `token`.
    pub fn watch(&self, token: u64, fd: RawFd) {
        let added = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        );
        if let Err(e) = added {
            if e.raw_os_error() != Some(libc::EEXIST) {
                log::warn!("slot {token:#x}: watching its queue: {e}");
            }
        }
    }

    /// Stops reporting kicks on `fd`.
    pub fn unwatch(&self, token: u64, fd: RawFd) {
        let removed = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        if let Err(e) = removed {
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::warn!("slot {token:#x}: unwatching its queue: {e}");
            }
        }
    }
}

/// One queue's notify eventfd while its kicks go to the event loop. The descriptor is kept
/// here, not borrowed from the activation, because a reset (on a vCPU thread, which may not
/// touch the epoll set) drops the activation and the event loop must still find the
/// descriptor to drain and unwatch.
#[derive(Debug)]
pub struct KickWatch {
    kicks: Arc<SlotKicks>,
    token: u64,
    fd: Option<EventFd>,
}

impl KickWatch {
    /// Nothing watched yet; kicks will be reported under `token`.
    pub fn new(kicks: Arc<SlotKicks>, token: u64) -> Self {
        KickWatch {
            kicks,
            token,
            fd: None,
        }
    }

    /// Sends the kicks on `notify` to the event loop.
    pub fn watch(&mut self, notify: &EventFd) {
        self.unwatch();
        match notify.try_clone() {
            Ok(fd) => {
                self.kicks.watch(self.token, fd.as_raw_fd());
                self.fd = Some(fd);
            }
            Err(e) => log::warn!("slot {:#x}: watching its queue: {e}", self.token),
        }
    }

    /// Leaves the kicks to whoever else reads the eventfd (a backend).
    pub fn unwatch(&mut self) {
        if let Some(fd) = self.fd.take() {
            self.kicks.unwatch(self.token, fd.as_raw_fd());
        }
    }

    /// The watched eventfd.
    pub fn fd(&self) -> Option<&EventFd> {
        self.fd.as_ref()
    }
}

/// Ring `index` as the driver configured it, for the slot to answer. `resume` is `None` for a
/// ring the driver just set up; otherwise the ring resumes from a backend's stopping point
/// (the used index, read back from guest memory since the backend wrote it last, when the
/// backend could not say or named a point outside the outstanding requests: see
/// `resume_index`). A device restored from a snapshot resumes from the used index too: it
/// had completed every chain it took before the machine was saved.
pub fn empty_ring(
    memory: &GuestMemoryMmap,
    params: &ActivateParams,
    index: usize,
    max_size: u16,
    resume: Option<Option<u16>>,
) -> Option<Queue> {
    let config = params.queues.get(index).filter(|q| q.ready)?;
    let mut queue = Queue::new(max_size).ok()?;
    queue.set_size(config.size);
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (lo, hi) = split(config.desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(config.avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(config.used);
    queue.set_used_ring_address(lo, hi);
    queue.set_event_idx(params.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
    queue.set_ready(true);
    if !queue.is_valid(memory) {
        return None;
    }
    if let Some(base) = resume {
        let used = ring_idx(memory, config.used)?;
        queue.set_next_avail(resume_index(base, used, ring_idx(memory, config.avail)?));
        queue.set_next_used(used);
    }
    Some(queue)
}

/// The `idx` field of the available or used ring at `ring`, read from guest memory.
fn ring_idx(memory: &GuestMemoryMmap, ring: u64) -> Option<u16> {
    let idx: u16 = memory.read_obj(GuestAddress(ring.checked_add(2)?)).ok()?;
    Some(u16::from_le(idx))
}

/// The used index the device last published on ring `index`, read from guest memory: where a
/// backend replacing one that died resumes (its inflight record corrects this when the dead
/// one had a request in hand).
pub fn used_index(memory: &GuestMemoryMmap, params: &ActivateParams, index: usize) -> Option<u16> {
    let config = params.queues.get(index).filter(|q| q.ready)?;
    ring_idx(memory, config.used)
}

/// Where a backend stopped on ring `index` is started again: at `stopped`, its own
/// GET_VRING_BASE answer, only when that lies between the used and available indices in
/// guest memory (see `resume_index`), else at the used index. `None` when the ring is not in
/// guest RAM.
pub fn restart_index(
    memory: &GuestMemoryMmap,
    params: &ActivateParams,
    index: usize,
    stopped: Option<u16>,
) -> Option<u16> {
    let config = params.queues.get(index).filter(|q| q.ready)?;
    let used = ring_idx(memory, config.used)?;
    Some(resume_index(stopped, used, ring_idx(memory, config.avail)?))
}

/// Where a driver's ring `index` starts when a backend takes it at activation: 0 for a ring
/// the driver just set up, the used index for one restored from a snapshot (every chain
/// taken before the machine was saved had been completed).
pub fn start_index(
    memory: &GuestMemoryMmap,
    params: &ActivateParams,
    index: usize,
) -> Result<u16, ActivateError> {
    if !params.resume {
        return Ok(0);
    }
    used_index(memory, params, index).ok_or(ActivateError::InvalidQueue {
        index: index as u16,
        reason: "the ring does not lie in guest RAM",
    })
}

/// Where the slot resumes a ring a backend stopped: the backend's word (GET_VRING_BASE) only
/// when it lies between what was completed (`used`) and what the driver offered (`avail`), as
/// any honest stopping point does; otherwise, or without one, from `used`, answering every
/// request not completed. A backend cannot make the slot skip requests or re-read old ones.
fn resume_index(base: Option<u16>, used: u16, avail: u16) -> u16 {
    base.filter(|b| b.wrapping_sub(used) <= avail.wrapping_sub(used))
        .unwrap_or(used)
}

/// The next chain the driver offered on `queue`, if any. A driver announcing more new chains
/// than the ring holds has broken the ring: that is logged once and the queue stops (is no
/// longer ready) until the driver resets the device. virtio-queue's own pop would answer
/// "nothing" at every attempt while the ring's index still promised more, and a caller
/// re-checking for more after enabling notifications would spin on the event loop.
pub fn next_chain<'a>(
    queue: &mut Queue,
    memory: &'a GuestMemoryMmap,
    what: &str,
) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
    if !queue.ready() {
        return None;
    }
    match queue.iter(memory) {
        Ok(mut chains) => chains.next(),
        Err(e) => {
            log::warn!("{what}: {e}; the queue stops until the driver resets the device");
            queue.set_ready(false);
            None
        }
    }
}

/// Answers the chains the driver queued on `queue` after a kick on `kick` (consumed here),
/// each with the used length `answer` returns, and raises the interrupt if the driver wants
/// one. At most `MAX_CHAINS_PER_KICK` chains are answered; the rest wait for the kick the
/// slot then gives itself.
pub fn answer_chains(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    kick: &EventFd,
    interrupt: &dyn VirtioInterrupt,
    index: usize,
    mut answer: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    let _ = kick.read();
    let mut answered = 0;
    loop {
        if queue.disable_notification(memory).is_err() {
            break;
        }
        while answered < MAX_CHAINS_PER_KICK {
            let Some(chain) = next_chain(queue, memory, "hot-replace slot") else {
                break;
            };
            let head = chain.head_index();
            let len = answer(chain);
            if let Err(e) = queue.add_used(memory, head, len) {
                log::warn!("hot-replace slot: answering a chain: {e}");
                break;
            }
            answered += 1;
        }
        if answered >= MAX_CHAINS_PER_KICK {
            let _ = kick.write(1);
            break;
        }
        match queue.enable_notification(memory) {
            Ok(true) if queue.ready() => continue,
            _ => break,
        }
    }
    if answered > 0 && queue.needs_notification(memory).unwrap_or(true) {
        if let Err(e) = interrupt.signal_used_queue(index) {
            log::warn!("hot-replace slot: raising its interrupt: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{answer_chains, empty_ring, restart_index, resume_index, start_index, used_index};
    use crate::devices::virtio_mmio::{ActivateParams, Interrupt, QueueConfig};
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn a_replacement_backend_resumes_at_the_used_index_the_guest_sees() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let ring = |used: u64, ready: bool| QueueConfig {
            size: 8,
            desc: 0x1000,
            avail: 0x2000,
            used,
            ready,
        };
        let params = |queues| ActivateParams {
            features: 0,
            queues,
            notify: Vec::new(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            resume: false,
        };
        memory
            .write_obj(0x1234u16.to_le(), GuestAddress(0x3002))
            .unwrap();
        let started = params(vec![ring(0x3000, true), ring(0xfffe, true)]);
        assert_eq!(used_index(&memory, &started, 0), Some(0x1234));
        // Its index would lie past guest RAM; a queue that does not exist.
        assert_eq!(used_index(&memory, &started, 1), None);
        assert_eq!(used_index(&memory, &started, 2), None);
        // A queue the driver did not start has no used index to resume from.
        let idle = params(vec![ring(0x3000, false)]);
        assert_eq!(used_index(&memory, &idle, 0), None);

        // A backend started again after a snapshot keeps its stopping point only inside what
        // the driver offered (avail index 0x1236 at 0x2002).
        memory
            .write_obj(0x1236u16.to_le(), GuestAddress(0x2002))
            .unwrap();
        assert_eq!(
            restart_index(&memory, &started, 0, Some(0x1235)),
            Some(0x1235)
        );
        assert_eq!(
            restart_index(&memory, &started, 0, Some(0x1237)),
            Some(0x1234)
        );
        assert_eq!(restart_index(&memory, &started, 0, Some(0)), Some(0x1234));
        assert_eq!(restart_index(&memory, &started, 0, None), Some(0x1234));
        assert_eq!(restart_index(&memory, &started, 1, Some(1)), None);
        // At activation: 0 for a fresh ring, the used index for a restored one.
        assert_eq!(start_index(&memory, &started, 0).ok(), Some(0));
        let restored = ActivateParams {
            resume: true,
            ..params(vec![ring(0x3000, true), ring(0xfffe, true)])
        };
        assert_eq!(start_index(&memory, &restored, 0).ok(), Some(0x1234));
        assert!(start_index(&memory, &restored, 1).is_err());
    }

    #[test]
    fn a_backends_stopping_point_is_believed_only_inside_the_outstanding_window() {
        assert_eq!(resume_index(Some(5), 3, 7), 5);
        assert_eq!(resume_index(Some(7), 3, 7), 7);
        assert_eq!(resume_index(Some(3), 3, 7), 3);
        // Beyond what the driver offered, or before what was completed: from `used`.
        assert_eq!(resume_index(Some(8), 3, 7), 3);
        assert_eq!(resume_index(Some(2), 3, 7), 3);
        assert_eq!(resume_index(None, 3, 7), 3);
        // Indices wrap at 2^16.
        assert_eq!(resume_index(Some(1), 65534, 3), 1);
        assert_eq!(resume_index(Some(4), 65534, 3), 65534);
    }

    #[test]
    fn a_ring_announcing_more_chains_than_it_holds_stops_instead_of_spinning() {
        // On its own thread, so that a spinning event loop fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let params = ActivateParams {
                features: 1 << VIRTIO_RING_F_EVENT_IDX,
                queues: vec![QueueConfig {
                    size: 8,
                    desc: 0x1000,
                    avail: 0x2000,
                    used: 0x3000,
                    ready: true,
                }],
                notify: Vec::new(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                resume: false,
            };
            // Thirteen new chains announced on a ring of eight.
            memory
                .write_obj(13u16.to_le(), GuestAddress(0x2002))
                .unwrap();
            let mut queue = empty_ring(&memory, &params, 0, 8, None).unwrap();
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut answered = 0;
            for _ in 0..2 {
                answer_chains(&mut queue, &memory, &kick, &*params.interrupt, 0, |_| {
                    answered += 1;
                    0
                });
            }
            let _ = tx.send((answered, queue.ready()));
        });
        let (answered, ready) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("answering the broken ring never returned");
        assert_eq!(answered, 0);
        assert!(
            !ready,
            "the broken ring is stopped until the driver resets the device"
        );
    }
}
