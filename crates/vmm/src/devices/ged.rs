//! The ACPI Generic Event Device (ACPI0013): one interrupt, one read-to-clear register of event
//! bits, and an `_EVT` method in the DSDT that dispatches on them. Hotplug notifications and the
//! power button reach the guest through it.

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// Event bits of the GED register (the DSDT's `_EVT` tests the same bits).
pub mod event {
    /// A DIMM was inserted or is asked to leave: scan the memory hotplug controller.
    pub const MEMORY_HOTPLUG: u8 = 1 << 1;
    /// The power button was pressed.
    pub const POWER_BUTTON: u8 = 1 << 3;
}

/// The GED's register and interrupt.
#[derive(Debug)]
pub struct GedDevice {
    pending: u8,
    irq: EventFd,
}

impl GedDevice {
    /// A GED raising `irq` (an irqfd on the GED's GSI).
    pub fn new(irq: EventFd) -> Self {
        GedDevice { pending: 0, irq }
    }

    /// Records `bits` and interrupts the guest.
    pub fn notify(&mut self, bits: u8) -> std::io::Result<()> {
        self.pending |= bits;
        self.irq.write(1)
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            data[0] = self.pending;
            self.pending = 0;
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_latched_until_read() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = GedDevice::new(irq.try_clone().unwrap());
        ged.notify(event::POWER_BUTTON).unwrap();
        ged.notify(event::MEMORY_HOTPLUG).unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        let mut data = [0u8; 4];
        ged.read(0, &mut data);
        assert_eq!(data[0], event::POWER_BUTTON | event::MEMORY_HOTPLUG);
        ged.read(0, &mut data);
        assert_eq!(data[0], 0);
        ged.read(7, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
