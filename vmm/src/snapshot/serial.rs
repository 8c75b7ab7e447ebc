//! What a snapshot keeps of the COM1 UART: its registers and the input the guest has not read.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// The UART's registers and unread input (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialSnapshot> for SerialState {
    fn from(s: SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::{Discard, LegacyDevices, COM1_BASE};
    use vmm_sys_util::eventfd::EventFd;

    fn uart() -> LegacyDevices {
        LegacyDevices::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(Discard))
    }

    #[test]
    fn registers_and_unread_input_move_to_another_uart() {
        let from = uart();
        // Scratch register, line control, and two bytes of input the guest has not read.
        from.pio_write(COM1_BASE + 7, &[0x5a]);
        from.pio_write(COM1_BASE + 3, &[0x03]);
        assert_eq!(from.serial_input(b"ok"), 2);
        let json = serde_json::to_string(&SerialSnapshot::from(from.serial_state())).unwrap();
        let saved: SerialSnapshot = serde_json::from_str(&json).unwrap();

        let to = uart();
        to.restore_serial(&saved.into()).unwrap();
        let mut byte = [0u8];
        to.pio_read(COM1_BASE + 7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        to.pio_read(COM1_BASE + 3, &mut byte);
        assert_eq!(byte[0], 0x03);
        to.pio_read(COM1_BASE, &mut byte);
        assert_eq!(byte[0], b'o');
        to.pio_read(COM1_BASE, &mut byte);
        assert_eq!(byte[0], b'k');
    }

    #[test]
    fn more_input_than_the_fifo_holds_is_refused() {
        let mut state = uart().serial_state();
        state.in_buffer = vec![b'x'; 65];
        let to = uart();
        let err = to.restore_serial(&state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "serial input of 65 bytes exceeds the 64-byte FIFO"
        );
        // The UART is left as it was, output included.
        to.pio_write(COM1_BASE + 7, &[1]);
        let mut byte = [0u8];
        to.pio_read(COM1_BASE + 7, &mut byte);
        assert_eq!(byte[0], 1);
    }
}
