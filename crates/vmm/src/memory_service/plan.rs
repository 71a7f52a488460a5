//! One memory size for the whole guest: the memory service gathers its state for the
//! planner (`memory::planner`) and carries a plan's steps out.

use super::{DimmRequest, DimmState as DimmLife, MemoryRequestError, MemoryService};
use crate::memory::planner::{
    self, BalloonState, DimmPhase, DimmSlots, DimmState, MemoryPlan, MemoryState, PlanStep,
    VirtioMemState,
};
use crate::memory::Backing;

impl MemoryService {
    /// The memory state as the planner sees it.
    pub fn memory_state(&self) -> MemoryState {
        let boot_by_node = self.settings.boot_by_node.clone();
        let virtio_mem = self
            .virtio_mem_statuses()
            .into_iter()
            .map(|(status, _)| VirtioMemState {
                id: status.id,
                node: status.node.unwrap_or(0),
                block_size: status.block_size,
                region_size: status.region.size,
                plugged: status.plugged_size,
                requested: status.requested_size,
            })
            .collect();
        let lives = self.dimms_status().map(|s| s.dimms).unwrap_or_default();
        let dimms = self
            .settings
            .dimms
            .iter()
            .map(|dimm| DimmState {
                id: dimm.id.clone(),
                size: dimm.size,
                node: dimm.node,
                phase: match lives.iter().find(|d| d.id == dimm.id).map(|d| d.state) {
                    Some(DimmLife::Inserting) => DimmPhase::Inserting,
                    Some(DimmLife::Removing) => DimmPhase::Ejecting,
                    Some(DimmLife::Active) | None => DimmPhase::Active,
                },
            })
            .collect();
        let memory = &self.settings.memory;
        let dimm_slots = (memory.slots > 0 && self.dimms.is_some()).then(|| DimmSlots {
            // The slot `add_dimm` takes is the lowest free one, as here.
            free: (0..memory.slots)
                .filter(|s| self.settings.dimms.iter().all(|d| d.slot != *s))
                .collect(),
            maxmem: memory.maxmem,
        });
        let balloon = self.balloon.as_ref().map(|balloon| {
            let status = super::lock(balloon).device().status();
            BalloonState {
                target: status.target_bytes,
                actual: status.actual_bytes,
                // `set_balloon` refuses more than the boot memory.
                max_target: self.settings.memory.size,
            }
        });
        MemoryState {
            boot_by_node,
            virtio_mem,
            dimms,
            dimm_slots,
            balloon,
        }
    }

    /// Plans the way to `size` bytes in all (only `node`'s devices and DIMMs when given) and
    /// asks the devices for it. A second request replaces the first: the plan depends on the
    /// target and the DIMMs there are, not on how far the guest got. A DIMM added or an
    /// eject asked for by the first stays so (neither can be taken back from the guest);
    /// the second plan counts the added DIMM as present and the ejected one as gone.
    pub fn set_memory(
        &mut self,
        size: u64,
        node: Option<u32>,
    ) -> Result<MemoryPlan, MemoryRequestError> {
        let plan = planner::plan(&self.memory_state(), size, node)?;
        // Whatever the earlier plan's steps left undone, this target replaces it.
        self.memory_target = None;
        self.progress.plan_started();
        self.publish(tidevm_api::Event::MemoryPlanned {
            target_total_bytes: plan.target_total,
            steps: plan.steps.iter().map(|s| format!("{s:?}")).collect(),
        });
        for (done, step) in plan.steps.iter().enumerate() {
            let outcome = match step {
                PlanStep::SetVirtioMem { id, requested } => self.resize_virtio_mem(id, *requested),
                PlanStep::SetBalloon { target } => self.set_balloon(*target),
                PlanStep::AddDimm { id, size, node } => self
                    .add_dimm(DimmRequest {
                        size: *size,
                        node: Some(*node),
                        id: Some(id.clone()),
                        backing: Backing::Anonymous,
                        prealloc: false,
                    })
                    .map(drop),
                PlanStep::EjectDimm { id, .. } => self.remove_dimm(id).map(drop),
            };
            // The planner checked every limit the devices check, so this is the host (no
            // memory for a DIMM) or the VMM's fault; say what was already asked of the guest.
            outcome.map_err(|source| MemoryRequestError::PlanStep {
                step: format!("{step:?}"),
                done,
                source: Box::new(source),
            })?;
        }
        self.memory_target = Some(plan.target_total);
        tracing::info!(
            "guest memory target now {size} bytes (node {node:?}): {} step(s)",
            plan.steps.len()
        );
        Ok(plan)
    }
}
