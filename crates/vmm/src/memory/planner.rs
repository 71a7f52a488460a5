//! The memory planner: from the VM's memory state and a target total, the steps that get
//! the guest there.
//!
//! It is a pure function ([`plan`]) so that every policy decision can be unit-tested without
//! a VM; the memory service gathers a [`MemoryState`], plans, and carries the steps out.
//!
//! # Policy
//!
//! The guest-visible total is `boot + Σ virtio-mem requested + Σ DIMMs − balloon target`
//! (a DIMM the guest was asked to eject no longer counts: that request cannot be taken
//! back). A target is reached by changing what is *in scope* (the virtio-mem devices and
//! DIMMs of the node asked for, else all of them), the balloon, and by adding at most one
//! DIMM; what is out of scope keeps its size. With `D = target − fixed`, where `fixed` is
//! boot RAM plus everything out of scope, and the DIMMs in scope taken in the order they
//! were added:
//!
//! 1. **virtio-mem, keeping as many DIMMs as possible.** The longest run of DIMMs (oldest
//!    first) whose sizes `K` leave `0 ≤ D − K ≤` the virtio-mem room is kept, the devices in
//!    scope get `D − K` spread as evenly as their regions and block sizes allow, and the
//!    newer DIMMs are ejected. Shrinking therefore unplugs virtio-mem first and ejects DIMMs
//!    only for what virtio-mem cannot give back; growing past the DIMMs plugs virtio-mem.
//! 2. **Then a DIMM, where virtio-mem has no room.** When `D` is more than every DIMM and
//!    every region fully plugged, one DIMM is added for the excess, rounded up to the
//!    guest's 128 MiB memory block (virtio-mem takes what the rounding leaves), on the node
//!    asked for (node 0 when none is), in the lowest free slot, within `maxmem`.
//! 3. **The balloon for what neither can do.** Below `fixed` (below the boot size when
//!    everything is in scope) every DIMM in scope is ejected, virtio-mem unplugs everything
//!    and the balloon takes `−D`. Between two DIMM sizes that virtio-mem cannot bridge, the
//!    DIMM is kept and the balloon takes the difference.
//!
//! The plan depends on the target and on which DIMMs exist, never on how far the guest got:
//! a second request simply replaces the first. A DIMM already added stays added (its memory
//! is mapped and the guest told); a smaller second target ejects it again like any other
//! DIMM, newest first.
//!
//! Steps are ordered so that the guest never has to give memory back before it receives
//! what replaces it, and so that DIMM ejects, which need the guest's cooperation per DIMM
//! and may be refused, come last: a deflate, virtio-mem devices that grow, a DIMM add,
//! virtio-mem devices that shrink, an inflate, then the ejects.

use std::collections::BTreeMap;

/// Granularity of balloon targets: the balloon works in 4 KiB pages.
pub const BALLOON_GRANULARITY: u64 = 4096;

/// Granularity of DIMM sizes: the guest's memory block (see `config::DIMM_ALIGN`).
pub const DIMM_GRANULARITY: u64 = crate::config::DIMM_ALIGN;

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

/// Where a DIMM is in its life, as far as totals go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimmPhase {
    /// Added on the host; the guest has not confirmed it yet. Counts in what is asked, not
    /// yet in what the guest has.
    Inserting,
    /// The guest uses it.
    Active,
    /// The guest was asked to eject it: it no longer counts in what is asked, but the guest
    /// has it until it calls `_EJ0`. The request cannot be taken back.
    Ejecting,
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
    /// Where it is in its life.
    pub phase: DimmPhase,
}

impl DimmState {
    /// Whether the DIMM is part of what the guest is asked to have.
    fn kept(&self) -> bool {
        self.phase != DimmPhase::Ejecting
    }

    /// Whether the guest has the DIMM's memory now.
    fn in_guest(&self) -> bool {
        self.phase != DimmPhase::Inserting
    }
}

/// What DIMM slots and `maxmem` still allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimmSlots {
    /// Slots without a DIMM, lowest first (a DIMM being ejected holds its slot until the
    /// guest lets it go).
    pub free: Vec<u32>,
    /// The limit on boot RAM plus DIMMs.
    pub maxmem: u64,
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
    /// DIMMs, in the order they were added.
    pub dimms: Vec<DimmState>,
    /// DIMM slots, if the VM has any (`--memory slots=N,maxmem=SIZE`).
    pub dimm_slots: Option<DimmSlots>,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonState>,
}

/// What a plan may change: the virtio-mem devices and the DIMMs of the node asked for (all
/// of them without a node), and where a new DIMM goes.
#[derive(Debug)]
struct Scope {
    /// Indices into `virtio_mem`.
    devices: Vec<usize>,
    /// Indices into `dimms` of the DIMMs a plan may keep or eject, oldest first.
    dimms: Vec<usize>,
    /// The node a new DIMM goes to.
    node: u32,
}

impl MemoryState {
    /// Boot RAM in all.
    pub fn boot_bytes(&self) -> u64 {
        self.boot_by_node.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Bytes of the DIMMs the guest is asked to keep.
    fn kept_dimm_bytes(&self) -> u64 {
        self.dimms.iter().filter(|d| d.kept()).map(|d| d.size).sum()
    }

    /// What the guest is asked to have: boot + Σ virtio-mem requested + Σ DIMMs not being
    /// ejected − balloon target.
    pub fn requested_total(&self) -> u64 {
        let requested: u64 = self.virtio_mem.iter().map(|d| d.requested).sum();
        let balloon = self.balloon.map_or(0, |b| b.target);
        (self.boot_bytes() + requested + self.kept_dimm_bytes()).saturating_sub(balloon)
    }

    /// What the guest has now: boot + Σ virtio-mem plugged + Σ DIMMs it has taken and not
    /// yet ejected − balloon actual.
    pub fn actual_total(&self) -> u64 {
        let plugged: u64 = self.virtio_mem.iter().map(|d| d.plugged).sum();
        let dimms: u64 = self
            .dimms
            .iter()
            .filter(|d| d.in_guest())
            .map(|d| d.size)
            .sum();
        let balloon = self.balloon.map_or(0, |b| b.actual);
        (self.boot_bytes() + plugged + dimms).saturating_sub(balloon)
    }

    /// Requested memory per NUMA node (boot RAM, virtio-mem requested, DIMMs not being
    /// ejected), by node. The balloon is not counted: the guest picks the pages it gives
    /// back from any node.
    pub fn requested_by_node(&self) -> Vec<(u32, u64)> {
        let mut nodes: BTreeMap<u32, u64> = BTreeMap::new();
        for &(node, bytes) in &self.boot_by_node {
            *nodes.entry(node).or_default() += bytes;
        }
        for device in &self.virtio_mem {
            *nodes.entry(device.node).or_default() += device.requested;
        }
        for dimm in self.dimms.iter().filter(|d| d.kept()) {
            *nodes.entry(dimm.node).or_default() += dimm.size;
        }
        nodes.into_iter().collect()
    }

    /// The smallest and largest totals [`plan`] can reach (with `node`: changing only that
    /// node's virtio-mem devices and DIMMs), or why it cannot plan for `node` at all. The
    /// largest counts the DIMM a free slot can still take under `maxmem`; the smallest
    /// assumes the guest ejects the DIMMs in scope.
    pub fn reachable(&self, node: Option<u32>) -> Result<(u64, u64), PlanError> {
        let scope = self.scope(node)?;
        let fixed = self.fixed_bytes(&scope);
        let kept: u64 = scope.dimms.iter().map(|&i| self.dimms[i].size).sum();
        let max_balloon = self.balloon.map_or(0, |b| b.max_target);
        Ok((
            fixed.saturating_sub(max_balloon),
            fixed + kept + self.virtio_mem_room(&scope) + self.addable_dimm_bytes(),
        ))
    }

    /// What the devices in scope can plug in all.
    fn virtio_mem_room(&self, scope: &Scope) -> u64 {
        scope
            .devices
            .iter()
            .map(|&i| self.virtio_mem[i].region_size)
            .sum()
    }

    /// The largest DIMM that can still be added: a free slot and `maxmem` room, whole
    /// memory blocks. A DIMM being ejected holds its slot and its part of `maxmem` until
    /// the guest lets it go.
    fn addable_dimm_bytes(&self) -> u64 {
        let Some(slots) = &self.dimm_slots else {
            return 0;
        };
        if slots.free.is_empty() {
            return 0;
        }
        let used = self.boot_bytes() + self.dimms.iter().map(|d| d.size).sum::<u64>();
        slots.maxmem.saturating_sub(used) / DIMM_GRANULARITY * DIMM_GRANULARITY
    }

    /// What a plan for `node` may change.
    fn scope(&self, node: Option<u32>) -> Result<Scope, PlanError> {
        if let Some(node) = node {
            if !self.boot_by_node.iter().any(|&(n, _)| n == node) {
                return Err(PlanError::UnknownNode {
                    node,
                    nodes: self.boot_by_node.len() as u32,
                });
            }
        }
        let in_scope = |n: u32| node.is_none_or(|node| n == node);
        let scope = Scope {
            devices: (0..self.virtio_mem.len())
                .filter(|&i| in_scope(self.virtio_mem[i].node))
                .collect(),
            dimms: (0..self.dimms.len())
                .filter(|&i| self.dimms[i].kept() && in_scope(self.dimms[i].node))
                .collect(),
            node: node.unwrap_or(0),
        };
        match node {
            Some(node)
                if scope.devices.is_empty()
                    && scope.dimms.is_empty()
                    && self.addable_dimm_bytes() == 0 =>
            {
                Err(PlanError::NothingOnNode { node })
            }
            _ => Ok(scope),
        }
    }

    /// The part of the total a plan over `scope` leaves alone: boot RAM, and the requested
    /// sizes of the devices and DIMMs out of scope.
    fn fixed_bytes(&self, scope: &Scope) -> u64 {
        let devices: u64 = (0..self.virtio_mem.len())
            .filter(|i| !scope.devices.contains(i))
            .map(|i| self.virtio_mem[i].requested)
            .sum();
        let dimms: u64 = (0..self.dimms.len())
            .filter(|i| self.dimms[*i].kept() && !scope.dimms.contains(i))
            .map(|i| self.dimms[i].size)
            .sum();
        self.boot_bytes() + devices + dimms
    }

    /// The id a DIMM the planner adds in `slot` gets: `dimm<slot>` (what `PUT /vm/dimms`
    /// gives without an id) unless a DIMM has that id already.
    fn new_dimm_id(&self, slot: u32) -> String {
        let taken = |id: &str| self.dimms.iter().any(|d| d.id == id);
        let mut id = format!("dimm{slot}");
        let mut n = 1;
        while taken(&id) {
            id = format!("dimm{slot}-{n}");
            n += 1;
        }
        id
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
    /// Hot-add a DIMM (in the lowest free slot).
    AddDimm {
        /// Its id.
        id: String,
        /// Size in bytes, whole memory blocks.
        size: u64,
        /// Guest NUMA node.
        node: u32,
    },
    /// Ask the guest to eject a DIMM.
    EjectDimm {
        /// Its id.
        id: String,
        /// Its size in bytes (what the total loses once the guest lets it go).
        size: u64,
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
        /// What sets the step ("virtio-mem block size", "balloon page size" or "DIMM size").
        unit: &'static str,
        /// Nearest reachable total below.
        below: u64,
        /// Nearest reachable total above.
        above: u64,
    },
    /// The target falls between the DIMMs: virtio-mem cannot make up the difference and
    /// the balloon cannot take it.
    #[error(
        "{target} bytes falls between what whole DIMMs and virtio-mem can make \
         ({why}); the nearest reachable sizes are {below} and {above} bytes"
    )]
    BetweenDimms {
        /// The target asked for.
        target: u64,
        /// Nearest reachable total below.
        below: u64,
        /// Nearest reachable total above.
        above: u64,
        /// Why the balloon cannot bridge the gap.
        why: &'static str,
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
    /// Larger than plugging every region completely and filling the DIMM slots can get.
    #[error("{target} bytes is above the maximum reachable {maximum} bytes ({why})")]
    AboveMaximum {
        /// The target asked for.
        target: u64,
        /// The largest reachable total.
        maximum: u64,
        /// What sets the maximum.
        why: &'static str,
    },
    /// A node the VM does not have.
    #[error("NUMA node {node} does not exist (the VM has {nodes})")]
    UnknownNode {
        /// The node asked for.
        node: u32,
        /// Nodes of the VM.
        nodes: u32,
    },
    /// A node was asked for and nothing on it can change.
    #[error("NUMA node {node} has no virtio-mem device, no DIMM and no free DIMM slot to resize")]
    NothingOnNode {
        /// The node asked for.
        node: u32,
    },
}

/// What sets the largest reachable total, in words.
fn maximum_limit(state: &MemoryState, scope: &Scope) -> &'static str {
    let virtio_mem = !scope.devices.is_empty();
    match (&state.dimm_slots, virtio_mem) {
        (None, false) => "boot memory and DIMMs: the VM has no virtio-mem device and no DIMM slots",
        (None, true) => "every virtio-mem region fully plugged; the VM has no DIMM slots",
        (Some(slots), _) if slots.free.is_empty() => {
            "every virtio-mem region fully plugged and every DIMM slot in use"
        }
        (Some(_), _) => "every virtio-mem region fully plugged and DIMMs up to maxmem",
    }
}

/// How the in-scope part `wanted` of a target is made up.
#[derive(Debug)]
struct Makeup {
    /// How many of the DIMMs in scope are kept (the oldest ones).
    kept_dimms: usize,
    /// Bytes the devices in scope get between them.
    virtio_mem: u64,
    /// Size of the DIMM to add (0: none).
    new_dimm: u64,
    /// The balloon's target.
    balloon: u64,
}

/// Plans how to bring the guest's total memory to `target` (with `node`: changing only the
/// virtio-mem devices and DIMMs of that node, besides the balloon, and adding a DIMM there).
/// See the module documentation for the policy.
pub fn plan(state: &MemoryState, target: u64, node: Option<u32>) -> Result<MemoryPlan, PlanError> {
    let scope = state.scope(node)?;
    let fixed = state.fixed_bytes(&scope);
    let (minimum, maximum) = state.reachable(node)?;
    if target > maximum {
        return Err(PlanError::AboveMaximum {
            target,
            maximum,
            why: maximum_limit(state, &scope),
        });
    }
    if target < minimum {
        return Err(PlanError::BelowMinimum {
            target,
            minimum,
            why: if state.balloon.is_some() {
                "virtio-mem fully unplugged, DIMMs ejected and the balloon at its largest, \
                 the boot memory"
            } else {
                "virtio-mem fully unplugged and DIMMs ejected; the VM has no balloon to go \
                 below that"
            },
        });
    }
    let makeup = make_up(state, &scope, fixed, target)?;

    let mut requested: Vec<u64> = state.virtio_mem.iter().map(|d| d.requested).collect();
    for &i in &scope.devices {
        requested[i] = 0;
    }
    let leftover = spread(state, &scope.devices, makeup.virtio_mem, &mut requested);
    if leftover != 0 {
        let granularity = scope
            .devices
            .iter()
            .map(|&i| state.virtio_mem[i].block_size)
            .min()
            .unwrap_or(1)
            .max(1);
        let below = target - leftover;
        return Err(PlanError::NotAligned {
            target,
            granularity,
            unit: "virtio-mem block size",
            below,
            above: (below + granularity).min(maximum),
        });
    }

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
    let add = (makeup.new_dimm > 0).then(|| {
        // `addable_dimm_bytes` was not zero, so there is a free slot.
        let slot = state
            .dimm_slots
            .as_ref()
            .and_then(|s| s.free.first().copied())
            .unwrap_or(0);
        PlanStep::AddDimm {
            id: state.new_dimm_id(slot),
            size: makeup.new_dimm,
            node: scope.node,
        }
    });
    // Newest first: the oldest DIMMs, those present at boot, are the last to go.
    let ejects = scope.dimms[makeup.kept_dimms..].iter().rev().map(|&i| {
        let dimm = &state.dimms[i];
        PlanStep::EjectDimm {
            id: dimm.id.clone(),
            size: dimm.size,
        }
    });
    let (deflate, inflate) = match state.balloon.map(|b| b.target) {
        Some(current) if makeup.balloon < current => (
            Some(PlanStep::SetBalloon {
                target: makeup.balloon,
            }),
            None,
        ),
        Some(current) if makeup.balloon > current => (
            None,
            Some(PlanStep::SetBalloon {
                target: makeup.balloon,
            }),
        ),
        _ => (None, None),
    };
    let mut steps = Vec::new();
    steps.extend(deflate);
    steps.extend(growing);
    steps.extend(add);
    steps.extend(shrinking);
    steps.extend(inflate);
    steps.extend(ejects);
    Ok(MemoryPlan {
        target_total: target,
        steps,
    })
}

/// Chooses the DIMMs to keep, the virtio-mem bytes, a DIMM to add and the balloon's target
/// for `target` (between the reachable limits). See the module documentation.
fn make_up(
    state: &MemoryState,
    scope: &Scope,
    fixed: u64,
    target: u64,
) -> Result<Makeup, PlanError> {
    let all_dimms = scope.dimms.len();
    if target < fixed {
        // Below what the planner cannot change: everything in scope goes, and the balloon
        // takes the rest (`reachable` checked it can).
        let balloon = fixed - target;
        if !balloon.is_multiple_of(BALLOON_GRANULARITY) {
            let above = fixed - balloon / BALLOON_GRANULARITY * BALLOON_GRANULARITY;
            return Err(PlanError::NotAligned {
                target,
                granularity: BALLOON_GRANULARITY,
                unit: "balloon page size",
                below: above - BALLOON_GRANULARITY,
                above,
            });
        }
        return Ok(Makeup {
            kept_dimms: 0,
            virtio_mem: 0,
            new_dimm: 0,
            balloon,
        });
    }
    let wanted = target - fixed;
    let room = state.virtio_mem_room(scope);
    // kept[k]: bytes in the k oldest DIMMs in scope.
    let kept: Vec<u64> = std::iter::once(0)
        .chain(scope.dimms.iter().scan(0, |sum, &i| {
            *sum += state.dimms[i].size;
            Some(*sum)
        }))
        .collect();
    // 1. virtio-mem makes up what the most DIMMs that fit leave.
    if let Some(k) = (0..=all_dimms)
        .rev()
        .find(|&k| kept[k] <= wanted && wanted - kept[k] <= room)
    {
        return Ok(Makeup {
            kept_dimms: k,
            virtio_mem: wanted - kept[k],
            new_dimm: 0,
            balloon: 0,
        });
    }
    // 2. More than every DIMM and every region: a DIMM for the excess (`reachable` checked
    // that a slot and maxmem allow it).
    let beyond = wanted - kept[all_dimms].min(wanted);
    if beyond > room {
        let excess = beyond - room;
        let new_dimm = excess.next_multiple_of(DIMM_GRANULARITY);
        if new_dimm > beyond {
            // virtio-mem has less than a memory block of room to absorb the rounding.
            let above = fixed + kept[all_dimms] + new_dimm;
            return Err(PlanError::NotAligned {
                target,
                granularity: DIMM_GRANULARITY,
                unit: "DIMM size, the guest's memory block",
                // One memory block less of DIMM, every region full.
                below: above - DIMM_GRANULARITY + room,
                above,
            });
        }
        return Ok(Makeup {
            kept_dimms: all_dimms,
            virtio_mem: beyond - new_dimm,
            new_dimm,
            balloon: 0,
        });
    }
    // 3. Between two DIMM sizes virtio-mem cannot bridge: keep the DIMM that brings the
    // total just above the target, and the balloon takes the difference.
    let k = (0..=all_dimms)
        .find(|&k| kept[k] > wanted)
        .unwrap_or(all_dimms);
    let balloon = kept[k] - wanted;
    let below = fixed + kept[k.saturating_sub(1)] + room;
    let max_balloon = state.balloon.map_or(0, |b| b.max_target);
    if balloon > max_balloon {
        return Err(PlanError::BetweenDimms {
            target,
            below,
            above: fixed + kept[k] - max_balloon,
            why: if state.balloon.is_some() {
                "more than the balloon can take"
            } else {
                "the VM has no balloon"
            },
        });
    }
    if !balloon.is_multiple_of(BALLOON_GRANULARITY) {
        // A smaller balloon, whole pages: the total lands just above the target.
        let above = target + balloon % BALLOON_GRANULARITY;
        return Err(PlanError::NotAligned {
            target,
            granularity: BALLOON_GRANULARITY,
            unit: "balloon page size",
            below: above - BALLOON_GRANULARITY,
            above,
        });
    }
    Ok(Makeup {
        kept_dimms: k,
        virtio_mem: 0,
        new_dimm: 0,
        balloon,
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

    fn dimm(id: &str, size: u64, node: u32) -> DimmState {
        DimmState {
            id: id.to_owned(),
            size,
            node,
            phase: DimmPhase::Active,
        }
    }

    fn add(id: &str, size: u64, node: u32) -> PlanStep {
        PlanStep::AddDimm {
            id: id.to_owned(),
            size,
            node,
        }
    }

    fn eject(id: &str, size: u64) -> PlanStep {
        PlanStep::EjectDimm {
            id: id.to_owned(),
            size,
        }
    }

    /// `slots` DIMM slots, the first `used` taken, under `maxmem`.
    fn slots(slots: u32, used: u32, maxmem: u64) -> Option<DimmSlots> {
        Some(DimmSlots {
            free: (used..slots).collect(),
            maxmem,
        })
    }

    /// 1 GiB boot RAM, `slots=2,maxmem=4G`, the given DIMMs, nothing else.
    fn dimms_only(dimms: Vec<DimmState>) -> MemoryState {
        MemoryState {
            boot_by_node: vec![(0, GIB)],
            dimm_slots: slots(2, dimms.len() as u32, 4 * GIB),
            dimms,
            ..Default::default()
        }
    }

    /// 1 GiB boot RAM, a small (512 MiB) virtio-mem device with `requested` plugged,
    /// `slots=2,maxmem=4G`, the given DIMMs and a balloon: the real-guest scenario's VM.
    fn small_virtio_mem_and_slots(requested: u64, dimms: Vec<DimmState>) -> MemoryState {
        MemoryState {
            boot_by_node: vec![(0, GIB)],
            virtio_mem: vec![device("vmem0", 0, 512 * MIB, requested)],
            dimm_slots: slots(2, dimms.len() as u32, 4 * GIB),
            dimms,
            balloon: balloon(0, GIB),
        }
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
                PlanStep::AddDimm { id, size, node } => {
                    // What `MemoryService::add_dimm` checks.
                    assert!(
                        *size > 0 && size.is_multiple_of(DIMM_GRANULARITY),
                        "{step:?}"
                    );
                    assert!(*size <= state.addable_dimm_bytes(), "{step:?}");
                    assert!(state.dimms.iter().all(|d| &d.id != id), "{step:?}");
                    assert!(state.boot_by_node.iter().any(|(n, _)| n == node));
                    state.dimm_slots.as_mut().unwrap().free.remove(0);
                    state.dimms.push(DimmState {
                        id: id.clone(),
                        size: *size,
                        node: *node,
                        phase: DimmPhase::Inserting,
                    });
                }
                PlanStep::EjectDimm { id, size } => {
                    let dimm = state.dimms.iter_mut().find(|d| &d.id == id).unwrap();
                    assert_eq!(dimm.size, *size);
                    assert_ne!(dimm.phase, DimmPhase::Ejecting, "ejected twice: {step:?}");
                    dimm.phase = DimmPhase::Ejecting;
                }
            }
        }
        state
    }

    /// What the guest has once it has done everything it was asked (DIMMs ejected).
    fn settle(state: &MemoryState) -> MemoryState {
        let mut state = state.clone();
        for device in &mut state.virtio_mem {
            device.plugged = device.requested;
        }
        for dimm in &mut state.dimms {
            if dimm.phase == DimmPhase::Inserting {
                dimm.phase = DimmPhase::Active;
            }
        }
        state.dimms.retain(|d| d.phase != DimmPhase::Ejecting);
        if let Some(balloon) = &mut state.balloon {
            balloon.actual = balloon.target;
        }
        state
    }

    /// Plans, checks that the plan really reaches the target, and returns its steps.
    fn steps(state: &MemoryState, target: u64, node: Option<u32>) -> Vec<PlanStep> {
        let plan = plan(state, target, node).unwrap();
        assert_eq!(plan.target_total, target);
        let applied = apply(state, &plan);
        assert_eq!(applied.requested_total(), target, "{plan:?}");
        assert_eq!(settle(&applied).actual_total(), target, "{plan:?}");
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
            Err(PlanError::UnknownNode { node: 2, nodes: 2 })
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
                why: "every virtio-mem region fully plugged; the VM has no DIMM slots",
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
        state.dimms = vec![dimm("dimm0", GIB, 0)];
        assert_eq!(state.requested_total(), 2 * GIB);
        // The smallest total has the DIMM ejected; without slots none can be added.
        assert_eq!(state.reachable(None), Ok((0, 6 * GIB)));
        assert_eq!(steps(&state, 3 * GIB, None), vec![vmem("vmem0", GIB)]);
        // Between boot and boot + DIMM: virtio-mem makes up what the DIMM's eject leaves.
        assert_eq!(
            steps(&state, 1536 * MIB, None),
            vec![vmem("vmem0", 512 * MIB), eject("dimm0", GIB)]
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

    #[test]
    fn dimms_only_grow_by_adding_and_shrink_by_ejecting_newest_first() {
        let state = dimms_only(vec![]);
        // Boot RAM plus a DIMM of all that maxmem leaves.
        assert_eq!(state.reachable(None), Ok((GIB, 4 * GIB)));
        assert_eq!(steps(&state, 2 * GIB, None), vec![add("dimm0", GIB, 0)]);
        assert_eq!(
            steps(&state, 2560 * MIB, None),
            vec![add("dimm0", 1536 * MIB, 0)]
        );
        assert_eq!(steps(&state, 4 * GIB, None), vec![add("dimm0", 3 * GIB, 0)]);
        // Whole memory blocks only.
        assert_eq!(
            plan(&state, GIB + 100 * MIB, None),
            Err(PlanError::NotAligned {
                target: GIB + 100 * MIB,
                granularity: DIMM_GRANULARITY,
                unit: "DIMM size, the guest's memory block",
                below: GIB,
                above: GIB + 128 * MIB,
            })
        );

        let two = dimms_only(vec![dimm("dimm0", GIB, 0), dimm("dimm1", 512 * MIB, 0)]);
        assert_eq!(two.requested_total(), 2560 * MIB);
        assert_eq!(steps(&two, 2 * GIB, None), vec![eject("dimm1", 512 * MIB)]);
        assert_eq!(
            steps(&two, GIB, None),
            vec![eject("dimm1", 512 * MIB), eject("dimm0", GIB)]
        );
        // Both slots are in use: nothing more can be added.
        assert_eq!(two.reachable(None), Ok((GIB, 2560 * MIB)));
        assert!(matches!(
            plan(&two, 3 * GIB, None),
            Err(PlanError::AboveMaximum { why, .. }) if why.contains("every DIMM slot in use")
        ));
        // 1.5 GiB would need the older DIMM halved; there is no balloon to make up for it.
        let error = plan(&two, 1536 * MIB, None).unwrap_err();
        assert_eq!(
            error,
            PlanError::BetweenDimms {
                target: 1536 * MIB,
                below: GIB,
                above: 2 * GIB,
                why: "the VM has no balloon",
            }
        );
        assert!(error.to_string().contains("nearest reachable"), "{error}");
    }

    #[test]
    fn between_dimms_the_balloon_makes_up_the_difference() {
        let mut state = dimms_only(vec![dimm("dimm0", GIB, 0), dimm("dimm1", 512 * MIB, 0)]);
        state.balloon = balloon(0, GIB);
        assert_eq!(
            steps(&state, 1536 * MIB, None),
            vec![set_balloon(512 * MIB), eject("dimm1", 512 * MIB)]
        );
    }

    #[test]
    fn growing_past_virtio_mem_room_adds_a_dimm_for_the_excess() {
        let state = small_virtio_mem_and_slots(0, vec![]);
        // 1 GiB boot + 512 MiB of virtio-mem + 3 GiB of DIMM under maxmem.
        assert_eq!(state.reachable(None), Ok((0, 4608 * MIB)));
        // Within the region: virtio-mem alone.
        assert_eq!(
            steps(&state, 1280 * MIB, None),
            vec![vmem("vmem0", 256 * MIB)]
        );
        // Past it: the region full first, then a DIMM for the rest.
        assert_eq!(
            steps(&state, 2560 * MIB, None),
            vec![vmem("vmem0", 512 * MIB), add("dimm0", GIB, 0)]
        );
        // An excess that is not whole memory blocks: the DIMM is rounded up and virtio-mem
        // takes less.
        assert_eq!(
            steps(&state, 2 * GIB + 100 * MIB, None),
            vec![vmem("vmem0", 484 * MIB), add("dimm0", 640 * MIB, 0)]
        );
        assert_eq!(
            steps(&state, 4608 * MIB, None),
            vec![vmem("vmem0", 512 * MIB), add("dimm0", 3 * GIB, 0)]
        );
        assert!(matches!(
            plan(&state, 5 * GIB, None),
            Err(PlanError::AboveMaximum { maximum, why, .. })
                if maximum == 4608 * MIB && why.contains("DIMMs up to maxmem")
        ));
    }

    #[test]
    fn growing_with_a_dimm_present_keeps_it_and_fills_virtio_mem_first() {
        let state = small_virtio_mem_and_slots(0, vec![dimm("dimm0", GIB, 0)]);
        assert_eq!(
            steps(&state, 2 * GIB + 512 * MIB, None),
            vec![vmem("vmem0", 512 * MIB)]
        );
        // The second slot takes what is beyond.
        assert_eq!(
            steps(&state, 3 * GIB, None),
            vec![vmem("vmem0", 512 * MIB), add("dimm1", 512 * MIB, 0)]
        );
        // maxmem: 4 GiB − 1 GiB boot − 1 GiB DIMM.
        assert_eq!(state.reachable(None), Ok((0, 4608 * MIB)));
    }

    #[test]
    fn shrinking_unplugs_virtio_mem_first_and_ejects_dimms_last() {
        let grown = small_virtio_mem_and_slots(512 * MIB, vec![dimm("dimm0", GIB, 0)]);
        assert_eq!(grown.requested_total(), 2560 * MIB);
        // What virtio-mem can give back, it gives: the DIMM stays.
        assert_eq!(steps(&grown, 2 * GIB, None), vec![vmem("vmem0", 0)]);
        // Below what the DIMM alone makes: virtio-mem makes up the rest and the DIMM goes,
        // after the unplug.
        assert_eq!(
            steps(&grown, 1280 * MIB, None),
            vec![vmem("vmem0", 256 * MIB), eject("dimm0", GIB)]
        );
        assert_eq!(
            steps(&grown, GIB, None),
            vec![vmem("vmem0", 0), eject("dimm0", GIB)]
        );
        // Below boot: the balloon takes the rest, and the eject is still last.
        assert_eq!(
            steps(&grown, 512 * MIB, None),
            vec![
                vmem("vmem0", 0),
                set_balloon(512 * MIB),
                eject("dimm0", GIB)
            ]
        );
        // A shrink that needs more virtio-mem: it grows before the DIMM goes.
        let empty = small_virtio_mem_and_slots(0, vec![dimm("dimm0", GIB, 0)]);
        assert_eq!(
            steps(&empty, 1536 * MIB, None),
            vec![vmem("vmem0", 512 * MIB), eject("dimm0", GIB)]
        );
    }

    #[test]
    fn a_dimm_being_ejected_is_gone_for_the_planner() {
        let mut state = small_virtio_mem_and_slots(0, vec![dimm("dimm0", GIB, 0)]);
        state.dimms[0].phase = DimmPhase::Ejecting;
        // The eject cannot be taken back: it no longer counts, and is not ejected again.
        assert_eq!(state.requested_total(), GIB);
        assert_eq!(state.actual_total(), 2 * GIB, "the guest has it until _EJ0");
        assert_eq!(steps(&state, GIB, None), vec![]);
        // It still holds its slot and its part of maxmem: a new DIMM takes the other slot.
        assert_eq!(
            steps(&state, 2560 * MIB, None),
            vec![vmem("vmem0", 512 * MIB), add("dimm1", GIB, 0)]
        );
        assert_eq!(state.reachable(None), Ok((0, 3584 * MIB)));
    }

    #[test]
    fn a_second_target_after_a_dimm_add_ejects_it_again() {
        // The first target added a DIMM (sent: mapped and announced, it cannot be taken
        // back); the second is planned from there and ejects it like any other.
        let state = small_virtio_mem_and_slots(0, vec![]);
        let first = apply(&state, &plan(&state, 3 * GIB, None).unwrap());
        assert_eq!(first.dimms[0].phase, DimmPhase::Inserting);
        assert_eq!(
            first.actual_total(),
            GIB,
            "nothing confirmed by the guest yet"
        );
        assert_eq!(
            steps(&first, 1280 * MIB, None),
            vec![vmem("vmem0", 256 * MIB), eject("dimm0", 1536 * MIB)]
        );
        // A second target that still needs the DIMM keeps it.
        assert_eq!(steps(&first, 2560 * MIB, None), vec![vmem("vmem0", 0)]);
        // Between the DIMM and what virtio-mem can make without it: the DIMM stays and the
        // balloon takes the difference.
        assert_eq!(
            steps(&first, 2 * GIB, None),
            vec![vmem("vmem0", 0), set_balloon(512 * MIB)]
        );
    }

    #[test]
    fn a_node_target_adds_and_ejects_dimms_on_that_node_only() {
        let mut state = two_nodes();
        state.dimm_slots = slots(2, 1, 6 * GIB);
        state.dimms = vec![dimm("dimm0", GIB, 0)];
        state.virtio_mem[1].region_size = 512 * MIB;
        // Node 1: 1 GiB boot + 512 MiB virtio-mem; node 0's DIMM and device are fixed.
        assert_eq!(state.requested_total(), 3 * GIB);
        assert_eq!(
            steps(&state, 4 * GIB, Some(1)),
            vec![vmem("vmem1", 512 * MIB), add("dimm1", 512 * MIB, 1)]
        );
        // Node 1 has no DIMM to eject: below its virtio-mem, the balloon.
        assert_eq!(steps(&state, 2 * GIB, Some(1)), vec![set_balloon(GIB)]);
        // Node 0's DIMM goes for a node-0 target only.
        assert_eq!(steps(&state, 2 * GIB, Some(0)), vec![eject("dimm0", GIB)]);
        // maxmem 6 GiB − 2 GiB boot − 1 GiB DIMM leaves 3 GiB for a DIMM on either node.
        assert_eq!(
            state.reachable(Some(1)),
            Ok((GIB, 3 * GIB + 512 * MIB + 3 * GIB))
        );
        // Without a node, a new DIMM goes to node 0.
        assert_eq!(
            steps(&state, 9 * GIB, None),
            vec![
                vmem("vmem0", 4 * GIB),
                vmem("vmem1", 512 * MIB),
                add("dimm1", 1536 * MIB, 0)
            ]
        );
    }

    #[test]
    fn a_node_with_only_dimm_slots_can_be_planned() {
        let mut state = dimms_only(vec![]);
        state.boot_by_node = vec![(0, 512 * MIB), (1, 512 * MIB)];
        assert_eq!(steps(&state, 2 * GIB, Some(1)), vec![add("dimm0", GIB, 1)]);
        let mut full = state.clone();
        full.dimm_slots = slots(2, 2, 4 * GIB);
        assert_eq!(
            plan(&full, 2 * GIB, Some(1)),
            Err(PlanError::NothingOnNode { node: 1 })
        );
    }

    #[test]
    fn new_dimm_ids_do_not_collide() {
        let mut state = dimms_only(vec![DimmState {
            id: "dimm0".to_owned(),
            ..dimm("x", GIB, 0)
        }]);
        // A user's DIMM called dimm0 sits in slot 1, so slot 0 is free.
        state.dimm_slots = Some(DimmSlots {
            free: vec![0],
            maxmem: 4 * GIB,
        });
        assert_eq!(steps(&state, 3 * GIB, None), vec![add("dimm0-1", GIB, 0)]);
    }
}
