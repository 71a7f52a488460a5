//! A guest that touches virtio-mem memory it does not own is caught: a 64-bit guest program
//! on this host's /dev/kvm reads a plugged block (plain memory, no exit), then an unplugged
//! block of the same region; the vCPU thread reports the second access with its address.
//! (Linux never does this, so a tiny program stands in for a misbehaving guest.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use tidevm_vmm::arch::x86_64::layout::{GuestLayout, GuestRange};
use tidevm_vmm::devices::Bus;
use tidevm_vmm::memory::{Backing, MemoryManager};
use tidevm_vmm::vstate::vcpu::{
    install_kick_handler, stop_vcpus, ExitReason, VcpuContext, VcpuExits, VcpuThread,
};
use tidevm_vmm::vstate::vm::{create_vm, open_kvm};
use tidevm_vmm::vstate::{Access, ExitRequester, VmEvent};
use vm_memory::{Bytes, GuestAddress};

const BLOCK: u64 = 2 << 20;
const CODE: u64 = 0x1000;
const PML4: u64 = 0x10_000;
const PDPT: u64 = 0x11_000;
const RESULT: u64 = 0x2000;
const PD_LOW: u64 = 0x12_000;
const PD_REGION: u64 = 0x13_000;

/// Block 64 starts the region's second 128 MiB chunk, which holds no plugged block and so
/// has no KVM slot: the access is an MMIO exit (or, on some hosts, a memory fault).
#[test]
fn access_to_an_unplugged_chunk_is_reported_with_its_address() {
    access_is_reported(64);
}

/// Block 5, plugged and then unplugged, shares the first chunk (and its KVM slot) with the
/// plugged blocks 0 and 1: only its host protection keeps the guest out, and KVM reports a
/// memory fault.
#[test]
fn access_to_an_unplugged_block_beside_plugged_ones_is_reported_with_its_address() {
    access_is_reported(5);
}

/// A guest program reads plugged block 0 and then `unplugged_block`; the read of the latter
/// must come back as a report naming its address.
fn access_is_reported(unplugged_block: u64) {
    let kvm = match open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("\n*** SKIPPED: unplugged_access: no /dev/kvm ({e}) ***\n");
            println!("SKIPPED: unplugged_access: no /dev/kvm");
            return;
        }
    };
    install_kick_handler().unwrap();
    let mut memory = MemoryManager::new(GuestLayout::new(256 << 20)).unwrap();
    let vm = Arc::new(create_vm(&kvm).unwrap());
    memory.register_boot_ram(&vm).unwrap();
    let region = GuestRange {
        start: memory.layout().hotplug_area.start,
        size: 1 << 30,
    };
    let id = memory
        .add_hotplug_region(&vm, region, BLOCK, Backing::Anonymous, false)
        .unwrap();
    // Blocks 2..8 were plugged once and given back: unplugging must close them again.
    memory.plug(id, 0, 8).unwrap();
    memory.unplug(id, 2, 6).unwrap();
    let plugged = region.start;
    let unplugged = region.start + unplugged_block * BLOCK + 0x40;
    let mem = memory.guest_memory().clone();
    mem.write_obj(0x5eed_f00du64, GuestAddress(plugged))
        .unwrap();
    assert!(memory.find_unplugged_access(unplugged).is_some());
    assert!(memory.find_unplugged_access(plugged).is_none());

    // Identity-map the first GiB and the GiB of the region with 2 MiB pages (1 GiB pages
    // are not available on every KVM).
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4)).unwrap();
    for (gib, table) in [(0u64, PD_LOW), (region.start >> 30, PD_REGION)] {
        mem.write_obj(table | 0x3, GuestAddress(PDPT + gib * 8))
            .unwrap();
        for i in 0..512u64 {
            let page = (gib << 30) + (i << 21);
            mem.write_obj(page | 0x83, GuestAddress(table + i * 8))
                .unwrap();
        }
    }
    // movabs rax,[plugged]; mov [RESULT],rax; movabs rax,[unplugged]; hlt
    let mut code = vec![0x48, 0xa1];
    code.extend_from_slice(&plugged.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0x04, 0x25]);
    code.extend_from_slice(&(RESULT as u32).to_le_bytes());
    code.extend_from_slice(&[0x48, 0xa1]);
    code.extend_from_slice(&unplugged.to_le_bytes());
    code.push(0xf4);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();

    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    let code_seg = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data_seg = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code_seg
    };
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.ss = data_seg;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let exits = Arc::new(VcpuExits::default());
    let thread = VcpuThread::spawn(
        vcpu,
        VcpuContext {
            index: 0,
            io_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(Bus::new()),
            exit: ExitRequester::new(move |r| sink.lock().unwrap().push(r)),
            stop: stop.clone(),
            hotplug_ranges: Arc::new(vec![region]),
            exits: exits.clone(),
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while events.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Release);
    stop_vcpus(vec![thread]);

    let events = std::mem::take(&mut *events.lock().unwrap());
    // The touch was an exit, and the shared counters saw it.
    let touches: u64 = exits
        .counts()
        .iter()
        .filter(|(reason, _)| matches!(reason, ExitReason::Mmio | ExitReason::MemoryFault))
        .map(|(_, n)| n)
        .sum();
    assert!(touches >= 1, "{:?}", exits.counts());
    // The plugged block is ordinary memory: the guest read it without any exit.
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(RESULT)).unwrap(),
        0x5eed_f00d,
        "events: {events:?}"
    );
    // An MMIO exit carries the exact address, a memory fault its 4 KiB page; either way the
    // report comes first and names the page the guest touched.
    match events.first() {
        Some(&VmEvent::Violation {
            gpa, access, vcpu, ..
        }) => {
            let gpa = gpa.expect("an MMIO exit or a memory fault names the address");
            assert_eq!(gpa & !0xfff, unplugged & !0xfff, "events: {events:?}");
            // A read: an MMIO exit says so; a memory fault cannot tell.
            assert_ne!(access, Access::Write, "events: {events:?}");
            assert_eq!(vcpu, 0);
        }
        other => panic!("no report of the unplugged access: {other:?} (all: {events:?})"),
    }
    drop(vm);
}
