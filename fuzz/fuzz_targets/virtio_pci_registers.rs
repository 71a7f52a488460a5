//! The virtio-pci transport of a virtio-mem device under arbitrary register accesses: common
//! configuration, ISR, device configuration, notifications, MSI-X table and PBA (through the
//! MMIO bus, which bounds every access to BAR0 as the vCPU loop does), PCI configuration
//! registers (BAR moves, MSI-X control), activation through `activate_and_drain`, queue
//! passes, requests posted on a queue the input programmed, and host resizes.
//!
//! Needs /dev/kvm (ioeventfds and irqfds): without it the target prints `SKIPPED` once and
//! returns. Each input gets its own VM, so no state leaks between inputs.
//!
//! Invariants: nothing panics or faults; `num_queues` reads 1; a queue size reads as a power
//! of two at most the maximum, 0 for a queue that does not exist; FEATURES_OK is only kept for
//! features that include VERSION_1 and UNPLUGGED_INACCESSIBLE; the ISR clears on read; the
//! device configuration read through the BAR is the device's; the manager's `is_accessible`
//! agrees with the plug bitmap.

#![no_main]

#[path = "common/split_ring.rs"]
mod split_ring;

use std::sync::{Arc, Mutex, MutexGuard, Once};

use kvm_ioctls::{Kvm, VmFd};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use split_ring::{guarded_write, Ring, F_NEXT, F_WRITE};
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::pci::PciDevice;
use tidevm_vmm::devices::virtio::mem::{VirtioMem, VirtioMemConfig};
use tidevm_vmm::devices::virtio::transport_pci::{VirtioPciDevice, BAR_SIZE};
use tidevm_vmm::devices::virtio::VirtioDevice;
use tidevm_vmm::devices::Bus;
use tidevm_vmm::memory::{Backing, BlockRangeState, HotplugRegionId, MemoryManager};
use tidevm_vmm::vstate::interrupts::MsiRouting;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const BLOCK: u64 = 2 * MIB;
const BLOCKS: u64 = 8;
const BAR: u64 = 0xe000_0000;
const RING: u64 = 0x1_0000;
const BUF: u64 = 0x20_0000;
const FEATURES_OK: u8 = 8;
const VERSION_1: u64 = 1 << 32;
const UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    Common(u8),
    Isr(u8),
    Device(u8),
    Notify(u8),
    MsixTable(u8),
    Pba(u8),
    Raw(u16),
}

impl Offset {
    fn get(self) -> u64 {
        match self {
            Offset::Common(o) => u64::from(o % 0x48),
            Offset::Isr(o) => 0x1000 + u64::from(o % 4),
            Offset::Device(o) => 0x2000 + u64::from(o % 0x40),
            Offset::Notify(o) => 0x3000 + u64::from(o % 16),
            Offset::MsixTable(o) => 0x4000 + u64::from(o % 0x40),
            Offset::Pba(o) => 0x5000 + u64::from(o % 16),
            Offset::Raw(o) => u64::from(o) % BAR_SIZE,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        at: Offset,
        len: u8,
    },
    Write {
        at: Offset,
        len: u8,
        value: u64,
    },
    ConfigRead {
        reg: u8,
    },
    ConfigWrite {
        reg: u8,
        offset: u8,
        len: u8,
        value: u32,
    },
    /// The whole driver bring-up with a queue of `2^size_log2` at `rings` + 16 * `skew`.
    BringUp {
        size_log2: u8,
        skew: u16,
        in_block: Option<u8>,
    },
    Status(u8),
    Drain,
    Process,
    /// A plug/unplug/state request on the queue BringUp programmed.
    Request {
        ty: u8,
        block: u8,
        nb: u8,
        resp_in_block: bool,
    },
    Resize(u8),
}

struct Rig {
    transport: Arc<Mutex<VirtioPciDevice<VirtioMem>>>,
    bus: Arc<Bus>,
    mm: MemoryManager,
    id: HotplugRegionId,
    base: u64,
    ring: Option<Ring>,
    next: u16,
    _vm: Arc<VmFd>,
}

fn rig() -> Option<Rig> {
    static SKIP: Once = Once::new();
    let vm = Kvm::new()
        .ok()
        .and_then(|kvm| kvm.create_vm().ok())
        .map(Arc::new);
    let Some(vm) = vm else {
        SKIP.call_once(|| println!("SKIPPED: /dev/kvm is not usable here"));
        return None;
    };
    vm.create_irq_chip().unwrap();
    let routing = Arc::new(MsiRouting::new(vm.clone()));
    let bus = Arc::new(Bus::new());
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
        node: Some(0),
        requested_size: 4 * BLOCK,
        hotplug: id,
    })
    .unwrap();
    let transport = Arc::new(Mutex::new(
        VirtioPciDevice::new("fuzz".into(), dev, BAR, routing, vm.clone(), bus.clone()).unwrap(),
    ));
    bus.insert(transport.clone(), BAR, BAR_SIZE).unwrap();
    Some(Rig {
        transport,
        bus,
        mm,
        id,
        base,
        ring: None,
        next: 0,
        _vm: vm,
    })
}

impl Rig {
    fn t(&self) -> MutexGuard<'_, VirtioPciDevice<VirtioMem>> {
        self.transport.lock().unwrap()
    }

    /// A read of BAR0 at `offset` through the MMIO bus, as the vCPU loop does it (the bus
    /// bounds the access to BAR0; after a BAR move the device is found at its new place).
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        let addr = self.t().bar_addr() + offset;
        self.bus.read(addr, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        let addr = self.t().bar_addr() + offset;
        self.bus.write(addr, &value.to_le_bytes()[..len]);
    }

    fn drain(&mut self) {
        let mem = self.mm.guest_memory().clone();
        self.transport
            .lock()
            .unwrap()
            .activate_and_drain(&mem, &mut self.mm);
    }

    fn check(&mut self) {
        assert_eq!(self.read(0x12, 2), 1, "num_queues");
        let select = self.read(0x16, 2);
        let size = self.read(0x18, 2);
        if select == 0 {
            assert!(size.is_power_of_two() && size <= 128, "queue size {size}");
        } else {
            assert_eq!(size, 0, "queue {select} does not exist");
        }
        let status = self.read(0x14, 1) as u8;
        if status & FEATURES_OK != 0 {
            let sel = self.read(0x08, 4);
            self.write(0x08, 4, 0);
            let lo = self.read(0x0c, 4);
            self.write(0x08, 4, 1);
            let hi = self.read(0x0c, 4);
            self.write(0x08, 4, sel);
            let features = lo | hi << 32;
            let need = VERSION_1 | UNPLUGGED_INACCESSIBLE;
            assert_eq!(features & need, need, "FEATURES_OK with {features:#x}");
        }
        for offset in [0u64, 0x18, 0x28, 0x30] {
            let mut direct = [0u8; 8];
            self.t().device().read_config(offset, &mut direct);
            assert_eq!(
                self.read(0x2000 + offset, 8),
                u64::from_le_bytes(direct),
                "device config at {offset:#x}"
            );
        }
        for b in 0..BLOCKS {
            let open = self.mm.is_accessible(self.base + b * BLOCK, BLOCK);
            let state = self.mm.block_state(self.id, b, 1).unwrap();
            assert_eq!(open, state == BlockRangeState::Plugged);
        }
        assert_eq!(
            self.t().device().status().plugged_size,
            self.mm.plugged_bytes(self.id).unwrap()
        );
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Read { at, len } => {
                let len = [1, 2, 4, 8][usize::from(len % 4)];
                let offset = at.get();
                if offset == 0x1000 && len >= 1 {
                    self.read(offset, len);
                    assert_eq!(self.read(offset, 1), 0, "ISR clears on read");
                } else {
                    self.read(offset, len);
                }
            }
            Op::Write { at, len, value } => {
                let len = [1, 2, 4, 8][usize::from(len % 4)];
                self.write(at.get(), len, value);
            }
            Op::ConfigRead { reg } => {
                self.t().read_config_register(usize::from(reg % 64));
            }
            Op::ConfigWrite {
                reg,
                offset,
                len,
                value,
            } => {
                let offset = u64::from(offset % 4);
                let len = (usize::from(len % 4) + 1).min(4 - offset as usize);
                let bytes = value.to_le_bytes();
                self.t()
                    .write_config_register(usize::from(reg % 64), offset, &bytes[..len]);
            }
            Op::BringUp {
                size_log2,
                skew,
                in_block,
            } => {
                let size = 1u16 << (size_log2 % 8);
                let base = match in_block {
                    Some(b) => self.base + u64::from(b) % BLOCKS * BLOCK,
                    None => RING,
                } + u64::from(skew % 64) * 16;
                let ring = Ring::at(base, size);
                ring.clear(self.mm.guest_memory(), &self.mm);
                self.write(0x14, 1, 0);
                self.write(0x14, 1, 1);
                self.write(0x14, 1, 3);
                self.write(0x08, 4, 0);
                self.write(0x0c, 4, UNPLUGGED_INACCESSIBLE);
                self.write(0x08, 4, 1);
                self.write(0x0c, 4, 1);
                self.write(0x14, 1, 3 | 8);
                self.write(0x16, 2, 0);
                self.write(0x18, 2, u64::from(size));
                let [(d, _), (a, _), (u, _)] = ring.ranges();
                self.write(0x20, 8, d);
                self.write(0x28, 8, a);
                self.write(0x30, 8, u);
                self.write(0x1a, 2, 0);
                self.write(0x10, 2, 1);
                self.write(0x1c, 2, 1);
                self.write(0x14, 1, 3 | 8 | 4);
                self.ring = Some(ring);
                self.next = 0;
            }
            Op::Status(s) => self.write(0x14, 1, u64::from(s)),
            Op::Drain => self.drain(),
            Op::Process => {
                let mem = self.mm.guest_memory().clone();
                let mut t = self.transport.lock().unwrap();
                let signal = t.device_mut().process_queue(0, &mem, &mut self.mm);
                t.raise(signal, 0);
                drop(t);
                let mem = self.mm.guest_memory().clone();
                if let Some(ring) = self.ring.as_mut() {
                    let _ = ring.take_used(&mem, &self.mm);
                }
            }
            Op::Request {
                ty,
                block,
                nb,
                resp_in_block,
            } => {
                let mem = self.mm.guest_memory().clone();
                let Some(ring) = self.ring.as_mut() else {
                    return;
                };
                let addr = self.base + u64::from(block) % (BLOCKS + 1) * BLOCK;
                let mut req = [0u8; 24];
                req[0..2].copy_from_slice(&u16::from(ty % 4).to_le_bytes());
                req[8..16].copy_from_slice(&addr.to_le_bytes());
                req[16..18].copy_from_slice(&u16::from(nb % 4).to_le_bytes());
                guarded_write(&mem, &self.mm, BUF, &req);
                let resp = if resp_in_block { addr } else { BUF + 0x100 };
                let head = self.next % ring.size;
                let second = (head + 1) % ring.size;
                ring.write_desc(&mem, &self.mm, head, (BUF, 24, F_NEXT, second));
                ring.write_desc(&mem, &self.mm, second, (resp, 10, F_WRITE, 0));
                // The response may land in the rings only if the input put them there.
                if ring.hits_rings(resp, 10) {
                    ring.tainted = true;
                }
                if ring.outstanding.len() < usize::from(ring.size / 2) {
                    ring.post(&mem, &self.mm, head);
                }
                self.next = (head + 2) % ring.size;
            }
            Op::Resize(blocks) => {
                let bytes = u64::from(blocks) % (BLOCKS + 1) * BLOCK;
                let mut t = self.t();
                let signal = t.device_mut().set_requested_size(bytes).unwrap();
                t.raise(signal, 0);
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let Some(mut rig) = rig() else {
        return;
    };
    for op in ops.iter().take(64) {
        rig.run(op);
        rig.check();
    }
});
