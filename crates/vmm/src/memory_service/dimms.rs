//! ACPI DIMM hotplug in the memory service: adding a DIMM (memory first, then the guest is
//! told), asking the guest to eject one, taking its memory away once it has, and describing
//! the slots.

use super::{MemoryRequestError, MemoryService};
use crate::arch::x86_64::layout::GuestRange;
use crate::config::{format_size, DimmConfig, DIMM_ALIGN};
use crate::devices::memory_hotplug::{DimmSlot, Ost, SlotState};
use crate::memory::placement::place_dimm;
use crate::memory::Backing;

/// Where a DIMM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DimmState {
    /// Mapped and announced; the guest has not confirmed it yet.
    Inserting,
    /// The guest uses it.
    Active,
    /// The guest was asked to eject it.
    Removing,
}

/// The guest's last `_OST` report for a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OstStatus {
    /// The ACPI event it answers.
    pub event: u32,
    /// Its status code.
    pub status: u32,
    /// Both, in words.
    pub meaning: String,
}

/// One DIMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimmStatus {
    /// Its id.
    pub id: String,
    /// Its slot.
    pub slot: u32,
    /// Guest-physical range.
    pub range: GuestRange,
    /// NUMA node.
    pub node: u32,
    /// Host backing.
    pub backing: Backing,
    /// Populated when added.
    pub prealloc: bool,
    /// Where it is in its life.
    pub state: DimmState,
    /// Host memory it holds.
    pub resident_bytes: u64,
    /// The guest's last `_OST`.
    pub last_ost: Option<OstStatus>,
    /// The guest's `_OST` refusal of the last removal, if it refused.
    pub removal_refused: Option<OstStatus>,
}

/// The slots and their DIMMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimmsStatus {
    /// Slots configured.
    pub slots: u32,
    /// The limit on boot RAM plus DIMMs.
    pub maxmem_bytes: u64,
    /// Bytes in DIMMs.
    pub plugged_bytes: u64,
    /// Where DIMMs go.
    pub area: GuestRange,
    /// The DIMMs.
    pub dimms: Vec<DimmStatus>,
}

/// What a client asks for when adding a DIMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimmRequest {
    /// Size in bytes.
    pub size: u64,
    /// NUMA node (0 if not given).
    pub node: Option<u32>,
    /// Id (`dimm<slot>` if not given).
    pub id: Option<String>,
    /// Host backing.
    pub backing: Backing,
    /// Populate it when added.
    pub prealloc: bool,
}

/// Whether a DIMM of `size` bytes fits under `maxmem` next to `boot` bytes of boot RAM and
/// the DIMMs of `plugged` sizes. `size` comes from the client: the sum is checked, so a size
/// near 2^64 cannot wrap past the limit.
pub(super) fn check_dimm_fits(
    boot: u64,
    plugged: &[u64],
    size: u64,
    maxmem: u64,
) -> Result<(), MemoryRequestError> {
    let plugged_total = plugged
        .iter()
        .try_fold(0u64, |total, dimm| total.checked_add(*dimm));
    let total = plugged_total
        .and_then(|plugged| boot.checked_add(plugged))
        .and_then(|used| used.checked_add(size));
    match total {
        Some(total) if total <= maxmem => Ok(()),
        _ => Err(MemoryRequestError::AboveMaxmem {
            size,
            total,
            maxmem,
            plugged: plugged_total,
        }),
    }
}

fn ost_status(ost: Ost) -> OstStatus {
    OstStatus {
        event: ost.event,
        status: ost.status,
        meaning: ost.meaning(),
    }
}

fn state_of(slot: &DimmSlot) -> DimmState {
    match slot.state {
        SlotState::Removing | SlotState::Ejected => DimmState::Removing,
        SlotState::Active => DimmState::Active,
        SlotState::Inserting | SlotState::Empty => DimmState::Inserting,
    }
}

impl MemoryService {
    fn dimm_config_index(&self, id: &str) -> Result<usize, MemoryRequestError> {
        self.settings
            .dimms
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| MemoryRequestError::UnknownDimm(id.to_owned()))
    }

    /// Hot-adds a DIMM: maps and registers its memory, then tells the guest.
    pub fn add_dimm(&mut self, request: DimmRequest) -> Result<DimmStatus, MemoryRequestError> {
        let memory = &self.settings.memory;
        if memory.slots == 0 {
            return Err(MemoryRequestError::NoDimmSlots);
        }
        let size = request.size;
        if size == 0 || !size.is_multiple_of(DIMM_ALIGN) {
            return Err(MemoryRequestError::DimmSize(size));
        }
        let plugged: Vec<u64> = self.settings.dimms.iter().map(|d| d.size).collect();
        check_dimm_fits(memory.size, &plugged, size, memory.maxmem)?;
        let nodes = self.settings.numa_nodes;
        let node = request.node.unwrap_or(0);
        if node >= nodes {
            return Err(MemoryRequestError::UnknownNode { node, nodes });
        }
        let slot = (0..memory.slots)
            .find(|s| self.settings.dimms.iter().all(|d| d.slot != *s))
            .ok_or(MemoryRequestError::SlotsFull(memory.slots))?;
        let id = request.id.unwrap_or_else(|| format!("dimm{slot}"));
        if self.settings.dimms.iter().any(|d| d.id == id) {
            return Err(MemoryRequestError::DuplicateDimm(id));
        }
        let dimms = self
            .dimms
            .as_mut()
            .ok_or(MemoryRequestError::NoDimmController)?;
        let used: Vec<GuestRange> = self
            .settings
            .dimms
            .iter()
            .map(|d| GuestRange {
                start: d.start,
                size: d.size,
            })
            .collect();
        let start = place_dimm(dimms.area, &used, size).ok_or(MemoryRequestError::NoRoom(size))?;
        let range = GuestRange { start, size };
        let region = self
            .manager
            .add_dimm(&self.vm_fd, range, request.backing, request.prealloc)
            .map_err(|source| MemoryRequestError::HostMemory { size, source })?;
        dimms.regions.insert(slot, region);
        dimms.controller().insert(slot, range, node, false);
        dimms.notify_guest();
        self.forget_memory_target();
        self.settings.dimms.push(DimmConfig {
            id: id.clone(),
            slot,
            start,
            size,
            node,
            backing: request.backing,
            prealloc: request.prealloc,
        });
        tracing::info!(
            "DIMM {id}: {} at {start:#x} in slot {slot} (node {node}); guest notified",
            format_size(size)
        );
        self.publish(tidevm_api::Event::ResizeStarted {
            mechanism: super::progress::DIMM.into(),
            device: id.clone(),
            target_bytes: size,
        });
        self.dimm_status(&id)
    }

    /// Asks the guest to eject a DIMM. The memory goes when the guest calls `_EJ0`.
    pub fn remove_dimm(&mut self, id: &str) -> Result<DimmStatus, MemoryRequestError> {
        let slot = self.settings.dimms[self.dimm_config_index(id)?].slot;
        let dimms = self
            .dimms
            .as_mut()
            .ok_or(MemoryRequestError::NoDimmController)?;
        if !dimms.controller().request_removal(slot) {
            return Err(MemoryRequestError::AlreadyEjecting(id.to_owned()));
        }
        dimms.notify_guest();
        self.progress.forget_shortfall(super::progress::DIMM, id);
        self.forget_memory_target();
        tracing::info!("DIMM {id}: the guest is asked to eject it");
        self.publish(tidevm_api::Event::ResizeStarted {
            mechanism: super::progress::DIMM.into(),
            device: id.to_owned(),
            target_bytes: 0,
        });
        self.dimm_status(id)
    }

    /// The guest ejected the DIMM in `slot`: its memory slot and host memory go away.
    pub fn dimm_ejected(&mut self, slot: u32) {
        let Some(dimms) = self.dimms.as_mut() else {
            return;
        };
        let Some(region) = dimms.regions.remove(&slot) else {
            return;
        };
        if let Err(e) = self.manager.remove_dimm(region) {
            // The guest no longer uses it; whatever is left is only host memory.
            tracing::error!(
                "DIMM slot {slot}: cannot release its memory: {}",
                crate::error_chain(&e)
            );
        }
        dimms.controller().release(slot);
        if let Some(index) = self.settings.dimms.iter().position(|d| d.slot == slot) {
            let dimm = self.settings.dimms.remove(index);
            tracing::info!(
                "DIMM {}: ejected by the guest, {} returned to the host",
                dimm.id,
                format_size(dimm.size)
            );
            self.dimm_gone(&dimm.id, slot);
        }
    }

    fn dimm_status(&self, id: &str) -> Result<DimmStatus, MemoryRequestError> {
        self.dimms_status()
            .and_then(|s| s.dimms.into_iter().find(|d| d.id == id))
            .ok_or_else(|| MemoryRequestError::UnknownDimm(id.to_owned()))
    }

    /// The slots and DIMMs; `None` for a VM without slots.
    pub fn dimms_status(&self) -> Option<DimmsStatus> {
        let dimms = self.dimms.as_ref()?;
        let slots: Vec<DimmSlot> = dimms.controller().slots().to_vec();
        let statuses = self
            .settings
            .dimms
            .iter()
            .map(|d| {
                let slot = slots.get(d.slot as usize).cloned().unwrap_or_default();
                DimmStatus {
                    id: d.id.clone(),
                    slot: d.slot,
                    range: GuestRange {
                        start: d.start,
                        size: d.size,
                    },
                    node: d.node,
                    backing: d.backing,
                    prealloc: d.prealloc,
                    state: state_of(&slot),
                    resident_bytes: dimms
                        .regions
                        .get(&d.slot)
                        .map_or(0, |r| self.manager.resident_bytes(*r)),
                    last_ost: slot.last_ost.map(ost_status),
                    removal_refused: slot.removal_refused.map(ost_status),
                }
            })
            .collect();
        Some(DimmsStatus {
            slots: self.settings.memory.slots,
            maxmem_bytes: self.settings.memory.maxmem,
            plugged_bytes: self.settings.dimms.iter().map(|d| d.size).sum(),
            area: dimms.area,
            dimms: statuses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn dimm_sizes_near_2_pow_64_are_rejected_not_wrapped() {
        const GIB: u64 = 1 << 30;
        let maxmem = 8 * GIB;
        assert!(check_dimm_fits(GIB, &[GIB], GIB, maxmem).is_ok());
        assert!(check_dimm_fits(GIB, &[GIB], 6 * GIB, maxmem).is_ok());
        let error = check_dimm_fits(GIB, &[GIB], 7 * GIB, maxmem).unwrap_err();
        assert_eq!(error.kind(), super::super::RequestErrorKind::Invalid);
        // boot + plugged + size wraps to 1 GiB + 128 MiB: must still be refused as invalid.
        let huge = u64::MAX - 2 * GIB + 1 + 128 * MIB;
        for (plugged, size) in [
            (&[GIB][..], huge),
            (&[GIB][..], u64::MAX),
            (&[GIB][..], u64::MAX - 128 * MIB + 1),
            (&[u64::MAX - 2 * GIB][..], 4 * GIB),
        ] {
            let error = check_dimm_fits(GIB, plugged, size, maxmem).unwrap_err();
            assert_eq!(
                error.kind(),
                super::super::RequestErrorKind::Invalid,
                "{size}: {error}"
            );
            assert!(error.to_string().contains("maxmem"), "{error}");
        }
    }
}
