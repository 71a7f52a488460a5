//! Stateful fuzzing of a whole virtio-mem device over real guest memory.
//!
//! Each input builds a fresh `MemoryManager` (64 MiB of boot RAM and a 32 MiB hotplug region
//! of 16 blocks of 2 MiB), a `VirtioMem` device on it, plugs an input-chosen set of blocks
//! through the device itself, then activates the device with a queue whose rings the input
//! places (boot RAM, a plugged block, anywhere) and runs an input-chosen sequence of
//! operations: well-formed requests with their request and response buffers wherever the
//! input says (including the block the request unplugs, or a ring), arbitrary chains, queue
//! passes, host resizes, device and system resets, driver scribbles.
//!
//! Unplugged blocks are `PROT_NONE`: any access the VMM makes to one kills the process with
//! SIGSEGV. After every operation the target checks:
//! - the manager's `is_accessible` agrees with the plug bitmap, block by block, and every
//!   block it calls accessible really is (a byte is read from both its ends);
//! - the device's `plugged_size` is the manager's, within `usable_region_size` and the region,
//!   and only blocks below `usable_region_size` are plugged;
//! - plugged memory grows only up to `requested_size`;
//! - the used ring only returns heads the driver made available, each once, with a used length
//!   of 0 or the 10-byte response;
//! - a queue pass never closes the memory the queue's own rings lie in.

#![no_main]

#[path = "common/split_ring.rs"]
mod split_ring;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use split_ring::{guarded_read, guarded_write, Ring, F_NEXT, F_WRITE};
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::virtio::mem::device::{
    VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
use tidevm_vmm::devices::virtio::mem::{VirtioMem, VirtioMemConfig};
use tidevm_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use tidevm_vmm::memory::{Backing, BlockRangeState, HotplugRegionId, MemoryManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const BLOCK: u64 = 2 * MIB;
const BLOCKS: u64 = 16;
const QUEUE_MAX: u16 = 128;
const RESPONSE_SIZE: u32 = 10;
/// Boot-RAM scratch area for request and response buffers.
const SCRATCH: u64 = 0x20_0000;
/// Boot-RAM place of the setup queue.
const SETUP_RING: u64 = 0x1_0000;

/// A guest-physical address chosen by the input.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Scratch(u16),
    /// In block `.0`, at 16-byte granularity.
    Block(u8, u16),
    /// The last `.1 % 16` bytes of block `.0`: a buffer there straddles into the next block.
    BlockEnd(u8, u8),
    /// Inside the queue's rings: 0 descriptor table, 1 available, 2 used.
    Ring(u8, u8),
    RamEnd(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    addr: Addr,
    len: u16,
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A well-formed two-descriptor request (device-readable request, device-writable
    /// response).
    Request {
        ty: u8,
        first_block: u8,
        nb_blocks: u8,
        /// Address not block aligned / outside the region.
        skew: u8,
        req: Addr,
        resp: Addr,
    },
    /// Arbitrary descriptors from slot `head`.
    Chain {
        descs: Vec<Desc>,
        head: u8,
    },
    Process,
    Resize {
        blocks: u8,
    },
    Reset,
    Activate {
        rings: Addr,
        size_log2: u8,
        features: u8,
    },
    SystemReset,
    Scribble {
        at: Addr,
        bytes: Vec<u8>,
    },
    AvailIdx(u16),
    ReadConfig {
        offset: u8,
        len: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    plugged: u16,
    requested: u8,
    rings: Addr,
    size_log2: u8,
    ops: Vec<Op>,
}

struct World {
    mm: MemoryManager,
    mem: GuestMemoryMmap,
    dev: VirtioMem,
    id: HotplugRegionId,
    base: u64,
    ring: Option<Ring>,
    next_desc: u16,
}

impl World {
    fn new() -> World {
        let mut mm = MemoryManager::new(GuestLayout::new(RAM)).unwrap();
        let base = mm.layout().hotplug_area.start;
        let region = GuestRange {
            start: base,
            size: BLOCKS * BLOCK,
        };
        let id = mm
            .map_hotplug_region(region, BLOCK, Backing::Anonymous, false)
            .unwrap();
        let dev = VirtioMem::new(VirtioMemConfig {
            id: "fuzz".into(),
            region,
            block_size: BLOCK,
            node: None,
            requested_size: 0,
            hotplug: id,
        })
        .unwrap();
        dev.check_region(&mm).unwrap();
        let mem = mm.guest_memory().clone();
        World {
            mm,
            mem,
            dev,
            id,
            base,
            ring: None,
            next_desc: 0,
        }
    }

    fn addr(&self, a: Addr) -> u64 {
        match a {
            Addr::Scratch(o) => SCRATCH + u64::from(o) * 8,
            Addr::Block(b, o) => {
                self.base + u64::from(b) % BLOCKS * BLOCK + (u64::from(o) * 16) % BLOCK
            }
            Addr::BlockEnd(b, o) => {
                self.base + (u64::from(b) % BLOCKS + 1) * BLOCK - 1 - u64::from(o % 16)
            }
            Addr::Ring(which, o) => match &self.ring {
                Some(r) => {
                    let (start, len) = r.ranges()[usize::from(which % 3)];
                    start.wrapping_add(u64::from(o) % len)
                }
                None => SETUP_RING + u64::from(o),
            },
            Addr::RamEnd(o) => RAM - 1 - u64::from(o % 32),
            Addr::Raw(a) => a,
        }
    }

    fn request_bytes(ty: u16, addr: u64, nb: u16) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..18].copy_from_slice(&nb.to_le_bytes());
        b
    }

    fn features() -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    }

    /// Activates the device on rings at `base`, as the transport would: only when the rings
    /// are valid and accessible.
    fn activate(&mut self, base: u64, size_log2: u8, features: u64) {
        let size = 1u16 << (size_log2 % 8);
        let base = base & !15;
        let ring = Ring::at(base, size);
        self.dev.reset();
        self.ring = None;
        if !self.dev.ack_features(features) {
            return;
        }
        let Some(queue) = ring.queue(QUEUE_MAX, &self.mem, &self.mm) else {
            return;
        };
        ring.clear(&self.mem, &self.mm);
        self.dev.activate(vec![queue]).unwrap();
        self.ring = Some(ring);
        self.next_desc = 0;
    }

    fn process(&mut self) {
        let before = self.mm.plugged_bytes(self.id).unwrap();
        let requested = self.dev.status().requested_size;
        let rings_open = self.ring.as_ref().is_some_and(|r| r.accessible(&self.mm));
        let mem = self.mem.clone();
        let _signal = self.dev.process_queue(0, &mem, &mut self.mm);
        let after = self.mm.plugged_bytes(self.id).unwrap();
        if after > before {
            assert!(
                after <= requested,
                "plugged {after:#x} > requested {requested:#x}"
            );
        }
        if let Some(ring) = self.ring.as_mut() {
            if rings_open {
                assert!(
                    ring.accessible(&self.mm),
                    "a queue pass closed the memory its own rings lie in"
                );
            }
            if let Some(used) = ring.take_used(&self.mem, &self.mm) {
                for (_, len) in used {
                    assert!(len == 0 || len == RESPONSE_SIZE, "used length {len}");
                }
            }
        }
    }

    fn check(&self) {
        let status = self.dev.status();
        let plugged = self.mm.plugged_bytes(self.id).unwrap();
        assert_eq!(status.plugged_size, plugged, "device and manager disagree");
        assert!(status.usable_region_size <= BLOCKS * BLOCK);
        assert!(plugged <= status.usable_region_size || plugged == 0);
        let mut cfg = [0u8; 8];
        self.dev.read_config(0x28, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), plugged);
        assert!(self.mm.is_accessible(0, RAM));
        for b in 0..BLOCKS {
            let start = self.base + b * BLOCK;
            let state = self.mm.block_state(self.id, b, 1).unwrap();
            let open = self.mm.is_accessible(start, BLOCK);
            assert_eq!(
                open,
                state == BlockRangeState::Plugged,
                "block {b}: is_accessible {open} but {state:?}"
            );
            if open {
                assert!(
                    (b + 1) * BLOCK <= status.usable_region_size,
                    "block {b} plugged beyond usable_region_size"
                );
                // Faults (SIGSEGV) if the manager calls a PROT_NONE block accessible.
                let mut byte = [0u8; 1];
                self.mem.read_slice(&mut byte, GuestAddress(start)).unwrap();
                self.mem
                    .read_slice(&mut byte, GuestAddress(start + BLOCK - 1))
                    .unwrap();
            }
        }
    }

    fn post_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let head = self.next_desc % ring.size;
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % ring.size;
            let next = (index + 1) % ring.size;
            if flags & F_WRITE != 0 && ring.hits_rings(addr, u64::from(len)) {
                ring.tainted = true;
            }
            ring.write_desc(&self.mem, &self.mm, index, (addr, len, flags, next));
        }
        ring.post(&self.mem, &self.mm, head);
        self.next_desc = (head + n) % ring.size;
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Request {
                ty,
                first_block,
                nb_blocks,
                skew,
                req,
                resp,
            } => {
                let ty = u16::from(ty % 5);
                let block_addr = self.base + u64::from(first_block % (BLOCKS as u8 + 2)) * BLOCK;
                let addr = match skew % 8 {
                    0 => block_addr + u64::from(skew),
                    1 => block_addr
                        .wrapping_sub(self.base)
                        .wrapping_mul(u64::from(skew)),
                    _ => block_addr,
                };
                let nb = u16::from(nb_blocks % (BLOCKS as u8 + 2));
                let req = self.addr(req);
                let resp = self.addr(resp);
                if let Some(ring) = self.ring.as_mut() {
                    // The driver itself writing its request over its rings.
                    if ring.hits_rings(req, 24) {
                        ring.tainted = true;
                    }
                }
                guarded_write(&self.mem, &self.mm, req, &Self::request_bytes(ty, addr, nb));
                self.post_chain(&[(req, 24, F_NEXT), (resp, RESPONSE_SIZE, F_WRITE)]);
            }
            Op::Chain { ref descs, head } => {
                let Some(size) = self.ring.as_ref().map(|r| r.size) else {
                    return;
                };
                let descs: Vec<(u64, u32, u16, u16)> = descs
                    .iter()
                    .take(usize::from(size))
                    .map(|d| {
                        let flags = u16::from(d.flags & 7);
                        let len = u32::from(d.len % 64);
                        let next = u16::from(d.next) % (size + 2);
                        (self.addr(d.addr), len, flags, next)
                    })
                    .collect();
                let ring = self.ring.as_mut().unwrap();
                for (i, &(gpa, len, flags, next)) in descs.iter().enumerate() {
                    if flags & F_WRITE != 0 && ring.hits_rings(gpa, u64::from(len)) {
                        ring.tainted = true;
                    }
                    ring.write_desc(&self.mem, &self.mm, i as u16, (gpa, len, flags, next));
                }
                let head = u16::from(head) % ring.size;
                ring.post(&self.mem, &self.mm, head);
            }
            Op::Process => self.process(),
            Op::Resize { blocks } => {
                let bytes = u64::from(blocks % (BLOCKS as u8 + 2)) * BLOCK;
                let ok = self.dev.set_requested_size(bytes).is_ok();
                assert_eq!(ok, bytes <= BLOCKS * BLOCK);
            }
            Op::Reset => {
                self.dev.reset();
                self.ring = None;
            }
            Op::Activate {
                rings,
                size_log2,
                features,
            } => {
                let mut f = Self::features();
                if features & 1 != 0 {
                    f &= !VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
                }
                if features & 2 != 0 {
                    f |= VIRTIO_MEM_F_ACPI_PXM;
                }
                let base = self.addr(rings);
                self.activate(base, size_log2, f);
            }
            Op::SystemReset => {
                self.dev.system_reset(&mut self.mm).unwrap();
                assert_eq!(self.mm.plugged_bytes(self.id).unwrap(), 0);
                self.ring = None;
            }
            Op::Scribble { at, ref bytes } => {
                let gpa = self.addr(at);
                let bytes = &bytes[..bytes.len().min(32)];
                if let Some(ring) = self.ring.as_mut() {
                    if ring.hits_rings(gpa, bytes.len() as u64) {
                        ring.tainted = true;
                    }
                }
                guarded_write(&self.mem, &self.mm, gpa, bytes);
            }
            Op::AvailIdx(idx) => {
                if let Some(ring) = self.ring.as_mut() {
                    ring.set_avail_idx(&self.mem, &self.mm, idx);
                }
            }
            Op::ReadConfig { offset, len } => {
                let mut data = vec![0u8; usize::from(len % 16)];
                self.dev.read_config(u64::from(offset), &mut data);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let mut w = World::new();
    // Plug the chosen blocks through the device itself, from a queue in boot RAM.
    w.dev.set_requested_size(BLOCKS * BLOCK).unwrap();
    w.activate(SETUP_RING, 4, World::features());
    for b in 0..BLOCKS {
        if input.plugged & (1 << b) != 0 {
            let req = SCRATCH + 0x1000;
            let resp = SCRATCH + 0x2000;
            let bytes = World::request_bytes(0, w.base + b * BLOCK, 1);
            assert!(guarded_write(&w.mem, &w.mm, req, &bytes));
            w.post_chain(&[(req, 24, F_NEXT), (resp, RESPONSE_SIZE, F_WRITE)]);
            w.process();
            let mut ty = [0u8; 2];
            assert!(guarded_read(&w.mem, &w.mm, resp, &mut ty));
            assert_eq!(
                u16::from_le_bytes(ty),
                0,
                "setup plug of block {b} not ACKed"
            );
        }
    }
    let requested = u64::from(input.requested % (BLOCKS as u8 + 1)) * BLOCK;
    w.dev.set_requested_size(requested).unwrap();
    let rings = w.addr(input.rings);
    w.activate(rings, input.size_log2, World::features());
    w.check();
    for op in input.ops.iter().take(64) {
        w.run(op);
        w.check();
    }
});
