//! Fuzzes the virtio-blk request parser and the device's request handling with arbitrary
//! descriptor chains, header bytes and DISCARD / WRITE_ZEROES segments.
//!
//! Guest memory is a real `MemoryManager`: 64 MiB of boot RAM plus a 4 MiB hotplug region
//! whose first 2 MiB block is plugged and whose second is unplugged, i.e. `PROT_NONE`. Any
//! guest access made without asking `is_accessible` first, in the unplugged block, kills the
//! process with SIGSEGV, which libFuzzer reports as a crash. The disk is a 1 MiB sparse image
//! file in the temporary directory, so requests really reach the host file.

#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::virtio::block::request::{
    decode_header, parse_chain, total_len, DescriptorTable, RequestType, HEADER_SIZE,
};
use tidevm_vmm::devices::virtio::block::{BlockConfig, Disk, DiskOptions, VirtioBlock};
use tidevm_vmm::memory::{Backing, MemoryManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: u64 = 2 << 20;
const TABLE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 8;
const HDR: u64 = 0x2000;
const DATA: u64 = 0x10_0000;
const STATUS: u64 = 0x3000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const IMAGE: u64 = 1 << 20;

struct World {
    manager: MemoryManager,
    memory: GuestMemoryMmap,
    plugged: u64,
    device: Mutex<VirtioBlock>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let mut manager = MemoryManager::new(GuestLayout::new(64 << 20)).unwrap();
        let start = manager.layout().hotplug_area.start;
        let range = GuestRange {
            start,
            size: 2 * BLOCK,
        };
        let id = manager
            .map_hotplug_region(range, BLOCK, Backing::Anonymous, false)
            .unwrap();
        manager.plug(id, 0, 1).unwrap();
        let memory = manager.guest_memory().clone();
        let path = std::env::temp_dir().join(format!("tidevm-fuzz-blk-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(IMAGE))
            .unwrap();
        let disk = Disk::open(DiskOptions {
            path: path.clone(),
            readonly: false,
            direct: false,
        })
        .unwrap();
        // The open file keeps the image alive; the name is not needed any more.
        let _ = std::fs::remove_file(&path);
        World {
            manager,
            memory,
            plugged: start,
            device: Mutex::new(VirtioBlock::new(BlockConfig {
                id: "fuzz".into(),
                disk,
            })),
        }
    })
}

/// Addresses worth hitting: boot RAM, the plugged block, the unplugged block, the block
/// boundary, the end of RAM, and the top of the address space; plus an input-chosen offset.
fn pick_addr(w: &World, selector: u8, offset: u64) -> u64 {
    let bases = [
        HDR,
        DATA,
        STATUS,
        w.plugged,
        w.plugged + BLOCK,
        w.plugged + BLOCK - 512,
        (64 << 20) - 512,
        u64::MAX - 16,
        offset,
    ];
    let base = bases[usize::from(selector) % bases.len()];
    base.wrapping_add(offset % 64)
}

/// Lengths worth trying: around the header and a sector, whole pages, and anything up to
/// 1 MiB.
fn pick_len(selector: u8, raw: u32) -> u32 {
    let lens = [0, 1, 15, 16, 17, 512, 513, 4096, 16 + 512, raw % (1 << 20)];
    lens[usize::from(selector) % lens.len()]
}

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fn write_desc(w: &World, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&addr.to_le_bytes());
    desc[8..12].copy_from_slice(&len.to_le_bytes());
    desc[12..14].copy_from_slice(&flags.to_le_bytes());
    desc[14..16].copy_from_slice(&next.to_le_bytes());
    w.memory
        .write_slice(&desc, GuestAddress(TABLE + 16 * index))
        .unwrap();
}

fuzz_target!(|input: &[u8]| {
    let w = world();
    let mut data = input;
    let [shape, head, count] = take::<3>(&mut data);
    // Every run starts from an empty table: no state leaks between inputs.
    let zero = [0u8; 16 * QUEUE_SIZE as usize];
    w.memory.write_slice(&zero, GuestAddress(TABLE)).unwrap();
    // Descriptors: (addr selector, offset, len, flags, next) from the input.
    for i in 0..u64::from(count % (QUEUE_SIZE as u8 + 1)) {
        let d = take::<16>(&mut data);
        let addr = pick_addr(w, d[0], u64::from_le_bytes(d[0..8].try_into().unwrap()));
        let len = pick_len(d[8], u32::from_le_bytes(d[8..12].try_into().unwrap()));
        let flags = if shape & 1 == 0 {
            u16::from(d[12] & 7)
        } else {
            u16::from_le_bytes([d[12], d[13]])
        };
        let next = u16::from_le_bytes([d[14], d[15]]) % (QUEUE_SIZE + 2);
        write_desc(w, i, addr, len, flags, next);
    }
    if shape & 2 != 0 {
        // A well-formed three-descriptor chain (header, data, status) around whatever header
        // and segment bytes follow, so that the device's handlers are reached.
        let data_flags = if shape & 4 != 0 { WRITE } else { 0 };
        let data_len = 512 * u32::from(shape >> 5) + 16 * u32::from((shape >> 3) & 3);
        write_desc(w, 0, HDR, HEADER_SIZE as u32, NEXT, 1);
        write_desc(w, 1, DATA, data_len, data_flags | NEXT, 2);
        write_desc(w, 2, STATUS, 1, WRITE, 0);
    }
    let mut header = take::<16>(&mut data);
    // Sectors near the disk's end are the interesting ones.
    if shape & 0x80 != 0 {
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap()) % (IMAGE / 512 + 4);
        header[8..16].copy_from_slice(&sector.to_le_bytes());
    }
    w.memory.write_slice(&header, GuestAddress(HDR)).unwrap();
    w.memory
        .write_slice(&header, GuestAddress(w.plugged))
        .unwrap();
    // DISCARD / WRITE_ZEROES segments (and OUT data) from the rest of the input.
    let rest = &data[..data.len().min(4096)];
    w.memory.write_slice(rest, GuestAddress(DATA)).unwrap();

    let table = DescriptorTable {
        addr: TABLE,
        size: QUEUE_SIZE,
    };
    let head = u16::from(head) % (QUEUE_SIZE + 2);
    let parsed = parse_chain(&w.memory, &w.manager, table, head);

    // Invariants: a decoded request's type and sector are the header's when the chain is the
    // well-formed one at 0; its data fits the bound.
    if let Ok(req) = &parsed.request {
        assert!(parsed.status.is_some());
        if shape & 2 != 0 && head == 0 {
            let (ty, sector) = decode_header(&header);
            assert_eq!(req.ty, RequestType::from_wire(ty));
            assert_eq!(req.sector, sector);
        }
        let data_len = total_len(&req.readable) + total_len(&req.writable);
        assert!(data_len <= tidevm_vmm::devices::virtio::block::request::MAX_DATA_BYTES);
    }

    // The whole device path: parse, disk I/O, scatter/gather, status.
    let mut device = w.device.lock().unwrap();
    let used = device.process_chain(&w.memory, &w.manager, table, head);
    if used > 0 {
        // Something was written: there was a status byte to write it to.
        assert!(parsed.status.is_some());
        if let Ok(req) = &parsed.request {
            assert!(u64::from(used) <= total_len(&req.writable) + 1);
        }
    }
});
