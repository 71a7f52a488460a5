//! The host bridge at 00:00.0. Linux's type-1 probe wants a host bridge on bus 0.

use super::config_space::{PciConfigSpace, PciIdentity};
use super::PciDevice;

/// Red Hat's vendor ID and the "QEMU PCIe host bridge" device ID: well known to guests as a
/// plain host bridge with no quirks.
const VENDOR_REDHAT: u16 = 0x1b36;
const DEVICE_PCIE_HOST: u16 = 0x0008;
const CLASS_HOST_BRIDGE: u32 = 0x06_0000;

/// A host bridge with nothing behind it but bus 0.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: PciConfigSpace::new(PciIdentity {
                vendor: VENDOR_REDHAT,
                device: DEVICE_PCIE_HOST,
                class: CLASS_HOST_BRIDGE,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_register(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_register(reg, offset, data);
    }
}
