//! Transport register tests: every register here is guest-written, so each rule is checked
//! the way a driver (or an attacker) would exercise it. Needs /dev/kvm for the ioeventfds and
//! MSI routes; without it the tests say SKIPPED.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::arch::x86_64::layout::GuestLayout;
use crate::devices::virtio::ActivateError;
use crate::memory::MemoryManager;

const BAR: u64 = 0xe000_0000;
const ACK: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;

/// A device that counts what the transport asks of it.
#[derive(Default)]
struct Probe {
    activations: usize,
    resets: usize,
    passes: usize,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        24
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) -> bool {
        features & !VIRTIO_F_VERSION_1 == 0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _queues: Vec<Queue>) -> Result<(), ActivateError> {
        self.activations += 1;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
    fn process_queue(
        &mut self,
        _index: usize,
        _guest_memory: &GuestMemoryMmap,
        _memory: &mut MemoryManager,
    ) -> Signal {
        self.passes += 1;
        Signal::default()
    }
}

struct Rig {
    transport: VirtioPciDevice<Probe>,
    bus: Arc<Bus>,
    memory: MemoryManager,
    _vm: Arc<VmFd>,
}

fn rig() -> Option<Rig> {
    let vm = kvm_ioctls::Kvm::new()
        .ok()
        .and_then(|kvm| kvm.create_vm().ok())
        .map(Arc::new);
    let Some(vm) = vm else {
        println!("SKIPPED: /dev/kvm is not usable here");
        return None;
    };
    vm.create_irq_chip().unwrap();
    let routing = Arc::new(MsiRouting::new(vm.clone()));
    let bus = Arc::new(Bus::new());
    let transport = VirtioPciDevice::new(
        "probe".into(),
        Probe::default(),
        BAR,
        routing,
        vm.clone(),
        bus.clone(),
    )
    .unwrap();
    let memory = MemoryManager::new(GuestLayout::new(64 << 20)).unwrap();
    Some(Rig {
        transport,
        bus,
        memory,
        _vm: vm,
    })
}

impl Rig {
    fn write(&mut self, offset: u64, value: u64, len: usize) {
        self.transport.write(offset, &value.to_le_bytes()[..len]);
    }
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.transport.read(offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }
    fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }
    fn set_status(&mut self, status: u8) {
        self.write(0x14, u64::from(status), 1);
    }
    /// Programs queue `index` with rings in boot RAM and enables it.
    fn program_queue(&mut self, index: u16) {
        let base = 0x10_0000 + u64::from(index) * 0x1000;
        self.write(0x16, u64::from(index), 2);
        self.write(0x18, 16, 2);
        self.write(0x20, base, 8);
        self.write(0x28, base + 0x200, 8);
        self.write(0x30, base + 0x400, 8);
        self.write(0x1c, 1, 2);
    }
    /// The driver's whole bring-up: features, FEATURES_OK, queues, DRIVER_OK.
    fn bring_up(&mut self) {
        self.set_status(ACK);
        self.set_status(ACK | DRIVER);
        self.write(0x08, 1, 4);
        self.write(0x0c, 1, 4); // VERSION_1 (bit 32)
        self.set_status(ACK | DRIVER | FEATURES_OK);
        self.program_queue(0);
        self.program_queue(1);
        self.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        self.drain();
    }
    fn drain(&mut self) {
        let guest_memory = self.memory.guest_memory().clone();
        self.transport
            .activate_and_drain(&guest_memory, &mut self.memory);
    }
}

#[test]
fn bring_up_activates_once_and_status_bits_only_clear_on_reset() {
    let Some(mut r) = rig() else {
        return;
    };
    r.bring_up();
    assert_eq!(r.transport.device().activations, 1);
    assert_eq!(r.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    // Hostile-guest defect 6b: clearing DRIVER_OK without a reset, then setting it again,
    // re-activated the queues from index 0 and replayed every old request.
    r.set_status(ACK | DRIVER | FEATURES_OK);
    assert_eq!(
        r.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        "not cleared"
    );
    r.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    r.drain();
    assert_eq!(r.transport.device().activations, 1, "no second activation");
    // The driver cannot set DEVICE_NEEDS_RESET itself.
    r.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(r.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    // A reset (0) clears everything, and a new bring-up activates again.
    r.set_status(0);
    assert_eq!(r.status(), 0);
    assert_eq!(r.transport.device().resets, 1);
    r.bring_up();
    assert_eq!(r.transport.device().activations, 2);
}

#[test]
fn features_ok_is_refused_without_version_1_and_driver_ok_without_features_ok() {
    let Some(mut r) = rig() else {
        return;
    };
    r.set_status(ACK | DRIVER);
    r.set_status(ACK | DRIVER | FEATURES_OK);
    assert_eq!(r.status() & FEATURES_OK, 0, "VERSION_1 was not accepted");
    r.program_queue(0);
    r.set_status(ACK | DRIVER | DRIVER_OK);
    r.drain();
    assert_eq!(r.transport.device().activations, 0);
}

#[test]
fn queue_registers_are_checked() {
    let Some(mut r) = rig() else {
        return;
    };
    assert_eq!(r.read(0x12, 2), 2, "num_queues");
    r.write(0x16, 0, 2);
    assert_eq!(r.read(0x18, 2), 16, "size starts at the maximum");
    for bad in [0, 3, 32] {
        r.write(0x18, bad, 2);
        assert_eq!(r.read(0x18, 2), 16, "size {bad} refused");
    }
    r.write(0x18, 8, 2);
    assert_eq!(r.read(0x18, 2), 8);
    r.write(0x20, 0x10_0000, 8);
    r.write(0x1c, 1, 2);
    r.write(0x20, 0x20_0000, 8);
    assert_eq!(
        r.read(0x20, 8),
        0x10_0000,
        "addresses are frozen once enabled"
    );
    // A queue beyond the device's reads as absent and takes no writes.
    r.write(0x16, 7, 2);
    assert_eq!(r.read(0x18, 2), 0);
    r.write(0x18, 4, 2);
    r.write(0x20, 0x30_0000, 8);
    assert_eq!(r.read(0x20, 8), 0);
    // MSI-X vectors beyond the table (2 queues + config = 3 vectors) read back as NO_VECTOR.
    r.write(0x16, 0, 2);
    r.write(0x1a, 2, 2);
    assert_eq!(r.read(0x1a, 2), 2);
    r.write(0x1a, 3, 2);
    assert_eq!(r.read(0x1a, 2), u64::from(NO_VECTOR));
    r.write(0x10, 0xffff_u64 - 1, 2);
    assert_eq!(r.read(0x10, 2), u64::from(NO_VECTOR));
}

#[test]
fn rings_outside_guest_memory_fail_the_device() {
    let Some(mut r) = rig() else {
        return;
    };
    r.set_status(ACK | DRIVER);
    r.write(0x08, 1, 4);
    r.write(0x0c, 1, 4);
    r.set_status(ACK | DRIVER | FEATURES_OK);
    r.write(0x16, 0, 2);
    r.write(0x20, 0xc000_0000, 8); // the PCI hole
    r.write(0x28, 0x10_0200, 8);
    r.write(0x30, 0x10_0400, 8);
    r.write(0x1c, 1, 2);
    r.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    r.drain();
    assert_eq!(r.transport.device().activations, 0);
    assert_eq!(r.status() & STATUS_FAILED, STATUS_FAILED);
}

/// Hostile-guest defect 6a: reprogramming BAR0 moved only the notify ioeventfds; the MMIO
/// bus kept dispatching the old address, and the new one reached nothing.
#[test]
fn a_moved_bar_moves_its_mmio_range() {
    let Some(r) = rig() else {
        return;
    };
    let bus = r.bus.clone();
    let transport = Arc::new(std::sync::Mutex::new(r.transport));
    bus.insert(transport.clone(), BAR, BAR_SIZE).unwrap();
    let num_queues_at = |base: u64| {
        let mut data = [0u8; 2];
        bus.read(base + 0x12, &mut data)
            .then(|| u16::from_le_bytes(data))
    };
    assert_eq!(num_queues_at(BAR), Some(2));
    let new_bar: u64 = 0xe010_0000;
    {
        let mut t = transport.lock().unwrap();
        // The sizing protocol's all-ones write must not move anything.
        t.write_config_register(BAR0_REG, 0, &u32::MAX.to_le_bytes());
        t.write_config_register(BAR0_REG + 1, 0, &u32::MAX.to_le_bytes());
        t.write_config_register(BAR0_REG, 0, &(new_bar as u32).to_le_bytes());
        t.write_config_register(BAR0_REG + 1, 0, &0u32.to_le_bytes());
        assert_eq!(t.bar_addr(), new_bar);
    }
    assert_eq!(
        num_queues_at(new_bar),
        Some(2),
        "the new address reaches it"
    );
    assert_eq!(num_queues_at(BAR), None, "the old one no longer does");
    // A BAR moved over another device stays where it is.
    let other: Arc<std::sync::Mutex<dyn BusDevice>> = Arc::new(std::sync::Mutex::new(
        crate::devices::bus::tests_support::Null,
    ));
    bus.insert(other, 0xe020_0000, 0x1000).unwrap();
    {
        let mut t = transport.lock().unwrap();
        t.write_config_register(BAR0_REG, 0, &0xe020_0000u32.to_le_bytes());
        assert_eq!(t.bar_addr(), new_bar);
    }
    assert_eq!(num_queues_at(new_bar), Some(2));
}

/// Found by the `virtio_pci_registers` fuzz target (LeakSanitizer): the transport held its
/// MMIO bus strongly while the bus held the transport, so neither was ever dropped. Every
/// guest reboot builds new buses and transports, so each one leaked the old VM's transports,
/// and through them its VmFd, eventfds and irqfds.
#[test]
fn a_transport_on_its_bus_is_dropped_with_the_bus() {
    let Some(r) = rig() else {
        return;
    };
    let bus = r.bus.clone();
    let transport = Arc::new(std::sync::Mutex::new(r.transport));
    bus.insert(transport.clone(), BAR, BAR_SIZE).unwrap();
    let weak = Arc::downgrade(&transport);
    drop(transport);
    drop(r.bus);
    assert!(weak.upgrade().is_some(), "the bus keeps it while it lives");
    drop(bus);
    assert!(
        weak.upgrade().is_none(),
        "the transport outlived its bus (reference cycle)"
    );
}
