//! tidevm's virtual machine monitor: everything between the command line and KVM.
//!
//! - [`arch`]: the x86-64 address map, CPUID and boot registers;
//! - [`boot`]: PVH loading of the kernel;
//! - [`memory`]: the memory manager, sole owner of guest memory and memory slots;
//! - [`devices`]: buses, platform devices, PCI;
//! - [`acpi`]: the ACPI tables;
//! - [`vstate`]: the KVM VM and vCPU threads;
//! - [`builder`] and [`vmm`]: config to running VM, and the control loop.

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod devices;
pub mod events;
pub mod logging;
pub mod memory;
pub mod memory_service;
pub mod metrics;
pub mod vmm;
pub mod vstate;

pub use config::VmConfig;
pub use vmm::{Vmm, VmmError};

/// An error and its causes on one line ("a: b: c"), for API messages and logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
