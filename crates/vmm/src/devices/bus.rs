//! Port-I/O and MMIO buses: map a guest address to the device that owns it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable from the guest through port I/O or MMIO.
///
/// `offset` is relative to the base the device was inserted at; `data` is exactly the access
/// size (1, 2, 4 or 8 bytes). Implementations must accept any offset and size the guest
/// chooses without panicking.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors when wiring devices onto a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("bus range {base:#x}+{len:#x} is invalid")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space (ports or MMIO) shared by all vCPU threads.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(ranges.iter().map(|(base, (len, _))| (base, len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base+len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let before = ranges.range(..end).next_back();
        if let Some((&other_base, &(other_len, _))) = before {
            if other_base + other_len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, (len, device));
        Ok(())
    }

    /// Moves the device placed at exactly `old_base` to `new_base` (a BAR the guest
    /// reprogrammed). On an overlap or an invalid range nothing moves.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let Some((len, device)) = ranges.remove(&old_base) else {
            return Err(BusError::InvalidRange {
                base: old_base,
                len: 0,
            });
        };
        let end = new_base.checked_add(len);
        let overlap = end.is_none_or(|end| {
            ranges
                .range(..end)
                .next_back()
                .is_some_and(|(&other, &(other_len, _))| other + other_len > new_base)
        });
        if overlap {
            ranges.insert(old_base, (len, device));
            return Err(BusError::Overlap {
                base: new_base,
                len,
            });
        }
        ranges.insert(new_base, (len, device));
        Ok(())
    }

    /// Removes the device placed at exactly `base`.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).is_some()
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, (len, device)) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fit in the device's range.
        if offset.checked_add(size as u64)? > *len {
            return None;
        }
        Some((offset, device.clone()))
    }

    /// Dispatches a read; returns false if no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch([u8; 16]);
    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn routes_by_address_and_rejects_overlap_and_straddling() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Scratch([0; 16]))), 0x100, 16)
            .unwrap();
        assert!(bus
            .insert(Arc::new(Mutex::new(Scratch([0; 16]))), 0x108, 16)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Scratch([0; 16]))), 0xf8, 16)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Scratch([0; 16]))), 0x50, 0)
            .is_err());
        bus.insert(Arc::new(Mutex::new(Scratch([0; 16]))), 0x110, 16)
            .unwrap();
        assert!(bus.write(0x104, &[1, 2, 3, 4]));
        let mut out = [0u8; 4];
        assert!(bus.read(0x104, &mut out));
        assert_eq!(out, [1, 2, 3, 4]);
        // An access running off the end of a device is not dispatched.
        assert!(!bus.read(0x10e, &mut out));
        assert!(!bus.read(0x0, &mut out));
        assert!(!bus.write(u64::MAX - 1, &[0; 4]));
        assert!(bus.remove(0x110));
        assert!(!bus.read(0x110, &mut out));
    }
}

/// Devices for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::BusDevice;

    /// A device that reads as zeros and ignores writes.
    pub(crate) struct Null;

    impl BusDevice for Null {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }
}
