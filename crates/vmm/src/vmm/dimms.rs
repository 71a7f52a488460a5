//! ACPI DIMM hotplug in the control loop: adding a DIMM (memory first, then the guest is
//! told), asking the guest to eject one, taking its memory away once it has, and describing
//! the slots for the API.

use tidevm_api::{
    AddDimmBody, ApiError, ApiResponse, DimmBacking, DimmInfo, DimmState, DimmsInfo, GuestRange,
    OstReport,
};

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::Vmm;
use crate::arch::x86_64::layout::GuestRange as Range;
use crate::builder::{host_backing, DimmHotplug, RunningVm};
use crate::config::{format_size, DimmConfig, HotplugBacking, DIMM_ALIGN};
use crate::devices::memory_hotplug::{ost_meaning, DimmSlot};
use crate::memory::MemoryManager;

/// What a DIMM request needs of the running VM: its DIMM hotplug, its memory manager and
/// the VM fd.
fn dimm_parts(
    vm: &mut Option<RunningVm>,
) -> Result<(&mut DimmHotplug, &mut MemoryManager, &Arc<VmFd>), ApiError> {
    let vm = vm
        .as_mut()
        .ok_or_else(|| ApiError::conflict("the VM is not running"))?;
    let dimms = vm
        .dimms
        .as_mut()
        .ok_or_else(|| ApiError::internal("the DIMM controller is missing"))?;
    Ok((dimms, &mut vm.memory, &vm.vm_fd))
}

fn backing_of(api: DimmBacking) -> HotplugBacking {
    match api {
        DimmBacking::Anon => HotplugBacking::Anonymous,
        DimmBacking::Memfd => HotplugBacking::Memfd,
        DimmBacking::Hugetlbfs => HotplugBacking::Hugetlbfs,
    }
}

fn backing_to_api(backing: HotplugBacking) -> DimmBacking {
    match backing {
        HotplugBacking::Anonymous => DimmBacking::Anon,
        HotplugBacking::Memfd => DimmBacking::Memfd,
        HotplugBacking::Hugetlbfs => DimmBacking::Hugetlbfs,
    }
}

/// The lowest 128 MiB-aligned start in `area` where `size` bytes fit between `used` ranges.
fn find_room(area: Range, used: &[Range], size: u64) -> Option<u64> {
    let mut used: Vec<Range> = used.to_vec();
    used.sort_by_key(|r| r.start);
    let mut candidate = area.start;
    for range in used {
        if candidate + size <= range.start {
            break;
        }
        candidate = candidate.max(range.end().next_multiple_of(DIMM_ALIGN));
    }
    (candidate + size <= area.end()).then_some(candidate)
}

/// Whether a DIMM of `size` bytes fits under `maxmem` next to `boot` bytes of boot RAM and
/// the DIMMs of `plugged` sizes. `size` comes from the client: the sum is checked, so a size
/// near 2^64 cannot wrap past the limit.
fn check_dimm_fits(boot: u64, plugged: &[u64], size: u64, maxmem: u64) -> Result<(), ApiError> {
    let plugged_total = plugged
        .iter()
        .try_fold(0u64, |total, dimm| total.checked_add(*dimm));
    let total = plugged_total
        .and_then(|plugged| boot.checked_add(plugged))
        .and_then(|used| used.checked_add(size));
    match total {
        Some(total) if total <= maxmem => Ok(()),
        _ => Err(ApiError::bad_request(format!(
            "a {} DIMM would bring the guest to {}, above maxmem {} ({} in DIMMs now)",
            format_size(size),
            total.map_or_else(|| "more than 16 EiB".to_owned(), format_size),
            format_size(maxmem),
            plugged_total.map_or_else(|| "more than 16 EiB".to_owned(), format_size)
        ))),
    }
}

impl Vmm {
    fn dimm_config_index(&self, id: &str) -> Result<usize, ApiError> {
        self.config
            .dimms
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no DIMM with id {id}")))
    }

    /// Hot-adds a DIMM: maps and registers its memory, then tells the guest.
    pub(super) fn add_dimm(&mut self, request: AddDimmBody) -> Result<ApiResponse, ApiError> {
        let memory = &self.config.memory;
        if memory.slots == 0 {
            return Err(ApiError::not_found(
                "this VM has no DIMM slots (start it with --memory size=...,slots=N,maxmem=SIZE)",
            ));
        }
        let size = request.size;
        if size == 0 || !size.is_multiple_of(DIMM_ALIGN) {
            return Err(ApiError::bad_request(format!(
                "DIMM size {size} bytes is not a non-zero multiple of 128 MiB (the guest's memory block)"
            )));
        }
        let plugged: Vec<u64> = self.config.dimms.iter().map(|d| d.size).collect();
        check_dimm_fits(memory.size, &plugged, size, memory.maxmem)?;
        let nodes = self.config.numa.len().max(1) as u32;
        let node = request.node.unwrap_or(0);
        if node >= nodes {
            return Err(ApiError::bad_request(format!(
                "NUMA node {node} does not exist (the VM has {nodes})"
            )));
        }
        let slot = (0..memory.slots)
            .find(|s| self.config.dimms.iter().all(|d| d.slot != *s))
            .ok_or_else(|| {
                ApiError::conflict(format!("all {} DIMM slots are in use", memory.slots))
            })?;
        let id = request.id.unwrap_or_else(|| format!("dimm{slot}"));
        if self.config.dimms.iter().any(|d| d.id == id) {
            return Err(ApiError::conflict(format!("a DIMM with id {id} exists")));
        }
        let (dimms, memory, vm_fd) = dimm_parts(&mut self.vm)?;
        let used: Vec<Range> = self
            .config
            .dimms
            .iter()
            .map(|d| Range {
                start: d.start,
                size: d.size,
            })
            .collect();
        let start = find_room(dimms.area, &used, size).ok_or_else(|| {
            ApiError::conflict(format!(
                "no contiguous {} of room left in the DIMM area (remove a DIMM first)",
                format_size(size)
            ))
        })?;
        let range = Range { start, size };
        let backing = backing_of(request.backing);
        let region = memory
            .add_dimm(vm_fd, range, host_backing(backing), request.prealloc)
            .map_err(|e| {
                ApiError::new(
                    503,
                    format!(
                        "the host cannot supply a {} DIMM: {}",
                        format_size(size),
                        crate::error_chain(&e)
                    ),
                )
            })?;
        dimms.regions.insert(slot, region);
        dimms.controller().insert(slot, range, node, false);
        dimms.notify_guest();
        self.config.dimms.push(DimmConfig {
            id: id.clone(),
            slot,
            start,
            size,
            node,
            backing,
            prealloc: request.prealloc,
        });
        tracing::info!(
            "DIMM {id}: {} at {start:#x} in slot {slot} (node {node}); guest notified",
            format_size(size)
        );
        self.dimm_info(&id)
            .map(ApiResponse::Dimm)
            .ok_or_else(|| ApiError::internal("the DIMM vanished"))
    }

    /// Asks the guest to eject a DIMM. The memory goes when the guest calls `_EJ0`.
    pub(super) fn remove_dimm(&mut self, id: &str) -> Result<ApiResponse, ApiError> {
        let slot = self.config.dimms[self.dimm_config_index(id)?].slot;
        let (dimms, _, _) = dimm_parts(&mut self.vm)?;
        if !dimms.controller().request_removal(slot) {
            return Err(ApiError::conflict(format!(
                "DIMM {id} is already being ejected"
            )));
        }
        dimms.notify_guest();
        tracing::info!("DIMM {id}: the guest is asked to eject it");
        self.dimm_info(id)
            .map(ApiResponse::Dimm)
            .ok_or_else(|| ApiError::internal("the DIMM vanished"))
    }

    /// The guest ejected the DIMM in `slot`: its memory slot and host memory go away.
    pub(super) fn dimm_ejected(&mut self, slot: u32) {
        let Ok((dimms, memory, _)) = dimm_parts(&mut self.vm) else {
            return;
        };
        let Some(region) = dimms.regions.remove(&slot) else {
            return;
        };
        if let Err(e) = memory.remove_dimm(region) {
            // The guest no longer uses it; whatever is left is only host memory.
            tracing::error!(
                "DIMM slot {slot}: cannot release its memory: {}",
                crate::error_chain(&e)
            );
        }
        dimms.controller().release(slot);
        if let Some(index) = self.config.dimms.iter().position(|d| d.slot == slot) {
            let dimm = self.config.dimms.remove(index);
            tracing::info!(
                "DIMM {}: ejected by the guest, {} returned to the host",
                dimm.id,
                format_size(dimm.size)
            );
        }
    }

    fn dimm_info(&self, id: &str) -> Option<DimmInfo> {
        self.dimms_info()?.dimms.into_iter().find(|d| d.id == id)
    }

    /// The slots and DIMMs for `GET /vm/info`.
    pub(super) fn dimms_info(&self) -> Option<DimmsInfo> {
        let vm = self.vm.as_ref()?;
        let dimms = vm.dimms.as_ref()?;
        let slots: Vec<DimmSlot> = dimms.controller().slots().to_vec();
        let infos = self
            .config
            .dimms
            .iter()
            .map(|d| {
                let slot = slots.get(d.slot as usize).cloned().unwrap_or_default();
                let state = if slot.removal_requested {
                    DimmState::Removing
                } else if slot.acknowledged {
                    DimmState::Active
                } else {
                    DimmState::Inserting
                };
                DimmInfo {
                    id: d.id.clone(),
                    slot: d.slot,
                    range: GuestRange {
                        start: d.start,
                        size: d.size,
                    },
                    node: d.node,
                    backing: backing_to_api(d.backing),
                    prealloc: d.prealloc,
                    state,
                    resident_bytes: dimms
                        .regions
                        .get(&d.slot)
                        .map_or(0, |r| vm.memory.resident_bytes(*r)),
                    last_ost: slot.last_ost.map(|(event, status)| OstReport {
                        event,
                        status,
                        meaning: ost_meaning(event, status),
                    }),
                    removal_refused: slot.removal_refused,
                }
            })
            .collect::<Vec<_>>();
        Some(DimmsInfo {
            slots: self.config.memory.slots,
            maxmem_bytes: self.config.memory.maxmem,
            plugged_bytes: self.config.dimms.iter().map(|d| d.size).sum(),
            area: GuestRange {
                start: dimms.area.start,
                size: dimms.area.size,
            },
            dimms: infos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn range(start: u64, size: u64) -> Range {
        Range { start, size }
    }

    #[test]
    fn dimm_sizes_near_2_pow_64_are_rejected_not_wrapped() {
        const GIB: u64 = 1 << 30;
        let maxmem = 8 * GIB;
        assert!(check_dimm_fits(GIB, &[GIB], GIB, maxmem).is_ok());
        assert!(check_dimm_fits(GIB, &[GIB], 6 * GIB, maxmem).is_ok());
        let error = check_dimm_fits(GIB, &[GIB], 7 * GIB, maxmem).unwrap_err();
        assert_eq!(error.status, 400);
        // boot + plugged + size wraps to 1 GiB + 128 MiB: must still be refused with a 400.
        let huge = u64::MAX - 2 * GIB + 1 + 128 * MIB;
        for (plugged, size) in [
            (&[GIB][..], huge),
            (&[GIB][..], u64::MAX),
            (&[GIB][..], u64::MAX - 128 * MIB + 1),
            (&[u64::MAX - 2 * GIB][..], 4 * GIB),
        ] {
            let error = check_dimm_fits(GIB, plugged, size, maxmem).unwrap_err();
            assert_eq!(error.status, 400, "{size}: {}", error.message);
            assert!(error.message.contains("maxmem"), "{}", error.message);
        }
    }

    #[test]
    fn dimms_go_in_the_first_gap_that_fits() {
        let area = range(1 << 32, 1024 * MIB);
        assert_eq!(find_room(area, &[], 256 * MIB), Some(1 << 32));
        let used = [
            range((1 << 32) + 256 * MIB, 128 * MIB),
            range(1 << 32, 128 * MIB),
        ];
        // 128 MiB gap at +128 MiB fits a 128 MiB DIMM but not a 256 MiB one.
        assert_eq!(
            find_room(area, &used, 128 * MIB),
            Some((1 << 32) + 128 * MIB)
        );
        assert_eq!(
            find_room(area, &used, 256 * MIB),
            Some((1 << 32) + 384 * MIB)
        );
        assert_eq!(
            find_room(area, &used, 640 * MIB),
            Some((1 << 32) + 384 * MIB)
        );
        assert_eq!(find_room(area, &used, 768 * MIB), None);
    }
}
