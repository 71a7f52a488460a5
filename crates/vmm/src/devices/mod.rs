//! Emulated devices: the buses that route guest I/O, the platform devices, PCI.

pub mod bus;
pub mod ged;
pub mod legacy;
pub mod memory_hotplug;
pub mod pci;
pub mod platform;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
