//! The KVM-backed machine: the VM file descriptor and the vCPU threads.

pub mod interrupts;
pub mod vcpu;
pub mod vm;

use std::sync::Arc;

/// Why a VM stops running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    Poweroff,
    /// The guest asked for a reset (ACPI reset register, 0xcf9, i8042, triple fault).
    Reset,
    /// Something went wrong that the VM cannot survive.
    Failed(String),
    /// Not an exit by itself: the guest touched hotplug memory it does not own. The control
    /// loop records it and, by policy, stops the VM.
    Violation {
        /// Guest-physical address.
        gpa: u64,
        /// Whether it was a write.
        write: bool,
        /// The vCPU.
        vcpu: u8,
    },
    /// Not an exit by itself: the guest ejected the DIMM in `slot` (its `_EJ0`); the control
    /// loop takes the DIMM's memory away.
    DimmEjected {
        /// The DIMM slot.
        slot: u32,
    },
}

/// Lets devices and vCPUs tell the control loop that the VM must stop or reset.
#[derive(Clone)]
pub struct ExitRequester(Arc<dyn Fn(VmExitReason) + Send + Sync>);

impl std::fmt::Debug for ExitRequester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExitRequester")
    }
}

impl ExitRequester {
    /// Calls `notify` for each request.
    pub fn new(notify: impl Fn(VmExitReason) + Send + Sync + 'static) -> Self {
        ExitRequester(Arc::new(notify))
    }

    /// Asks the control loop to end or reset the VM.
    pub fn request(&self, reason: VmExitReason) {
        tracing::debug!("VM exit requested: {reason:?}");
        (self.0)(reason)
    }

    /// A requester whose requests land in the returned receiver.
    #[cfg(test)]
    pub fn for_test() -> (Self, std::sync::mpsc::Receiver<VmExitReason>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        (
            ExitRequester::new(move |r| {
                let _ = tx.lock().unwrap().send(r);
            }),
            rx,
        )
    }
}
