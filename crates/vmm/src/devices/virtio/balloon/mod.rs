//! virtio-balloon (traditional): the host asks the guest for pages back (inflate), the guest
//! returns them when asked to shrink the balloon (deflate), reports memory statistics, and
//! reports free pages it does not need (free page reporting).
//!
//! The balloon is cooperative: every number the guest sends is a claim. The device therefore
//! keeps its own count of inflated pages, asks the memory manager to check every range before
//! discarding it, and offers [`BalloonDevice::audit`] to compare the guest's claims with host
//! RSS.
//!
//! - [`request`]: decoding requests from chains walked by `virtio::chain`, and PFN parsing;
//! - [`reuse`]: exact detection of inflated pages the guest wrote again;
//! - [`stats`]: the statistics wire format and snapshots;
//! - [`pages`]: the host's own set of inflated pages;
//! - [`device`]: config space, features, queues ([`BalloonDevice`]);
//! - [`metrics`]: per-device counters.

pub mod device;
pub mod metrics;
pub mod pages;
pub mod request;
pub mod reuse;
pub mod stats;
#[cfg(test)]
mod tests;

pub use device::{BalloonConfig, BalloonDevice, BalloonError, BalloonStatus};
pub use metrics::BalloonMetrics;
pub use reuse::{ReusePolicy, ReuseScan};
pub use stats::StatsSnapshot;
