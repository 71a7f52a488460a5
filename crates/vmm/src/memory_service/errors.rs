//! Why a memory request was refused, typed; the API edge maps [`RequestErrorKind`] to an HTTP
//! status and nothing in the memory service knows HTTP.

use crate::config::format_size;
use crate::devices::virtio::balloon::BalloonError;
use crate::devices::virtio::mem::VirtioMemError;
use crate::memory::DimmMemoryError;

/// What kind of refusal an error is, for the API edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// The request names something this VM does not have.
    NotFound,
    /// The request's values are wrong.
    Invalid,
    /// The request collides with the VM's state (slots full, a removal under way).
    Conflict,
    /// The host cannot supply what was asked now.
    Unavailable,
    /// The VMM itself is inconsistent.
    Internal,
}

fn size_or_overflow(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "more than 16 EiB".to_owned(), format_size)
}

/// A refused memory request.
#[derive(Debug, thiserror::Error)]
pub enum MemoryRequestError {
    /// No balloon was configured.
    #[error("this VM has no balloon (start it with --balloon)")]
    NoBalloon,
    /// A balloon target above the boot RAM it can take from.
    #[error("balloon target {target} bytes is more than the boot memory ({boot} bytes)")]
    BalloonAboveBoot {
        /// The target asked for.
        target: u64,
        /// Boot RAM.
        boot: u64,
    },
    /// The balloon refused the target.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// No virtio-mem device has this id.
    #[error("no virtio-mem device with id {0}")]
    UnknownVirtioMem(String),
    /// The virtio-mem device refused the size.
    #[error("cannot resize {id}")]
    VirtioMem {
        /// The device.
        id: String,
        /// Why.
        #[source]
        source: VirtioMemError,
    },
    /// The VM was started without DIMM slots.
    #[error("this VM has no DIMM slots (start it with --memory size=...,slots=N,maxmem=SIZE)")]
    NoDimmSlots,
    /// A DIMM size that is not whole memory blocks.
    #[error(
        "DIMM size {0} bytes is not a non-zero multiple of 128 MiB (the guest's memory block)"
    )]
    DimmSize(u64),
    /// A DIMM beyond maxmem.
    #[error(
        "a {} DIMM would bring the guest to {}, above maxmem {} ({} in DIMMs now)",
        format_size(*.size),
        size_or_overflow(*.total),
        format_size(*.maxmem),
        size_or_overflow(*.plugged)
    )]
    AboveMaxmem {
        /// The DIMM asked for.
        size: u64,
        /// Boot RAM + DIMMs + this one, unless that overflows.
        total: Option<u64>,
        /// The limit.
        maxmem: u64,
        /// DIMMs now, unless that overflows.
        plugged: Option<u64>,
    },
    /// A NUMA node the VM does not have.
    #[error("NUMA node {node} does not exist (the VM has {nodes})")]
    UnknownNode {
        /// Asked for.
        node: u32,
        /// Nodes of the VM.
        nodes: u32,
    },
    /// Every slot holds a DIMM.
    #[error("all {0} DIMM slots are in use")]
    SlotsFull(u32),
    /// The id is taken.
    #[error("a DIMM with id {0} exists")]
    DuplicateDimm(String),
    /// The DIMM area has no gap large enough.
    #[error(
        "no contiguous {} of room left in the DIMM area (remove a DIMM first)",
        format_size(*.0)
    )]
    NoRoom(u64),
    /// The host could not map or register the DIMM's memory.
    #[error("the host cannot supply a {} DIMM", format_size(*.size))]
    HostMemory {
        /// The DIMM asked for.
        size: u64,
        /// Why.
        #[source]
        source: DimmMemoryError,
    },
    /// No DIMM has this id.
    #[error("no DIMM with id {0}")]
    UnknownDimm(String),
    /// The DIMM is already being ejected.
    #[error("DIMM {0} is already being ejected")]
    AlreadyEjecting(String),
    /// The planner cannot reach the size asked for (the message names the limit).
    #[error("cannot resize the guest's memory")]
    Plan(#[from] crate::memory::planner::PlanError),
    /// A step of a plan failed after `done` steps were asked of the guest.
    #[error("memory plan step {step} failed after {done} step(s) were done")]
    PlanStep {
        /// The step.
        step: String,
        /// Steps already carried out.
        done: usize,
        /// Why it failed.
        #[source]
        source: Box<MemoryRequestError>,
    },
    /// A memory policy this VM cannot follow.
    #[error(transparent)]
    Policy(crate::config::ConfigError),
    /// Slots were configured but the controller is missing.
    #[error("the DIMM controller is missing")]
    NoDimmController,
}

impl MemoryRequestError {
    /// What kind of refusal this is.
    pub fn kind(&self) -> RequestErrorKind {
        use MemoryRequestError as E;
        match self {
            E::NoBalloon | E::UnknownVirtioMem(_) | E::NoDimmSlots | E::UnknownDimm(_) => {
                RequestErrorKind::NotFound
            }
            E::BalloonAboveBoot { .. }
            | E::Balloon(_)
            | E::VirtioMem { .. }
            | E::DimmSize(_)
            | E::AboveMaxmem { .. }
            | E::UnknownNode { .. }
            | E::Plan(_)
            | E::Policy(_) => RequestErrorKind::Invalid,
            E::SlotsFull(_) | E::DuplicateDimm(_) | E::NoRoom(_) | E::AlreadyEjecting(_) => {
                RequestErrorKind::Conflict
            }
            E::HostMemory { .. } => RequestErrorKind::Unavailable,
            // A plan's DIMM can fail for the host's reasons (no memory for it, no contiguous
            // room left in the DIMM area): those keep their kind; the rest is the VMM's fault.
            E::PlanStep { source, .. } => match source.kind() {
                kind @ (RequestErrorKind::Unavailable | RequestErrorKind::Conflict) => kind,
                _ => RequestErrorKind::Internal,
            },
            E::NoDimmController => RequestErrorKind::Internal,
        }
    }
}
