//! PCI: the root bus with its two configuration mechanisms (ports 0xcf8/0xcfc and ECAM), the
//! host bridge, configuration-space emulation and the BAR allocator.

pub mod allocator;
pub mod config_space;
pub mod host_bridge;
pub mod root;

pub use allocator::BarAllocator;
pub use config_space::PciConfigSpace;
pub use root::{PciConfigIo, PciConfigMmio, PciRoot};

/// A function on the PCI bus, as its configuration space sees it.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (byte offset `reg * 4`).
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` (0..4) of register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);
}
