//! The virtio-net device: one RX and one TX queue, a MAC address and link status in the
//! config space, frames passed to and from a host backend (a TAP) with their
//! `virtio_net_hdr_v1`. No offload is offered (no CSUM, no TSO, no MRG_RXBUF): the guest
//! checksums and segments itself, and the TAP is set to hand over only whole, checksummed
//! frames of at most its MTU.
//!
//! Frames move on the VMM's control thread, through one host buffer per direction: guest
//! memory is only touched through [`read_buffer`] and [`write_buffer`], which ask the memory
//! manager right before each access, so a buffer in unplugged virtio-mem memory, an ejected
//! DIMM or outside RAM is refused and never touched.
//!
//! Wake-ups: the TX queue's notification sends what the guest made available. The RX queue
//! is processed when the guest notifies it (it posted buffers) and when the backend becomes
//! readable (`VirtioDevice::backend_fd`, watched edge-triggered by the control loop). A pass
//! reads frames until the backend has none (so the next frame is a new edge), until the
//! guest has no buffer (its next notification resumes), or until [`PASS_BUDGET`] frames
//! (the pass then asks to be run again, [`Signal::more`]).

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::metrics::NetMetrics;
use super::request::{
    parse_rx, parse_tx, total_len, NetChainError, Piece, MAX_FRAME, NET_HDR_SIZE, QUEUE_SIZE,
};
use super::tap::NetBackend;
use crate::devices::virtio::chain::{
    read_buffer, run_pass, write_buffer, Completion, DescriptorTable, GuestAccess, PASS_BUDGET,
};
use crate::devices::virtio::{
    read_config_space, ActivateError, Signal, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::MemoryManager;

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// `mac` in the config space is valid.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `status` in the config space is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// The link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Config space: mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
pub const CONFIG_SIZE: usize = 12;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `xx:xx:xx:xx:xx:xx` (hex, either case). Multicast addresses are refused: a
    /// NIC's own address must be unicast.
    pub fn parse(text: &str) -> Option<MacAddr> {
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next()?;
            if part.len() != 2 {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        (parts.next().is_none() && bytes[0] & 1 == 0).then_some(MacAddr(bytes))
    }

    /// A random locally administered unicast address (`x2:..`, `x6:..`, `xa:..`, `xe:..`).
    pub fn random() -> MacAddr {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let mut bytes = [0u8; 6];
        bytes.copy_from_slice(&hasher.finish().to_le_bytes()[..6]);
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        MacAddr(bytes)
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// How a network device is set up.
#[derive(Debug)]
pub struct NetConfig {
    /// Name for logs and the API.
    pub id: String,
    /// The host interface behind it (for the API).
    pub host_name: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// Where frames go.
    pub backend: NetBackend,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    id: String,
    host_name: String,
    mac: MacAddr,
    backend: NetBackend,
    acked_features: u64,
    rx: Option<Queue>,
    tx: Option<Queue>,
    metrics: NetMetrics,
    /// Frame read from the backend, with its header; `rx_pending` bytes of it are waiting
    /// for a guest buffer.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// A TX frame gathered from the guest, with its header.
    tx_frame: Vec<u8>,
}

/// What the backend gave.
enum Read {
    /// A frame of this many bytes (header included) is in `rx_frame`.
    Frame(usize),
    /// A frame was consumed and dropped (too short), or the read was interrupted.
    Skipped,
    /// Nothing more to read now.
    Empty,
}

/// Copies `data` into the guest pieces in order; `false` if a piece is not accessible now
/// (what came before it was written).
fn scatter(mem: &GuestMemoryMmap, access: &dyn GuestAccess, pieces: &[Piece], data: &[u8]) -> bool {
    let mut done = 0;
    for piece in pieces {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(piece.len as usize);
        if write_buffer(mem, access, piece.addr, &data[done..done + n]).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// Fills `out` from the guest pieces in order; `false` if a piece is not accessible now.
fn gather(
    mem: &GuestMemoryMmap,
    access: &dyn GuestAccess,
    pieces: &[Piece],
    out: &mut [u8],
) -> bool {
    let mut done = 0;
    for piece in pieces {
        let n = (out.len() - done).min(piece.len as usize);
        if read_buffer(mem, access, piece.addr, &mut out[done..done + n]).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

impl VirtioNet {
    /// Creates a device on an open backend; the queues are not running.
    pub fn new(config: NetConfig) -> Self {
        VirtioNet {
            id: config.id,
            host_name: config.host_name,
            mac: config.mac,
            backend: config.backend,
            acked_features: 0,
            rx: None,
            tx: None,
            metrics: NetMetrics::default(),
            rx_frame: vec![0; NET_HDR_SIZE + MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0; NET_HDR_SIZE + MAX_FRAME],
        }
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host interface behind it.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The device's counters.
    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        b
    }

    /// Reads the next frame from the backend unless one is already waiting.
    fn next_frame(&mut self) -> Read {
        if let Some(len) = self.rx_pending {
            return Read::Frame(len);
        }
        match self.backend.read_frame(&mut self.rx_frame) {
            Ok(n) if n < NET_HDR_SIZE => {
                self.metrics.rx_dropped += 1;
                Read::Skipped
            }
            Ok(n) => {
                // num_buffers: one buffer per frame without MRG_RXBUF. The TAP skips these
                // two bytes instead of writing them.
                self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                self.rx_pending = Some(n);
                Read::Frame(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::Empty,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Read::Skipped,
            Err(e) => {
                self.metrics.backend_errors += 1;
                crate::guest_warn!(
                    "virtio-net {}: reading {} failed: {e}",
                    self.id,
                    self.host_name
                );
                Read::Empty
            }
        }
    }

    /// Puts the waiting frame of `len` bytes into chain `head`; returns the used length.
    /// A chain that cannot hold any frame leaves the frame waiting for the next chain; a
    /// frame too large for a good chain is dropped.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        access: &dyn GuestAccess,
        table: DescriptorTable,
        head: u16,
        len: usize,
    ) -> u32 {
        let pieces = match parse_rx(mem, access, table, head) {
            Ok(pieces) => pieces,
            Err(e) => {
                self.metrics.malformed += 1;
                crate::guest_warn!("virtio-net {}: unusable RX chain: {e}", self.id);
                return 0;
            }
        };
        if !pieces
            .iter()
            .all(|p| access.is_accessible(p.addr, u64::from(p.len)))
        {
            self.metrics.malformed += 1;
            crate::guest_warn!(
                "virtio-net {}: RX buffer in memory the guest does not own",
                self.id
            );
            return 0;
        }
        self.rx_pending = None;
        if total_len(&pieces) < len as u64 {
            self.metrics.rx_dropped += 1;
            return 0;
        }
        if !scatter(mem, access, &pieces, &self.rx_frame[..len]) {
            self.metrics.rx_dropped += 1;
            return 0;
        }
        self.metrics.rx_frames += 1;
        self.metrics.rx_bytes += (len - NET_HDR_SIZE) as u64;
        // At most NET_HDR_SIZE + MAX_FRAME.
        len as u32
    }

    /// Moves frames from the backend into the guest's RX buffers.
    pub fn process_rx_with<A: GuestAccess>(
        &mut self,
        guest_memory: &GuestMemoryMmap,
        access: &mut A,
    ) -> Signal {
        // Taken out so that delivery can borrow the device mutably; put back below.
        let Some(mut queue) = self.rx.take() else {
            return Signal::default();
        };
        let mut signal = Signal::default();
        let mut handled = 0;
        loop {
            if handled == PASS_BUDGET {
                signal.more = true;
                break;
            }
            let len = match self.next_frame() {
                Read::Frame(len) => len,
                Read::Skipped => {
                    handled += 1;
                    continue;
                }
                Read::Empty => break,
            };
            let mut popped = false;
            let pass = run_pass(
                &mut queue,
                guest_memory,
                access,
                1,
                |access, table, head| {
                    popped = true;
                    Completion::Used(self.deliver(guest_memory, &*access, table, head, len))
                },
            );
            signal.queue |= pass.used;
            if pass.rings_lost {
                self.rings_lost("RX");
                signal.needs_reset = true;
                break;
            }
            if !popped {
                // No buffer: the frame waits for the guest's next RX notification.
                break;
            }
            handled += 1;
        }
        self.rx = Some(queue);
        signal
    }

    /// Sends one TX chain's frame to the backend (what a TX pass does with each chain; also
    /// the fuzz target's entry).
    pub fn process_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        access: &dyn GuestAccess,
        table: DescriptorTable,
        head: u16,
    ) {
        let pieces = match parse_tx(mem, access, table, head) {
            Ok(pieces) => pieces,
            Err(NetChainError::TooLarge(len)) => {
                self.metrics.tx_dropped += 1;
                crate::guest_warn!("virtio-net {}: dropped a TX chain of {len} bytes", self.id);
                return;
            }
            Err(e) => {
                self.metrics.malformed += 1;
                crate::guest_warn!("virtio-net {}: unusable TX chain: {e}", self.id);
                return;
            }
        };
        // At most NET_HDR_SIZE + MAX_FRAME: parse_tx checked.
        let len = total_len(&pieces) as usize;
        if !gather(mem, access, &pieces, &mut self.tx_frame[..len]) {
            self.metrics.tx_dropped += 1;
            crate::guest_warn!(
                "virtio-net {}: TX buffer in memory the guest does not own",
                self.id
            );
            return;
        }
        // No offload was negotiated, so the header carries nothing the host may act on:
        // zeroed, whatever the guest wrote, so that the TAP never sees GSO or checksum
        // requests it was not set up for.
        self.tx_frame[..NET_HDR_SIZE].fill(0);
        match self.backend.write_frame(&self.tx_frame[..len]) {
            Ok(_) => {
                self.metrics.tx_frames += 1;
                self.metrics.tx_bytes += (len - NET_HDR_SIZE) as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.metrics.tx_dropped += 1,
            Err(e) => {
                self.metrics.tx_dropped += 1;
                self.metrics.backend_errors += 1;
                crate::guest_warn!(
                    "virtio-net {}: writing a {}-byte frame to {} failed: {e}",
                    self.id,
                    len - NET_HDR_SIZE,
                    self.host_name
                );
            }
        }
    }

    /// Sends what the guest made available on the TX queue, at most [`PASS_BUDGET`] frames.
    pub fn process_tx_with<A: GuestAccess>(
        &mut self,
        guest_memory: &GuestMemoryMmap,
        access: &mut A,
    ) -> Signal {
        let Some(mut queue) = self.tx.take() else {
            return Signal::default();
        };
        let pass = run_pass(
            &mut queue,
            guest_memory,
            access,
            PASS_BUDGET,
            |access, table, head| {
                self.process_tx_chain(guest_memory, &*access, table, head);
                Completion::Used(0)
            },
        );
        if pass.rings_lost {
            self.rings_lost("TX");
        }
        self.tx = Some(queue);
        Signal {
            queue: pass.used,
            more: pass.more,
            needs_reset: pass.rings_lost,
            ..Signal::default()
        }
    }

    fn rings_lost(&mut self, which: &str) {
        self.metrics.bad_rings += 1;
        crate::guest_warn!(
            "virtio-net {}: {which} queue rings are not in accessible memory",
            self.id
        );
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn ack_features(&mut self, features: u64) -> bool {
        if features & !self.features() != 0 || features & VIRTIO_F_VERSION_1 == 0 {
            return false;
        }
        self.acked_features = features;
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's legacy path, not offered.
        crate::guest_warn!(
            "virtio-net {}: driver wrote {} bytes of read-only config at {offset:#x}",
            self.id,
            data.len()
        );
    }

    fn activate(&mut self, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let [rx, tx]: [Queue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 2,
                })?;
        if !rx.ready() {
            return Err(ActivateError::QueueNotEnabled("receive"));
        }
        if !tx.ready() {
            return Err(ActivateError::QueueNotEnabled("transmit"));
        }
        self.rx = Some(rx);
        self.tx = Some(tx);
        Ok(())
    }

    fn reset(&mut self) {
        // Every chain was completed before its pass ended: nothing is in flight. A frame
        // waiting for an RX buffer stays for the driver's next start.
        self.rx = None;
        self.tx = None;
        self.acked_features = 0;
    }

    fn process_queue(
        &mut self,
        index: usize,
        guest_memory: &GuestMemoryMmap,
        memory: &mut MemoryManager,
    ) -> Signal {
        match index {
            RX_QUEUE => self.process_rx_with(guest_memory, memory),
            TX_QUEUE => self.process_tx_with(guest_memory, memory),
            _ => Signal::default(),
        }
    }

    fn backend_fd(&self) -> Option<(RawFd, usize)> {
        Some((self.backend.as_raw_fd(), RX_QUEUE))
    }
}
