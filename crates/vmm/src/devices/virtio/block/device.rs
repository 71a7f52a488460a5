//! The virtio-blk device: config space, feature negotiation, and request handling.
//!
//! I/O is synchronous, on the VMM's control thread, one request at a time: a request's file
//! I/O finishes before the next chain is popped. That is simple and bounded (a pass handles
//! at most [`PASS_BUDGET`] chains of at most [`super::request::MAX_DATA_BYTES`] each), but a slow disk delays
//! the control loop's other work (API requests, other devices) for as long as the pass runs.
//! Moving I/O off the thread would pay only for disks slow enough to matter; nothing here
//! has measured that yet.
//!
//! Guest memory is only touched through [`read_buffer`] and [`write_buffer`], which ask the
//! memory manager right before each access: a buffer in unplugged (`PROT_NONE`) virtio-mem
//! memory, in an ejected DIMM, or outside RAM makes the request fail with IOERR and is never
//! touched.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::backend::{AlignedBuffer, Disk, RangeOutcome, SECTOR_SIZE};
use super::metrics::BlockMetrics;
use super::request::{
    decode_range, parse_chain, total_len, Piece, Range, Request, RequestType, RANGE_SIZE, SEG_MAX,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use crate::devices::virtio::chain::{
    read_buffer, run_pass, write_buffer, Completion, DescriptorTable, GuestAccess, PASS_BUDGET,
};
use crate::devices::virtio::{ActivateError, Signal, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::MemoryManager;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// The disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// DISCARD is supported.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// WRITE_ZEROES is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Size of the config space up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SIZE: usize = 0x3c;
/// Length of the GET_ID string.
pub const ID_BYTES: usize = 20;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Most segments in one DISCARD or WRITE_ZEROES request.
pub const MAX_RANGE_SEGMENTS: u32 = 32;
/// Discard granularity in sectors (4 KiB, the usual file system block: a hole punched over
/// less than a block zeroes it but frees nothing).
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
/// Bytes moved between the disk and guest memory per host call.
const CHUNK: usize = 256 << 10;

/// Status byte values.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// How a disk is set up.
#[derive(Debug)]
pub struct BlockConfig {
    /// Name for logs, the API, and the GET_ID string (its first 20 bytes).
    pub id: String,
    /// The open disk.
    pub disk: Disk,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct VirtioBlock {
    id: String,
    disk: Disk,
    acked_features: u64,
    queue: Option<Queue>,
    metrics: BlockMetrics,
    /// Where disk data passes between the file and guest memory; aligned for `O_DIRECT`.
    bounce: AlignedBuffer,
}

/// A request's answer: the status byte and the data bytes written to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Answer {
    status: u8,
    written: u32,
}

impl Answer {
    const OK: Answer = Answer {
        status: VIRTIO_BLK_S_OK,
        written: 0,
    };
    const IOERR: Answer = Answer {
        status: VIRTIO_BLK_S_IOERR,
        written: 0,
    };
    const UNSUPP: Answer = Answer {
        status: VIRTIO_BLK_S_UNSUPP,
        written: 0,
    };
}

/// A position in a list of guest pieces, for scattering and gathering disk data.
struct Cursor<'a> {
    pieces: &'a [Piece],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(pieces: &'a [Piece]) -> Self {
        Cursor {
            pieces,
            index: 0,
            offset: 0,
        }
    }

    /// The next run of at most `max` bytes, and moves past it.
    fn next_run(&mut self, max: usize) -> Option<(u64, usize)> {
        let piece = self.pieces.get(self.index)?;
        let left = (piece.len - self.offset) as usize;
        let n = left.min(max);
        let addr = piece.addr + u64::from(self.offset);
        // `n` is at most `left`, itself a u32.
        self.offset += n as u32;
        if self.offset == piece.len {
            self.index += 1;
            self.offset = 0;
        }
        Some((addr, n))
    }
}

/// Copies `data` into the guest at the cursor. If a piece is not accessible now, stops there
/// and returns how many bytes were written before it.
fn scatter(
    mem: &GuestMemoryMmap,
    access: &dyn GuestAccess,
    cursor: &mut Cursor,
    data: &[u8],
) -> Result<(), usize> {
    let mut done = 0;
    while done < data.len() {
        let Some((addr, n)) = cursor.next_run(data.len() - done) else {
            return Err(done);
        };
        if write_buffer(mem, access, addr, &data[done..done + n]).is_err() {
            return Err(done);
        }
        done += n;
    }
    Ok(())
}

/// Fills `out` from the guest at the cursor. `false` if a piece is not accessible now.
fn gather(
    mem: &GuestMemoryMmap,
    access: &dyn GuestAccess,
    cursor: &mut Cursor,
    out: &mut [u8],
) -> bool {
    let mut done = 0;
    while done < out.len() {
        let Some((addr, n)) = cursor.next_run(out.len() - done) else {
            return false;
        };
        if read_buffer(mem, access, addr, &mut out[done..done + n]).is_err() {
            return false;
        }
        done += n;
    }
    true
}

impl VirtioBlock {
    /// Creates a device on an open disk; the queue is not running.
    pub fn new(config: BlockConfig) -> Self {
        VirtioBlock {
            id: config.id,
            disk: config.disk,
            acked_features: 0,
            queue: None,
            metrics: BlockMetrics::default(),
            bounce: AlignedBuffer::new(CHUNK),
        }
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The disk behind the device.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The device's counters.
    pub fn metrics(&self) -> &BlockMetrics {
        &self.metrics
    }

    fn readonly(&self) -> bool {
        self.disk.options().readonly
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        let capacity_sectors = self.disk.capacity() / SECTOR_SIZE;
        // The block size is 512 or 4096: it fits.
        let blk_size = self.disk.block_size() as u32;
        b[0x00..0x08].copy_from_slice(&capacity_sectors.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&SEG_MAX.to_le_bytes());
        b[0x14..0x18].copy_from_slice(&blk_size.to_le_bytes());
        b[0x24..0x28].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        b[0x28..0x2c].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        b[0x30..0x34].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        b[0x34..0x38].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        // write_zeroes_may_unmap: WRITE_ZEROES with UNMAP punches a hole.
        b[0x38] = 1;
        b
    }

    /// The byte offset of `sector` if `len` bytes from there fit the disk (and are aligned
    /// for `O_DIRECT`).
    fn data_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (len.is_multiple_of(SECTOR_SIZE) && self.disk.range_ok(offset, len)).then_some(offset)
    }

    /// Whether every piece is accessible now; asked before any disk I/O so that a request
    /// with a bad buffer fails before it half-happens (the accesses ask again).
    fn all_accessible(access: &dyn GuestAccess, pieces: &[Piece]) -> bool {
        pieces
            .iter()
            .all(|p| access.is_accessible(p.addr, u64::from(p.len)))
    }

    fn host_error(&mut self, what: &str, e: &std::io::Error) -> Answer {
        self.metrics.host_errors += 1;
        tracing::warn!("virtio-blk {}: {what} failed: {e}", self.id);
        Answer::IOERR
    }

    fn read(&mut self, mem: &GuestMemoryMmap, access: &dyn GuestAccess, req: &Request) -> Answer {
        let len = total_len(&req.writable);
        let Some(mut offset) = self.data_range(req.sector, len) else {
            return Answer::IOERR;
        };
        if !req.readable.is_empty() || !Self::all_accessible(access, &req.writable) {
            return Answer::IOERR;
        }
        let mut cursor = Cursor::new(&req.writable);
        let mut written = 0u64;
        while written < len {
            let n = (len - written).min(CHUNK as u64) as usize;
            let chunk = self.bounce.slice_mut(n);
            if let Err(e) = self.disk.read_exact_at(chunk, offset) {
                return self.host_error("read", &e);
            }
            if let Err(partial) = scatter(mem, access, &mut cursor, chunk) {
                return Answer {
                    status: VIRTIO_BLK_S_IOERR,
                    // At most MAX_DATA_BYTES.
                    written: (written + partial as u64) as u32,
                };
            }
            written += n as u64;
            offset += n as u64;
            self.metrics.bytes_read += n as u64;
        }
        Answer {
            status: VIRTIO_BLK_S_OK,
            // At most MAX_DATA_BYTES.
            written: written as u32,
        }
    }

    fn write(&mut self, mem: &GuestMemoryMmap, access: &dyn GuestAccess, req: &Request) -> Answer {
        let len = total_len(&req.readable);
        let Some(mut offset) = self.data_range(req.sector, len) else {
            return Answer::IOERR;
        };
        if self.readonly()
            || !req.writable.is_empty()
            || !Self::all_accessible(access, &req.readable)
        {
            return Answer::IOERR;
        }
        let mut cursor = Cursor::new(&req.readable);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = self.bounce.slice_mut(n);
            if !gather(mem, access, &mut cursor, chunk) {
                return Answer::IOERR;
            }
            if let Err(e) = self.disk.write_all_at(chunk, offset) {
                return self.host_error("write", &e);
            }
            done += n as u64;
            offset += n as u64;
            self.metrics.bytes_written += n as u64;
        }
        self.sync_if_writethrough()
    }

    /// Without FLUSH negotiated the driver expects every write to be durable on completion.
    fn sync_if_writethrough(&mut self) -> Answer {
        if self.acked_features & VIRTIO_BLK_F_FLUSH != 0 {
            return Answer::OK;
        }
        match self.disk.flush() {
            Ok(()) => Answer::OK,
            Err(e) => self.host_error("fdatasync", &e),
        }
    }

    fn flush(&mut self) -> Answer {
        match self.disk.flush() {
            Ok(()) => Answer::OK,
            Err(e) => self.host_error("fdatasync", &e),
        }
    }

    fn get_id(&mut self, mem: &GuestMemoryMmap, access: &dyn GuestAccess, req: &Request) -> Answer {
        let mut id = [0u8; ID_BYTES];
        let bytes = self.id.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        id[..n].copy_from_slice(&bytes[..n]);
        let len = total_len(&req.writable).min(ID_BYTES as u64) as usize;
        match scatter(mem, access, &mut Cursor::new(&req.writable), &id[..len]) {
            Ok(()) => Answer {
                status: VIRTIO_BLK_S_OK,
                written: len as u32,
            },
            Err(partial) => Answer {
                status: VIRTIO_BLK_S_IOERR,
                written: partial as u32,
            },
        }
    }

    /// Reads and checks the segments of a DISCARD or WRITE_ZEROES request.
    fn ranges(
        &self,
        mem: &GuestMemoryMmap,
        access: &dyn GuestAccess,
        req: &Request,
    ) -> Result<Vec<Range>, Answer> {
        let len = total_len(&req.readable);
        let count = len / RANGE_SIZE;
        if len == 0 || !len.is_multiple_of(RANGE_SIZE) || count > u64::from(MAX_RANGE_SEGMENTS) {
            return Err(Answer::IOERR);
        }
        let mut bytes = [0u8; (MAX_RANGE_SEGMENTS as usize) * RANGE_SIZE as usize];
        // `len` is at most 512 here.
        let bytes = &mut bytes[..len as usize];
        if !gather(mem, access, &mut Cursor::new(&req.readable), bytes) {
            return Err(Answer::IOERR);
        }
        Ok(bytes
            .chunks_exact(RANGE_SIZE as usize)
            .map(|c| {
                let mut one = [0u8; RANGE_SIZE as usize];
                one.copy_from_slice(c);
                decode_range(&one)
            })
            .collect())
    }

    /// The byte range of a segment, if it fits the disk (no alignment needed: `fallocate`
    /// takes any range).
    fn segment_range(&self, range: &Range) -> Option<(u64, u64)> {
        let offset = range.sector.checked_mul(SECTOR_SIZE)?;
        let len = u64::from(range.num_sectors) * SECTOR_SIZE;
        let end = offset.checked_add(len)?;
        (range.num_sectors > 0 && range.num_sectors <= MAX_RANGE_SECTORS)
            .then_some(())
            .filter(|()| end <= self.disk.capacity())
            .map(|()| (offset, len))
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        access: &dyn GuestAccess,
        req: &Request,
        zero: bool,
    ) -> Answer {
        if self.readonly() || !req.writable.is_empty() {
            return Answer::IOERR;
        }
        let ranges = match self.ranges(mem, access, req) {
            Ok(ranges) => ranges,
            Err(answer) => return answer,
        };
        // The spec: UNSUPP for DISCARD with the UNMAP flag, and for unknown flags.
        let allowed = if zero {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if ranges.iter().any(|r| r.flags & !allowed != 0) {
            return Answer::UNSUPP;
        }
        let mut checked = Vec::with_capacity(ranges.len());
        for range in &ranges {
            match self.segment_range(range) {
                Some((offset, len)) => checked.push((offset, len, range.flags)),
                None => return Answer::IOERR,
            }
        }
        for (offset, len, flags) in checked {
            let answer = if zero {
                self.zero(offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
            } else {
                self.discard(offset, len)
            };
            if answer != Answer::OK {
                return answer;
            }
        }
        if zero {
            self.sync_if_writethrough()
        } else {
            Answer::OK
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> Answer {
        match self.disk.punch_hole(offset, len) {
            Ok(RangeOutcome::Done) => {
                self.metrics.bytes_discarded += len;
                Answer::OK
            }
            // Discard is a hint: after it the sectors' contents are unspecified, so keeping
            // them is a valid answer.
            Ok(RangeOutcome::Unsupported) => Answer::OK,
            Err(e) => self.host_error("discard (punch hole)", &e),
        }
    }

    fn zero(&mut self, offset: u64, len: u64, unmap: bool) -> Answer {
        let result = if unmap {
            self.disk.punch_hole(offset, len)
        } else {
            self.disk.zero_range(offset, len)
        };
        match result {
            Ok(RangeOutcome::Done) => {}
            Ok(RangeOutcome::Unsupported) => {
                if let Err(e) = self.write_zero_bytes(offset, len) {
                    return self.host_error("write zeroes", &e);
                }
            }
            Err(e) => return self.host_error("write zeroes (fallocate)", &e),
        }
        self.metrics.bytes_zeroed += len;
        Answer::OK
    }

    /// Zeroes a range with plain writes, for file systems without `fallocate` zeroing.
    fn write_zero_bytes(&mut self, mut offset: u64, len: u64) -> std::io::Result<()> {
        let end = offset + len;
        self.bounce.slice_mut(CHUNK).fill(0);
        while offset < end {
            let n = (end - offset).min(CHUNK as u64) as usize;
            self.disk.write_all_at(self.bounce.slice_mut(n), offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn handle(&mut self, mem: &GuestMemoryMmap, access: &dyn GuestAccess, req: &Request) -> Answer {
        let counts = &mut self.metrics.requests;
        match req.ty {
            RequestType::In => counts.read += 1,
            RequestType::Out => counts.write += 1,
            RequestType::Flush => counts.flush += 1,
            RequestType::GetId => counts.get_id += 1,
            RequestType::Discard => counts.discard += 1,
            RequestType::WriteZeroes => counts.write_zeroes += 1,
            RequestType::Unsupported(_) => counts.unsupported += 1,
        }
        match req.ty {
            RequestType::In => self.read(mem, access, req),
            RequestType::Out => self.write(mem, access, req),
            RequestType::Flush => self.flush(),
            RequestType::GetId => self.get_id(mem, access, req),
            RequestType::Discard => self.discard_or_zero(mem, access, req, false),
            RequestType::WriteZeroes => self.discard_or_zero(mem, access, req, true),
            RequestType::Unsupported(_) => Answer::UNSUPP,
        }
    }

    /// Parses and answers one chain; returns the used length (data written plus the status
    /// byte, or 0 when no status could be written).
    pub fn process_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        access: &dyn GuestAccess,
        table: DescriptorTable,
        head: u16,
    ) -> u32 {
        let parsed = parse_chain(mem, access, table, head);
        let answer = match &parsed.request {
            Ok(request) => self.handle(mem, access, request),
            Err(e) => {
                self.metrics.malformed += 1;
                tracing::warn!("virtio-blk {}: malformed request: {e}", self.id);
                Answer::IOERR
            }
        };
        match answer.status {
            VIRTIO_BLK_S_IOERR => self.metrics.io_errors += 1,
            VIRTIO_BLK_S_UNSUPP => self.metrics.unsupported += 1,
            _ => {}
        }
        let Some(status) = parsed.status else {
            self.metrics.dropped += 1;
            return 0;
        };
        // Asked again now, right before the write.
        match write_buffer(mem, access, status, &[answer.status]) {
            Ok(()) => answer.written + 1,
            Err(_) => {
                self.metrics.dropped += 1;
                0
            }
        }
    }

    /// Processes the queue with `access` deciding what memory may be touched (the memory
    /// manager in the VMM; tests pass managers whose memory changes during the pass).
    pub fn process_queue_with<A: GuestAccess>(
        &mut self,
        guest_memory: &GuestMemoryMmap,
        access: &mut A,
    ) -> Signal {
        // Taken out so that request handling can borrow the device mutably; put back below.
        let Some(mut queue) = self.queue.take() else {
            return Signal::default();
        };
        let pass = run_pass(
            &mut queue,
            guest_memory,
            access,
            PASS_BUDGET,
            |access, table, head| {
                Completion::Used(self.process_chain(guest_memory, &*access, table, head))
            },
        );
        if pass.rings_lost {
            self.metrics.bad_rings += 1;
            tracing::warn!(
                "virtio-blk {}: queue rings are not in accessible memory",
                self.id
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

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly() { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | ro
    }

    fn ack_features(&mut self, features: u64) -> bool {
        if features & !self.features() != 0 || features & VIRTIO_F_VERSION_1 == 0 {
            return false;
        }
        self.acked_features = features;
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            *byte = at.and_then(|o| config.get(o).copied()).unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        tracing::warn!(
            "virtio-blk {}: driver wrote {} bytes of read-only config at {offset:#x}",
            self.id,
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
        // Every request completed before its chain was returned: nothing is in flight.
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
        self.process_queue_with(guest_memory, memory)
    }
}
