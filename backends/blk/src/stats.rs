//! Request counters, printed as one line on exit and on SIGUSR1.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every queue worker.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests completed (any type, any status).
    pub requests: AtomicU64,
    /// Read requests.
    pub reads: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests.
    pub discards: AtomicU64,
    /// Bytes read from the image into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory to the image.
    pub written_bytes: AtomicU64,
    /// Requests answered with IOERR or dropped as malformed.
    pub errors: AtomicU64,
    /// Requests answered with UNSUPP.
    pub unsupported: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The one-line summary.
    pub fn line(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "stats: requests={} reads={} writes={} flushes={} discards={} read_bytes={} written_bytes={} errors={} unsupported={}",
            g(&self.requests),
            g(&self.reads),
            g(&self.writes),
            g(&self.flushes),
            g(&self.discards),
            g(&self.read_bytes),
            g(&self.written_bytes),
            g(&self.errors),
            g(&self.unsupported),
        )
    }
}
