//! The memory service of a VM built for real ([`build_vm`]: KVM, guest memory, the virtio
//! devices on PCI, the DIMM controller), with no guest driver answering: what the host side
//! of each request does, and that a bad request is refused with its typed error and leaves
//! everything as it was.

use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::builder::{build_vm, RunningVm};
use crate::config::{
    BalloonDeviceConfig, MemoryConfig, SerialConfig, VirtioMemDeviceConfig, VmConfig,
};
use crate::console::Console;
use crate::memory::Backing;
use crate::vstate::vcpu::{install_kick_handler, stop_vcpus, VcpuExits};
use crate::vstate::ExitRequester;

const MIB: u64 = 1 << 20;

/// A VM with 512 MiB of boot RAM, a 1 GiB virtio-mem device `vm0`, a balloon and two DIMM
/// slots under maxmem 2 GiB. Stopped on drop.
struct TestVm(Option<RunningVm>);

impl TestVm {
    /// `None` (after a loud SKIPPED) without KVM or without the guest kernel to load.
    fn build(test: &str) -> Option<TestVm> {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("SKIPPED {test}: no /dev/kvm ({e})");
                return None;
            }
        };
        let kernel = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/guest/vmlinux");
        if !kernel.exists() {
            eprintln!("SKIPPED {test}: no {} (make guest)", kernel.display());
            return None;
        }
        install_kick_handler().unwrap();
        let config = VmConfig {
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            cpus: 1,
            memory: MemoryConfig::parse("size=512M,slots=2,maxmem=2G").unwrap(),
            serial: SerialConfig::Off,
            virtio_mem: vec![VirtioMemDeviceConfig::parse("id=vm0,size=1G").unwrap()],
            violation_policy: ViolationPolicy::Report,
            numa: Vec::new(),
            balloon: Some(BalloonDeviceConfig::parse("size=0").unwrap()),
            disks: Vec::new(),
            nets: Vec::new(),
            dimms: Vec::new(),
            memory_policy: None,
        };
        let vm = build_vm(
            &kvm,
            &config,
            &[],
            &Console::open(&SerialConfig::Off).unwrap(),
            &ExitRequester::new(|_| {}),
            &Arc::new(VcpuExits::default()),
            &Arc::new(EventBus::new()),
        )
        .unwrap();
        Some(TestVm(Some(vm)))
    }

    fn memory(&mut self) -> &mut MemoryService {
        &mut self.0.as_mut().unwrap().memory
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Some(mut vm) = self.0.take() {
            vm.stop.store(true, std::sync::atomic::Ordering::Release);
            stop_vcpus(std::mem::take(&mut vm.vcpus));
        }
    }
}

fn dimm(size: u64, id: &str) -> DimmRequest {
    DimmRequest {
        size,
        node: None,
        id: Some(id.to_owned()),
        backing: Backing::Anonymous,
        prealloc: false,
    }
}

/// Everything a refused request could have changed.
fn snapshot(memory: &MemoryService) -> (String, usize, u64, u64, u64) {
    let (virtio_mem, _) = memory.virtio_mem_statuses().remove(0);
    let balloon = lock(memory.balloon.as_ref().unwrap()).device().status();
    (
        format!("{:?}", memory.memory_state()),
        memory.manager().slots().len(),
        virtio_mem.requested_size,
        balloon.target_bytes,
        memory.dimms_status().unwrap().plugged_bytes,
    )
}

#[test]
fn bad_requests_are_refused_with_their_error_and_change_nothing() {
    let Some(mut vm) =
        TestVm::build("bad_requests_are_refused_with_their_error_and_change_nothing")
    else {
        return;
    };
    let memory = vm.memory();
    let before = snapshot(memory);
    let refusals: Vec<(MemoryRequestError, &str)> = vec![
        (
            memory.resize_virtio_mem("nope", 0).unwrap_err(),
            "unknown device",
        ),
        (
            memory.resize_virtio_mem("vm0", 3 * MIB).unwrap_err(),
            "not whole blocks",
        ),
        (
            memory.resize_virtio_mem("vm0", 2 << 30).unwrap_err(),
            "above the region",
        ),
        (
            memory.set_balloon((512 * MIB) + 4096).unwrap_err(),
            "balloon above boot RAM",
        ),
        (
            memory.add_dimm(dimm(100 * MIB, "odd")).unwrap_err(),
            "DIMM not 128 MiB blocks",
        ),
        (
            memory.add_dimm(dimm(2 << 30, "big")).unwrap_err(),
            "DIMM above maxmem",
        ),
        (
            memory
                .add_dimm(DimmRequest {
                    node: Some(5),
                    ..dimm(128 * MIB, "far")
                })
                .unwrap_err(),
            "DIMM on a node that does not exist",
        ),
        (memory.remove_dimm("ghost").unwrap_err(), "unknown DIMM"),
        (
            memory.set_memory(64 << 30, None).unwrap_err(),
            "total above every limit",
        ),
    ];
    for (error, what) in &refusals {
        eprintln!("{what}: {}", crate::error_chain(error));
    }
    let kinds: Vec<RequestErrorKind> = refusals.iter().map(|(e, _)| e.kind()).collect();
    use RequestErrorKind::{Invalid, NotFound};
    assert_eq!(
        kinds,
        vec![NotFound, Invalid, Invalid, Invalid, Invalid, Invalid, Invalid, NotFound, Invalid]
    );
    assert!(matches!(
        refusals[0].0,
        MemoryRequestError::UnknownVirtioMem(_)
    ));
    assert!(matches!(
        refusals[3].0,
        MemoryRequestError::BalloonAboveBoot { .. }
    ));
    assert!(matches!(refusals[4].0, MemoryRequestError::DimmSize(_)));
    assert!(matches!(
        refusals[5].0,
        MemoryRequestError::AboveMaxmem { .. }
    ));
    assert!(matches!(
        refusals[6].0,
        MemoryRequestError::UnknownNode { .. }
    ));
    assert!(matches!(refusals[8].0, MemoryRequestError::Plan(_)));
    assert_eq!(snapshot(memory), before, "a refused request changed the VM");
}

#[test]
fn a_dimm_brings_host_memory_a_kvm_slot_and_its_limits() {
    let Some(mut vm) = TestVm::build("a_dimm_brings_host_memory_a_kvm_slot_and_its_limits") else {
        return;
    };
    let memory = vm.memory();
    let slots_before = memory.manager().slots().len();
    let added = memory.add_dimm(dimm(256 * MIB, "d0")).unwrap();
    assert_eq!(added.range.size, 256 * MIB);
    assert_eq!(memory.manager().slots().len(), slots_before + 1);
    let slot = memory
        .manager()
        .slots()
        .iter()
        .find(|s| s.range == added.range)
        .copied()
        .expect("a KVM slot for the DIMM");
    // The guest's memory there is real host memory, and costs the host nothing until used:
    // written through the guest memory collection, exactly those pages become resident.
    assert!(memory.manager().is_accessible(added.range.start, 16 * MIB));
    let resident = |memory: &MemoryService| {
        memory
            .manager()
            .resident_page_map(added.range.start, 32 * MIB)
            .expect("the DIMM is accessible guest memory")
            .iter()
            .filter(|r| **r)
            .count() as u64
    };
    assert_eq!(resident(memory), 0);
    let data = vec![0xa5u8; (16 * MIB) as usize];
    memory
        .manager()
        .guest_memory()
        .write_slice(&data, GuestAddress(added.range.start))
        .unwrap();
    // 4 KiB pages, or whole 2 MiB huge pages: at least the 16 MiB written, at most 18.
    let pages = resident(memory);
    assert!((4096..=4608).contains(&pages), "{pages} pages resident");
    assert_ne!(slot.host_addr, 0);

    let status = memory.dimms_status().unwrap();
    assert_eq!(status.plugged_bytes, 256 * MIB);
    assert_eq!(status.dimms.len(), 1);
    assert!(matches!(
        memory.add_dimm(dimm(128 * MIB, "d0")).unwrap_err(),
        MemoryRequestError::DuplicateDimm(_)
    ));
    // Both slots used: a third DIMM has no slot, though it fits under maxmem.
    memory.add_dimm(dimm(256 * MIB, "d1")).unwrap();
    let full = memory.add_dimm(dimm(128 * MIB, "d2")).unwrap_err();
    assert!(matches!(full, MemoryRequestError::SlotsFull(2)), "{full}");
    assert_eq!(full.kind(), RequestErrorKind::Conflict);
    assert_eq!(memory.dimms_status().unwrap().plugged_bytes, 512 * MIB);
}

#[test]
fn a_virtio_mem_request_waits_for_the_guest_and_outlives_the_boot() {
    let Some(mut vm) =
        TestVm::build("a_virtio_mem_request_waits_for_the_guest_and_outlives_the_boot")
    else {
        return;
    };
    let memory = vm.memory();
    memory.resize_virtio_mem("vm0", 256 * MIB).unwrap();
    let (status, _) = memory.virtio_mem_statuses().remove(0);
    assert_eq!(status.requested_size, 256 * MIB);
    // No driver has plugged anything: nothing of the region is open to the guest yet.
    assert_eq!(status.plugged_size, 0);
    assert!(!memory.manager().is_accessible(status.region.start, 4096));
    // The request is kept for the next boot, where the guest plugs back up to it.
    assert_eq!(memory.settings().virtio_mem[0].requested, 256 * MIB);
    // The balloon likewise.
    memory.set_balloon(64 * MIB).unwrap();
    let balloon = lock(memory.balloon.as_ref().unwrap()).device().status();
    assert_eq!(balloon.target_bytes, 64 * MIB);
    assert_eq!(balloon.actual_bytes, 0, "no driver inflated anything");
}
