//! The virtio-mem device: config space, feature negotiation, and request handling.
//!
//! The device holds only the guest-visible sizes; which blocks are plugged is the memory
//! manager's state (see `memory::hotplug`), consulted and changed through it.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::metrics::VirtioMemMetrics;
use super::request::{encode_response, parse_chain, Request, ResponseType, RESPONSE_SIZE};
use crate::arch::x86_64::layout::GuestRange;
use crate::devices::virtio::chain::{
    overlaps, ring_ranges, run_pass, write_buffer, Completion, DescriptorTable, PASS_BUDGET,
};
use crate::devices::virtio::{
    read_config_space, ActivateError, Signal, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::{BlockRangeState, HotplugRegionId, MemoryManager, PlugError};

/// Virtio device ID of virtio-mem.
pub const VIRTIO_ID_MEM: u32 = 24;
/// Largest queue the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 128;
/// `node_id` is an ACPI proximity domain.
pub const VIRTIO_MEM_F_ACPI_PXM: u64 = 1 << 0;
/// The driver must not read unplugged memory (ours is PROT_NONE, so it must not).
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
/// Size of the config space.
pub const CONFIG_SIZE: usize = 56;
/// Slack added on top of requested_size when growing usable_region_size, so Linux can pick
/// whole memory blocks (QEMU uses the same on x86-64).
const USABLE_SLACK: u64 = 256 << 20;
/// Linux's memory block size on x86-64 VMs: usable_region_size is kept a multiple of it,
/// because the driver only uses memory blocks that lie fully inside it.
const LINUX_MEMORY_BLOCK: u64 = 128 << 20;

/// STATE response values.
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;

/// How a virtio-mem device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioMemConfig {
    /// Name for logs and the API.
    pub id: String,
    /// Guest-physical region; must equal the hotplug region's range.
    pub region: GuestRange,
    /// Block size; must equal the hotplug region's block size.
    pub block_size: u64,
    /// ACPI proximity domain, if the region belongs to a NUMA node.
    pub node: Option<u32>,
    /// Initial requested size.
    pub requested_size: u64,
    /// The memory manager's hotplug region behind the device.
    pub hotplug: HotplugRegionId,
}

/// What the host API sees of a device.
#[derive(Clone, Debug)]
pub struct VirtioMemStatus {
    /// Device name.
    pub id: String,
    /// Proximity domain.
    pub node: Option<u32>,
    /// Guest-physical region.
    pub region: GuestRange,
    /// Block size.
    pub block_size: u64,
    /// Bytes the guest has plugged.
    pub plugged_size: u64,
    /// Bytes the host asks the guest to plug.
    pub requested_size: u64,
    /// Part of the region the guest may currently use.
    pub usable_region_size: u64,
    /// Why the last BUSY answer was given, until the next successful plug or unplug.
    pub last_busy_reason: Option<Arc<PlugError>>,
}

/// Errors of the device's host API.
#[derive(Debug, thiserror::Error)]
pub enum VirtioMemError {
    /// The configuration is inconsistent.
    #[error("virtio-mem {id}: {reason}")]
    InvalidConfig {
        /// Device name.
        id: String,
        /// What is wrong.
        reason: ConfigProblem,
    },
    /// A requested size the device cannot offer.
    #[error("requested size {requested:#x} must be a multiple of {block_size:#x} and at most {region_size:#x}")]
    RequestedSize {
        /// The value asked for.
        requested: u64,
        /// The block size.
        block_size: u64,
        /// The region size.
        region_size: u64,
    },
    /// Unplugging on system reset failed.
    #[error("virtio-mem reset could not unplug memory")]
    Unplug(#[source] PlugError),
}

/// A virtio-mem device.
#[derive(Debug)]
pub struct VirtioMem {
    config: VirtioMemConfig,
    acked_features: u64,
    usable_region_size: u64,
    plugged_size: u64,
    queue: Option<Queue>,
    metrics: VirtioMemMetrics,
    last_busy_reason: Option<Arc<PlugError>>,
}

/// What is wrong with a virtio-mem configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// The block size cannot be used.
    #[error("block size {0:#x} is not a power of two >= 4 KiB")]
    BlockSize(u64),
    /// The region is empty or not block aligned.
    #[error("region {start:#x}+{size:#x} is not block aligned")]
    Unaligned {
        /// Start.
        start: u64,
        /// Size.
        size: u64,
    },
    /// The region runs past the top of the address space.
    #[error("region wraps")]
    Wraps,
    /// The node id does not fit the config field.
    #[error("node id does not fit the 16-bit config field")]
    NodeTooLarge,
    /// The device names a hotplug region the memory manager does not have, or another one.
    #[error("hotplug region {0:?} does not match")]
    RegionMismatch(HotplugRegionId),
}

fn validate(config: &VirtioMemConfig) -> Result<(), ConfigProblem> {
    let bs = config.block_size;
    if !bs.is_power_of_two() || bs < 4096 {
        return Err(ConfigProblem::BlockSize(bs));
    }
    let r = config.region;
    if r.size == 0 || !r.start.is_multiple_of(bs) || !r.size.is_multiple_of(bs) {
        return Err(ConfigProblem::Unaligned {
            start: r.start,
            size: r.size,
        });
    }
    if r.start.checked_add(r.size).is_none() {
        return Err(ConfigProblem::Wraps);
    }
    if config.node.is_some_and(|n| n > u32::from(u16::MAX)) {
        return Err(ConfigProblem::NodeTooLarge);
    }
    Ok(())
}

impl VirtioMem {
    /// Creates a device; nothing is plugged and the queue is not running.
    pub fn new(config: VirtioMemConfig) -> Result<Self, VirtioMemError> {
        validate(&config).map_err(|reason| VirtioMemError::InvalidConfig {
            id: config.id.clone(),
            reason,
        })?;
        let requested = config.requested_size;
        let mut device = VirtioMem {
            config,
            acked_features: 0,
            usable_region_size: 0,
            plugged_size: 0,
            queue: None,
            metrics: VirtioMemMetrics::default(),
            last_busy_reason: None,
        };
        device.config.requested_size = 0;
        device.set_requested_size(requested)?;
        Ok(device)
    }

    /// Checks the device against the memory manager's hotplug region it names.
    pub fn check_region(&self, memory: &MemoryManager) -> Result<(), VirtioMemError> {
        let info = memory.hotplug_region(self.config.hotplug);
        match info {
            Some(i) if i.range == self.config.region && i.block_size == self.config.block_size => {
                Ok(())
            }
            _ => Err(VirtioMemError::InvalidConfig {
                id: self.config.id.clone(),
                reason: ConfigProblem::RegionMismatch(self.config.hotplug),
            }),
        }
    }

    /// usable_region_size for `requested`: requested plus slack, in whole Linux memory blocks.
    fn usable_for(&self, requested: u64) -> u64 {
        if requested == 0 {
            return 0;
        }
        let align = self.config.block_size.max(LINUX_MEMORY_BLOCK);
        let wanted = requested.saturating_add(USABLE_SLACK);
        let aligned = wanted.checked_next_multiple_of(align).unwrap_or(u64::MAX);
        aligned.min(self.config.region.size)
    }

    /// Asks the guest to reach `bytes` of plugged memory. Returns the interrupt to raise.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<Signal, VirtioMemError> {
        let region_size = self.config.region.size;
        if !bytes.is_multiple_of(self.config.block_size) || bytes > region_size {
            return Err(VirtioMemError::RequestedSize {
                requested: bytes,
                block_size: self.config.block_size,
                region_size,
            });
        }
        self.config.requested_size = bytes;
        // Grow only: the guest may be using memory up to the current usable size.
        self.usable_region_size = self.usable_region_size.max(self.usable_for(bytes));
        Ok(Signal {
            config: true,
            ..Signal::default()
        })
    }

    /// The device as the API shows it.
    pub fn status(&self) -> VirtioMemStatus {
        VirtioMemStatus {
            id: self.config.id.clone(),
            node: self.config.node,
            region: self.config.region,
            block_size: self.config.block_size,
            plugged_size: self.plugged_size,
            requested_size: self.config.requested_size,
            usable_region_size: self.usable_region_size,
            last_busy_reason: self.last_busy_reason.clone(),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> &VirtioMemMetrics {
        &self.metrics
    }

    /// System reset (guest reboot): everything is unplugged and usable_region_size shrinks
    /// back, as the spec asks at "initial start and system reset". Unlike a device reset this
    /// does touch memory.
    pub fn system_reset(&mut self, memory: &mut MemoryManager) -> Result<(), VirtioMemError> {
        self.reset();
        memory
            .unplug_all(self.config.hotplug)
            .map_err(VirtioMemError::Unplug)?;
        self.plugged_size = 0;
        self.usable_region_size = self.usable_for(self.config.requested_size);
        Ok(())
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        let node = self.config.node.unwrap_or(0) as u16;
        b[0x00..0x08].copy_from_slice(&self.config.block_size.to_le_bytes());
        b[0x08..0x0a].copy_from_slice(&node.to_le_bytes());
        b[0x10..0x18].copy_from_slice(&self.config.region.start.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&self.config.region.size.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&self.usable_region_size.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&self.plugged_size.to_le_bytes());
        b[0x30..0x38].copy_from_slice(&self.config.requested_size.to_le_bytes());
        b
    }

    /// Validates a block range against the usable part of the region; returns the first block
    /// index and the block count, or `None` (the request deserves ERROR).
    fn block_range(&self, addr: u64, nb_blocks: u16) -> Option<(u64, u64)> {
        let bs = self.config.block_size;
        let start = self.config.region.start;
        if nb_blocks == 0 || !addr.is_multiple_of(bs) || addr < start {
            return None;
        }
        let size = u64::from(nb_blocks).checked_mul(bs)?;
        let end = addr.checked_add(size)?;
        (end <= start + self.usable_region_size).then_some(((addr - start) / bs, nb_blocks.into()))
    }

    fn busy(&mut self, e: PlugError) -> (ResponseType, u16) {
        crate::guest_warn!("virtio-mem {}: answering BUSY: {e}", self.config.id);
        self.last_busy_reason = Some(Arc::new(e));
        (ResponseType::Busy, 0)
    }

    fn sync_plugged(&mut self, memory: &MemoryManager) {
        if let Ok(bytes) = memory.plugged_bytes(self.config.hotplug) {
            self.plugged_size = bytes;
        }
    }

    fn plug(&mut self, memory: &mut MemoryManager, addr: u64, nb: u16) -> (ResponseType, u16) {
        let Some((first, count)) = self.block_range(addr, nb) else {
            return (ResponseType::Error, 0);
        };
        let size = count * self.config.block_size;
        if self.plugged_size + size > self.config.requested_size {
            return (ResponseType::Nack, 0);
        }
        let id = self.config.hotplug;
        match memory.block_state(id, first, count) {
            Ok(BlockRangeState::Unplugged) => {}
            Ok(_) => return (ResponseType::Error, 0),
            Err(e) => return self.busy(e),
        }
        let started = Instant::now();
        let result = memory.plug(id, first, count);
        let elapsed = started.elapsed();
        self.metrics.plug_time += elapsed;
        self.metrics.plug_seconds.observe(elapsed);
        self.sync_plugged(memory);
        match result {
            Ok(()) => {
                self.metrics.bytes_plugged += size;
                self.last_busy_reason = None;
                (ResponseType::Ack, 0)
            }
            Err(e) => self.busy(e),
        }
    }

    fn unplug(&mut self, memory: &mut MemoryManager, addr: u64, nb: u16) -> (ResponseType, u16) {
        let Some((first, count)) = self.block_range(addr, nb) else {
            return (ResponseType::Error, 0);
        };
        let id = self.config.hotplug;
        match memory.block_state(id, first, count) {
            Ok(BlockRangeState::Plugged) => {}
            Ok(_) => return (ResponseType::Error, 0),
            Err(e) => return self.busy(e),
        }
        let started = Instant::now();
        let result = memory.unplug(id, first, count);
        let elapsed = started.elapsed();
        self.metrics.unplug_time += elapsed;
        self.metrics.unplug_seconds.observe(elapsed);
        let before = self.plugged_size;
        self.sync_plugged(memory);
        self.metrics.bytes_unplugged += before - self.plugged_size;
        match result {
            Ok(()) => {
                self.last_busy_reason = None;
                (ResponseType::Ack, 0)
            }
            Err(e) => self.busy(e),
        }
    }

    fn unplug_all(&mut self, memory: &mut MemoryManager) -> (ResponseType, u16) {
        let started = Instant::now();
        let result = memory.unplug_all(self.config.hotplug);
        let elapsed = started.elapsed();
        self.metrics.unplug_time += elapsed;
        self.metrics.unplug_seconds.observe(elapsed);
        let before = self.plugged_size;
        self.sync_plugged(memory);
        self.metrics.bytes_unplugged += before.saturating_sub(self.plugged_size);
        match result {
            Ok(()) => {
                self.plugged_size = 0;
                // The spec lets the device shrink here without a notification.
                self.usable_region_size = self.usable_for(self.config.requested_size);
                self.last_busy_reason = None;
                (ResponseType::Ack, 0)
            }
            Err(e) => self.busy(e),
        }
    }

    fn state(&self, memory: &MemoryManager, addr: u64, nb: u16) -> (ResponseType, u16) {
        let Some((first, count)) = self.block_range(addr, nb) else {
            return (ResponseType::Error, 0);
        };
        match memory.block_state(self.config.hotplug, first, count) {
            Ok(BlockRangeState::Plugged) => (ResponseType::Ack, STATE_PLUGGED),
            Ok(BlockRangeState::Unplugged) => (ResponseType::Ack, STATE_UNPLUGGED),
            Ok(BlockRangeState::Mixed) => (ResponseType::Ack, STATE_MIXED),
            // A VMM misconfiguration, not the driver's fault: do not break the driver.
            Err(_) => (ResponseType::Busy, 0),
        }
    }

    /// Handles one well-formed request.
    fn handle(&mut self, memory: &mut MemoryManager, request: Request) -> (ResponseType, u16) {
        let answer = match request {
            Request::Plug { addr, nb_blocks } => self.plug(memory, addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => self.unplug(memory, addr, nb_blocks),
            Request::UnplugAll => self.unplug_all(memory),
            Request::State { addr, nb_blocks } => self.state(memory, addr, nb_blocks),
        };
        self.metrics.record(request.kind(), answer.0);
        if answer.0 == ResponseType::Error {
            crate::guest_warn!("virtio-mem {}: ERROR for {request:?}", self.config.id);
        }
        answer
    }

    /// The guest-physical range `request` would close (make `PROT_NONE`), if any.
    fn range_closed_by(&self, request: &Request) -> Option<(u64, u64)> {
        match *request {
            Request::Unplug { addr, nb_blocks } => {
                Some((addr, u64::from(nb_blocks) * self.config.block_size))
            }
            Request::UnplugAll => Some((self.config.region.start, self.config.region.size)),
            Request::Plug { .. } | Request::State { .. } => None,
        }
    }

    /// Parses and answers one chain; returns the used length. `rings` are the queue's ring
    /// ranges: a request may not close the memory they, or its own response buffer, lie in.
    fn process_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        memory: &mut MemoryManager,
        table: DescriptorTable,
        head: u16,
        rings: &[(u64, u64)],
    ) -> u32 {
        let parsed = parse_chain(mem, memory, table, head);
        let response = match parsed.request {
            Ok(request) => {
                let closed = self.range_closed_by(&request);
                let in_use = parsed
                    .response
                    .map(|addr| (addr, RESPONSE_SIZE))
                    .into_iter()
                    .chain(rings.iter().copied());
                let closes_own = closed.is_some_and(|(start, len)| {
                    in_use
                        .clone()
                        .any(|(addr, n)| overlaps(start, len, addr, n))
                });
                if closes_own {
                    // Not done: the unplug would close the response buffer or the rings before
                    // the device writes them. The spec's answer to an invalid request.
                    self.metrics.self_closing += 1;
                    self.metrics.record(request.kind(), ResponseType::Error);
                    crate::guest_warn!(
                        "virtio-mem {}: ERROR for {request:?}: it would unplug the memory \
                         holding its own response or the queue",
                        self.config.id
                    );
                    (ResponseType::Error, 0)
                } else {
                    self.handle(memory, request)
                }
            }
            Err(e) => {
                self.metrics.malformed += 1;
                crate::guest_warn!("virtio-mem {}: malformed request: {e}", self.config.id);
                (ResponseType::Error, 0)
            }
        };
        let Some(addr) = parsed.response else {
            return 0;
        };
        let bytes = encode_response(response.0, response.1);
        // Asked again now: the request just handled may have closed memory.
        match write_buffer(mem, memory, addr, &bytes) {
            Ok(()) => RESPONSE_SIZE as u32,
            Err(_) => 0,
        }
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn features(&self) -> u64 {
        let pxm = if self.config.node.is_some() {
            VIRTIO_MEM_F_ACPI_PXM
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE | pxm
    }

    fn ack_features(&mut self, features: u64) -> bool {
        // Unplugged memory is PROT_NONE here: a driver that may read it would fault. Refuse
        // FEATURES_OK like QEMU does.
        let required = VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
        if features & !self.features() != 0 || features & required != required {
            return false;
        }
        self.acked_features = features;
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            "virtio-mem {}: driver wrote {} bytes of read-only config at {offset:#x}",
            self.config.id,
            data.len()
        );
    }

    fn activate(&mut self, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let [queue]: [Queue; 1] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 1,
                })?;
        self.queue = Some(queue);
        Ok(())
    }

    fn reset(&mut self) {
        // A device reset must not change block state: memory and sizes stay.
        self.queue = None;
        self.acked_features = 0;
    }

    fn process_queue(
        &mut self,
        index: usize,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    ) -> Signal {
        if index != 0 {
            return Signal::default();
        }
        // Taken out so that request handling can borrow the device mutably; put back below.
        let Some(mut queue) = self.queue.take() else {
            return Signal::default();
        };
        let rings = ring_ranges(&queue);
        let pass = run_pass(
            &mut queue,
            guest_memory,
            memory,
            PASS_BUDGET,
            |memory, table, head| {
                Completion::Used(self.process_chain(guest_memory, memory, table, head, &rings))
            },
        );
        if pass.rings_lost {
            self.metrics.bad_rings += 1;
            crate::guest_warn!(
                "virtio-mem {}: queue rings are not in accessible memory",
                self.config.id
            );
        }
        self.queue = Some(queue);
        Signal {
            queue: pass.used,
            more: pass.more,
            needs_reset: pass.rings_lost,
            ..Signal::default()
        }
    }
}
