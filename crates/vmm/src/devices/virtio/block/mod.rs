//! virtio-blk: a disk backed by a raw image file or a host block device.
//!
//! - [`request`]: descriptor-chain decoding (also the fuzz target's entry);
//! - [`device`]: config space, features and request handling ([`VirtioBlock`]);
//! - [`backend`]: the host file, positioned and `O_DIRECT` I/O, hole punching ([`Disk`]);
//! - [`metrics`]: per-disk counters.

pub mod backend;
pub mod device;
pub mod metrics;
pub mod request;
#[cfg(test)]
mod tests;

pub use backend::{Disk, DiskError, DiskOptions};
pub use device::{BlockConfig, VirtioBlock};
pub use metrics::{BlockMetrics, RequestCounts};
pub use request::{parse_chain, ParsedChain, Request, RequestError, RequestType};
