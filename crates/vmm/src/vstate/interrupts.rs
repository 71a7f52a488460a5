//! MSI routes: GSIs above the IOAPIC pins, each bound to an irqfd, whose routes follow what
//! the guest programs into MSI-X tables.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::FIRST_MSI_GSI;

/// IOAPIC pins of KVM's in-kernel IOAPIC.
const IOAPIC_PINS: u32 = 24;
/// Most GSIs KVM routes.
const MAX_GSI: u32 = 4096;

/// Errors while managing interrupt routes.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// No GSI left.
    #[error("no free GSI for an MSI vector")]
    NoGsi,
    /// KVM refused the routing table or an irqfd.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we asked.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The VM's GSI routing table.
#[derive(Debug)]
pub struct MsiRouting {
    vm: Arc<VmFd>,
    msi_routes: Mutex<BTreeMap<u32, Option<(u64, u32)>>>,
}

/// One MSI vector: an irqfd on its own GSI.
#[derive(Debug)]
pub struct MsiVector {
    /// The GSI.
    pub gsi: u32,
    /// Writing 1 injects the interrupt the route describes.
    pub irqfd: EventFd,
}

impl MsiRouting {
    /// Routing for `vm`, which keeps KVM's default IRQ-chip routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        MsiRouting {
            vm,
            msi_routes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Allocates a GSI and binds a new irqfd to it (no route yet: it fires nowhere).
    pub fn allocate_vector(&self) -> Result<MsiVector, InterruptError> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = (FIRST_MSI_GSI..MAX_GSI)
            .find(|g| !routes.contains_key(g))
            .ok_or(InterruptError::NoGsi)?;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(|source| InterruptError::Kvm {
                what: "bind an irqfd",
                source,
            })?;
        routes.insert(gsi, None);
        Ok(MsiVector { gsi, irqfd })
    }

    /// Points `gsi` at the MSI message `(address, data)`, or nowhere with `None`.
    pub fn set_route(&self, gsi: u32, message: Option<(u64, u32)>) -> Result<(), InterruptError> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.get(&gsi) == Some(&message) {
            return Ok(());
        }
        routes.insert(gsi, message);
        self.commit(&routes)
    }

    fn commit(&self, routes: &BTreeMap<u32, Option<(u64, u32)>>) -> Result<(), InterruptError> {
        let mut entries = default_irqchip_routes();
        for (&gsi, message) in routes {
            if let Some((address, data)) = message {
                let mut entry = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                entry.u.msi.address_lo = *address as u32;
                entry.u.msi.address_hi = (*address >> 32) as u32;
                entry.u.msi.data = *data;
                entries.push(entry);
            }
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::NoGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| InterruptError::Kvm {
                what: "set the GSI routing table",
                source,
            })
    }
}

/// KVM's default routes (the whole table is replaced on every change): GSIs 0-15 to the PICs
/// and the IOAPIC, 16-23 to the IOAPIC.
fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    entries
}
