//! The transport driven the way a guest driver drives it, against a small recording device.

use std::sync::{mpsc, Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::mmio_bus::{MmioBus, MmioDevice};

const DEVICE_TYPE: u32 = 42;
/// Device feature bits of the test device: two of its own, plus two transport features the
/// transport must hide.
const DEVICE_FEATURES: u64 =
    (1 << 0) | (1 << 5) | (1 << VIRTIO_F_NOTIFICATION_DATA) | (1 << VIRTIO_F_RING_RESET);
const PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const CONFIG: [u8; 12] = [
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b,
];

/// What the test device saw.
#[derive(Default)]
struct Record {
    activations: Vec<ActivateParams>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct TestDevice {
    record: Arc<Mutex<Record>>,
    max_sizes: Vec<u16>,
    features: u64,
    config: Vec<u8>,
    fail_activation: bool,
    /// What [`VirtioDevice::resumable`] answers.
    resumable: bool,
    /// When set, activation announces itself on the first channel and then waits on the
    /// second, the way a frontend waits for its backend.
    gate: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
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
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::Device("backend refused".into()));
        }
        if let Some((entered, release)) = &self.gate {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        self.record.lock().unwrap().activations.push(params);
        Ok(())
    }
    fn resumable(&self) -> bool {
        self.resumable
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
}

struct Fixture {
    transport: VirtioMmioTransport<TestDevice>,
    record: Arc<Mutex<Record>>,
}

fn device_with(max_sizes: &[u16], features: u64) -> (TestDevice, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let device = TestDevice {
        record: Arc::clone(&record),
        max_sizes: max_sizes.to_vec(),
        features,
        config: CONFIG.to_vec(),
        fail_activation: false,
        resumable: false,
        gate: None,
    };
    (device, record)
}

fn new_interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()))
}

fn fixture_with(max_sizes: &[u16], features: u64) -> Fixture {
    let (device, record) = device_with(max_sizes, features);
    let transport = VirtioMmioTransport::new(device, new_interrupt()).unwrap();
    Fixture { transport, record }
}

fn fixture() -> Fixture {
    fixture_with(&[256, 64], DEVICE_FEATURES)
}

impl Fixture {
    fn r32(&self, reg: u32) -> u32 {
        let mut data = [0xee; 4];
        self.transport.read(u64::from(reg), &mut data);
        u32::from_le_bytes(data)
    }

    fn w32(&self, reg: u32, value: u32) {
        self.transport.write(u64::from(reg), &value.to_le_bytes());
    }

    fn status(&self) -> u32 {
        self.r32(VIRTIO_MMIO_STATUS)
    }

    fn device_features(&self) -> u64 {
        self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.r32(VIRTIO_MMIO_DEVICE_FEATURES);
        self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.r32(VIRTIO_MMIO_DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    fn write_driver_features(&self, features: u64) {
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    fn negotiate(&self, features: u64) -> u32 {
        self.w32(VIRTIO_MMIO_STATUS, S_ACK);
        self.w32(VIRTIO_MMIO_STATUS, S_DRIVER);
        self.write_driver_features(features);
        self.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
        self.status()
    }

    fn setup_queue(&self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.w32(VIRTIO_MMIO_QUEUE_SEL, index);
        self.w32(VIRTIO_MMIO_QUEUE_NUM, size);
        for (low, value) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, used),
        ] {
            self.w32(low, value as u32);
            self.w32(low + 4, (value >> 32) as u32);
        }
        self.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn activations(&self) -> usize {
        self.record.lock().unwrap().activations.len()
    }
}

fn is_signalled(evt: &EventFd) -> bool {
    evt.read().is_ok()
}

#[test]
fn identity_registers() {
    let f = fixture();
    assert_eq!(f.r32(VIRTIO_MMIO_MAGIC_VALUE), u32::from_le_bytes(*b"virt"));
    assert_eq!(f.r32(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(f.r32(VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
    assert_eq!(f.r32(VIRTIO_MMIO_VENDOR_ID), u32::from_le_bytes(*b"CTDL"));
    assert_eq!(f.status(), 0);
}

#[test]
fn device_features_add_version_1_and_hide_unsupported_transport_features() {
    let f = fixture();
    assert_eq!(f.device_features(), (1 << 0) | (1 << 5) | VERSION_1);
    // Feature words past the second do not exist.
    f.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(f.r32(VIRTIO_MMIO_DEVICE_FEATURES), 0);
    f.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(f.r32(VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn full_negotiation_activates_with_exactly_what_the_driver_wrote() {
    let f = fixture();
    f.w32(VIRTIO_MMIO_STATUS, S_ACK);
    assert_eq!(f.status(), S_ACK);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER);
    assert_eq!(f.status(), S_DRIVER);
    let features = f.device_features() & !(1 << 5);
    f.write_driver_features(features);
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_FEATURES_OK);

    f.w32(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    f.setup_queue(0, 128, 0x1_2345_6000, 0x1_2345_7000, 0x1_2345_8000);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 1);
    f.w32(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
    f.setup_queue(1, 64, 0xa000, 0xb002, 0xc004);
    assert_eq!(f.activations(), 0, "nothing starts before DRIVER_OK");

    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.status(), S_DRIVER_OK);

    let record = f.record.lock().unwrap();
    assert_eq!(record.activations.len(), 1);
    let params = &record.activations[0];
    assert_eq!(params.features, features);
    assert_eq!(
        params.queues,
        vec![
            QueueConfig {
                size: 128,
                desc: 0x1_2345_6000,
                avail: 0x1_2345_7000,
                used: 0x1_2345_8000,
                ready: true
            },
            QueueConfig {
                size: 64,
                desc: 0xa000,
                avail: 0xb002,
                used: 0xc004,
                ready: true
            },
        ]
    );
    assert_eq!(params.notify.len(), 2);
    let transport_interrupt: Arc<dyn VirtioInterrupt> = f.transport.interrupt().clone();
    assert!(Arc::ptr_eq(&params.interrupt, &transport_interrupt));
}

#[test]
fn queues_the_driver_leaves_alone_are_passed_as_not_ready_with_the_default_size() {
    let f = fixture();
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(1, 32, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let record = f.record.lock().unwrap();
    let queues = &record.activations[0].queues;
    assert_eq!(
        queues[0],
        QueueConfig {
            size: 256,
            ready: false,
            ..QueueConfig::default()
        }
    );
    assert!(queues[1].ready);
    assert_eq!(queues[1].size, 32);
}

#[test]
fn feature_sets_that_are_not_a_subset_or_lack_version_1_are_refused() {
    let f = fixture();
    // A feature the device never offered.
    assert_eq!(f.negotiate(VERSION_1 | (1 << 3)), S_DRIVER);
    // A transport feature the device has but the transport hides.
    f.write_driver_features(VERSION_1 | (1 << VIRTIO_F_RING_RESET));
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_DRIVER);
    // Legacy drivers (no VERSION_1) are not served.
    f.write_driver_features(1 << 0);
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_DRIVER);
    // A valid subset is accepted after all that.
    f.write_driver_features(VERSION_1 | (1 << 5));
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_FEATURES_OK);
    // Once FEATURES_OK is set, the features are frozen.
    f.write_driver_features(VERSION_1 | (1 << 0) | (1 << 5));
    f.setup_queue(0, 16, 0, 0x100, 0x200);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(
        f.record.lock().unwrap().activations[0].features,
        VERSION_1 | (1 << 5)
    );
}

#[test]
fn driver_features_are_only_taken_in_the_driver_state() {
    let f = fixture();
    f.write_driver_features(VERSION_1);
    f.w32(VIRTIO_MMIO_STATUS, S_ACK);
    f.write_driver_features(VERSION_1);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER);
    // Nothing written earlier counted: the features are still empty.
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_DRIVER);
    // A write to a feature word that does not exist changes nothing.
    f.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    f.w32(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 0);
    f.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    f.w32(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    f.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
    f.w32(VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_FEATURES_OK);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(
        f.record.lock().unwrap().activations[0].features,
        VERSION_1 | 1
    );
}

#[test]
fn invalid_status_transitions_are_refused() {
    let f = fixture();
    // Skipping steps.
    for value in [S_DRIVER, S_FEATURES_OK, S_DRIVER_OK, VIRTIO_CONFIG_S_DRIVER] {
        f.w32(VIRTIO_MMIO_STATUS, value);
        assert_eq!(f.status(), 0, "{value:#x} from 0");
    }
    f.w32(VIRTIO_MMIO_STATUS, S_ACK);
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    assert_eq!(f.status(), S_ACK);
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    // Clearing a bit.
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER);
    assert_eq!(f.status(), S_FEATURES_OK);
    // The driver cannot claim the device needs a reset.
    f.w32(
        VIRTIO_MMIO_STATUS,
        S_FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
    );
    assert_eq!(f.status(), S_FEATURES_OK);
    // Bits that mean nothing.
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK | 0x10);
    assert_eq!(f.status(), S_FEATURES_OK);
    assert_eq!(f.activations(), 0);
}

#[test]
fn failed_is_accepted_at_any_point_and_freezes_the_device_until_reset() {
    let f = fixture();
    f.w32(VIRTIO_MMIO_STATUS, S_ACK);
    f.w32(VIRTIO_MMIO_STATUS, S_ACK | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(f.status(), S_ACK | VIRTIO_CONFIG_S_FAILED);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(f.status(), S_ACK | VIRTIO_CONFIG_S_FAILED);
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED);
    // Queue setup after FAILED is ignored.
    f.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(f.activations(), 0);
}

#[test]
fn queue_sizes_must_be_powers_of_two_within_the_maximum() {
    let f = fixture();
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.w32(VIRTIO_MMIO_QUEUE_SEL, 1);
    for bad in [0, 3, 48, 128, 65536, u32::MAX] {
        f.w32(VIRTIO_MMIO_QUEUE_NUM, bad);
    }
    f.w32(VIRTIO_MMIO_QUEUE_NUM, 16);
    f.w32(VIRTIO_MMIO_QUEUE_NUM, 100);
    f.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.record.lock().unwrap().activations[0].queues[1].size, 16);
}

#[test]
fn packed_rings_take_any_size_within_the_maximum() {
    let f = fixture_with(&[256], DEVICE_FEATURES | PACKED);
    assert_eq!(f.negotiate(VERSION_1 | PACKED), S_FEATURES_OK);
    f.w32(VIRTIO_MMIO_QUEUE_NUM, 300);
    f.setup_queue(0, 100, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.status(), S_DRIVER_OK);
    assert_eq!(f.record.lock().unwrap().activations[0].queues[0].size, 100);
}

#[test]
fn queue_fields_change_only_during_setup() {
    let f = fixture();
    // Before FEATURES_OK.
    f.w32(VIRTIO_MMIO_STATUS, S_ACK);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER);
    f.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    f.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    f.write_driver_features(VERSION_1);
    f.w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);

    f.setup_queue(0, 64, 0x1000, 0x2000, 0x3000);
    // While the queue is ready, its size and addresses are frozen.
    f.w32(VIRTIO_MMIO_QUEUE_NUM, 32);
    f.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x9000);
    f.w32(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 1);
    f.w32(VIRTIO_MMIO_QUEUE_USED_LOW, 0x9000);
    // The driver may take a queue back before DRIVER_OK and set it up again.
    f.w32(VIRTIO_MMIO_QUEUE_SEL, 1);
    f.setup_queue(1, 8, 0x4000, 0x5000, 0x6000);
    f.w32(VIRTIO_MMIO_QUEUE_READY, 0);
    f.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x7000);
    f.w32(VIRTIO_MMIO_QUEUE_READY, 1);
    // A value other than 0 or 1 changes nothing.
    f.w32(VIRTIO_MMIO_QUEUE_READY, 2);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 1);

    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    // After DRIVER_OK nothing changes, not even readiness.
    f.w32(VIRTIO_MMIO_QUEUE_SEL, 0);
    f.w32(VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 1);

    let record = f.record.lock().unwrap();
    let queues = &record.activations[0].queues;
    assert_eq!(
        queues[0],
        QueueConfig {
            size: 64,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ready: true
        }
    );
    assert_eq!(queues[1].desc, 0x7000);
}

#[test]
fn selecting_a_queue_that_does_not_exist() {
    let f = fixture();
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    for sel in [2, 1000, u32::MAX] {
        f.w32(VIRTIO_MMIO_QUEUE_SEL, sel);
        assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        f.w32(VIRTIO_MMIO_QUEUE_NUM, 16);
        f.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        f.w32(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    }
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let record = f.record.lock().unwrap();
    assert!(record.activations[0].queues.iter().all(|q| !q.ready));
}

#[test]
fn misaligned_or_wrapping_rings_fail_activation_with_needs_reset() {
    for (desc, avail, used) in [
        (0x1008, 0x2000, 0x3000),
        (0x1000, 0x2001, 0x3000),
        (0x1000, 0x2000, 0x3002),
        (u64::MAX - 15, 0x2000, 0x3000),
    ] {
        let f = fixture();
        assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
        f.setup_queue(0, 16, desc, avail, used);
        f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
        assert_eq!(
            f.status(),
            S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
            "{desc:#x} {avail:#x} {used:#x}"
        );
        assert_eq!(f.activations(), 0);
        // The driver hears about it through a configuration interrupt.
        assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
        assert!(is_signalled(f.transport.interrupt().queue_irqfd(0)));
    }
}

#[test]
fn activation_failure_sets_needs_reset_and_a_reset_recovers() {
    let (mut device, record) = device_with(&[16], DEVICE_FEATURES);
    device.fail_activation = true;
    let f = Fixture {
        transport: VirtioMmioTransport::new(device, new_interrupt()).unwrap(),
        record,
    };
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    let generation = f.r32(VIRTIO_MMIO_CONFIG_GENERATION);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let failed = S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET;
    assert_eq!(f.status(), failed);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    assert_ne!(f.r32(VIRTIO_MMIO_CONFIG_GENERATION), generation);
    // Only FAILED or a reset are accepted now.
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.status(), failed);
    f.w32(VIRTIO_MMIO_STATUS, failed | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(f.status(), failed | VIRTIO_CONFIG_S_FAILED);
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(f.record.lock().unwrap().resets, 1);
}

#[test]
fn a_device_failed_while_running_needs_a_reset_and_one_never_started_does_not() {
    let f = fixture();
    f.transport.fail_device(|_| ());
    assert_eq!(f.status(), 0);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.activations(), 1);
    let ran = f.transport.fail_device(|device| device.max_sizes.len());
    assert_eq!(ran, 2);
    assert_eq!(f.status(), S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    assert!(is_signalled(f.transport.interrupt().queue_irqfd(0)));
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.record.lock().unwrap().resets, 1);
}

#[test]
fn reset_returns_every_register_to_its_initial_value() {
    let f = fixture();
    assert_eq!(f.negotiate(VERSION_1 | 1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.setup_queue(1, 8, 0x4000, 0x5000, 0x6000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    f.transport.interrupt().signal_used_queue(0).unwrap();
    f.transport.interrupt().set_vring_signalled_externally(true);
    // A kick the device never consumed.
    f.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    f.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);

    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.record.lock().unwrap().resets, 1);
    assert_eq!(f.status(), 0);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    // Feature and queue selectors are back at 0.
    assert_eq!(f.r32(VIRTIO_MMIO_DEVICE_FEATURES), (1 << 0) | (1 << 5));
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    assert_eq!(f.r32(VIRTIO_MMIO_QUEUE_READY), 0);
    for (_, _, evt) in f.transport.notify_ioevents(0) {
        assert!(!is_signalled(evt), "stale kick survived the reset");
    }

    // The next driver starts from scratch: its features and queues only.
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(1, 64, 0x7000, 0x8000, 0x9000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let record = f.record.lock().unwrap();
    assert_eq!(record.activations.len(), 2);
    let params = &record.activations[1];
    assert_eq!(params.features, VERSION_1);
    assert_eq!(
        params.queues,
        vec![
            QueueConfig {
                size: 256,
                ..QueueConfig::default()
            },
            QueueConfig {
                size: 64,
                desc: 0x7000,
                avail: 0x8000,
                used: 0x9000,
                ready: true
            },
        ]
    );
}

#[test]
fn reset_reaches_the_device_even_when_it_never_started() {
    let f = fixture();
    f.w32(VIRTIO_MMIO_STATUS, S_ACK);
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.record.lock().unwrap().resets, 1);
}

#[test]
fn wrong_width_register_accesses_are_ignored_and_read_zero() {
    let f = fixture();
    for len in [1usize, 2, 3, 8] {
        let mut data = vec![0xee; len];
        f.transport
            .read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut data);
        assert_eq!(data, vec![0; len], "{len}-byte read");
        f.transport
            .write(u64::from(VIRTIO_MMIO_STATUS), &vec![1; len]);
        assert_eq!(f.status(), 0, "{len}-byte write");
    }
    // Misaligned 32-bit accesses.
    let mut data = [0xee; 4];
    f.transport.read(1, &mut data);
    assert_eq!(data, [0; 4]);
    f.transport
        .write(u64::from(VIRTIO_MMIO_STATUS) + 2, &1u32.to_le_bytes());
    f.transport
        .write(u64::from(VIRTIO_MMIO_STATUS) - 1, &S_ACK.to_le_bytes());
    assert_eq!(f.status(), 0);
    // An empty access does not panic.
    f.transport.read(0, &mut []);
    f.transport.write(0, &[]);
}

#[test]
fn reserved_and_write_only_registers_read_zero_and_ignore_writes() {
    let f = fixture();
    // Legacy-only registers, gaps, write-only registers and the queue reset register, which
    // only exists with VIRTIO_F_RING_RESET.
    for reg in [
        VIRTIO_MMIO_GUEST_PAGE_SIZE,
        VIRTIO_MMIO_QUEUE_ALIGN,
        VIRTIO_MMIO_QUEUE_PFN,
        VIRTIO_MMIO_DEVICE_FEATURES_SEL,
        VIRTIO_MMIO_DRIVER_FEATURES,
        VIRTIO_MMIO_QUEUE_SEL,
        VIRTIO_MMIO_QUEUE_NUM,
        VIRTIO_MMIO_QUEUE_NOTIFY,
        VIRTIO_MMIO_INTERRUPT_ACK,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        0x0c0,
        0x0f8,
        0x0fc - 0x10,
    ] {
        assert_eq!(f.r32(reg), 0, "register {reg:#x}");
    }
    for reg in [
        VIRTIO_MMIO_MAGIC_VALUE,
        VIRTIO_MMIO_VERSION,
        VIRTIO_MMIO_DEVICE_ID,
        VIRTIO_MMIO_CONFIG_GENERATION,
        0x0c0,
    ] {
        f.w32(reg, 0x1234);
    }
    assert_eq!(f.r32(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(f.r32(VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
    assert_eq!(f.r32(VIRTIO_MMIO_CONFIG_GENERATION), 0);
}

#[test]
fn no_shared_memory_regions() {
    let f = fixture();
    for sel in [0, 1, 255] {
        f.w32(VIRTIO_MMIO_SHM_SEL, sel);
        assert_eq!(f.r32(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(f.r32(VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
    }
}

#[test]
fn config_space_reads_any_width_and_zero_past_the_end() {
    let f = fixture();
    let read = |offset: u64, len: usize| {
        let mut data = vec![0xee; len];
        f.transport.read(CONFIG_SPACE_OFFSET + offset, &mut data);
        data
    };
    assert_eq!(read(0, 1), vec![0x10]);
    assert_eq!(read(1, 2), vec![0x11, 0x12]);
    assert_eq!(read(4, 4), vec![0x14, 0x15, 0x16, 0x17]);
    assert_eq!(read(3, 8), CONFIG[3..11].to_vec());
    assert_eq!(read(10, 4), vec![0x1a, 0x1b, 0, 0]);
    assert_eq!(read(12, 4), vec![0; 4]);
    assert_eq!(read(0xeff, 1), vec![0]);
    assert_eq!(read(u64::MAX - CONFIG_SPACE_OFFSET, 1), vec![0]);
}

#[test]
fn config_space_writes_reach_the_device_with_their_offset() {
    let f = fixture();
    f.transport.write(CONFIG_SPACE_OFFSET + 6, &[1, 2]);
    f.transport.write(CONFIG_SPACE_OFFSET, &[7]);
    assert_eq!(
        f.record.lock().unwrap().config_writes,
        vec![(6, vec![1, 2]), (0, vec![7])]
    );
}

#[test]
fn queue_notify_signals_the_eventfd_of_that_queue() {
    let f = fixture();
    let base = layout::VIRTIO_MMIO_BASE;
    let ioevents: Vec<_> = f.transport.notify_ioevents(base).collect();
    assert_eq!(ioevents.len(), 2);
    for (i, (addr, datamatch, _)) in ioevents.iter().enumerate() {
        assert_eq!(*addr, base + 0x50);
        assert_eq!(*datamatch, i as u32);
    }
    f.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert!(!is_signalled(ioevents[0].2));
    assert!(is_signalled(ioevents[1].2));
    // Queues that do not exist, and wrong widths, signal nothing.
    f.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 2);
    f.w32(VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    f.transport.write(QUEUE_NOTIFY_OFFSET, &[0, 0]);
    assert!(ioevents.iter().all(|(_, _, evt)| !is_signalled(evt)));
}

#[test]
fn the_device_receives_the_very_eventfds_the_notify_register_signals() {
    let f = fixture();
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    f.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let record = f.record.lock().unwrap();
    let notify = &record.activations[0].notify;
    assert_eq!(notify[0].read().unwrap(), 1);
    assert!(notify[1].read().is_err());
    // A kick delivered by KVM straight to the eventfd reaches the device the same way.
    let (_, _, evt) = f.transport.notify_ioevents(0).nth(1).unwrap();
    evt.write(1).unwrap();
    assert_eq!(notify[1].read().unwrap(), 1);
}

#[test]
fn used_queue_interrupts_set_the_status_bit_and_the_driver_acknowledges_them() {
    let f = fixture();
    let interrupt = Arc::clone(f.transport.interrupt());
    interrupt.signal_used_queue(0).unwrap();
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    assert_eq!(interrupt.queue_irqfd(0).read().unwrap(), 1);
    interrupt.signal_config_change().unwrap();
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    f.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    // Unknown bits in the acknowledgement are ignored.
    f.w32(VIRTIO_MMIO_INTERRUPT_ACK, 0xfffc);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    f.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn externally_signalled_rings_always_report_the_vring_bit() {
    let f = fixture();
    let interrupt = f.transport.interrupt();
    interrupt.set_vring_signalled_externally(true);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    // The driver's acknowledgement cannot hide completions it has not seen yet.
    f.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    interrupt.signal_config_change().unwrap();
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    interrupt.set_vring_signalled_externally(false);
    f.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn interrupt_handling_and_kicks_do_not_wait_for_a_slow_activation() {
    let (mut device, record) = device_with(&[16], DEVICE_FEATURES);
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    device.gate = Some((entered_tx, release_rx));
    let f = Arc::new(Fixture {
        transport: VirtioMmioTransport::new(device, new_interrupt()).unwrap(),
        record,
    });
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    let activating = {
        let f = Arc::clone(&f);
        std::thread::spawn(move || f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK))
    };
    entered_rx.recv().unwrap();
    // The activation holds the transport; another vCPU still takes its interrupt and kicks.
    f.transport.interrupt().signal_used_queue(0).unwrap();
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    f.w32(VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    f.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    release_tx.send(()).unwrap();
    activating.join().unwrap();
    assert_eq!(f.status(), S_DRIVER_OK);
    let record = f.record.lock().unwrap();
    assert_eq!(record.activations[0].notify[0].read().unwrap(), 1);
}

#[test]
fn config_updates_bump_the_generation_and_raise_the_config_interrupt() {
    let f = fixture();
    assert_eq!(f.r32(VIRTIO_MMIO_CONFIG_GENERATION), 0);
    let old = f
        .transport
        .update_config(|device| std::mem::replace(&mut device.config[0], 0x99))
        .unwrap();
    assert_eq!(old, 0x10);
    assert_eq!(f.r32(VIRTIO_MMIO_CONFIG_GENERATION), 1);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    assert!(is_signalled(f.transport.interrupt().queue_irqfd(0)));
    let mut data = [0];
    f.transport.read(CONFIG_SPACE_OFFSET, &mut data);
    assert_eq!(data, [0x99]);
    // A reset clears the pending interrupt but never rewinds the generation.
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(f.r32(VIRTIO_MMIO_CONFIG_GENERATION), 1);
}

#[test]
fn devices_with_unusable_queues_are_refused() {
    for (sizes, expected) in [
        (vec![0u16], "queue 0 has maximum size 0"),
        (vec![256, 100], "queue 1 has maximum size 100"),
        (vec![16, 16, 65535], "queue 2 has maximum size 65535"),
    ] {
        let (device, _) = device_with(&sizes, 0);
        let err = VirtioMmioTransport::new(device, new_interrupt())
            .err()
            .unwrap();
        assert!(err.to_string().starts_with(expected), "{err}");
    }
    let (device, _) = device_with(&vec![16; MAX_QUEUES + 1], 0);
    let err = VirtioMmioTransport::new(device, new_interrupt())
        .err()
        .unwrap();
    assert!(matches!(err, VirtioMmioError::TooManyQueues(n) if n == MAX_QUEUES + 1));
    let (device, _) = device_with(&[32768; 3], 0);
    assert!(VirtioMmioTransport::new(device, new_interrupt()).is_ok());
}

#[test]
fn boxed_devices_of_any_kind_fit_one_transport_type() {
    let (device, record) = device_with(&[16], DEVICE_FEATURES);
    let boxed: Box<dyn VirtioDevice> = Box::new(device);
    let transport = VirtioMmioTransport::new(boxed, new_interrupt()).unwrap();
    let mut data = [0; 4];
    transport.read(u64::from(VIRTIO_MMIO_DEVICE_ID), &mut data);
    assert_eq!(u32::from_le_bytes(data), DEVICE_TYPE);
    transport.read(CONFIG_SPACE_OFFSET, &mut data);
    assert_eq!(data, [0x10, 0x11, 0x12, 0x13]);
    transport.write(u64::from(VIRTIO_MMIO_STATUS), &S_ACK.to_le_bytes());
    transport.write(u64::from(VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
    assert_eq!(record.lock().unwrap().resets, 1);
}

#[test]
fn kernel_command_line_device_strings() {
    assert_eq!(
        cmdline_slot(0, 5).unwrap(),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
    assert_eq!(
        cmdline_slot(3, 12).unwrap(),
        "virtio_mmio.device=4K@0xd0003000:12"
    );
    let last = layout::VIRTIO_MMIO_MAX_SLOTS - 1;
    assert!(cmdline_slot(last, 5).is_ok());
    let err = cmdline_slot(last + 1, 5).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "virtio-mmio slot {} does not exist: there are {} slots",
            last + 1,
            layout::VIRTIO_MMIO_MAX_SLOTS
        )
    );
    assert_eq!(
        cmdline_device(0x1000_0000, 0x20_0000, 1),
        "virtio_mmio.device=2M@0x10000000:1"
    );
    assert_eq!(
        cmdline_device(0x1000, 0x200, 7),
        "virtio_mmio.device=512@0x1000:7"
    );
}

#[test]
fn driven_through_the_mmio_bus_at_its_slot() {
    let (device, record) = device_with(&[16], DEVICE_FEATURES);
    let transport = Arc::new(VirtioMmioTransport::new(device, new_interrupt()).unwrap());
    let bus = MmioBus::new();
    let base = layout::virtio_mmio_slot(2).unwrap().0;
    bus.insert(base, layout::VIRTIO_MMIO_SLOT_SIZE, transport.clone())
        .unwrap();
    let r32 = |reg: u32| {
        let mut data = [0; 4];
        assert!(bus.read(base + u64::from(reg), &mut data));
        u32::from_le_bytes(data)
    };
    let w32 =
        |reg: u32, value: u32| assert!(bus.write(base + u64::from(reg), &value.to_le_bytes()));
    assert_eq!(r32(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
    w32(VIRTIO_MMIO_STATUS, S_ACK);
    w32(VIRTIO_MMIO_STATUS, S_DRIVER);
    w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w32(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w32(VIRTIO_MMIO_STATUS, S_FEATURES_OK);
    w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10000);
    w32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x11000);
    w32(VIRTIO_MMIO_QUEUE_USED_LOW, 0x12000);
    w32(VIRTIO_MMIO_QUEUE_READY, 1);
    w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(r32(VIRTIO_MMIO_STATUS), S_DRIVER_OK);
    let mut data = [0; 2];
    assert!(bus.read(base + CONFIG_SPACE_OFFSET + 2, &mut data));
    assert_eq!(data, [0x12, 0x13]);
    // The last byte of the slot is config space; the next byte is someone else's.
    let mut byte = [0xee];
    assert!(bus.read(base + 0xfff, &mut byte));
    assert_eq!(byte, [0]);
    assert!(!bus.read(base + 0x1000, &mut byte));
    assert_eq!(byte, [0xff]);
    let record = record.lock().unwrap();
    assert_eq!(
        record.activations[0].queues[0],
        QueueConfig {
            size: 16,
            desc: 0x10000,
            avail: 0x11000,
            used: 0x12000,
            ready: true
        }
    );
}

/// Arbitrary guest writes and reads over the whole slot, every width, never panic, and leave
/// the transport answering correctly.
#[test]
fn arbitrary_accesses_never_panic() {
    let f = fixture();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50_000 {
        let r = next();
        let offset = (r >> 8) % 0x1000;
        let len = [1usize, 2, 4, 8][(r & 3) as usize];
        // Mostly small values so that status steps and queue indices get hit.
        let value = if r & 4 == 0 { next() % 16 } else { next() };
        if r & 8 == 0 {
            let mut data = vec![0; len];
            f.transport.read(offset, &mut data);
        } else {
            f.transport.write(offset, &value.to_le_bytes()[..len]);
        }
    }
    assert_eq!(f.r32(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.status(), 0);
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
}

/// With deferred activation, DRIVER_OK only signals; the device starts when the event loop
/// runs the pending activation, and a reset or FAILED in between cancels it.
#[test]
fn deferred_activation_runs_later_and_a_reset_cancels_it() {
    let (device, record) = device_with(&[16], DEVICE_FEATURES);
    let signal = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let f = Fixture {
        transport: VirtioMmioTransport::new(device, new_interrupt())
            .unwrap()
            .with_deferred_activation(signal.try_clone().unwrap()),
        record,
    };
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.status(), S_DRIVER_OK);
    assert_eq!(
        f.activations(),
        0,
        "DRIVER_OK must not start the device itself"
    );
    assert_eq!(signal.read().unwrap(), 1);
    f.transport.run_pending_activation();
    assert_eq!(f.activations(), 1);
    // Nothing pending any more: running again starts nothing.
    f.transport.run_pending_activation();
    assert_eq!(f.activations(), 1);

    // A reset between DRIVER_OK and the event loop cancels the start.
    f.w32(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    f.w32(VIRTIO_MMIO_STATUS, 0);
    f.transport.run_pending_activation();
    assert_eq!(f.activations(), 1);
    // So does FAILED.
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED);
    f.transport.run_pending_activation();
    assert_eq!(f.activations(), 1);
}

/// A deferred activation that fails sets NEEDS_RESET and raises the configuration interrupt,
/// as an immediate one does.
#[test]
fn deferred_activation_failure_sets_needs_reset() {
    let (mut device, record) = device_with(&[16], DEVICE_FEATURES);
    device.fail_activation = true;
    let signal = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let f = Fixture {
        transport: VirtioMmioTransport::new(device, new_interrupt())
            .unwrap()
            .with_deferred_activation(signal),
        record,
    };
    assert_eq!(f.negotiate(VERSION_1), S_FEATURES_OK);
    f.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    f.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(f.status(), S_DRIVER_OK);
    f.transport.run_pending_activation();
    assert_eq!(f.status(), S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(f.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn a_configured_transport_moves_to_a_fresh_one() {
    let from = fixture();
    assert_eq!(
        from.negotiate((1 << 0) | (1 << 5) | VERSION_1),
        S_FEATURES_OK
    );
    from.setup_queue(1, 32, 0x1000, 0x2000, 0x3000);
    from.transport.interrupt().signal_config_change().unwrap();
    let saved = from.transport.save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: crate::snapshot::transport::TransportSnapshot = serde_json::from_str(&json).unwrap();

    let to = fixture();
    to.transport.restore(&back).unwrap();
    assert_eq!(to.status(), S_FEATURES_OK);
    assert_eq!(to.r32(VIRTIO_MMIO_QUEUE_READY), 1);
    assert_eq!(to.r32(VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(to.r32(VIRTIO_MMIO_CONFIG_GENERATION), 1);
    assert_eq!(to.transport.save(), saved);
    // The driver can go on from there: DRIVER_OK starts the device with the saved queue.
    to.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    assert_eq!(to.activations(), 1);
    let record = to.record.lock().unwrap();
    assert_eq!(
        record.activations[0].queues[1],
        QueueConfig {
            size: 32,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ready: true
        }
    );
    assert_eq!(
        record.activations[0].features,
        (1 << 0) | (1 << 5) | VERSION_1
    );
}

/// A change that makes a saved transport state one a restore must refuse.
type Spoil = Box<dyn Fn(&mut crate::snapshot::transport::TransportSnapshot)>;

#[test]
fn a_hostile_transport_state_is_refused_and_changes_nothing() {
    let from = fixture();
    assert_eq!(from.negotiate((1 << 5) | VERSION_1), S_FEATURES_OK);
    let good = from.transport.save();
    let cases: Vec<(Spoil, &str)> = vec![
        (Box::new(|s| s.device_type += 1), "device type"),
        (
            Box::new(|s| {
                s.queues.pop();
            }),
            "1 queues where the device has 2",
        ),
        (
            Box::new(|s| s.queues[1].size = 128),
            "queue 1 has an invalid size 128",
        ),
        (
            Box::new(|s| s.queues[0].size = 3),
            "queue 0 has an invalid size 3",
        ),
        (
            Box::new(|s| s.driver_features |= 1 << 63),
            "features the device does not offer",
        ),
        (
            Box::new(|s| s.status = S_DRIVER_OK),
            "device type 42 was started by its driver and cannot be resumed: its rings are \
             not served by the VMM",
        ),
    ];
    for (spoil, expected) in cases {
        let mut bad = good.clone();
        spoil(&mut bad);
        let to = fixture();
        let err = to.transport.restore(&bad).unwrap_err();
        assert!(err.contains(expected), "{err}");
        assert_eq!(to.status(), 0);
        assert_eq!(to.activations(), 0);
    }
}

/// A transport whose device resumes, with deferred activation as every slot has, and the
/// signal its starts are handed over on.
fn resumable_fixture() -> (Fixture, EventFd) {
    let (mut device, record) = device_with(&[256, 64], DEVICE_FEATURES);
    device.resumable = true;
    let signal = EventFd::new(EFD_NONBLOCK).unwrap();
    let f = Fixture {
        transport: VirtioMmioTransport::new(device, new_interrupt())
            .unwrap()
            .with_deferred_activation(signal.try_clone().unwrap()),
        record,
    };
    (f, signal)
}

/// Which queues' notify eventfds were signalled, draining them.
fn kicked(f: &Fixture) -> Vec<bool> {
    f.transport
        .notify_ioevents(0)
        .map(|(_, _, evt)| is_signalled(evt))
        .collect()
}

/// A device its driver started comes back started: the start waits for the event loop, as
/// a driver's DRIVER_OK does, then runs in resume mode with the saved queues and kicks each
/// ready queue once. A DRIVER_OK the event loop had not acted on when the state was saved
/// comes back the same way.
#[test]
fn a_started_device_resumes_on_the_event_loop_with_one_kick_per_ready_queue() {
    let (from, from_signal) = resumable_fixture();
    assert_eq!(from.negotiate((1 << 5) | VERSION_1), S_FEATURES_OK);
    from.setup_queue(1, 32, 0x1000, 0x2000, 0x3000);
    from.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let pending = from.transport.save();
    from.transport.run_pending_activation();
    assert_eq!(from.activations(), 1);
    assert!(!from.record.lock().unwrap().activations[0].resume);
    let started = from.transport.save();
    assert_eq!(started, pending);
    assert_eq!(from_signal.read().unwrap(), 1);

    for saved in [started, pending] {
        let (to, signal) = resumable_fixture();
        to.transport.restore(&saved).unwrap();
        assert_eq!(
            to.activations(),
            0,
            "a restore must not start the device itself"
        );
        assert_eq!(to.status(), S_DRIVER_OK);
        assert_eq!(signal.read().unwrap(), 1);
        assert_eq!(kicked(&to), [false, false]);
        to.transport.run_pending_activation();
        assert_eq!(to.activations(), 1);
        {
            let record = to.record.lock().unwrap();
            let params = &record.activations[0];
            assert!(params.resume);
            assert_eq!(params.features, (1 << 5) | VERSION_1);
            assert_eq!(
                params.queues[1],
                QueueConfig {
                    size: 32,
                    desc: 0x1000,
                    avail: 0x2000,
                    used: 0x3000,
                    ready: true
                }
            );
            assert!(!params.queues[0].ready);
        }
        assert_eq!(kicked(&to), [false, true]);
        assert_eq!(to.status(), S_DRIVER_OK);
        assert_eq!(to.transport.save(), saved);
        // Started once: the event loop running again starts nothing.
        to.transport.run_pending_activation();
        assert_eq!(to.activations(), 1);

        // After the driver resets it, the device starts afresh, not in resume mode.
        to.w32(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(to.negotiate(VERSION_1), S_FEATURES_OK);
        to.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
        to.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
        to.transport.run_pending_activation();
        assert_eq!(to.activations(), 2);
        assert!(!to.record.lock().unwrap().activations[1].resume);
        assert_eq!(kicked(&to), [false, false]);
    }
}

/// A reset between the restore and the event loop cancels the resumed start, and a device
/// that had failed to start, or that its driver gave up on, comes back stopped.
#[test]
fn a_restored_device_that_was_reset_failed_or_given_up_on_does_not_start() {
    let (from, _signal) = resumable_fixture();
    assert_eq!(from.negotiate(VERSION_1), S_FEATURES_OK);
    from.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    from.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let started = from.transport.save();

    let (to, _signal) = resumable_fixture();
    to.transport.restore(&started).unwrap();
    to.w32(VIRTIO_MMIO_STATUS, 0);
    to.transport.run_pending_activation();
    assert_eq!(to.activations(), 0);
    assert_eq!(kicked(&to), [false, false]);

    for status in [
        S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
        S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
    ] {
        let mut saved = started.clone();
        saved.status = status;
        let (to, signal) = resumable_fixture();
        to.transport.restore(&saved).unwrap();
        assert_eq!(to.status(), status);
        assert!(signal.read().is_err());
        to.transport.run_pending_activation();
        assert_eq!(to.activations(), 0);
        assert_eq!(kicked(&to), [false, false]);
    }
}

/// A transport without deferred activation resumes its device on the spot.
#[test]
fn a_restored_device_without_deferred_activation_resumes_at_once() {
    let (from, _signal) = resumable_fixture();
    assert_eq!(from.negotiate(VERSION_1), S_FEATURES_OK);
    from.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    from.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let saved = from.transport.save();
    let (mut device, record) = device_with(&[256, 64], DEVICE_FEATURES);
    device.resumable = true;
    let to = Fixture {
        transport: VirtioMmioTransport::new(device, new_interrupt()).unwrap(),
        record,
    };
    to.transport.restore(&saved).unwrap();
    assert_eq!(to.activations(), 1);
    assert!(to.record.lock().unwrap().activations[0].resume);
    assert_eq!(kicked(&to), [true, false]);
}

#[test]
fn a_hostile_started_transport_state_is_refused_and_changes_nothing() {
    let (from, _signal) = resumable_fixture();
    assert_eq!(from.negotiate((1 << 5) | VERSION_1), S_FEATURES_OK);
    from.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    from.w32(VIRTIO_MMIO_STATUS, S_DRIVER_OK);
    let good = from.transport.save();
    let cases: Vec<(Spoil, &str)> = vec![
        (
            Box::new(|s| s.status = S_ACK | VIRTIO_CONFIG_S_DRIVER_OK),
            "status 0x5 is not one a driver can reach",
        ),
        (
            Box::new(|s| s.status = S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK),
            "status 0x7 is not one a driver can reach",
        ),
        (
            Box::new(|s| s.status = S_FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET),
            "status 0x4b is not one a driver can reach",
        ),
        (
            Box::new(|s| s.status = S_DRIVER_OK | 0x10),
            "status 0x1f is not one a driver can reach",
        ),
        (
            Box::new(|s| s.driver_features = 1 << 5),
            "the driver accepted features without VERSION_1",
        ),
        (
            Box::new(|s| s.queues[0].desc = 0x1008),
            "queue 0 is unusable: a ring area is misaligned",
        ),
        (
            Box::new(|s| s.queues[0].used = u64::MAX - 3),
            "queue 0 is unusable: a ring area wraps around the address space",
        ),
    ];
    for (spoil, expected) in cases {
        let mut bad = good.clone();
        spoil(&mut bad);
        let (to, signal) = resumable_fixture();
        let err = to.transport.restore(&bad).unwrap_err();
        assert_eq!(err, expected);
        assert_eq!(to.status(), 0);
        assert_eq!(to.r32(VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(signal.read().is_err());
        to.transport.run_pending_activation();
        assert_eq!(to.activations(), 0);
        assert_eq!(kicked(&to), [false, false]);
    }
}
