//! When to tell QMP clients that the guest's memory size moved (`BALLOON_CHANGE`).
//!
//! The driver writes `actual` after every batch of pages it inflates or deflates, hundreds of
//! times for a large change, and a guest can write it in a loop. As QEMU does, events are
//! rate limited: the first change is reported at once, later ones at most once per
//! [`INTERVAL`], each carrying the latest size, and the last size is always reported.

use std::time::{Duration, Instant};

/// Shortest time between two reports.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The sizes reported so far and the one waiting to be.
#[derive(Debug)]
pub struct ChangeEvents {
    reported: u64,
    last_sent: Option<Instant>,
    pending: bool,
}

impl ChangeEvents {
    /// Nothing reported yet; the guest starts with all of its RAM, `ram_bytes`.
    pub fn new(ram_bytes: u64) -> Self {
        ChangeEvents {
            reported: ram_bytes,
            last_sent: None,
            pending: false,
        }
    }

    /// The guest's size is now `actual`: returns the size to report now, if any. A change
    /// inside the interval waits for [`ChangeEvents::due`].
    pub fn changed(&mut self, actual: u64, now: Instant) -> Option<u64> {
        if actual == self.reported {
            self.pending = false;
            return None;
        }
        self.pending = true;
        self.due(actual, now)
    }

    /// The size to report now, `actual` being the current one, if a report was waiting and
    /// its interval is over.
    pub fn due(&mut self, actual: u64, now: Instant) -> Option<u64> {
        let open = self
            .last_sent
            .is_none_or(|t| now.saturating_duration_since(t) >= INTERVAL);
        if !self.pending || !open {
            return None;
        }
        self.pending = false;
        if actual == self.reported {
            return None;
        }
        self.reported = actual;
        self.last_sent = Some(now);
        Some(actual)
    }

    /// How long the event loop may sleep before a waiting report is due; `None` when none
    /// waits.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending {
            return None;
        }
        Some(self.last_sent.map_or(Duration::ZERO, |t| {
            INTERVAL.saturating_sub(now.saturating_duration_since(t))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_change_is_reported_at_once_then_one_per_interval_with_the_latest_size() {
        let t0 = Instant::now();
        let mut events = ChangeEvents::new(1000);
        assert_eq!(events.timeout(t0), None);
        assert_eq!(events.changed(1000, t0), None);
        assert_eq!(events.changed(900, t0), Some(900));
        let soon = t0 + Duration::from_millis(100);
        assert_eq!(events.changed(800, soon), None);
        assert_eq!(events.changed(700, soon), None);
        assert_eq!(events.timeout(soon), Some(Duration::from_millis(900)));
        assert_eq!(events.due(700, soon), None);
        let later = t0 + INTERVAL;
        assert_eq!(events.due(600, later), Some(600));
        assert_eq!(events.timeout(later), None);
        // Back to the reported size before the interval ends: nothing to say.
        let next = later + Duration::from_millis(10);
        assert_eq!(events.changed(500, next), None);
        assert_eq!(events.changed(600, next), None);
        assert_eq!(events.timeout(next), None);
        assert_eq!(events.due(600, later + INTERVAL), None);
    }
}
