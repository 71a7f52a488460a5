//! Per-disk counters (kept in the device, so several disks never mix their numbers).

/// How many requests of each type the driver sent (whatever the answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// IN.
    pub read: u64,
    /// OUT.
    pub write: u64,
    /// FLUSH.
    pub flush: u64,
    /// GET_ID.
    pub get_id: u64,
    /// DISCARD.
    pub discard: u64,
    /// WRITE_ZEROES.
    pub write_zeroes: u64,
    /// Any other type (answered UNSUPP).
    pub unsupported: u64,
}

/// Counters of one virtio-blk device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMetrics {
    /// Decoded requests, by type.
    pub requests: RequestCounts,
    /// Bytes read from the disk into guest buffers.
    pub bytes_read: u64,
    /// Bytes written to the disk from guest buffers.
    pub bytes_written: u64,
    /// Bytes the guest discarded.
    pub bytes_discarded: u64,
    /// Bytes the guest zeroed with WRITE_ZEROES.
    pub bytes_zeroed: u64,
    /// Requests answered VIRTIO_BLK_S_IOERR (bad range, host I/O error, read-only disk,
    /// inaccessible buffer, malformed chain with a status byte).
    pub io_errors: u64,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
    /// Chains that were not a well-formed request (counted also in `io_errors` when they had
    /// a status byte to answer in).
    pub malformed: u64,
    /// Chains returned with no status written (no usable status byte, or it became
    /// inaccessible).
    pub dropped: u64,
    /// Host I/O failures (`pread`, `pwrite`, `fdatasync`, `fallocate`).
    pub host_errors: u64,
    /// Queue passes stopped because the rings lie outside accessible memory.
    pub bad_rings: u64,
}
