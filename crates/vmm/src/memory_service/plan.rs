//! One memory size for the whole guest: the memory service gathers its state for the
//! planner (`memory::planner`) and carries a plan's steps out.

use super::{MemoryRequestError, MemoryService};
use crate::memory::planner::{
    self, BalloonState, DimmState, MemoryPlan, MemoryState, PlanStep, VirtioMemState,
};

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
        let dimms = self
            .settings
            .dimms
            .iter()
            .map(|dimm| DimmState {
                id: dimm.id.clone(),
                size: dimm.size,
                node: dimm.node,
            })
            .collect();
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
            balloon,
        }
    }

    /// Plans the way to `size` bytes in all (only `node`'s devices when given) and asks the
    /// devices for it. A second request replaces the first: the plan depends only on the
    /// target, not on what the guest has done so far.
    pub fn set_memory(
        &mut self,
        size: u64,
        node: Option<u32>,
    ) -> Result<MemoryPlan, MemoryRequestError> {
        let plan = planner::plan(&self.memory_state(), size, node)?;
        self.publish(tidevm_api::Event::MemoryPlanned {
            target_total_bytes: plan.target_total,
            steps: plan.steps.iter().map(|s| format!("{s:?}")).collect(),
        });
        for (done, step) in plan.steps.iter().enumerate() {
            let outcome = match step {
                PlanStep::SetVirtioMem { id, requested } => self.resize_virtio_mem(id, *requested),
                PlanStep::SetBalloon { target } => self.set_balloon(*target),
            };
            // The planner checked every limit the devices check, so this is the VMM's fault;
            // say what was already asked of the guest.
            outcome.map_err(|source| MemoryRequestError::PlanStep {
                step: format!("{step:?}"),
                done,
                source: Box::new(source),
            })?;
        }
        tracing::info!(
            "guest memory target now {size} bytes (node {node:?}): {} step(s)",
            plan.steps.len()
        );
        Ok(plan)
    }
}
