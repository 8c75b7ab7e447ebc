//! Drives a virtio-mmio transport, mapped on the MMIO bus as the monitor maps it, with a
//! sequence of guest accesses of any width at any offset in and around its slot, interleaved
//! with the device raising interrupts and changing its configuration. The device behind it
//! is a dummy whose queue count, queue sizes, features and activation result come from the
//! input.
//!
//! Checks that nothing panics; that the identification registers always read the same; that
//! the status register only ever holds a step of the initialisation sequence (possibly with
//! FAILED or NEEDS_RESET); that the device is activated only through DRIVER_OK, with features
//! it offered plus VERSION_1 and with ready queues of a valid size and alignment; and that
//! configuration accesses reach the device with the offset and bytes the guest used.
//!
//! Run with `scripts/fuzz.sh`, or from `vmm/fuzz` with `cargo fuzz run virtio_mmio`.

#![no_main]

use std::sync::{Arc, Mutex};

use citadel::devices::interrupt::VirtioInterrupt;
use citadel::devices::mmio_bus::MmioBus;
use citadel::devices::virtio_mmio::{
    read_config_bytes, ActivateError, ActivateParams, Interrupt, VirtioDevice, VirtioMmioTransport,
    CONFIG_SPACE_OFFSET,
};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VERSION,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = 0xd000_0000;
const SLOT: u64 = 0x1000;
const CONFIG_LEN: usize = 24;

/// What the dummy device saw, shared with the harness.
#[derive(Default)]
struct Seen {
    activations: Vec<ActivateParams>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct Dummy {
    max_sizes: Vec<u16>,
    features: u64,
    refuse_activation: bool,
    config: [u8; CONFIG_LEN],
    seen: Arc<Mutex<Seen>>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get_mut(o..o.checked_add(data.len())?))
        {
            dst.copy_from_slice(data);
        }
        self.seen
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        self.seen.lock().unwrap().activations.push(params);
        if self.refuse_activation {
            return Err(ActivateError::Device("refused by the input".into()));
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
    }
}

/// Takes bytes from the front of the input, zero when it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

fn valid_status(status: u32) -> bool {
    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRIVER: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
    let step = status & !(VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET);
    let needs_reset = status & VIRTIO_CONFIG_S_NEEDS_RESET != 0;
    [0, ACK, DRIVER, FEATURES_OK, DRIVER_OK].contains(&step) && (!needs_reset || step == DRIVER_OK)
}

fn check_activation(params: &ActivateParams, offered: u64, max_sizes: &[u16]) {
    assert_ne!(params.features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(params.features & !(offered | 1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(params.queues.len(), max_sizes.len());
    assert_eq!(params.notify.len(), max_sizes.len());
    let packed = params.features & (1 << VIRTIO_F_RING_PACKED) != 0;
    for (q, &max) in params.queues.iter().zip(max_sizes) {
        if !q.ready {
            continue;
        }
        assert!(
            q.size != 0 && q.size <= max,
            "queue size {} (max {max})",
            q.size
        );
        assert!(packed || q.size.is_power_of_two());
        assert_eq!(q.desc % 16, 0);
        if !packed {
            assert_eq!(q.avail % 2, 0);
            assert_eq!(q.used % 4, 0);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let queues = usize::from(input.u8() % 9);
    let max_sizes: Vec<u16> = (0..queues).map(|_| 1 << (input.u8() % 16)).collect();
    let features = input.u64();
    let refuse_activation = input.u8() & 1 != 0;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let device = Dummy {
        max_sizes: max_sizes.clone(),
        features,
        refuse_activation,
        config: std::array::from_fn(|i| i as u8),
        seen: Arc::clone(&seen),
    };
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let transport = Arc::new(VirtioMmioTransport::new(device, Arc::clone(&interrupt)).unwrap());
    let bus = MmioBus::new();
    bus.insert(BASE, SLOT, transport.clone()).unwrap();

    while !input.0.is_empty() {
        let op = input.u8();
        // Accesses land anywhere from half a page before the slot to half a page after it.
        let addr = BASE - 0x800 + u64::from(input.u16() % 0x2000);
        let len = [0, 1, 2, 3, 4, 8][usize::from(op >> 2) % 6];
        let value: [u8; 8] = input.bytes();
        let inside = addr >= BASE && addr + len as u64 <= BASE + SLOT;
        match op & 3 {
            0 => {
                let mut buf = [0xa5u8; 8];
                let decoded = bus.read(addr, &mut buf[..len]);
                assert_eq!(decoded, inside);
                if !decoded {
                    assert!(buf[..len].iter().all(|&b| b == 0xff));
                    continue;
                }
                let offset = addr - BASE;
                let word = (len == 4).then(|| u32::from_le_bytes(buf[..4].try_into().unwrap()));
                match (offset, word) {
                    (o, Some(w)) if o == u64::from(VIRTIO_MMIO_MAGIC_VALUE) => {
                        assert_eq!(w, 0x7472_6976)
                    }
                    (o, Some(w)) if o == u64::from(VIRTIO_MMIO_VERSION) => assert_eq!(w, 2),
                    (o, Some(w)) if o == u64::from(VIRTIO_MMIO_STATUS) => {
                        assert!(valid_status(w), "status {w:#x}")
                    }
                    (o, None) if o < CONFIG_SPACE_OFFSET => {
                        assert!(buf[..len].iter().all(|&b| b == 0), "non-register read")
                    }
                    _ => {}
                }
            }
            1 => {
                let before = seen.lock().unwrap().config_writes.len();
                let decoded = bus.write(addr, &value[..len]);
                assert_eq!(decoded, inside);
                let seen = seen.lock().unwrap();
                if decoded && addr - BASE >= CONFIG_SPACE_OFFSET {
                    let (offset, bytes) = seen.config_writes.last().expect("config write seen");
                    assert_eq!(*offset, addr - BASE - CONFIG_SPACE_OFFSET);
                    assert_eq!(bytes.as_slice(), &value[..len]);
                } else {
                    assert_eq!(seen.config_writes.len(), before);
                }
            }
            2 => {
                let _ = interrupt.signal_used_queue(0);
            }
            _ => {
                let _ = transport
                    .update_config(|d| d.config[usize::from(value[0]) % CONFIG_LEN] = value[1]);
            }
        }
    }
    // Everything the device was started with was validated by the transport.
    let device_features = features | 1 << VIRTIO_F_VERSION_1;
    for params in &seen.lock().unwrap().activations {
        check_activation(params, device_features, &max_sizes);
    }
});
