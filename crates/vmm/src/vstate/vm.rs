//! Creating the KVM VM with its in-kernel interrupt controllers.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we asked.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::OpenKvm)
}

/// A VM with the in-kernel PIC, IOAPIC, LAPICs and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    Ok(vm)
}

/// A fresh VM on this host's /dev/kvm for unit tests, with an in-kernel irqchip when
/// `irqchip`; `None`, with a loud SKIPPED line, when /dev/kvm is not usable here.
#[cfg(test)]
pub(crate) fn test_vm(irqchip: bool) -> Option<std::sync::Arc<kvm_ioctls::VmFd>> {
    let vm = kvm_ioctls::Kvm::new()
        .ok()
        .and_then(|kvm| kvm.create_vm().ok())
        .map(std::sync::Arc::new);
    let Some(vm) = vm else {
        println!("SKIPPED: /dev/kvm is not usable here");
        return None;
    };
    if irqchip {
        vm.create_irq_chip().expect("create the in-kernel irqchip");
    }
    Some(vm)
}
