//! Architecture-specific code. tidevm supports x86-64 only.

pub mod x86_64;
