//! x86-64: the guest address map, CPUID and the boot-time vCPU state.

pub mod cpuid;
pub mod layout;
pub mod regs;
