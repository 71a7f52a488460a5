//! `GET /vm/memory` and `PUT /vm/memory` in the control loop: gathers the memory state for
//! the planner, answers with it, and carries a plan's steps out.

use tidevm_api::{
    ApiError, ApiResponse, MemoryBalloon, MemoryDimm, MemoryPlanInfo, MemoryStatus, MemoryStep,
    MemoryVirtioMem, NodeMemory,
};

use super::Vmm;
use crate::memory::planner::{
    self, BalloonState, DimmState, MemoryState, PlanError, PlanStep, VirtioMemState,
};

/// The answer to a target the planner cannot reach: the client's request is at fault, and
/// the message names the limit.
fn plan_refused(error: PlanError) -> ApiError {
    ApiError::bad_request(format!("cannot resize the guest's memory: {error}"))
}

impl Vmm {
    /// The memory state as the planner sees it.
    fn memory_state(&self) -> Result<MemoryState, ApiError> {
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| ApiError::conflict("the VM is not running"))?;
        let boot_by_node = if self.config.numa.is_empty() {
            vec![(0, self.config.memory.size)]
        } else {
            self.config
                .numa
                .iter()
                .map(|node| (node.id, node.memory))
                .collect()
        };
        let virtio_mem = vm
            .virtio_mem
            .iter()
            .map(|device| {
                let status = device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .status();
                VirtioMemState {
                    id: status.id,
                    node: status.node.unwrap_or(0),
                    block_size: status.block_size,
                    region_size: status.region.size,
                    plugged: status.plugged_size,
                    requested: status.requested_size,
                }
            })
            .collect();
        let dimms = self
            .config
            .dimms
            .iter()
            .map(|dimm| DimmState {
                id: dimm.id.clone(),
                size: dimm.size,
                node: dimm.node,
            })
            .collect();
        let balloon = vm.balloon.as_ref().map(|balloon| {
            let status = balloon
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .status();
            BalloonState {
                target: status.target_bytes,
                actual: status.actual_bytes,
                // `set_balloon` refuses more than the boot memory.
                max_target: self.config.memory.size,
            }
        });
        Ok(MemoryState {
            boot_by_node,
            virtio_mem,
            dimms,
            balloon,
        })
    }

    /// `GET /vm/memory`.
    pub(super) fn memory_status(&self) -> Result<MemoryStatus, ApiError> {
        let state = self.memory_state()?;
        let (min_bytes, max_bytes) = state.reachable(None).map_err(plan_refused)?;
        let balloon_config = self.config.balloon.as_ref();
        Ok(MemoryStatus {
            boot_ram_bytes: state.boot_bytes(),
            virtio_mem: state
                .virtio_mem
                .iter()
                .map(|d| MemoryVirtioMem {
                    id: d.id.clone(),
                    node: d.node,
                    block_size: d.block_size,
                    region_size: d.region_size,
                    plugged_size: d.plugged,
                    requested_size: d.requested,
                })
                .collect(),
            dimms: state
                .dimms
                .iter()
                .map(|d| MemoryDimm {
                    id: d.id.clone(),
                    size: d.size,
                    node: d.node,
                })
                .collect(),
            balloon: state.balloon.map(|b| MemoryBalloon {
                target_bytes: b.target,
                actual_bytes: b.actual,
                max_target_bytes: b.max_target,
                deflate_on_oom: balloon_config.is_some_and(|c| c.deflate_on_oom),
                free_page_reporting: balloon_config.is_some_and(|c| c.free_page_reporting),
            }),
            requested_total_bytes: state.requested_total(),
            actual_total_bytes: state.actual_total(),
            nodes: state
                .requested_by_node()
                .into_iter()
                .map(|(node, requested_bytes)| NodeMemory {
                    node,
                    requested_bytes,
                })
                .collect(),
            min_bytes,
            max_bytes,
        })
    }

    /// `PUT /vm/memory`: plans the way to `size` bytes in all and asks the devices for it.
    pub(super) fn set_memory(
        &mut self,
        size: u64,
        node: Option<u32>,
    ) -> Result<ApiResponse, ApiError> {
        let state = self.memory_state()?;
        let plan = planner::plan(&state, size, node).map_err(plan_refused)?;
        let mut done = Vec::with_capacity(plan.steps.len());
        for step in plan.steps {
            let outcome = match &step {
                PlanStep::SetVirtioMem { id, requested } => self.resize_virtio_mem(id, *requested),
                PlanStep::SetBalloon { target } => self.set_balloon(*target),
            };
            if let Err(error) = outcome {
                // The planner checked every limit the devices check, so this is the VMM's
                // fault; say what was already asked of the guest.
                return Err(ApiError::internal(format!(
                    "memory plan step {step:?} failed after {} step(s) were done: {}",
                    done.len(),
                    error.message
                )));
            }
            done.push(match step {
                PlanStep::SetVirtioMem { id, requested } => MemoryStep::SetVirtioMem {
                    id,
                    requested_size: requested,
                },
                PlanStep::SetBalloon { target } => MemoryStep::SetBalloon {
                    target_size: target,
                },
            });
        }
        tracing::info!(
            "guest memory target now {size} bytes (node {node:?}): {} step(s)",
            done.len()
        );
        Ok(ApiResponse::MemoryPlan(MemoryPlanInfo {
            target_total_bytes: plan.target_total,
            steps: done,
        }))
    }
}
