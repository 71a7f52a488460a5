//! The VMM's KVM plumbing on this host's /dev/kvm: VM and irqchip creation, boot RAM slots,
//! and a few instructions of real-mode guest code whose exits we check. No Linux guest boots
//! here (see docs: the host's software KVM cannot run one); those tests live in
//! `crates/tidevm/tests/real_guest`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuExit};
use tidevm_vmm::arch::x86_64::layout::{
    GuestLayout, MMIO32_HOLE_START, PCI_MMIO32_START, RAM_64BIT_START, SERIAL_PORT,
};
use tidevm_vmm::devices::serial::SerialDevice;
use tidevm_vmm::devices::Bus;
use tidevm_vmm::memory::MemoryManager;
use tidevm_vmm::vstate::vm::{create_vm, open_kvm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Opens /dev/kvm or says loudly why the test does not run.
fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match open_kvm() {
        Ok(kvm) => Some(kvm),
        Err(error) => {
            eprintln!();
            eprintln!("**************************************************************");
            eprintln!("SKIPPED: {test}: no /dev/kvm ({error})");
            eprintln!("**************************************************************");
            println!("SKIPPED: {test}: no /dev/kvm");
            None
        }
    }
}

#[test]
fn boot_ram_gets_one_slot_per_range() {
    let Some(kvm) = kvm_or_skip("boot_ram_gets_one_slot_per_range") else {
        return;
    };
    // The memory managers are declared before their VMs so that each VM is dropped first:
    // a memory slot must never outlive the mapping behind it.
    let mut small = MemoryManager::new(GuestLayout::new(64 << 20)).expect("map 64 MiB");
    let mut big = MemoryManager::new(GuestLayout::new(6 << 30)).expect("map 6 GiB");
    let small_vm = create_vm(&kvm).expect("VM with irqchip");
    let big_vm = create_vm(&kvm).expect("second VM with irqchip");

    small.register_boot_ram(&small_vm).expect("register 64 MiB");
    let slots = small.slots();
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert_eq!((slots[0].range.start, slots[0].range.size), (0, 64 << 20));

    big.register_boot_ram(&big_vm).expect("register 6 GiB");
    let slots = big.slots();
    assert_eq!(
        slots.len(),
        2,
        "6 GiB needs two slots around the hole: {slots:?}"
    );
    assert_eq!(slots.len(), big.layout().ram.len());
    assert_eq!(
        (slots[0].range.start, slots[0].range.end()),
        (0, MMIO32_HOLE_START)
    );
    assert_eq!(slots[1].range.start, RAM_64BIT_START);
    assert_eq!(
        slots[0].range.size + slots[1].range.size,
        6 << 30,
        "the slots cover all boot RAM"
    );
    assert_ne!(slots[0].slot, slots[1].slot);
    for (slot, range) in slots.iter().zip(&big.layout().ram) {
        assert_eq!(slot.range, *range);
    }
}

/// Collects what the UART transmits.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the test program lives (real mode, CS base 0).
const CODE_ADDR: u64 = 0x1000;
/// The byte the program stores in RAM, through DS (base 0).
const RAM_TARGET: u64 = 0x2000;
/// ES points into the 32-bit MMIO hole, where no memory slot is: a store through it must
/// come back to the VMM as an MMIO exit.
const ES_BASE: u64 = PCI_MMIO32_START + 0x1000_0000;
const MMIO_OFFSET: u64 = 0x10;

#[rustfmt::skip]
const PROGRAM: &[u8] = &[
    0xba, 0xf8, 0x03,                         // mov dx, 0x3f8
    0xb0, b'A',                               // mov al, 'A'
    0xee,                                     // out dx, al
    0xc6, 0x06, 0x00, 0x20, 0x5a,             // mov byte [0x2000], 0x5a
    0x26, 0xc6, 0x06, 0x10, 0x00, 0x42,       // mov byte es:[0x0010], 0x42
    0xf4,                                     // hlt
];

#[test]
fn real_mode_guest_exits_on_port_io_and_mmio() {
    let Some(kvm) = kvm_or_skip("real_mode_guest_exits_on_port_io_and_mmio") else {
        return;
    };
    let mut memory = MemoryManager::new(GuestLayout::new(64 << 20)).expect("map 64 MiB");
    let vm = create_vm(&kvm).expect("VM with irqchip");
    memory.register_boot_ram(&vm).expect("register boot RAM");
    memory
        .guest_memory()
        .write_slice(PROGRAM, GuestAddress(CODE_ADDR))
        .expect("write the program");

    let vcpu = vm.create_vcpu(0).expect("create vCPU 0");
    let mut sregs = vcpu.get_sregs().expect("get sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    sregs.es.base = ES_BASE;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("get regs");
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).expect("set regs");

    // The port write goes through the same bus and UART the VMM uses.
    let io_bus = Bus::new();
    let sink = Sink::default();
    let serial = SerialDevice::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        Box::new(sink.clone()),
    );
    io_bus
        .insert(Arc::new(Mutex::new(serial)), u64::from(SERIAL_PORT), 8)
        .expect("serial on the I/O bus");

    let mut vcpu = vcpu;
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(port, data) => {
            assert_eq!((port, data), (SERIAL_PORT, &b"A"[..]));
            assert!(io_bus.write(u64::from(port), data), "port 0x3f8 is claimed");
        }
        other => panic!("expected an IoOut exit on 0x3f8, got {other:?}"),
    }
    assert_eq!(&*sink.0.lock().unwrap(), b"A");

    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::MmioWrite(addr, data) => {
            assert_eq!(addr, ES_BASE + MMIO_OFFSET);
            assert_eq!(data, &[0x42]);
        }
        other => panic!(
            "expected an MmioWrite exit at {:#x}, got {other:?}",
            ES_BASE + MMIO_OFFSET
        ),
    }

    // The store into RAM before the MMIO write landed in the manager's guest memory.
    let byte: u8 = memory
        .guest_memory()
        .read_obj(GuestAddress(RAM_TARGET))
        .expect("read guest RAM");
    assert_eq!(byte, 0x5a);
    // The program itself is still there, untouched.
    let mut code = vec![0u8; PROGRAM.len()];
    memory
        .guest_memory()
        .read_slice(&mut code, GuestAddress(CODE_ADDR))
        .expect("read the program back");
    assert_eq!(code, PROGRAM);
    // Drop the vCPU and VM before the memory they map.
    drop(vcpu);
    drop(vm);
}
