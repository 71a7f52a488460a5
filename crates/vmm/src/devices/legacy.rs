//! Legacy PC ports the kernel pokes at: the i8042 reset line, the PCI reset control register
//! (0xcf9) and port 0x61. Enough of them to reboot; no keyboard.

use super::BusDevice;
use crate::vstate::{ExitRequester, VmEvent};

/// i8042 command port.
pub const I8042_PORT: u16 = 0x61;
/// Ports 0x61..0x65: system control port B (0x61) and the i8042 (0x60/0x64).
pub const I8042_PORT_LEN: u64 = 4;
const I8042_CMD_OFFSET: u64 = 3;
const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// The i8042's "pulse the reset line" command, as `reboot=k` uses.
#[derive(Debug)]
pub struct I8042Reset {
    exit: ExitRequester,
}

impl I8042Reset {
    /// A controller that reports resets through `exit`.
    pub fn new(exit: ExitRequester) -> Self {
        I8042Reset { exit }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty, so the kernel never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_CMD_OFFSET && data == [I8042_CMD_RESET_CPU] {
            self.exit.request(VmEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let (exit, rx) = ExitRequester::for_test();
        let mut dev = I8042Reset::new(exit);
        dev.write(0, &[0xfe]);
        assert!(rx.try_recv().is_err());
        dev.write(I8042_CMD_OFFSET, &[0xfe]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::Reset));
    }
}
