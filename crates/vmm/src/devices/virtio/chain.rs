//! The split-queue plumbing every virtio device shares: one checked descriptor-chain walker,
//! guest-buffer reads and writes that ask whether the memory is open at the moment of each
//! access, and the queue pass with a per-pass budget.
//!
//! The guest driver controls every byte read here (descriptor table entries, addresses,
//! lengths, flags, ring indexes), so chains are walked by hand instead of with
//! `virtio_queue::DescriptorChain`: that iterator follows indirect tables and reads buffers
//! without asking whether the memory is plugged, and touching an unplugged (`PROT_NONE`) block
//! kills the VMM with SIGSEGV. Accessibility is asked again right before each access, not
//! once per request, because a device's own action (an unplug, an eject) can close memory
//! between two accesses of the same request.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::memory::MemoryManager;

/// Size of a split-queue descriptor.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// How many chains one pass over a queue may complete before the control loop gets its turn
/// (API requests, resets, other devices). A driver that keeps reposting costly chains is
/// served in turns instead of holding the loop.
pub const PASS_BUDGET: usize = 64;

/// Who decides whether the VMM may touch a guest range. [`MemoryManager`] is the real one; the
/// fuzz target and tests use simpler ones.
pub trait GuestAccess {
    /// Whether `[gpa, gpa+len)` can be read and written without faulting, right now.
    fn is_accessible(&self, gpa: u64, len: u64) -> bool;
}

impl GuestAccess for MemoryManager {
    fn is_accessible(&self, gpa: u64, len: u64) -> bool {
        MemoryManager::is_accessible(self, gpa, len)
    }
}

/// Where a queue's descriptor table lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Guest-physical address.
    pub addr: u64,
    /// Number of descriptors.
    pub size: u16,
}

impl DescriptorTable {
    /// The table `queue` was programmed with.
    pub fn of(queue: &Queue) -> Self {
        DescriptorTable {
            addr: queue.desc_table(),
            size: queue.size(),
        }
    }
}

/// One descriptor of a chain, checked for its index only: its buffer is the device's to
/// check, with [`read_buffer`] or [`write_buffer`], when it uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
    /// `VRING_DESC_F_INDIRECT`: the walker never follows indirect tables (no device offers
    /// them); the device decides whether that makes the chain invalid.
    pub indirect: bool,
}

/// A walked chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The descriptors, in order, at most as many as the walk was allowed.
    pub buffers: Vec<Buffer>,
    /// The last buffer has `VRING_DESC_F_NEXT`: the chain goes on past the walk's limit.
    pub continues: bool,
}

/// Why a chain or a buffer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index beyond the queue size.
    #[error("descriptor index {index} beyond queue size {queue_size}")]
    DescriptorIndex {
        /// The index.
        index: u16,
        /// The queue size.
        queue_size: u16,
    },
    /// The chain has more descriptors than the queue (it loops).
    #[error("descriptor chain longer than the queue")]
    ChainTooLong,
    /// A buffer or descriptor lies (partly) outside accessible guest memory.
    #[error("guest range {addr:#x}+{len:#x} is not accessible")]
    Inaccessible {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Guest memory refused an access the manager allowed (stale memory view).
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn has(desc: &Descriptor, flag: u32) -> bool {
    u32::from(desc.flags()) & flag != 0
}

/// Reads descriptor `index` of `table` after checking it is in range and accessible now.
fn read_descriptor<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    index: u16,
) -> Result<Descriptor, ChainError> {
    if index >= table.size {
        return Err(ChainError::DescriptorIndex {
            index,
            queue_size: table.size,
        });
    }
    let addr = table.addr.checked_add(u64::from(index) * DESCRIPTOR_SIZE);
    let Some(addr) = addr.filter(|a| access.is_accessible(*a, DESCRIPTOR_SIZE)) else {
        return Err(ChainError::Inaccessible {
            addr: table
                .addr
                .saturating_add(u64::from(index) * DESCRIPTOR_SIZE),
            len: DESCRIPTOR_SIZE,
        });
    };
    let raw: RawDescriptor = mem
        .read_obj(GuestAddress(addr))
        .map_err(ChainError::Memory)?;
    Ok(Descriptor::from(raw))
}

/// Walks the chain starting at `head`, reading at most `max_buffers` descriptors. A chain
/// longer than the queue is a loop and an error, so the walk is bounded by both.
pub fn walk_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    table: DescriptorTable,
    head: u16,
    max_buffers: usize,
) -> Result<Chain, ChainError> {
    let mut buffers = Vec::new();
    let mut index = head;
    loop {
        let desc = read_descriptor(mem, access, table, index)?;
        buffers.push(Buffer {
            addr: desc.addr().0,
            len: desc.len(),
            writable: has(&desc, VRING_DESC_F_WRITE),
            indirect: has(&desc, VRING_DESC_F_INDIRECT),
        });
        let next = has(&desc, VRING_DESC_F_NEXT);
        if next && buffers.len() >= usize::from(table.size) {
            return Err(ChainError::ChainTooLong);
        }
        if !next || buffers.len() >= max_buffers {
            return Ok(Chain {
                buffers,
                continues: next,
            });
        }
        index = desc.next();
    }
}

/// Fills `out` from guest memory at `gpa`, after checking the range is accessible now.
pub fn read_buffer<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    gpa: u64,
    out: &mut [u8],
) -> Result<(), ChainError> {
    let len = out.len() as u64;
    if !access.is_accessible(gpa, len) {
        return Err(ChainError::Inaccessible { addr: gpa, len });
    }
    mem.read_slice(out, GuestAddress(gpa))
        .map_err(ChainError::Memory)
}

/// Writes `data` to guest memory at `gpa`, after checking the range is accessible now.
pub fn write_buffer<M: GuestMemory + ?Sized>(
    mem: &M,
    access: &dyn GuestAccess,
    gpa: u64,
    data: &[u8],
) -> Result<(), ChainError> {
    let len = data.len() as u64;
    if !access.is_accessible(gpa, len) {
        return Err(ChainError::Inaccessible { addr: gpa, len });
    }
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(ChainError::Memory)
}

/// The guest-physical ranges a queue's rings occupy: descriptor table, available ring (with
/// `used_event`), used ring (with `avail_event`).
pub fn ring_ranges(queue: &Queue) -> [(u64, u64); 3] {
    let n = u64::from(queue.size());
    [
        (queue.desc_table(), DESCRIPTOR_SIZE * n),
        (queue.avail_ring(), 6 + 2 * n),
        (queue.used_ring(), 6 + 8 * n),
    ]
}

/// Whether the rings the driver configured lie in memory the VMM may touch, right now.
pub fn rings_accessible(queue: &Queue, access: &dyn GuestAccess) -> bool {
    ring_ranges(queue)
        .iter()
        .all(|&(addr, len)| access.is_accessible(addr, len))
}

/// Whether `[a, a+a_len)` and `[b, b+b_len)` share a byte (ranges that wrap count as reaching
/// the top of the address space).
pub fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    let a_end = a.saturating_add(a_len);
    let b_end = b.saturating_add(b_len);
    a_len > 0 && b_len > 0 && a < b_end && b < a_end
}

/// What a device did with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Return it to the driver with this many bytes written.
    Used(u32),
    /// The device keeps it for now (the balloon's statistics buffer) and completes it later
    /// with [`complete`].
    Held,
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// At least one chain went to the used ring: raise the queue's interrupt.
    pub used: bool,
    /// The budget ran out with chains still available: process the queue again after the
    /// control loop's other work.
    pub more: bool,
    /// The rings were not (or stopped being) in accessible memory: nothing more can be done
    /// with this queue until the driver resets the device.
    pub rings_lost: bool,
}

/// Returns chain `head` to the driver with `len` bytes written, after checking the rings are
/// accessible now. `false` if they are not (the chain is then lost with the queue) or the
/// queue refused.
pub fn complete<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    access: &dyn GuestAccess,
    head: u16,
    len: u32,
) -> bool {
    rings_accessible(queue, access) && queue.add_used(mem, head, len).is_ok()
}

/// Pops and handles at most `budget` chains from `queue`, checking the rings before every pop
/// and every completion: `handle` may close memory (an unplug) that the rings lie in.
pub fn run_pass<M, A>(
    queue: &mut Queue,
    mem: &M,
    access: &mut A,
    budget: usize,
    mut handle: impl FnMut(&mut A, DescriptorTable, u16) -> Completion,
) -> Pass
where
    M: GuestMemory,
    A: GuestAccess,
{
    let mut pass = Pass::default();
    if !rings_accessible(queue, access) {
        pass.rings_lost = true;
        return pass;
    }
    // The driver's available index may run at most a queue ahead of the device's; anything
    // else is a broken (or hostile) driver. Checked here, once, because virtio-queue would
    // log an error on every pop of such a queue: a log line per guest notification.
    let ahead = queue
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| (idx - Wrapping(queue.next_avail())).0);
    match ahead {
        Ok(ahead) if ahead <= queue.size() => {}
        _ => {
            pass.rings_lost = true;
            return pass;
        }
    }
    for _ in 0..budget {
        if !rings_accessible(queue, access) {
            pass.rings_lost = true;
            return pass;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return pass;
        };
        let head = chain.head_index();
        let table = DescriptorTable::of(queue);
        if let Completion::Used(len) = handle(access, table, head) {
            if complete(queue, mem, access, head, len) {
                pass.used = true;
            } else {
                pass.rings_lost = true;
                return pass;
            }
        }
    }
    pass.more = rings_accessible(queue, access)
        && queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx != Wrapping(queue.next_avail()));
    pass
}
