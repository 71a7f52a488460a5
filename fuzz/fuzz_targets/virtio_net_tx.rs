//! Fuzzes the virtio-net TX chain parser and the device's TX path with arbitrary descriptor
//! chains and frame bytes.
//!
//! Guest memory is a real `MemoryManager`: 64 MiB of boot RAM plus a 4 MiB hotplug region
//! whose first 2 MiB block is plugged and whose second is unplugged, i.e. `PROT_NONE`. Any
//! guest access made without asking `is_accessible` first, in the unplugged block, kills the
//! process with SIGSEGV, which libFuzzer reports as a crash. The backend is a Unix datagram
//! socketpair (one frame per datagram, as a TAP gives), so what the device sends is checked
//! byte for byte.

#![no_main]

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::virtio::net::request::{
    parse_tx, total_len, DescriptorTable, MAX_FRAME, NET_HDR_SIZE,
};
use tidevm_vmm::devices::virtio::net::{MacAddr, NetBackend, NetConfig, VirtioNet};
use tidevm_vmm::memory::{Backing, MemoryManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: u64 = 2 << 20;
const TABLE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 8;
const HDR: u64 = 0x2000;
const DATA: u64 = 0x10_0000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct World {
    manager: MemoryManager,
    memory: GuestMemoryMmap,
    plugged: u64,
    device: Mutex<VirtioNet>,
    peer: UnixDatagram,
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
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        World {
            manager,
            memory,
            plugged: start,
            device: Mutex::new(VirtioNet::new(NetConfig {
                id: "fuzz".into(),
                host_name: "socketpair".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                backend: NetBackend::from_fd(OwnedFd::from(ours)),
            })),
            peer,
        }
    })
}

/// Addresses worth hitting: boot RAM, the plugged block, the unplugged block, the block
/// boundary, the end of RAM, and the top of the address space; plus an input-chosen offset.
fn pick_addr(w: &World, selector: u8, offset: u64) -> u64 {
    let bases = [
        HDR,
        DATA,
        w.plugged,
        w.plugged + BLOCK,
        w.plugged + BLOCK - 64,
        (64 << 20) - 512,
        u64::MAX - 16,
        offset,
    ];
    let base = bases[usize::from(selector) % bases.len()];
    base.wrapping_add(offset % 64)
}

/// Lengths worth trying: around the header, a frame, the 64 KiB limit, and anything up to
/// 1 MiB.
fn pick_len(selector: u8, raw: u32) -> u32 {
    let max = (NET_HDR_SIZE + MAX_FRAME) as u32;
    let lens = [0, 1, 11, 12, 13, 60, 1514, max - 12, max, max + 1, raw % (1 << 20)];
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

/// What the device sent, if anything.
fn sent(w: &World) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; NET_HDR_SIZE + MAX_FRAME + 64];
    match w.peer.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

fuzz_target!(|input: &[u8]| {
    let w = world();
    let mut data = input;
    let [shape, head, count] = take::<3>(&mut data);
    // Every run starts from an empty table: no state leaks between inputs.
    let zero = [0u8; 16 * QUEUE_SIZE as usize];
    w.memory.write_slice(&zero, GuestAddress(TABLE)).unwrap();
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
        // A well-formed two-descriptor chain (header, frame), the frame possibly writable.
        let frame_flags = if shape & 4 != 0 { WRITE } else { 0 };
        let frame_len = 60 * u32::from(shape >> 3);
        write_desc(w, 0, HDR, NET_HDR_SIZE as u32, NEXT, 1);
        write_desc(w, 1, DATA, frame_len, frame_flags, 0);
    }
    // Header and frame bytes from the rest of the input.
    let rest = &data[..data.len().min(4096)];
    w.memory.write_slice(rest, GuestAddress(HDR)).unwrap();
    w.memory.write_slice(rest, GuestAddress(DATA)).unwrap();
    w.memory.write_slice(rest, GuestAddress(w.plugged)).unwrap();

    let table = DescriptorTable {
        addr: TABLE,
        size: QUEUE_SIZE,
    };
    let head = u16::from(head) % (QUEUE_SIZE + 2);
    let parsed = parse_tx(&w.memory, &w.manager, table, head);
    if let Ok(pieces) = &parsed {
        let len = total_len(pieces);
        assert!((NET_HDR_SIZE as u64..=(NET_HDR_SIZE + MAX_FRAME) as u64).contains(&len));
        assert!(pieces.iter().all(|p| p.len > 0));
    }

    let mut device = w.device.lock().unwrap();
    let before = device.metrics().clone();
    device.process_tx_chain(&w.memory, &w.manager, table, head);
    let after = device.metrics().clone();
    let frame = sent(w);
    assert_eq!(sent(w), None, "one chain sends at most one frame");
    // Exactly one outcome per chain.
    let outcomes = (after.tx_frames - before.tx_frames)
        + (after.tx_dropped - before.tx_dropped)
        + (after.malformed - before.malformed);
    assert_eq!(outcomes, 1, "{before:?} -> {after:?}");
    match (&parsed, frame) {
        (Ok(pieces), Some(frame)) => {
            // The chain's bytes, in order, with the header zeroed (no offload negotiated).
            let accessible = pieces
                .iter()
                .all(|p| w.manager.is_accessible(p.addr, u64::from(p.len)));
            assert!(accessible);
            assert_eq!(frame.len() as u64, total_len(pieces));
            assert!(frame[..NET_HDR_SIZE].iter().all(|&b| b == 0));
            let mut expected = Vec::new();
            for p in pieces {
                let mut bytes = vec![0u8; p.len as usize];
                w.memory
                    .read_slice(&mut bytes, GuestAddress(p.addr))
                    .unwrap();
                expected.extend_from_slice(&bytes);
            }
            assert_eq!(&frame[NET_HDR_SIZE..], &expected[NET_HDR_SIZE..]);
            assert_eq!(after.tx_frames, before.tx_frames + 1);
        }
        (Err(_), Some(_)) => panic!("a chain the parser refused was sent"),
        (_, None) => assert_eq!(after.tx_frames, before.tx_frames),
    }
});
