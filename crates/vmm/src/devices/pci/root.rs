//! PCI bus 0 and the two ways the guest reaches its configuration space.

use std::sync::{Arc, Mutex};

use super::host_bridge::HostBridge;
use super::PciDevice;
use crate::devices::BusDevice;
use crate::vstate::{ExitRequester, VmEvent};

const MAX_DEVICES: usize = 32;
const CONFIG_ENABLE: u32 = 1 << 31;

/// Errors when placing devices on the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    /// All 32 slots are taken.
    #[error("PCI bus 0 has no free slot")]
    NoFreeSlot,
}

/// Bus 0: up to 32 single-function devices.
pub struct PciRoot {
    devices: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..MAX_DEVICES)
            .filter(|&i| self.devices[i].is_some())
            .collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        let mut root = PciRoot {
            devices: vec![None; MAX_DEVICES],
        };
        root.devices[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        root
    }
}

impl PciRoot {
    /// Puts `device` in the first free slot and returns the slot number.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciRootError> {
        let slot = self
            .devices
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::NoFreeSlot)?;
        self.devices[slot] = Some(device);
        Ok(slot as u8)
    }

    fn read(&self, bus: u8, device: u8, function: u8, reg: usize) -> u32 {
        match self.device(bus, device, function) {
            Some(dev) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    fn write(&self, bus: u8, device: u8, function: u8, reg: usize, offset: u64, data: &[u8]) {
        if let Some(dev) = self.device(bus, device, function) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_config_register(reg, offset, data);
        }
    }

    fn device(&self, bus: u8, device: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(usize::from(device))?.as_ref()
    }
}

/// Extracts `data.len()` bytes at byte `offset` of a 32-bit register value.
fn read_bytes_of(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
    }
}

/// Configuration mechanism #1: the address latch at 0xcf8 and the data window at 0xcfc.
/// Port 0xcf9 (inside the latch) is also the PC's reset control register.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    exit: ExitRequester,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PciConfigIo({:#x})", self.address)
    }
}

/// Size of the 0xcf8..0xd00 port range.
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
const RESET_CONTROL_OFFSET: u64 = 1;
/// 0xcf9: bit 2 starts the reset, bit 1 asks for a hard one.
const RESET_CONTROL_RESET_CPU: u8 = 1 << 2;

impl PciConfigIo {
    /// Port access to `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>, exit: ExitRequester) -> Self {
        PciConfigIo {
            root,
            address: 0,
            exit,
        }
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let device = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address & 0xfc) >> 2) as usize;
        Some((bus, device, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            read_bytes_of(self.address, offset, data);
            return;
        }
        let value = match self.target() {
            Some((b, d, f, reg)) => self
                .root
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(b, d, f, reg),
            None => 0xffff_ffff,
        };
        read_bytes_of(value, offset - 4, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else if offset == RESET_CONTROL_OFFSET && data.len() == 1 {
            if data[0] & RESET_CONTROL_RESET_CPU != 0 {
                self.exit.request(VmEvent::Reset);
            }
        } else if offset >= 4 && (offset - 4) as usize + data.len() <= 4 {
            if let Some((b, d, f, reg)) = self.target() {
                self.root.lock().unwrap_or_else(|e| e.into_inner()).write(
                    b,
                    d,
                    f,
                    reg,
                    offset - 4,
                    data,
                );
            }
        }
    }
}

/// ECAM: `bus << 20 | device << 15 | function << 12 | register`.
#[derive(Debug)]
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// MMIO access to `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = ((offset >> 20) & 0xff) as u8;
        let device = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (bus, device, function, reg, offset & 3)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg, byte) = Self::decode(offset);
        if byte as usize + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let value = self
            .root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(b, d, f, reg);
        read_bytes_of(value, byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg, byte) = Self::decode(offset);
        if byte as usize + data.len() > 4 {
            return;
        }
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(b, d, f, reg, byte, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_io() -> (PciConfigIo, std::sync::mpsc::Receiver<VmEvent>) {
        let (exit, rx) = ExitRequester::for_test();
        (
            PciConfigIo::new(Arc::new(Mutex::new(PciRoot::default())), exit),
            rx,
        )
    }

    #[test]
    fn type1_probe_reads_back_the_latch_and_finds_the_host_bridge() {
        let (mut io, _rx) = config_io();
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut latch = [0u8; 4];
        io.read(0, &mut latch);
        assert_eq!(u32::from_le_bytes(latch), 0x8000_0000);
        // 00:00.0 register 2: class code 0x060000.
        io.write(0, &0x8000_0008u32.to_le_bytes());
        let mut class = [0u8; 4];
        io.read(4, &mut class);
        assert_eq!(u32::from_le_bytes(class) >> 8, 0x06_0000);
        // Byte access to the upper half of the vendor/device register.
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut hi = [0u8; 2];
        io.read(6, &mut hi);
        assert_eq!(u16::from_le_bytes(hi), 0x0008);
        // An empty slot reads as no device.
        io.write(0, &0x8000_0800u32.to_le_bytes());
        let mut v = [0u8; 4];
        io.read(4, &mut v);
        assert_eq!(v, [0xff; 4]);
    }

    #[test]
    fn port_cf9_resets() {
        let (mut io, rx) = config_io();
        io.write(1, &[0x06]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::Reset));
    }

    #[test]
    fn ecam_decodes_and_tolerates_odd_accesses() {
        let mut ecam = PciConfigMmio::new(Arc::new(Mutex::new(PciRoot::default())));
        let mut v = [0u8; 4];
        ecam.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0008_1b36);
        ecam.read(1 << 15, &mut v);
        assert_eq!(v, [0xff; 4]);
        ecam.read(1 << 20, &mut v);
        assert_eq!(v, [0xff; 4]);
        let mut wide = [0u8; 8];
        ecam.read(2, &mut wide);
        assert_eq!(wide, [0xff; 8]);
        ecam.write(3, &[1, 2, 3, 4]);
    }
}
