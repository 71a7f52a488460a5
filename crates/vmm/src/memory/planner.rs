//! The memory planner: from the VM's memory state and a target total, the steps that get
//! the guest there.
//!
//! It is a pure function ([`plan`]) so that every policy decision can be unit-tested without
//! a VM; the control loop gathers a [`MemoryState`], plans, and carries the steps out.
//!
//! # Policy
//!
//! The guest-visible total is `boot + Σ virtio-mem requested + Σ DIMMs − balloon target`.
//! A target is reached by changing the virtio-mem devices *in scope* (those of the node
//! asked for, else all of them) and the balloon; devices out of scope keep their requested
//! size. With `D = target − (boot + DIMMs + Σ out-of-scope requested)`:
//!
//! * `D ≥ 0`: the balloon is deflated completely and the devices in scope get `D` between
//!   them, spread as evenly as their regions and block sizes allow.
//! * `D < 0`: the devices in scope unplug everything and the balloon takes `−D`.
//!
//! So growing deflates the balloon before plugging, and shrinking unplugs before inflating
//! the balloon (only for what unplugging cannot do, below the boot size). The plan depends
//! on the target alone, never on how the VM got to its current state: a second request
//! simply replaces the first.
//!
//! Steps are ordered so that the guest never has to give memory back before it receives
//! what replaces it: a deflate first, then virtio-mem devices that grow, then those that
//! shrink, then an inflate.
//!
//! DIMMs count in the total but the planner never adds or ejects one: ejecting needs the
//! guest's cooperation per DIMM and adding needs a free slot, so DIMMs stay a separate,
//! explicit operation (`PUT /vm/dimms`, `DELETE /vm/dimms/{id}`).

use std::collections::BTreeMap;

/// Granularity of balloon targets: the balloon works in 4 KiB pages.
pub const BALLOON_GRANULARITY: u64 = 4096;

/// One virtio-mem device as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioMemState {
    /// Device id.
    pub id: String,
    /// Guest NUMA node.
    pub node: u32,
    /// Plug granularity in bytes.
    pub block_size: u64,
    /// Most the device can plug, in bytes.
    pub region_size: u64,
    /// Bytes the guest has plugged now.
    pub plugged: u64,
    /// Bytes the host asked for.
    pub requested: u64,
}

/// One DIMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimmState {
    /// DIMM id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Guest NUMA node.
    pub node: u32,
}

/// The balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonState {
    /// Bytes the host asked the guest to give back.
    pub target: u64,
    /// Bytes the guest says it has given back.
    pub actual: u64,
    /// Largest target the host accepts (the boot memory: the balloon only takes boot RAM).
    pub max_target: u64,
}

/// Everything the planner needs to know about the VM's memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryState {
    /// Boot RAM per NUMA node (node 0 alone without `--numa`).
    pub boot_by_node: Vec<(u32, u64)>,
    /// virtio-mem devices, in creation order.
    pub virtio_mem: Vec<VirtioMemState>,
    /// DIMMs plugged now.
    pub dimms: Vec<DimmState>,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonState>,
}

impl MemoryState {
    /// Boot RAM in all.
    pub fn boot_bytes(&self) -> u64 {
        self.boot_by_node.iter().map(|(_, bytes)| bytes).sum()
    }

    fn dimm_bytes(&self) -> u64 {
        self.dimms.iter().map(|d| d.size).sum()
    }

    /// What the guest is asked to have: boot + Σ virtio-mem requested + Σ DIMMs − balloon
    /// target.
    pub fn requested_total(&self) -> u64 {
        let requested: u64 = self.virtio_mem.iter().map(|d| d.requested).sum();
        let balloon = self.balloon.map_or(0, |b| b.target);
        (self.boot_bytes() + requested + self.dimm_bytes()).saturating_sub(balloon)
    }

    /// What the guest has now: boot + Σ virtio-mem plugged + Σ DIMMs − balloon actual.
    pub fn actual_total(&self) -> u64 {
        let plugged: u64 = self.virtio_mem.iter().map(|d| d.plugged).sum();
        let balloon = self.balloon.map_or(0, |b| b.actual);
        (self.boot_bytes() + plugged + self.dimm_bytes()).saturating_sub(balloon)
    }

    /// Requested memory per NUMA node (boot RAM, virtio-mem requested, DIMMs), by node.
    /// The balloon is not counted: the guest picks the pages it gives back from any node.
    pub fn requested_by_node(&self) -> Vec<(u32, u64)> {
        let mut nodes: BTreeMap<u32, u64> = BTreeMap::new();
        for &(node, bytes) in &self.boot_by_node {
            *nodes.entry(node).or_default() += bytes;
        }
        for device in &self.virtio_mem {
            *nodes.entry(device.node).or_default() += device.requested;
        }
        for dimm in &self.dimms {
            *nodes.entry(dimm.node).or_default() += dimm.size;
        }
        nodes.into_iter().collect()
    }

    /// The smallest and largest totals [`plan`] can reach (with `node`: changing only that
    /// node's virtio-mem devices), or why it cannot plan for `node` at all.
    pub fn reachable(&self, node: Option<u32>) -> Result<(u64, u64), PlanError> {
        let scope = self.scope(node)?;
        let fixed = self.fixed_bytes(&scope);
        let capacity: u64 = scope.iter().map(|&i| self.virtio_mem[i].region_size).sum();
        let max_balloon = self.balloon.map_or(0, |b| b.max_target);
        Ok((fixed.saturating_sub(max_balloon), fixed + capacity))
    }

    /// Indices of the virtio-mem devices a plan may change.
    fn scope(&self, node: Option<u32>) -> Result<Vec<usize>, PlanError> {
        let scope: Vec<usize> = (0..self.virtio_mem.len())
            .filter(|&i| node.is_none_or(|node| self.virtio_mem[i].node == node))
            .collect();
        match node {
            Some(node) if scope.is_empty() => Err(PlanError::NoVirtioMemOnNode { node }),
            _ => Ok(scope),
        }
    }

    /// The part of the total a plan over `scope` leaves alone: boot, DIMMs and the requested
    /// sizes of the devices out of scope.
    fn fixed_bytes(&self, scope: &[usize]) -> u64 {
        let out_of_scope: u64 = (0..self.virtio_mem.len())
            .filter(|i| !scope.contains(i))
            .map(|i| self.virtio_mem[i].requested)
            .sum();
        self.boot_bytes() + self.dimm_bytes() + out_of_scope
    }
}

/// One thing to do to reach a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanStep {
    /// Set a virtio-mem device's requested size.
    SetVirtioMem {
        /// Device id.
        id: String,
        /// New requested size in bytes.
        requested: u64,
    },
    /// Set the balloon's target.
    SetBalloon {
        /// New target in bytes.
        target: u64,
    },
}

/// The steps to reach a target, in the order to carry them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The total the guest will have once the steps are done.
    pub target_total: u64,
    /// Empty when the guest is already asked for the target.
    pub steps: Vec<PlanStep>,
}

/// Why a target cannot be planned. Each names the limit it hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The target needs memory in units the devices cannot plug (or the balloon take).
    #[error(
        "{target} bytes is not reachable in steps of {granularity} bytes (the {unit}); \
         the nearest reachable sizes are {below} and {above} bytes"
    )]
    NotAligned {
        /// The target asked for.
        target: u64,
        /// The step it must be a multiple of, from the current fixed part.
        granularity: u64,
        /// What sets the step ("virtio-mem block size" or "balloon page size").
        unit: &'static str,
        /// Nearest reachable total below.
        below: u64,
        /// Nearest reachable total above.
        above: u64,
    },
    /// Smaller than unplugging everything and inflating the balloon fully can get.
    #[error("{target} bytes is below the minimum reachable {minimum} bytes ({why})")]
    BelowMinimum {
        /// The target asked for.
        target: u64,
        /// The smallest reachable total.
        minimum: u64,
        /// What sets the minimum.
        why: &'static str,
    },
    /// Larger than plugging every region completely can get.
    #[error("{target} bytes is above the maximum reachable {maximum} bytes ({why})")]
    AboveMaximum {
        /// The target asked for.
        target: u64,
        /// The largest reachable total.
        maximum: u64,
        /// What sets the maximum.
        why: &'static str,
    },
    /// A node was asked for and no virtio-mem device belongs to it.
    #[error("NUMA node {node} has no virtio-mem device to resize")]
    NoVirtioMemOnNode {
        /// The node asked for.
        node: u32,
    },
}

/// Plans how to bring the guest's total memory to `target` (with `node`: changing only the
/// virtio-mem devices of that node, besides the balloon). See the module documentation for
/// the policy.
pub fn plan(state: &MemoryState, target: u64, node: Option<u32>) -> Result<MemoryPlan, PlanError> {
    let scope = state.scope(node)?;
    let fixed = state.fixed_bytes(&scope);
    let (minimum, maximum) = state.reachable(node)?;
    if target > maximum {
        return Err(PlanError::AboveMaximum {
            target,
            maximum,
            why: if scope.is_empty() {
                "boot memory and DIMMs: the VM has no virtio-mem device"
            } else {
                "every virtio-mem region fully plugged"
            },
        });
    }
    if target < minimum {
        return Err(PlanError::BelowMinimum {
            target,
            minimum,
            why: if state.balloon.is_some() {
                "virtio-mem fully unplugged and the balloon at its largest, the boot memory"
            } else {
                "virtio-mem fully unplugged; the VM has no balloon to go below that"
            },
        });
    }

    let mut requested: Vec<u64> = state.virtio_mem.iter().map(|d| d.requested).collect();
    let balloon_target;
    if target >= fixed {
        balloon_target = 0;
        let wanted = target - fixed;
        let leftover = spread(state, &scope, wanted, &mut requested);
        if leftover != 0 {
            let granularity = scope
                .iter()
                .map(|&i| state.virtio_mem[i].block_size)
                .min()
                .unwrap_or(1)
                .max(1);
            let below = fixed + (wanted - leftover);
            return Err(PlanError::NotAligned {
                target,
                granularity,
                unit: "virtio-mem block size",
                below,
                above: (below + granularity).min(maximum),
            });
        }
    } else {
        for &i in &scope {
            requested[i] = 0;
        }
        balloon_target = fixed - target;
        if !balloon_target.is_multiple_of(BALLOON_GRANULARITY) {
            let above = fixed - balloon_target / BALLOON_GRANULARITY * BALLOON_GRANULARITY;
            return Err(PlanError::NotAligned {
                target,
                granularity: BALLOON_GRANULARITY,
                unit: "balloon page size",
                below: above - BALLOON_GRANULARITY,
                above,
            });
        }
    }

    let mut steps = Vec::new();
    let current_balloon = state.balloon.map(|b| b.target);
    let balloon_step = current_balloon
        .filter(|&current| current != balloon_target)
        .map(|current| {
            (
                current,
                PlanStep::SetBalloon {
                    target: balloon_target,
                },
            )
        });
    let mut growing = Vec::new();
    let mut shrinking = Vec::new();
    for (device, &new) in state.virtio_mem.iter().zip(&requested) {
        let step = PlanStep::SetVirtioMem {
            id: device.id.clone(),
            requested: new,
        };
        if new > device.requested {
            growing.push(step);
        } else if new < device.requested {
            shrinking.push(step);
        }
    }
    let (deflate, inflate) = match balloon_step {
        Some((current, step)) if balloon_target < current => (Some(step), None),
        Some((_, step)) => (None, Some(step)),
        None => (None, None),
    };
    steps.extend(deflate);
    steps.extend(growing);
    steps.extend(shrinking);
    steps.extend(inflate);
    Ok(MemoryPlan {
        target_total: target,
        steps,
    })
}

/// Shares `wanted` bytes among the devices in `scope` as evenly as their regions and block
/// sizes allow, writing each one's new requested size into `requested`. Returns what could
/// not be placed (non-zero only when `wanted` does not fit the block sizes).
fn spread(state: &MemoryState, scope: &[usize], wanted: u64, requested: &mut [u64]) -> u64 {
    // Smallest regions first, so that what they cannot take flows on to the larger ones.
    let mut order: Vec<usize> = scope.to_vec();
    order.sort_by_key(|&i| (state.virtio_mem[i].region_size, i));
    let mut remaining = wanted;
    for (position, &i) in order.iter().enumerate() {
        let device = &state.virtio_mem[i];
        let block = device.block_size.max(1);
        let devices_left = (order.len() - position) as u64;
        let share = remaining.div_ceil(devices_left);
        // Round the fair share up to a block so that a remainder smaller than a block lands
        // somewhere, but never past what is left or the region.
        let share = share
            .next_multiple_of(block)
            .min(remaining / block * block)
            .min(device.region_size / block * block);
        requested[i] = share;
        remaining -= share;
    }
    // Rounding may leave bytes that a later device could not take but an earlier one can.
    for &i in &order {
        if remaining == 0 {
            break;
        }
        let device = &state.virtio_mem[i];
        let block = device.block_size.max(1);
        let room = (device.region_size - requested[i]) / block * block;
        let more = (remaining / block * block).min(room);
        requested[i] += more;
        remaining -= more;
    }
    remaining
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn device(id: &str, node: u32, region_size: u64, requested: u64) -> VirtioMemState {
        VirtioMemState {
            id: id.to_owned(),
            node,
            block_size: 2 * MIB,
            region_size,
            plugged: requested,
            requested,
        }
    }

    fn balloon(target: u64, max_target: u64) -> Option<BalloonState> {
        Some(BalloonState {
            target,
            actual: target,
            max_target,
        })
    }

    fn vmem(id: &str, requested: u64) -> PlanStep {
        PlanStep::SetVirtioMem {
            id: id.to_owned(),
            requested,
        }
    }

    fn set_balloon(target: u64) -> PlanStep {
        PlanStep::SetBalloon { target }
    }

    /// 1 GiB boot RAM, one 4 GiB virtio-mem device, no balloon.
    fn virtio_mem_only(requested: u64) -> MemoryState {
        MemoryState {
            boot_by_node: vec![(0, GIB)],
            virtio_mem: vec![device("vmem0", 0, 4 * GIB, requested)],
            ..Default::default()
        }
    }

    /// 2 GiB boot RAM and a balloon.
    fn balloon_only(target: u64) -> MemoryState {
        MemoryState {
            boot_by_node: vec![(0, 2 * GIB)],
            balloon: balloon(target, 2 * GIB),
            ..Default::default()
        }
    }

    /// 1 GiB boot RAM, a 4 GiB virtio-mem device and a balloon.
    fn both(requested: u64, balloon_target: u64) -> MemoryState {
        MemoryState {
            boot_by_node: vec![(0, GIB)],
            virtio_mem: vec![device("vmem0", 0, 4 * GIB, requested)],
            balloon: balloon(balloon_target, GIB),
            ..Default::default()
        }
    }

    /// Two nodes of 1 GiB boot RAM, each with a virtio-mem device (4 GiB and 2 GiB).
    fn two_nodes() -> MemoryState {
        MemoryState {
            boot_by_node: vec![(0, GIB), (1, GIB)],
            virtio_mem: vec![
                device("vmem0", 0, 4 * GIB, 0),
                device("vmem1", 1, 2 * GIB, 0),
            ],
            balloon: balloon(0, 2 * GIB),
            ..Default::default()
        }
    }

    /// Applies a plan's steps to the state, as the VMM would.
    fn apply(state: &MemoryState, plan: &MemoryPlan) -> MemoryState {
        let mut state = state.clone();
        for step in &plan.steps {
            match step {
                PlanStep::SetVirtioMem { id, requested } => {
                    let device = state.virtio_mem.iter_mut().find(|d| &d.id == id).unwrap();
                    assert!(requested.is_multiple_of(device.block_size), "{step:?}");
                    assert!(*requested <= device.region_size, "{step:?}");
                    device.requested = *requested;
                }
                PlanStep::SetBalloon { target } => {
                    let balloon = state.balloon.as_mut().unwrap();
                    assert!(*target <= balloon.max_target, "{step:?}");
                    balloon.target = *target;
                }
            }
        }
        state
    }

    /// Plans, checks that the plan really reaches the target, and returns its steps.
    fn steps(state: &MemoryState, target: u64, node: Option<u32>) -> Vec<PlanStep> {
        let plan = plan(state, target, node).unwrap();
        assert_eq!(plan.target_total, target);
        assert_eq!(apply(state, &plan).requested_total(), target, "{plan:?}");
        plan.steps
    }

    #[test]
    fn virtio_mem_only_grows_and_shrinks_by_plugging() {
        let state = virtio_mem_only(0);
        assert_eq!(state.requested_total(), GIB);
        assert_eq!(steps(&state, 3 * GIB, None), vec![vmem("vmem0", 2 * GIB)]);
        let grown = virtio_mem_only(2 * GIB);
        assert_eq!(steps(&grown, GIB, None), vec![vmem("vmem0", 0)]);
        assert_eq!(
            steps(&grown, 1536 * MIB, None),
            vec![vmem("vmem0", 512 * MIB)]
        );
        assert_eq!(steps(&grown, 3 * GIB, None), vec![]);
        assert_eq!(state.reachable(None), Ok((GIB, 5 * GIB)));
    }

    #[test]
    fn virtio_mem_only_cannot_go_below_boot() {
        let error = plan(&virtio_mem_only(2 * GIB), 512 * MIB, None).unwrap_err();
        assert!(matches!(
            error,
            PlanError::BelowMinimum { minimum, .. } if minimum == GIB
        ));
        assert!(error.to_string().contains("no balloon"), "{error}");
    }

    #[test]
    fn balloon_only_inflates_and_deflates() {
        let state = balloon_only(0);
        assert_eq!(
            steps(&state, 1536 * MIB, None),
            vec![set_balloon(512 * MIB)]
        );
        let inflated = balloon_only(512 * MIB);
        assert_eq!(inflated.requested_total(), 1536 * MIB);
        assert_eq!(steps(&inflated, 2 * GIB, None), vec![set_balloon(0)]);
        assert_eq!(steps(&inflated, 1536 * MIB, None), vec![]);
        assert_eq!(state.reachable(None), Ok((0, 2 * GIB)));
        assert!(matches!(
            plan(&state, 3 * GIB, None),
            Err(PlanError::AboveMaximum { maximum, why, .. })
                if maximum == 2 * GIB && why.contains("no virtio-mem")
        ));
    }

    #[test]
    fn growing_deflates_the_balloon_before_plugging() {
        let state = both(0, 512 * MIB);
        assert_eq!(state.requested_total(), 512 * MIB);
        // Within the balloon: deflating is enough.
        assert_eq!(steps(&state, 768 * MIB, None), vec![set_balloon(256 * MIB)]);
        // Past it: deflate first, then plug.
        assert_eq!(
            steps(&state, 3 * GIB, None),
            vec![set_balloon(0), vmem("vmem0", 2 * GIB)]
        );
    }

    #[test]
    fn shrinking_unplugs_before_inflating_the_balloon() {
        let state = both(2 * GIB, 0);
        // Above boot: unplugging is enough.
        assert_eq!(steps(&state, 2 * GIB, None), vec![vmem("vmem0", GIB)]);
        // Below boot: unplug everything, then the balloon takes the rest.
        assert_eq!(
            steps(&state, 512 * MIB, None),
            vec![vmem("vmem0", 0), set_balloon(512 * MIB)]
        );
        assert_eq!(state.reachable(None), Ok((0, 5 * GIB)));
    }

    #[test]
    fn a_second_target_replaces_the_first() {
        // Planned from the state the first plan left, whatever the guest has done so far.
        let state = both(0, 0);
        let first = apply(&state, &plan(&state, 4 * GIB, None).unwrap());
        assert_eq!(steps(&first, 2 * GIB, None), vec![vmem("vmem0", GIB)]);
        assert_eq!(
            plan(&first, 2 * GIB, None).unwrap(),
            plan(&both(3 * GIB, 0), 2 * GIB, None).unwrap()
        );
    }

    #[test]
    fn two_nodes_spread_evenly_within_each_region() {
        let state = two_nodes();
        assert_eq!(
            steps(&state, 4 * GIB, None),
            vec![vmem("vmem0", GIB), vmem("vmem1", GIB)]
        );
        // vmem1's region holds 2 GiB; the rest goes to vmem0.
        assert_eq!(
            steps(&state, 7 * GIB, None),
            vec![vmem("vmem0", 3 * GIB), vmem("vmem1", 2 * GIB)]
        );
        // An odd number of blocks: one device gets the extra block.
        let plan = steps(&state, 2 * GIB + 6 * MIB, None);
        assert_eq!(plan, vec![vmem("vmem0", 2 * MIB), vmem("vmem1", 4 * MIB)]);
        assert_eq!(
            state.requested_by_node(),
            vec![(0, GIB), (1, GIB)],
            "boot RAM per node"
        );
        assert_eq!(state.reachable(None), Ok((0, 8 * GIB)));
    }

    #[test]
    fn a_node_target_changes_only_that_nodes_devices() {
        let mut state = two_nodes();
        state.virtio_mem[1].requested = GIB;
        state.virtio_mem[1].plugged = GIB;
        assert_eq!(
            steps(&state, 5 * GIB, Some(0)),
            vec![vmem("vmem0", 2 * GIB)]
        );
        assert_eq!(
            steps(&state, 3 * GIB + 512 * MIB, Some(1)),
            vec![vmem("vmem1", 1536 * MIB)]
        );
        // The node's device cannot give more than it has; the balloon does the rest.
        assert_eq!(
            steps(&state, GIB, Some(1)),
            vec![vmem("vmem1", 0), set_balloon(GIB)]
        );
        // Node 1's region is the limit, whatever node 0 could take.
        assert_eq!(state.reachable(Some(1)), Ok((0, 4 * GIB)));
        assert!(matches!(
            plan(&state, 5 * GIB, Some(1)),
            Err(PlanError::AboveMaximum { maximum, .. }) if maximum == 4 * GIB
        ));
        assert_eq!(
            plan(&state, 4 * GIB, Some(2)),
            Err(PlanError::NoVirtioMemOnNode { node: 2 })
        );
        assert_eq!(state.requested_by_node(), vec![(0, GIB), (1, 2 * GIB)]);
    }

    #[test]
    fn limits_are_named() {
        let state = both(0, 0);
        let above = plan(&state, 6 * GIB, None).unwrap_err();
        assert_eq!(
            above,
            PlanError::AboveMaximum {
                target: 6 * GIB,
                maximum: 5 * GIB,
                why: "every virtio-mem region fully plugged",
            }
        );
        assert!(
            above.to_string().contains("maximum reachable 5368709120"),
            "{above}"
        );
        let mut small_balloon = both(0, 0);
        small_balloon.balloon = balloon(0, 256 * MIB);
        let below = plan(&small_balloon, 512 * MIB, None).unwrap_err();
        assert!(matches!(
            below,
            PlanError::BelowMinimum { minimum, .. } if minimum == 768 * MIB
        ));
        assert!(below.to_string().contains("minimum reachable"), "{below}");
        // Exactly at the limits is fine.
        assert_eq!(steps(&state, 5 * GIB, None), vec![vmem("vmem0", 4 * GIB)]);
        assert_eq!(steps(&state, 0, None), vec![set_balloon(GIB)]);
    }

    #[test]
    fn dimms_count_in_the_total_and_the_limits() {
        let mut state = both(0, 0);
        state.dimms = vec![DimmState {
            id: "dimm0".to_owned(),
            size: GIB,
            node: 0,
        }];
        assert_eq!(state.requested_total(), 2 * GIB);
        assert_eq!(state.reachable(None), Ok((GIB, 6 * GIB)));
        assert_eq!(steps(&state, 3 * GIB, None), vec![vmem("vmem0", GIB)]);
        assert_eq!(
            steps(&state, 1536 * MIB, None),
            vec![set_balloon(512 * MIB)]
        );
        assert_eq!(state.requested_by_node(), vec![(0, 2 * GIB)]);
    }

    #[test]
    fn unaligned_targets_name_the_granularity_and_neighbours() {
        let state = virtio_mem_only(0);
        let error = plan(&state, GIB + MIB, None).unwrap_err();
        assert_eq!(
            error,
            PlanError::NotAligned {
                target: GIB + MIB,
                granularity: 2 * MIB,
                unit: "virtio-mem block size",
                below: GIB,
                above: GIB + 2 * MIB,
            }
        );
        assert!(error.to_string().contains("block size"), "{error}");
        let error = plan(&both(0, 0), GIB - 100, None).unwrap_err();
        assert_eq!(
            error,
            PlanError::NotAligned {
                target: GIB - 100,
                granularity: BALLOON_GRANULARITY,
                unit: "balloon page size",
                below: GIB - 4096,
                above: GIB,
            }
        );
    }

    #[test]
    fn mixed_block_sizes_place_what_each_device_can_take() {
        let mut state = two_nodes();
        state.virtio_mem[1].block_size = 128 * MIB;
        // 130 MiB: a 128 MiB block on vmem1 and one 2 MiB block on vmem0.
        let planned = steps(&state, 2 * GIB + 130 * MIB, None);
        assert_eq!(
            planned,
            vec![vmem("vmem0", 2 * MIB), vmem("vmem1", 128 * MIB)]
        );
        // 64 MiB fits vmem0's blocks only.
        assert_eq!(
            steps(&state, 2 * GIB + 64 * MIB, None),
            vec![vmem("vmem0", 64 * MIB)]
        );
    }

    #[test]
    fn steps_grow_before_they_shrink() {
        // Unevenly plugged devices are rebalanced: the one that grows goes first.
        let mut state = two_nodes();
        state.virtio_mem[0].requested = 2 * GIB;
        assert_eq!(
            steps(&state, 4 * GIB, None),
            vec![vmem("vmem1", GIB), vmem("vmem0", GIB)]
        );
    }

    #[test]
    fn totals_follow_the_policy_formula() {
        let mut state = both(2 * GIB, 256 * MIB);
        state.virtio_mem[0].plugged = GIB;
        state.balloon = Some(BalloonState {
            target: 256 * MIB,
            actual: 128 * MIB,
            max_target: GIB,
        });
        assert_eq!(state.requested_total(), 3 * GIB - 256 * MIB);
        assert_eq!(state.actual_total(), 2 * GIB - 128 * MIB);
    }
}
