//! Legacy port-I/O devices: the 8250 UART on COM1 and the i8042 controller (used only for its
//! reset line), both from vm-superio, and the dispatch of port-I/O exits to them.

use std::io::{self, Write};
use std::sync::Mutex;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port and its eight registers.
pub const COM1_BASE: u16 = 0x3f8;
const COM1_LEN: u16 = 8;
/// Legacy IRQ line of COM1 (wired to the in-kernel PIC/IOAPIC input 4).
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command/status ports.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;

/// An eventfd that vm-superio devices can signal: the serial interrupt (bound to an irqfd)
/// or the reset request (watched by the event loop).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The port-I/O devices of the machine, shared by every vCPU thread.
pub struct LegacyDevices {
    serial: Mutex<Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>>,
    i8042: Mutex<I8042Device<EventFdTrigger>>,
}

/// A writer that does nothing: `-serial none`.
pub struct Discard;

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LegacyDevices {
    /// Builds the devices. `serial_irq` is signalled when the UART raises its interrupt;
    /// `reset` when the guest pulses the i8042 reset line.
    pub fn new(serial_irq: EventFd, reset: EventFd, serial_out: SerialOut) -> Self {
        LegacyDevices {
            serial: Mutex::new(Serial::new(EventFdTrigger(serial_irq), serial_out)),
            i8042: Mutex::new(I8042Device::new(EventFdTrigger(reset))),
        }
    }

    /// Handles a port read. Ports nobody decodes read as all-ones, like an open bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) && data.len() == 1 => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                Some(serial.read((p - COM1_BASE) as u8))
            }
            I8042_DATA | I8042_COMMAND if data.len() == 1 => {
                let mut i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                Some(i8042.read((port - I8042_DATA) as u8))
            }
            _ => None,
        };
        match value {
            Some(v) => data[0] = v,
            None => data.fill(0xff),
        }
    }

    /// Handles a port write. Writes to ports nobody decodes are dropped.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let [value] = data else { return };
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = serial.write((p - COM1_BASE) as u8, *value) {
                    log::warn!("serial: {e:?}");
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let mut i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = i8042.write((port - I8042_DATA) as u8, *value) {
                    log::warn!("i8042: {e}");
                }
            }
            _ => {}
        }
    }

    /// Feeds host input to the UART's receive FIFO; returns how many bytes it took (the FIFO
    /// is bounded: the rest must be offered again later).
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.fifo_capacity();
        let take = bytes.len().min(room);
        if take == 0 {
            return 0;
        }
        match serial.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input: {e:?}");
                0
            }
        }
    }

    /// Flushes buffered serial output.
    pub fn flush_serial(&self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = serial.writer_mut().flush() {
            log::debug!("serial flush: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<StdMutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn devices() -> (LegacyDevices, EventFd, Capture) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset_probe = reset.try_clone().unwrap();
        let out = Capture::default();
        let d = LegacyDevices::new(irq, reset, Box::new(out.clone()));
        (d, reset_probe, out)
    }

    #[test]
    fn serial_output_reaches_writer() {
        let (d, _, out) = devices();
        for b in b"hi\n" {
            d.pio_write(COM1_BASE, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_signals_event() {
        let (d, reset, _) = devices();
        assert!(reset.read().is_err(), "no reset before the guest asks");
        d.pio_write(I8042_COMMAND, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let (d, _, _) = devices();
        let mut data = [0u8; 4];
        d.pio_read(0x1234, &mut data);
        assert_eq!(data, [0xff; 4]);
        // A wide access to a byte-wide register is not decoded either.
        let mut wide = [0u8; 2];
        d.pio_read(COM1_BASE, &mut wide);
        assert_eq!(wide, [0xff; 2]);
        d.pio_write(0x1234, &[1, 2, 3, 4]);
    }

    #[test]
    fn serial_input_is_bounded_by_fifo() {
        let (d, _, _) = devices();
        let big = vec![b'x'; 1000];
        let taken = d.serial_input(&big);
        assert!(taken > 0 && taken < big.len());
        assert_eq!(d.serial_input(&big), 0, "full FIFO takes nothing more");
        // Reading RBR drains one byte.
        let mut b = [0u8];
        d.pio_read(COM1_BASE, &mut b);
        assert_eq!(b[0], b'x');
    }
}
