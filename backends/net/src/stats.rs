//! Traffic counters, shared by every queue pair and every frontend connection.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the backend's lifetime. Printed as one line on exit and on SIGUSR1.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest (frame bytes, without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames from the tap that could not be delivered (larger than the guest's buffers, or
    /// pending when the frontend went away).
    pub rx_drops: AtomicU64,
    /// Frames sent by the guest to the tap.
    pub tx_packets: AtomicU64,
    /// Bytes sent by the guest to the tap (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped: short header, oversized, or tap queue full.
    pub tx_drops: AtomicU64,
    /// Malformed descriptor chains and failed tap reads/writes.
    pub errors: AtomicU64,
}

impl Stats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "stats: rx_packets={} rx_bytes={} rx_drops={} tx_packets={} tx_bytes={} tx_drops={} errors={}",
            v(&self.rx_packets),
            v(&self.rx_bytes),
            v(&self.rx_drops),
            v(&self.tx_packets),
            v(&self.tx_bytes),
            v(&self.tx_drops),
            v(&self.errors),
        )
    }
}
