//! A bound on how long a thread may wait for a vhost-user backend.
//!
//! The `vhost` crate retries a receive that fails with `EAGAIN`, so a socket receive timeout
//! alone would only make a thread blocked on a mute backend wake up and wait again. Instead,
//! a per-thread POSIX timer sends the waiting thread [`deadline_signal`] when the time is up,
//! and the handler shuts the backend's socket down: the pending receive then returns end of
//! file, which the crate reports as an error, and the device is not used again.
//!
//! No helper thread is involved, so the vCPU and event-loop threads, which may start none,
//! can bound their own requests. What they need for it: `timer_create`, `timer_settime`,
//! `timer_delete` and `shutdown`.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use vmm_sys_util::signal::register_signal_handler;

thread_local! {
    /// The socket the running thread's armed deadline shuts down, or -1.
    static ARMED: Cell<RawFd> = const { Cell::new(-1) };
}

/// The signal a deadline delivers; the one after the vCPU kick signal.
pub fn deadline_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_deadline(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local is a plain TLS slot: reading it is signal-safe.
    let fd = ARMED.with(Cell::get);
    if fd >= 0 {
        // SAFETY: shutdown is async-signal-safe; `fd` is the socket the interrupted thread
        // armed the deadline for and keeps open until it disarms it.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Installs the handler; once per process, before any deadline is armed.
pub fn register_handler() -> io::Result<()> {
    register_signal_handler(deadline_signal(), on_deadline)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// An armed deadline for the calling thread; disarmed on drop.
pub struct Deadline {
    timer: libc::timer_t,
}

impl Deadline {
    /// Shuts `fd` down if the calling thread still holds the returned guard after `timeout`.
    /// `fd` must stay open until the guard is dropped.
    pub fn arm(fd: RawFd, timeout: Duration) -> io::Result<Deadline> {
        // SAFETY: sigevent is plain data; all-zero is a valid starting value.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = deadline_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to a live sigevent and timer id; SIGEV_THREAD_ID makes glibc
        // pass the request straight to the kernel.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let guard = Deadline { timer };
        ARMED.with(|armed| armed.set(fd));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_nsec: timeout.subsec_nanos().into(),
            },
        };
        // SAFETY: `timer` was just created; `spec` is a valid itimerspec; no old value wanted.
        if unsafe { libc::timer_settime(guard.timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(guard)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // SAFETY: deletes the timer this guard created; a pending expiry is discarded.
        unsafe { libc::timer_delete(self.timer) };
        ARMED.with(|armed| armed.set(-1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn an_expired_deadline_ends_a_blocked_receive_and_a_disarmed_one_does_nothing() {
        register_handler().unwrap();
        let (mut ours, _peer) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let deadline = Deadline::arm(ours.as_raw_fd(), Duration::from_millis(200)).unwrap();
        let mut buf = [0u8; 1];
        // Interrupted by the signal, then, retried as the vhost crate does, end of file: the
        // handler shut the socket down.
        let n = loop {
            match ours.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.unwrap(),
            }
        };
        assert_eq!(n, 0);
        drop(deadline);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        drop(Deadline::arm(ours.as_raw_fd(), Duration::from_millis(50)).unwrap());
        std::thread::sleep(Duration::from_millis(150));
        std::io::Write::write_all(&mut peer, b"x").unwrap();
        assert_eq!(ours.read(&mut buf).unwrap(), 1);
    }
}
