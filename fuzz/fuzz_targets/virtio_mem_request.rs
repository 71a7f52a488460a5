//! Fuzzes the virtio-mem request parser with arbitrary descriptor chains and request bytes.
//!
//! Guest memory is a real `MemoryManager`: 64 MiB of boot RAM plus a 4 MiB hotplug region
//! whose first 2 MiB block is plugged and whose second is unplugged, i.e. `PROT_NONE`. Any read
//! the parser makes without asking `is_accessible` first, in the unplugged block, kills the
//! process with SIGSEGV, which libFuzzer reports as a crash.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::virtio::mem::request::{
    parse_chain, DescriptorTable, Request, REQUEST_SIZE, RESPONSE_SIZE,
};
use tidevm_vmm::memory::{Backing, MemoryManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: u64 = 2 << 20;
const TABLE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 8;
const REQ: u64 = 0x2000;
const RESP: u64 = 0x3000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct World {
    manager: MemoryManager,
    memory: GuestMemoryMmap,
    plugged: u64,
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
        World {
            manager,
            memory,
            plugged: start,
        }
    })
}

/// Addresses worth hitting: boot RAM, the plugged block, the unplugged block, region ends,
/// and the top of the address space; plus an input-chosen offset.
fn pick_addr(w: &World, selector: u8, offset: u64) -> u64 {
    let bases = [
        REQ,
        RESP,
        w.plugged,
        w.plugged + BLOCK,
        w.plugged + BLOCK - 16,
        (64 << 20) - 16,
        u64::MAX - 16,
        offset,
    ];
    let base = bases[usize::from(selector) % bases.len()];
    base.wrapping_add(offset % 64)
}

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
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
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap()) % 64;
        let flags = if shape & 1 == 0 {
            u16::from(d[12] & 7)
        } else {
            u16::from_le_bytes([d[12], d[13]])
        };
        let next = u16::from_le_bytes([d[14], d[15]]) % (QUEUE_SIZE + 2);
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        desc[14..16].copy_from_slice(&next.to_le_bytes());
        w.memory
            .write_slice(&desc, GuestAddress(TABLE + 16 * i))
            .unwrap();
    }
    if shape & 2 != 0 {
        // A well-formed chain around whatever request bytes follow, to reach the decoder.
        let ok = [
            (REQ, REQUEST_SIZE as u32, NEXT, 1u16),
            (RESP, RESPONSE_SIZE as u32, WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in ok.iter().enumerate() {
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&next.to_le_bytes());
            w.memory
                .write_slice(&desc, GuestAddress(TABLE + 16 * i as u64))
                .unwrap();
        }
    }
    let request = take::<24>(&mut data);
    w.memory.write_slice(&request, GuestAddress(REQ)).unwrap();
    w.memory
        .write_slice(&request, GuestAddress(w.plugged))
        .unwrap();

    let table = DescriptorTable {
        addr: TABLE,
        size: QUEUE_SIZE,
    };
    let head = u16::from(head) % (QUEUE_SIZE + 2);
    let parsed = parse_chain(&w.memory, &w.manager, table, head);

    // Invariants: a usable response buffer is accessible; a parsed request has one, and its
    // type round-trips through the decoder.
    if let Some(resp) = parsed.response {
        assert!(w.manager.is_accessible(resp, RESPONSE_SIZE));
    }
    if let Ok(req) = parsed.request {
        assert!(parsed.response.is_some());
        let ty = u16::from_le_bytes([request[0], request[1]]);
        let expected = match req {
            Request::Plug { .. } => 0,
            Request::Unplug { .. } => 1,
            Request::UnplugAll => 2,
            Request::State { .. } => 3,
        };
        // Only the well-formed chain at 0 is known to read exactly the bytes at REQ.
        if shape & 2 != 0 && head == 0 {
            assert_eq!(ty, expected);
        }
    }
});
