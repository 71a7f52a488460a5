//! virtio-net device tests on real guest memory (a memory manager with one plugged and one
//! unplugged, `PROT_NONE`, hotplug block), mock split queues, and a Unix datagram socketpair
//! as the backend in place of a TAP (one frame per datagram, as a TAP gives; no root).

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::*;
use super::request::{MAX_FRAME, NET_HDR_SIZE};
use super::tap::NetBackend;
use crate::arch::x86_64::layout::{GuestLayout, GuestRange};
use crate::devices::virtio::chain::PASS_BUDGET;
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::{Backing, MemoryManager};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
const RX_ADDR: u64 = 0x1_0000;
const TX_ADDR: u64 = 0x3_0000;
const QSIZE: u16 = 128;
/// Descriptors reserved per chain.
const STRIDE: u16 = 8;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const DATA2: u64 = 0x30_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const HDR_LEN: u32 = NET_HDR_SIZE as u32;

struct Setup {
    mm: MemoryManager,
    mem: GuestMemoryMmap,
    dev: VirtioNet,
    /// The host's end of the backend.
    peer: UnixDatagram,
    /// First byte of the unplugged hotplug block.
    closed: u64,
}

fn setup() -> Setup {
    let mut mm = MemoryManager::new(GuestLayout::new(64 * MIB)).unwrap();
    let base = mm.layout().hotplug_area.start;
    let region = GuestRange {
        start: base,
        size: 2 * BLOCK,
    };
    let hotplug = mm
        .map_hotplug_region(region, BLOCK, Backing::Anonymous, false)
        .unwrap();
    mm.plug(hotplug, 0, 1).unwrap();
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let dev = VirtioNet::new(NetConfig {
        id: "net0".into(),
        host_name: "socketpair".into(),
        mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
        backend: NetBackend::from_fd(OwnedFd::from(ours)),
    });
    let mem = mm.guest_memory().clone();
    Setup {
        mm,
        mem,
        dev,
        peer,
        closed: base + BLOCK,
    }
}

/// One queue as the driver sees it. The used ring is moved to its own page: the mock places
/// it inside the available ring of a 128-entry queue.
struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    used: u64,
    next_desc: u16,
    next_used: u16,
}

/// Offset of a queue's used ring from its descriptor table.
const USED_OFFSET: u64 = 0x1000;

/// A ready queue from `mock`, its used ring at [`USED_OFFSET`].
fn queue_of(mock: &MockSplitQueue<GuestMemoryMmap>, addr: u64) -> Queue {
    let mut queue: Queue = mock.create_queue().unwrap();
    let used = addr + USED_OFFSET;
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue
}

impl DriverQueue<'_> {
    /// Adds `descs` as one chain; returns its head.
    fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        assert!(descs.len() <= usize::from(STRIDE));
        let base = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = (base + i as u16 + 1) % QSIZE;
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, base).unwrap();
        self.next_desc = (base + STRIDE) % QSIZE;
        base
    }

    /// Completed chains not seen yet: (head, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let mem = self.mem;
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.next_used != idx {
            let at = self.used + 4 + 8 * u64::from(self.next_used % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.next_used = self.next_used.wrapping_add(1);
        }
        out
    }
}

struct Driver<'a> {
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
}

fn start<'a>(dev: &mut VirtioNet, mem: &'a GuestMemoryMmap) -> Driver<'a> {
    let rx = MockSplitQueue::create(mem, GuestAddress(RX_ADDR), QSIZE);
    let tx = MockSplitQueue::create(mem, GuestAddress(TX_ADDR), QSIZE);
    assert!(dev.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS));
    dev.activate(vec![queue_of(&rx, RX_ADDR), queue_of(&tx, TX_ADDR)])
        .unwrap();
    let q = |mock, addr| DriverQueue {
        mock,
        mem,
        used: addr + USED_OFFSET,
        next_desc: 0,
        next_used: 0,
    };
    Driver {
        rx: q(rx, RX_ADDR),
        tx: q(tx, TX_ADDR),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What the peer received, if anything.
fn received(peer: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; NET_HDR_SIZE + MAX_FRAME + 16];
    match peer.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// Sends `frame` from the host with a vnet header whose num_buffers bytes are junk.
fn host_sends(peer: &UnixDatagram, frame: &[u8]) {
    let mut bytes = vec![0u8; NET_HDR_SIZE];
    bytes[10] = 0xaa;
    bytes[11] = 0xbb;
    bytes.extend_from_slice(frame);
    peer.send(&bytes).unwrap();
}

fn tx(s: &mut Setup) -> crate::devices::virtio::Signal {
    let mem = s.mem.clone();
    s.dev.process_queue(TX_QUEUE, &mem, &mut s.mm)
}

fn rx(s: &mut Setup) -> crate::devices::virtio::Signal {
    let mem = s.mem.clone();
    s.dev.process_queue(RX_QUEUE, &mem, &mut s.mm)
}

#[test]
fn config_has_the_mac_and_link_up() {
    let s = setup();
    let mut config = [0xffu8; 16];
    s.dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &[0x02, 0, 0, 0, 0, 1]);
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        VIRTIO_NET_S_LINK_UP
    );
    assert_eq!(&config[12..], &[0; 4], "bytes past the config read as zero");
    let mut dev = s.dev;
    assert!(!dev.ack_features(VIRTIO_NET_F_MAC), "VERSION_1 is required");
    assert!(
        !dev.ack_features(VIRTIO_F_VERSION_1 | 1),
        "CSUM was not offered"
    );
}

#[test]
fn tx_sends_the_frame_with_a_zeroed_header() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    // A header claiming checksum offload and GSO, which were not negotiated.
    mem.write_slice(&[1, 1, 0, 0, 0xff, 5, 0, 0, 0, 0, 0, 0], GuestAddress(HDR))
        .unwrap();
    let frame = pattern(1514, 7);
    mem.write_slice(&frame[..100], GuestAddress(DATA)).unwrap();
    mem.write_slice(&frame[100..], GuestAddress(DATA2)).unwrap();
    let head = drv
        .tx
        .add(&[(HDR, HDR_LEN, NEXT), (DATA, 100, NEXT), (DATA2, 1414, 0)]);
    let signal = tx(&mut s);
    assert!(signal.queue && !signal.more && !signal.needs_reset);
    assert_eq!(drv.tx.take_used(), vec![(u32::from(head), 0)]);
    let got = received(&s.peer).expect("a frame on the backend");
    assert_eq!(&got[..NET_HDR_SIZE], &[0; NET_HDR_SIZE]);
    assert_eq!(&got[NET_HDR_SIZE..], &frame[..]);
    let m = s.dev.metrics();
    assert_eq!((m.tx_frames, m.tx_bytes, m.malformed), (1, 1514, 0));
}

#[test]
fn tx_chain_with_a_device_writable_descriptor_is_refused() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    let head = drv.tx.add(&[(HDR, HDR_LEN, NEXT), (DATA, 64, WRITE)]);
    // The buffer the device must not write.
    mem.write_slice(&[0x5a; 64], GuestAddress(DATA)).unwrap();
    tx(&mut s);
    assert_eq!(drv.tx.take_used(), vec![(u32::from(head), 0)]);
    assert_eq!(received(&s.peer), None);
    assert_eq!(s.dev.metrics().malformed, 1);
    assert_eq!(s.dev.metrics().tx_frames, 0);
    let mut after = [0u8; 64];
    mem.read_slice(&mut after, GuestAddress(DATA)).unwrap();
    assert_eq!(after, [0x5a; 64]);
}

#[test]
fn tx_indirect_and_short_chains_are_refused() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    drv.tx.add(&[(HDR, 16 * 4, VRING_DESC_F_INDIRECT as u16)]);
    drv.tx.add(&[(HDR, 11, 0)]);
    tx(&mut s);
    assert_eq!(drv.tx.take_used().len(), 2);
    assert_eq!(received(&s.peer), None);
    assert_eq!(s.dev.metrics().malformed, 2);
}

#[test]
fn tx_chain_larger_than_64k_and_the_header_is_dropped() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    let max = MAX_FRAME as u32;
    // One byte too many: dropped.
    drv.tx.add(&[(HDR, HDR_LEN, NEXT), (DATA, max + 1, 0)]);
    // Exactly the limit: sent.
    drv.tx.add(&[(HDR, HDR_LEN, NEXT), (DATA, max, 0)]);
    tx(&mut s);
    assert_eq!(drv.tx.take_used().len(), 2);
    let got = received(&s.peer).expect("the frame at the limit");
    assert_eq!(got.len(), NET_HDR_SIZE + MAX_FRAME);
    assert_eq!(received(&s.peer), None);
    let m = s.dev.metrics();
    assert_eq!((m.tx_dropped, m.tx_frames), (1, 1));
}

#[test]
fn tx_buffer_in_an_unplugged_block_is_never_touched() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    let closed = s.closed;
    // Touching the PROT_NONE block would kill the test process with SIGSEGV.
    drv.tx.add(&[(HDR, HDR_LEN, NEXT), (closed, 60, 0)]);
    drv.tx.add(&[(closed - 6, HDR_LEN, NEXT), (DATA, 60, 0)]);
    tx(&mut s);
    assert_eq!(drv.tx.take_used().len(), 2);
    assert_eq!(received(&s.peer), None);
    let m = s.dev.metrics();
    assert_eq!((m.tx_dropped, m.tx_frames), (2, 0));
}

#[test]
fn tx_pass_stops_at_its_budget() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    for _ in 0..PASS_BUDGET + 4 {
        drv.tx.add(&[(HDR, HDR_LEN + 60, 0)]);
        drv.tx.next_desc = drv.tx.next_desc.wrapping_sub(STRIDE - 1) % QSIZE;
    }
    let signal = tx(&mut s);
    assert!(signal.more);
    assert_eq!(drv.tx.take_used().len(), PASS_BUDGET);
    let signal = tx(&mut s);
    assert!(!signal.more);
    assert_eq!(drv.tx.take_used().len(), 4);
    assert_eq!(s.dev.metrics().tx_frames, PASS_BUDGET as u64 + 4);
}

#[test]
fn rx_delivers_a_frame_with_num_buffers_set() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    let frame = pattern(1000, 3);
    host_sends(&s.peer, &frame);
    let head = drv
        .rx
        .add(&[(HDR, HDR_LEN, WRITE | NEXT), (DATA, 1514, WRITE)]);
    let signal = rx(&mut s);
    assert!(signal.queue && !signal.more);
    assert_eq!(drv.rx.take_used(), vec![(u32::from(head), HDR_LEN + 1000)]);
    let mut hdr = [0u8; NET_HDR_SIZE];
    mem.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    let mut got = vec![0u8; 1000];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, frame);
    let m = s.dev.metrics();
    assert_eq!((m.rx_frames, m.rx_bytes), (1, 1000));
}

#[test]
fn rx_frame_waits_for_a_buffer() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    host_sends(&s.peer, &pattern(60, 1));
    // No buffer yet: the frame is read and kept, nothing completes.
    let signal = rx(&mut s);
    assert!(!signal.queue && !signal.more);
    assert!(drv.rx.take_used().is_empty());
    drv.rx.add(&[(DATA, 2048, WRITE)]);
    rx(&mut s);
    assert_eq!(drv.rx.take_used(), vec![(0, HDR_LEN + 60)]);
    assert_eq!(s.dev.metrics().rx_dropped, 0);
}

#[test]
fn rx_buffer_too_small_for_the_header_keeps_the_frame_for_the_next() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    host_sends(&s.peer, &pattern(60, 9));
    let small = drv.rx.add(&[(DATA, HDR_LEN - 1, WRITE)]);
    let good = drv.rx.add(&[(DATA2, 2048, WRITE)]);
    rx(&mut s);
    assert_eq!(
        drv.rx.take_used(),
        vec![(u32::from(small), 0), (u32::from(good), HDR_LEN + 60)]
    );
    let m = s.dev.metrics();
    assert_eq!((m.malformed, m.rx_frames, m.rx_dropped), (1, 1, 0));
}

#[test]
fn rx_chain_with_a_device_readable_descriptor_is_refused() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    host_sends(&s.peer, &pattern(60, 9));
    mem.write_slice(&[0x5a; 128], GuestAddress(DATA)).unwrap();
    drv.rx.add(&[(DATA, 128, 0)]);
    rx(&mut s);
    assert_eq!(drv.rx.take_used(), vec![(0, 0)]);
    let mut after = [0u8; 128];
    mem.read_slice(&mut after, GuestAddress(DATA)).unwrap();
    assert_eq!(after, [0x5a; 128], "a device-readable buffer was written");
    assert_eq!(s.dev.metrics().malformed, 1);
}

#[test]
fn rx_frame_larger_than_the_buffer_is_dropped_and_the_next_one_delivered() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    host_sends(&s.peer, &pattern(1500, 1));
    host_sends(&s.peer, &pattern(80, 2));
    mem.write_slice(&[0x5a; 112], GuestAddress(DATA)).unwrap();
    drv.rx.add(&[(DATA, HDR_LEN + 100, WRITE)]);
    drv.rx.add(&[(DATA2, HDR_LEN + 100, WRITE)]);
    rx(&mut s);
    assert_eq!(
        drv.rx.take_used(),
        vec![(0, 0), (STRIDE.into(), HDR_LEN + 80)]
    );
    let mut got = vec![0u8; 80];
    mem.read_slice(&mut got, GuestAddress(DATA2 + u64::from(HDR_LEN)))
        .unwrap();
    assert_eq!(got, pattern(80, 2));
    let mut small = [0u8; 112];
    mem.read_slice(&mut small, GuestAddress(DATA)).unwrap();
    assert_eq!(small, [0x5a; 112], "a dropped frame is not written in part");
    let m = s.dev.metrics();
    assert_eq!((m.rx_dropped, m.rx_frames), (1, 1));
}

#[test]
fn rx_buffer_in_an_unplugged_block_is_never_touched() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    host_sends(&s.peer, &pattern(60, 4));
    drv.rx
        .add(&[(HDR, HDR_LEN, WRITE | NEXT), (s.closed - 16, 1500, WRITE)]);
    drv.rx.add(&[(DATA, 1500, WRITE)]);
    rx(&mut s);
    assert_eq!(
        drv.rx.take_used(),
        vec![(0, 0), (STRIDE.into(), HDR_LEN + 60)]
    );
    let m = s.dev.metrics();
    assert_eq!((m.malformed, m.rx_frames, m.rx_dropped), (1, 1, 0));
}

#[test]
fn rx_short_backend_datagram_is_dropped() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    s.peer.send(&[1, 2, 3]).unwrap();
    host_sends(&s.peer, &pattern(60, 4));
    drv.rx.add(&[(DATA, 1500, WRITE)]);
    rx(&mut s);
    assert_eq!(drv.rx.take_used(), vec![(0, HDR_LEN + 60)]);
    assert_eq!(s.dev.metrics().rx_dropped, 1);
}

#[test]
fn rx_pass_stops_at_its_budget_and_asks_to_run_again() {
    let mut s = setup();
    let mem = s.mem.clone();
    let mut drv = start(&mut s.dev, &mem);
    let frames = PASS_BUDGET + 6;
    for i in 0..frames {
        host_sends(&s.peer, &pattern(60, i as u8));
    }
    let descs: Vec<RawDescriptor> = (0..frames)
        .map(|i| RawDescriptor::from(Descriptor::new(DATA + 2048 * i as u64, 2048, WRITE, 0)))
        .collect();
    drv.rx.mock.add_desc_chains(&descs, 0).unwrap();
    let signal = rx(&mut s);
    assert!(signal.queue && signal.more);
    let used = drv.rx.take_used();
    assert!(used.iter().all(|&(_, len)| len == HDR_LEN + 60), "{used:?}");
    assert_eq!(used.len(), PASS_BUDGET);
    let signal = rx(&mut s);
    assert!(!signal.more);
    assert_eq!(drv.rx.take_used().len(), 6);
    assert_eq!(
        s.dev.metrics().rx_frames,
        frames as u64,
        "{:?}",
        s.dev.metrics()
    );
}

#[test]
fn rings_in_an_unplugged_block_need_a_reset() {
    let mut s = setup();
    let mem = s.mem.clone();
    let rx_mock = MockSplitQueue::create(&mem, GuestAddress(RX_ADDR), QSIZE);
    let tx_mock = MockSplitQueue::create(&mem, GuestAddress(TX_ADDR), QSIZE);
    let mut tx_queue = queue_of(&tx_mock, TX_ADDR);
    tx_queue.set_desc_table_address(Some(s.closed as u32), Some((s.closed >> 32) as u32));
    assert!(s.dev.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC));
    s.dev
        .activate(vec![queue_of(&rx_mock, RX_ADDR), tx_queue])
        .unwrap();
    let signal = tx(&mut s);
    assert!(signal.needs_reset);
    assert_eq!(s.dev.metrics().bad_rings, 1);
}
