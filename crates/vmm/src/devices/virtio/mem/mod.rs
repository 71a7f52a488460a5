//! virtio-mem: a paravirtualized memory device through which the guest plugs and unplugs
//! memory blocks of one region, steered by the host's requested size.
//!
//! - [`request`]: wire format and the descriptor-chain parser (also the fuzz target's entry);
//! - [`device`]: config space, features and request handling ([`VirtioMem`]);
//! - [`metrics`]: per-device counters.

pub mod device;
pub mod metrics;
pub mod request;
#[cfg(test)]
mod tests;

pub use device::{VirtioMem, VirtioMemConfig, VirtioMemError, VirtioMemStatus};
pub use metrics::{handling_time_buckets, HandlingTimes, ResponseCounts, VirtioMemMetrics};
pub use request::{GuestAccess, Request, RequestError};
