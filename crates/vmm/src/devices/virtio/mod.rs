//! Virtio: the device trait shared by every virtio device, and the PCI transport.
//!
//! Threading: queue notifications arrive as ioeventfds and are processed on the VMM's control
//! thread, which owns the [`MemoryManager`]; a device asks the manager for every plug, unplug
//! and discard instead of touching host mappings itself.

use vm_memory::GuestMemoryMmap;

pub mod balloon;
pub mod block;
pub mod chain;
pub mod mem;
pub mod msix;
pub mod net;
pub mod transport_pci;
use virtio_queue::Queue;

use crate::memory::MemoryManager;

/// `VIRTIO_F_VERSION_1`: the modern interface (the only one tidevm offers).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors a device reports when the driver starts it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("{got} queues, the device has {want}")]
    QueueCount {
        /// Queues handed over.
        got: usize,
        /// Queues of the device.
        want: usize,
    },
    /// A queue the device cannot work without was not enabled by the driver.
    #[error("the {0} queue is not enabled")]
    QueueNotEnabled(&'static str),
    /// The transport could not build a queue from the driver's registers.
    #[error("queue {index} is invalid")]
    Queue {
        /// The queue.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue's rings are not in memory the guest owns.
    #[error("queue {0} is not in guest RAM")]
    RingsOutsideRam(usize),
}

/// Copies the bytes of `config` at `offset` into `data`, the way every device's configuration
/// space reads: bytes past its end (or at an offset the guest made absurd) read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok());
        *byte = at.and_then(|o| config.get(o).copied()).unwrap_or(0);
    }
}

/// What a device must do after processing a queue or a host request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    /// Raise the interrupt of the processed queue.
    pub queue: bool,
    /// Raise the configuration-change interrupt.
    pub config: bool,
    /// The queue's pass stopped at its budget with work left: process it again after the
    /// control loop's other work.
    pub more: bool,
    /// The device cannot go on (its rings are no longer in accessible memory): set
    /// DEVICE_NEEDS_RESET and tell the driver.
    pub needs_reset: bool,
}

/// A virtio device behind some transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (24 virtio-mem, 5 balloon, 2 block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (its length is the number of queues).
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Features the driver accepted; `false` refuses them (FEATURES_OK is not set).
    fn ack_features(&mut self, features: u64) -> bool;
    /// Reads the device configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes the configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: the queues are ready.
    fn activate(&mut self, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// The driver wrote 0 to the status register. A device reset must not change plugged
    /// memory (virtio-mem: "MUST NOT change block state").
    fn reset(&mut self);
    /// The driver notified queue `index`: process what it made available.
    fn process_queue(
        &mut self,
        index: usize,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    ) -> Signal;
    /// A host descriptor whose readability is work for the device (a network backend with
    /// frames for the guest), and the queue to process when it becomes readable. The
    /// control loop watches it edge-triggered: the device reads it until it would block, or
    /// asks to be run again ([`Signal::more`]).
    fn backend_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
}
