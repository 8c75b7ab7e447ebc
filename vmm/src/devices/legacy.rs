//! Legacy port-I/O devices: the 8250 UART on COM1 and the i8042 controller (used only for its
//! reset line), both from vm-superio, and the dispatch of port-I/O exits to them and, on q35,
//! to the PCI configuration ports.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialState;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::pcie::PcieHost;

/// COM1 base port and its eight registers.
pub const COM1_BASE: u16 = 0x3f8;
const COM1_LEN: u16 = 8;
/// Legacy IRQ line of COM1 (wired to the in-kernel PIC/IOAPIC input 4).
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command/status ports.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;

/// An eventfd the UART signals for its interrupt (bound to an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Latched when the guest pulses the i8042 reset line, and read back by the vCPU that did it,
/// so that this vCPU stops right at the write instead of running on until told to.
#[derive(Default)]
pub struct ResetLatch(AtomicBool);

impl Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What a port write asks of the vCPU that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioOutcome {
    /// Carry on.
    Continue,
    /// The guest asked for a machine reset.
    ResetRequested,
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The port-I/O devices of the machine, shared by every vCPU thread.
pub struct LegacyDevices {
    serial: Mutex<Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>>,
    i8042: Mutex<I8042Device<ResetLatch>>,
    pcie: Option<Arc<PcieHost>>,
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
    /// Builds the devices. `serial_irq` is signalled when the UART raises its interrupt.
    pub fn new(serial_irq: EventFd, serial_out: SerialOut) -> Self {
        LegacyDevices {
            serial: Mutex::new(Serial::new(EventFdTrigger(serial_irq), serial_out)),
            i8042: Mutex::new(I8042Device::new(ResetLatch::default())),
            pcie: None,
        }
    }

    /// Adds the PCI configuration ports (0xCF8 to 0xCFF) of the q35 machine's segment.
    pub fn with_pcie(mut self, pcie: Arc<PcieHost>) -> Self {
        self.pcie = Some(pcie);
        self
    }

    /// The segment, when `port` is one of its configuration ports.
    fn pcie_port(&self, port: u16) -> Option<&PcieHost> {
        self.pcie
            .as_deref()
            .filter(|_| PcieHost::decodes_port(port))
    }

    /// Handles a port read. Ports nobody decodes read as all-ones, like an open bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(pcie) = self.pcie_port(port) {
            pcie.port_read(port, data);
            return;
        }
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
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if let Some(pcie) = self.pcie_port(port) {
            pcie.port_write(port, data);
            return PioOutcome::Continue;
        }
        let [value] = data else {
            return PioOutcome::Continue;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = serial.write((p - COM1_BASE) as u8, *value) {
                    log::warn!("serial: {e:?}");
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let mut i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                // The latch's trigger cannot fail.
                let _ = i8042.write((port - I8042_DATA) as u8, *value);
                if i8042.reset_evt().0.swap(false, Ordering::SeqCst) {
                    return PioOutcome::ResetRequested;
                }
            }
            _ => {}
        }
        PioOutcome::Continue
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

    /// The UART's registers and unread input, for a snapshot. The i8042 keeps no state.
    pub fn serial_state(&self) -> SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
    }

    /// Puts saved UART registers and input back, keeping the interrupt and output. Refuses
    /// more input than the UART's FIFO holds.
    pub fn restore_serial(&self, state: &SerialState) -> io::Result<()> {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        // Checked here, before the output moves: the FIFO size is the room left plus what
        // it holds.
        let fifo = serial.fifo_capacity() + serial.state().in_buffer.len();
        if state.in_buffer.len() > fifo {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "serial input of {} bytes exceeds the {fifo}-byte FIFO",
                    state.in_buffer.len()
                ),
            ));
        }
        let irq = serial.interrupt_evt().0.try_clone()?;
        let placeholder = Serial::new(
            EventFdTrigger(irq.try_clone()?),
            Box::new(Discard) as SerialOut,
        );
        let out = std::mem::replace(&mut *serial, placeholder).into_writer();
        // The only refusal of `from_state` is the FIFO length checked above.
        *serial = Serial::from_state(
            state,
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
        Ok(())
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

    fn devices() -> (LegacyDevices, Capture) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Capture::default();
        let d = LegacyDevices::new(irq, Box::new(out.clone()));
        (d, out)
    }

    #[test]
    fn serial_output_reaches_writer() {
        let (d, out) = devices();
        for b in b"hi\n" {
            d.pio_write(COM1_BASE, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_is_reported_to_the_writing_vcpu_once() {
        let (d, _) = devices();
        assert_eq!(d.pio_write(I8042_COMMAND, &[0xd1]), PioOutcome::Continue);
        assert_eq!(d.pio_write(I8042_DATA, &[0xfe]), PioOutcome::Continue);
        assert_eq!(
            d.pio_write(I8042_COMMAND, &[0xfe]),
            PioOutcome::ResetRequested
        );
        assert_eq!(d.pio_write(COM1_BASE, b"x"), PioOutcome::Continue);
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let (d, _) = devices();
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
        let (d, _) = devices();
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
