//! Loading a Linux kernel and describing the machine to it.

pub mod pvh;

pub use pvh::{load_pvh_kernel, BootError, BootInfo};
