//! The KVM-backed machine: the VM file descriptor and the vCPU threads.

pub mod interrupts;
pub mod vcpu;
pub mod vm;

use std::sync::Arc;

/// What a vCPU thread or a device tells the control loop: the VM must stop or reset, or
/// something happened that the loop must act on while the VM goes on.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    Poweroff,
    /// The guest asked for a reset (ACPI reset register, 0xcf9, i8042, triple fault).
    Reset,
    /// Something went wrong that the VM cannot survive.
    Failed(VmFailure),
    /// The guest touched hotplug memory it does not own. The control loop records it and, by
    /// policy, stops the VM.
    Violation {
        /// Guest-physical address, when KVM gave one.
        gpa: Option<u64>,
        /// What kind of access it was, as far as KVM tells.
        access: Access,
        /// The vCPU.
        vcpu: u8,
        /// Earlier violations not sent on their own: a guest touching unplugged memory in a
        /// loop is reported at a bounded rate, and the rest only counted here.
        unreported: u64,
    },
    /// The guest ejected the DIMM in `slot` (its `_EJ0`); the control loop takes the DIMM's
    /// memory away.
    DimmEjected {
        /// The DIMM slot.
        slot: u32,
    },
}

/// The kind of a guest access KVM reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read (an MMIO read exit).
    Read,
    /// A write (an MMIO write exit).
    Write,
    /// KVM did not say (a memory fault exit or a bare EFAULT carries no direction).
    Unknown,
}

/// Why a VM could not go on.
#[derive(Debug, thiserror::Error)]
pub enum VmFailure {
    /// KVM_RUN returned EFAULT with no address: a slot's host page could not be faulted in.
    #[error(
        "vCPU {vcpu} touched guest memory with no host backing (EFAULT, this kernel gives no \
         address): most likely an unplugged hotplug block"
    )]
    UnbackedAccess {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM_RUN failed otherwise.
    #[error("vCPU {vcpu} KVM_RUN failed")]
    KvmRun {
        /// The vCPU.
        vcpu: u8,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest reported a crash (a KVM crash system event).
    #[error("guest crashed")]
    GuestCrashed,
    /// A KVM system event tidevm does not know.
    #[error("unknown KVM system event {0}")]
    UnknownSystemEvent(u32),
    /// VM entry failed.
    #[error("VM entry failed on vCPU {vcpu} (host CPU {cpu}, reason {reason:#x})")]
    EntryFailed {
        /// The vCPU.
        vcpu: u8,
        /// The host CPU.
        cpu: u32,
        /// KVM's hardware entry failure reason.
        reason: u64,
    },
    /// KVM's internal error exit.
    #[error("KVM internal error on vCPU {vcpu}")]
    KvmInternal {
        /// The vCPU.
        vcpu: u8,
    },
    /// A memory fault exit inside a hotplug region: an unplugged page under a slot, which
    /// cannot be emulated.
    #[error("vCPU {vcpu} touched unplugged hotplug memory at {gpa:#x} (memory fault)")]
    UnpluggedMemoryFault {
        /// The vCPU.
        vcpu: u8,
        /// Guest-physical address (page).
        gpa: u64,
    },
    /// A memory fault exit elsewhere.
    #[error("vCPU {vcpu} faulted on guest memory {gpa:#x}+{size:#x} with no host backing")]
    UnbackedMemoryFault {
        /// The vCPU.
        vcpu: u8,
        /// Guest-physical address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// `--on-memory-violation stop`.
    #[error("the guest touched memory it does not own at {}", .gpa.map_or_else(|| "an unknown address".to_owned(), |g| format!("{g:#x}")))]
    Violation {
        /// Where, when known.
        gpa: Option<u64>,
    },
    /// `--balloon on-reuse=stop`.
    #[error("the guest wrote pages it had given to the balloon (on-reuse=stop)")]
    BalloonReuse,
}

/// Lets devices and vCPUs tell the control loop that the VM must stop or reset.
#[derive(Clone)]
pub struct ExitRequester(Arc<dyn Fn(VmEvent) + Send + Sync>);

impl std::fmt::Debug for ExitRequester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExitRequester")
    }
}

impl ExitRequester {
    /// Calls `notify` for each request.
    pub fn new(notify: impl Fn(VmEvent) + Send + Sync + 'static) -> Self {
        ExitRequester(Arc::new(notify))
    }

    /// Tells the control loop.
    pub fn request(&self, reason: VmEvent) {
        tracing::debug!("VM exit requested: {reason:?}");
        (self.0)(reason)
    }

    /// A requester whose requests land in the returned receiver.
    #[cfg(test)]
    pub fn for_test() -> (Self, std::sync::mpsc::Receiver<VmEvent>) {
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
