//! Per-device counters (kept in the device, so several networks never mix their numbers).

/// Counters of one virtio-net device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (frames only, without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the host that never reached the guest: larger than the guest's buffer,
    /// shorter than a header, or a buffer that stopped being accessible mid-copy.
    pub rx_dropped: u64,
    /// Frames the guest sent that went to the host.
    pub tx_frames: u64,
    /// Their bytes (frames only, without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames the guest sent that did not go out: larger than 64 KiB, refused by the host
    /// (its queue full, or the frame invalid there), or with a buffer that was not
    /// accessible.
    pub tx_dropped: u64,
    /// Chains that could not carry a frame: wrong descriptor direction, indirect, shorter
    /// than the header, looping, or in memory the guest does not own. Counted once per
    /// chain, returned to the driver empty.
    pub malformed: u64,
    /// Host read or write failures other than "would block".
    pub backend_errors: u64,
    /// Queue passes stopped because the rings lie outside accessible memory.
    pub bad_rings: u64,
}
