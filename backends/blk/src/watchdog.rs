//! Bounds the time one frontend request may hold the serving thread on its socket.
//!
//! The vhost crate reads a message header and writes a reply in loops that retry until the
//! whole of it has moved, whatever a socket timeout says: a frontend that sends part of a
//! header and stalls, or stops reading replies, would keep citadel-blk's only serving thread
//! (and so its signal handling and the next frontend) waiting forever. The watchdog,
//! a thread of its own, shuts the socket down when one request has been in progress for
//! longer than the limit; the blocked read or write then ends and the frontend is dropped.

use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// When the request in progress started; `None` between requests.
    busy_since: Option<Instant>,
    /// The connection ended; the thread returns.
    done: bool,
    /// The limit was hit and the socket shut down.
    fired: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // The state is three plain fields, valid whatever a panicking holder left behind.
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watches one frontend connection; stops (and joins its thread) when dropped.
pub struct Watchdog {
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

/// Marks a request in progress for as long as it lives.
pub struct Busy<'a> {
    shared: &'a Shared,
}

impl Watchdog {
    /// Starts watching the socket `fd`, which must stay open until the watchdog is dropped.
    pub fn start(fd: RawFd, limit: Duration) -> std::io::Result<Watchdog> {
        let shared: Shared = Arc::default();
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("blk-watchdog".into())
            .spawn(move || watch(&watched, fd, limit))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// A request starts; it must end (the guard dropped) within the limit.
    pub fn busy(&self) -> Busy<'_> {
        lock(&self.shared).busy_since = Some(Instant::now());
        self.shared.1.notify_one();
        Busy {
            shared: &self.shared,
        }
    }

    /// Whether the limit was hit and the socket shut down.
    pub fn fired(&self) -> bool {
        lock(&self.shared).fired
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(self.shared).busy_since = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared).done = true;
        self.shared.1.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(shared: &Shared, fd: RawFd, limit: Duration) {
    let mut state = lock(shared);
    loop {
        if state.done {
            return;
        }
        state = match state.busy_since {
            None => shared.1.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(since) => {
                let elapsed = since.elapsed();
                if elapsed >= limit {
                    log::warn!(
                        "frontend request still in progress after {limit:?}: dropping the frontend"
                    );
                    // SAFETY: shutdown(2) only changes the state of the socket; the descriptor
                    // stays open until the watchdog is dropped (the caller's contract).
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    state.fired = true;
                    return;
                }
                shared
                    .1
                    .wait_timeout(state, limit - elapsed)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_request_stalled_past_the_limit_ends_with_the_socket_shut_down() {
        let (mut backend, _frontend) = UnixStream::pair().unwrap();
        // Long enough for the watchdog, short enough for the test to fail rather than hang
        // if nothing shuts the socket down.
        backend
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let dog = Watchdog::start(backend.as_raw_fd(), Duration::from_millis(200)).unwrap();
        let start = Instant::now();
        let _busy = dog.busy();
        // Nothing is ever sent: without the watchdog this read would block forever.
        let mut buf = [0u8; 8];
        assert_eq!(backend.read(&mut buf).unwrap(), 0, "read sees the shutdown");
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(dog.fired());
    }

    #[test]
    fn an_idle_connection_or_a_quick_request_is_left_alone() {
        let (backend, mut frontend) = UnixStream::pair().unwrap();
        let dog = Watchdog::start(backend.as_raw_fd(), Duration::from_millis(100)).unwrap();
        drop(dog.busy());
        std::thread::sleep(Duration::from_millis(300));
        assert!(!dog.fired());
        drop(dog);
        // The socket still works both ways.
        use std::io::Write;
        (&backend).write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        frontend.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }
}
