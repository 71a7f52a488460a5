//! The hardware-reduced ACPI power-management registers: sleep control (S5 = power off) and
//! the reset register. The FADT points Linux at them.

use super::BusDevice;
use crate::vstate::{ExitRequester, VmEvent};

/// Value of the FADT reset register that resets the machine.
pub const ACPI_RESET_VALUE: u8 = 1;
/// Sleep type for S5 (soft off), as the DSDT's `_S5_` package says.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
const SLEEP_ENABLE: u8 = 1 << 5;

/// Offset of the sleep control / reset register (one byte, shared).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Size of the register block.
pub const ACPI_PM_SIZE: u64 = 2;

/// Sleep control, sleep status and reset registers at one I/O port.
#[derive(Debug)]
pub struct AcpiPowerManagement {
    exit: ExitRequester,
}

impl AcpiPowerManagement {
    /// Registers that report power-off and reset through `exit`.
    pub fn new(exit: ExitRequester) -> Self {
        AcpiPowerManagement { exit }
    }
}

impl BusDevice for AcpiPowerManagement {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != SLEEP_CONTROL_OFFSET || data.len() != 1 {
            return;
        }
        let value = data[0];
        if value == ACPI_RESET_VALUE {
            self.exit.request(VmEvent::Reset);
        } else if value & SLEEP_ENABLE != 0
            && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == ACPI_S5_SLEEP_TYPE
        {
            self.exit.request(VmEvent::Poweroff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (exit, rx) = ExitRequester::for_test();
        let mut pm = AcpiPowerManagement::new(exit);
        pm.write(0, &[(5 << 2) | (1 << 5)]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::Poweroff));
        pm.write(0, &[ACPI_RESET_VALUE]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::Reset));
        // S3 (sleep) or a write without SLP_EN does nothing.
        pm.write(0, &[(3 << 2) | (1 << 5)]);
        pm.write(0, &[5 << 2]);
        pm.write(1, &[0xff]);
        pm.write(0, &[1, 2]);
        assert!(rx.try_recv().is_err());
    }
}
