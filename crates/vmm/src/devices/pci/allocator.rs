//! Guest-physical space for PCI BARs, from the 32-bit and 64-bit windows of the host bridge.

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::arch::x86_64::layout::GuestRange;

/// Errors while allocating BAR space.
#[derive(Debug, thiserror::Error)]
pub enum BarAllocatorError {
    /// The window could not be set up.
    #[error("cannot create a BAR window")]
    Window(#[source] vm_allocator::Error),
    /// No room left.
    #[error("no room for a {size:#x}-byte BAR")]
    Exhausted {
        /// Requested size.
        size: u64,
        /// The cause.
        #[source]
        source: vm_allocator::Error,
    },
}

/// Hands out naturally aligned BAR addresses.
#[derive(Debug)]
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
}

impl BarAllocator {
    /// Allocator over the two windows.
    pub fn new(mmio32: GuestRange, mmio64: GuestRange) -> Result<Self, BarAllocatorError> {
        Ok(BarAllocator {
            mmio32: AddressAllocator::new(mmio32.start, mmio32.size)
                .map_err(BarAllocatorError::Window)?,
            mmio64: AddressAllocator::new(mmio64.start, mmio64.size)
                .map_err(BarAllocatorError::Window)?,
        })
    }

    fn allocate_in(
        allocator: &mut AddressAllocator,
        size: u64,
    ) -> Result<RangeInclusive, BarAllocatorError> {
        allocator
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|source| BarAllocatorError::Exhausted { size, source })
    }

    /// A BAR in the 32-bit window (for devices whose drivers need it below 4 GiB).
    pub fn allocate_mmio32(&mut self, size: u64) -> Result<u64, BarAllocatorError> {
        Self::allocate_in(&mut self.mmio32, size).map(|r| r.start())
    }

    /// A BAR in the 64-bit window.
    pub fn allocate_mmio64(&mut self, size: u64) -> Result<u64, BarAllocatorError> {
        Self::allocate_in(&mut self.mmio64, size).map(|r| r.start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_naturally_aligned_and_disjoint() {
        let mut alloc = BarAllocator::new(
            GuestRange {
                start: 0xc000_0000,
                size: 0x2000_0000,
            },
            GuestRange {
                start: 1 << 40,
                size: 1 << 36,
            },
        )
        .unwrap();
        let a = alloc.allocate_mmio64(0x8_0000).unwrap();
        let b = alloc.allocate_mmio64(0x10_0000).unwrap();
        assert_eq!(a % 0x8_0000, 0);
        assert_eq!(b % 0x10_0000, 0);
        assert!(a + 0x8_0000 <= b || b + 0x10_0000 <= a);
        assert!(alloc.allocate_mmio32(0x4000_0000).is_err());
    }
}
