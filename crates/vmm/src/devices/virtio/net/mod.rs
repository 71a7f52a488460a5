//! virtio-net: a network device backed by a host TAP interface.
//!
//! - [`request`]: descriptor-chain decoding of TX and RX chains (also the fuzz target's entry);
//! - [`device`]: config space, features, the RX and TX passes ([`VirtioNet`]);
//! - [`tap`]: the TAP interface and the frame backend ([`Tap`], [`NetBackend`]);
//! - [`metrics`]: per-device counters.

pub mod device;
pub mod metrics;
pub mod request;
pub mod tap;
#[cfg(test)]
mod tests;

pub use device::{MacAddr, NetConfig, VirtioNet};
pub use metrics::NetMetrics;
pub use request::{parse_rx, parse_tx, NetChainError};
pub use tap::{NetBackend, Tap, TapError, TapName};
