//! From a validated [`VmConfig`] to a running VM, step by step.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::numa::{split_boot_ram, NumaNode};
use crate::acpi::{self, AcpiConfig, DsdtConfig};
use crate::arch::x86_64::layout::{
    GuestLayout, GuestRange, ACPI_PM_PORT, GED_GSI, GED_MMIO_SIZE, GED_MMIO_START, PCI_CONFIG_PORT,
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START, PLATFORM_MMIO_START,
    SERIAL_GSI, SERIAL_PORT,
};
use crate::arch::x86_64::{cpuid, regs};
use crate::boot;
use crate::config::VmConfig;
use crate::config::{DimmConfig, VirtioMemDeviceConfig};
use crate::console::Console;
use crate::devices::ged::GedDevice;
use crate::devices::legacy::{I8042Reset, I8042_PORT, I8042_PORT_LEN};
use crate::devices::memory_hotplug::{MemoryHotplugController, MEMORY_HOTPLUG_REGISTERS_SIZE};
use crate::devices::pci::root::PCI_CONFIG_IO_SIZE;
use crate::devices::pci::{BarAllocator, PciConfigIo, PciConfigMmio, PciRoot};
use crate::devices::platform::{AcpiPowerManagement, ACPI_PM_SIZE};
use crate::devices::virtio::balloon::{BalloonConfig, BalloonDevice};
use crate::devices::virtio::block::{BlockConfig, Disk, DiskError, VirtioBlock};
use crate::devices::virtio::mem::{VirtioMem, VirtioMemConfig, VirtioMemError};
use crate::devices::virtio::net::{MacAddr, NetConfig, Tap, TapError, VirtioNet};
use crate::devices::virtio::transport_pci::{
    VirtioPciDevice, VirtioPciError, VirtioTransport, BAR_SIZE,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::Bus;
use crate::events::EventBus;
use crate::memory::placement::{plan_hotplug_area, HotplugPlan};
use crate::memory::{DimmMemoryError, HotplugRegionId, MemoryManager};
use crate::memory_service::{MemoryDevices, MemoryService, MemorySettings};
use crate::vstate::interrupts::MsiRouting;
use crate::vstate::vcpu::{VcpuContext, VcpuExits, VcpuThread};
use crate::vstate::vm;
use crate::vstate::ExitRequester;

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Creating the KVM VM failed.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A device could not be placed on a bus.
    #[error("cannot place a device")]
    Bus(#[from] crate::devices::BusError),
    /// BAR windows could not be created.
    #[error(transparent)]
    Bars(#[from] crate::devices::pci::allocator::BarAllocatorError),
    /// A KVM call failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we asked for.
        what: String,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A virtio device could not be created.
    #[error("cannot create virtio-mem device {id}")]
    VirtioMem {
        /// The device id.
        id: String,
        /// The cause.
        #[source]
        source: VirtioMemError,
    },
    /// A DIMM present before the reboot could not be mapped again.
    #[error("cannot map DIMM {id} again")]
    Dimm {
        /// The DIMM's id.
        id: String,
        /// The cause.
        #[source]
        source: DimmMemoryError,
    },
    /// A disk image could not be opened.
    #[error("cannot attach disk {id}")]
    Disk {
        /// The disk's id.
        id: String,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// A TAP device could not be opened.
    #[error("cannot attach network {id}")]
    Net {
        /// The network's id.
        id: String,
        /// The cause.
        #[source]
        source: TapError,
    },
    /// An open TAP could not be handed to the device.
    #[error("cannot attach network {id}: duplicating the TAP descriptor failed")]
    NetBackend {
        /// The network's id.
        id: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The balloon could not be created.
    #[error("cannot create the balloon")]
    Balloon(#[source] crate::devices::virtio::balloon::BalloonError),
    /// A virtio transport could not be created.
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    /// The PCI bus is full.
    #[error(transparent)]
    PciRoot(#[from] crate::devices::pci::root::PciRootError),
    /// A vCPU thread could not start.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Kvm { what, source }
}

/// A VM that runs. Fields drop in order: vCPU threads are stopped by the owner before this
/// is dropped; the memory service (guest memory and the memory devices) goes last, after
/// nothing can use it. The VM fd closes with the last `Arc<VmFd>`, which the memory manager
/// holds, so KVM's slots stay valid as long as the mappings they point to.
#[derive(Debug)]
pub struct RunningVm {
    /// The vCPU threads.
    pub vcpus: Vec<VcpuThread>,
    /// Tells the vCPU threads to stop.
    pub stop: Arc<AtomicBool>,
    /// Every virtio transport, in the order their queue events are watched.
    pub virtio: Vec<Arc<Mutex<dyn VirtioTransport>>>,
    /// The virtio-blk disks (also in `virtio`), in configuration order.
    pub disks: Vec<Arc<Mutex<VirtioPciDevice<VirtioBlock>>>>,
    /// The virtio-net devices (also in `virtio`), in configuration order.
    pub nets: Vec<Arc<Mutex<VirtioPciDevice<VirtioNet>>>>,
    /// Devices the guest reaches by port I/O and MMIO, and PCI bus 0; held so they live as
    /// long as the VM (the vCPU threads hold the buses too).
    _platform: Platform,
    /// Guest memory and the memory devices.
    pub memory: MemoryService,
}

/// What a running VM keeps alive but the control loop never asks for.
#[derive(Debug)]
#[allow(dead_code)] // Held for their lifetime only.
struct Platform {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    ged: Arc<Mutex<GedDevice>>,
    bars: BarAllocator,
    pci: Arc<Mutex<PciRoot>>,
    msi_routing: Arc<MsiRouting>,
    hotplug_ranges: Arc<Vec<GuestRange>>,
}

/// ACPI DIMM hotplug of a running VM: where DIMMs go, the controller the guest talks to, and
/// the memory manager's region of each plugged slot.
#[derive(Debug)]
pub struct DimmHotplug {
    /// Guest-physical range DIMMs are placed in.
    pub area: GuestRange,
    /// The register block behind `\_SB.MHPC`.
    controller: Arc<Mutex<MemoryHotplugController>>,
    /// Hotplug region of each occupied slot.
    pub regions: std::collections::BTreeMap<u32, HotplugRegionId>,
    /// The GED, which carries the controller's events to the guest.
    ged: Arc<Mutex<GedDevice>>,
}

impl DimmHotplug {
    /// The controller, locked.
    pub fn controller(&self) -> std::sync::MutexGuard<'_, MemoryHotplugController> {
        self.controller.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the guest scan the slots for insert and remove events.
    pub fn notify_guest(&self) {
        let _ = self
            .ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notify(crate::devices::ged::event::MEMORY_HOTPLUG);
    }
}

/// A network's host side, opened once for the life of the VMM: the TAP (and, for
/// `tap=auto`, the interface itself) and the MAC address outlive reboots, so that the host's
/// addresses on the TAP and the guest's neighbours' ARP entries stay valid.
#[derive(Debug)]
pub struct NetAttachment {
    /// The network's id.
    pub id: String,
    /// The open TAP.
    pub tap: Tap,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// Opens the TAP of every `--net`, in order.
pub fn open_nets(config: &VmConfig) -> Result<Vec<NetAttachment>, BuildError> {
    config
        .nets
        .iter()
        .map(|net| {
            let tap = Tap::open(&net.tap).map_err(|source| BuildError::Net {
                id: net.id.clone(),
                source,
            })?;
            let mac = net.mac.unwrap_or_else(MacAddr::random);
            tracing::info!("network {}: TAP {}, guest MAC {mac}", net.id, tap.name());
            Ok(NetAttachment {
                id: net.id.clone(),
                tap,
                mac,
            })
        })
        .collect()
}

/// Where DIMMs go: after the virtio-mem regions, as large as maxmem allows; `None` without
/// slots.
pub fn dimm_area(config: &VmConfig, layout: &GuestLayout) -> Option<GuestRange> {
    if config.memory.slots == 0 {
        return None;
    }
    hotplug_plan(config, layout).dimm_area
}

/// The hotplug area divided among the virtio-mem devices and the DIMM area.
fn hotplug_plan(config: &VmConfig, layout: &GuestLayout) -> HotplugPlan {
    let sizes: Vec<u64> = config.virtio_mem.iter().map(|d| d.size).collect();
    let budget = if config.memory.slots == 0 {
        0
    } else {
        config.memory.dimm_budget()
    };
    plan_hotplug_area(layout.hotplug_area.start, &sizes, budget)
}

/// Maps the DIMMs of `config` again (after a reboot) and shows them to the guest as present
/// at boot.
fn attach_dimms(
    config: &VmConfig,
    layout: &GuestLayout,
    vm_fd: &Arc<VmFd>,
    memory: &mut MemoryManager,
    mmio_bus: &Bus,
    ged: &Arc<Mutex<GedDevice>>,
    exit: &ExitRequester,
) -> Result<Option<DimmHotplug>, BuildError> {
    let Some(area) = dimm_area(config, layout) else {
        return Ok(None);
    };
    let controller = Arc::new(Mutex::new(MemoryHotplugController::new(
        config.memory.slots,
        exit.clone(),
    )));
    mmio_bus.insert(
        controller.clone(),
        PLATFORM_MMIO_START,
        MEMORY_HOTPLUG_REGISTERS_SIZE,
    )?;
    let mut regions = std::collections::BTreeMap::new();
    for DimmConfig {
        id,
        slot,
        start,
        size,
        node,
        backing,
        prealloc,
    } in &config.dimms
    {
        let range = GuestRange {
            start: *start,
            size: *size,
        };
        let region = memory
            .add_dimm(vm_fd, range, *backing, *prealloc)
            .map_err(|source| BuildError::Dimm {
                id: id.clone(),
                source,
            })?;
        regions.insert(*slot, region);
        controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*slot, range, *node, true);
    }
    Ok(Some(DimmHotplug {
        area,
        controller,
        regions,
        ged: ged.clone(),
    }))
}

/// Creates, loads and starts a VM.
pub fn build_vm(
    kvm: &Kvm,
    config: &VmConfig,
    net_attachments: &[NetAttachment],
    console: &Console,
    exit: &ExitRequester,
    vcpu_exits: &Arc<VcpuExits>,
    events: &Arc<EventBus>,
) -> Result<RunningVm, BuildError> {
    let started = std::time::Instant::now();
    let vm_fd = Arc::new(vm::create_vm(kvm)?);
    let layout = GuestLayout::new(config.memory.size);
    let mut memory = MemoryManager::new(layout.clone())?;
    memory.register_boot_ram(&vm_fd)?;

    let io_bus = Arc::new(Bus::new());
    let mmio_bus = Arc::new(Bus::new());
    let pci = Arc::new(Mutex::new(PciRoot::default()));
    let ged = attach_platform_devices(&vm_fd, &io_bus, &mmio_bus, &pci, console, exit)?;
    let mut bars = BarAllocator::new(
        GuestRange {
            start: PCI_MMIO32_START,
            size: PCI_MMIO32_SIZE,
        },
        layout.pci_mmio64,
    )?;

    let msi_routing = Arc::new(MsiRouting::new(vm_fd.clone()));
    let mut attacher = VirtioPciAttacher {
        vm_fd: &vm_fd,
        bars: &mut bars,
        msi_routing: &msi_routing,
        mmio_bus: &mmio_bus,
        pci: &pci,
    };
    let virtio_mem = attach_virtio_mem(
        &config.virtio_mem,
        &layout,
        &vm_fd,
        &mut memory,
        &mut attacher,
    )?;
    let dimms = attach_dimms(config, &layout, &vm_fd, &mut memory, &mmio_bus, &ged, exit)?;
    let hotplug_ranges = Arc::new(
        virtio_mem
            .iter()
            .map(|d| {
                d.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .status()
                    .region
            })
            .chain(dimms.as_ref().map(|d| d.area))
            .collect::<Vec<_>>(),
    );
    let balloon = match &config.balloon {
        Some(balloon_config) => {
            let device = BalloonDevice::new(BalloonConfig {
                target_bytes: balloon_config.size,
                deflate_on_oom: balloon_config.deflate_on_oom,
                free_page_reporting: balloon_config.free_page_reporting,
                stats_interval: balloon_config.stats_interval,
                per_page_discard: balloon_config.per_page_discard,
                on_reuse: balloon_config.on_reuse,
            })
            .map_err(BuildError::Balloon)?;
            Some(attacher.attach("balloon".into(), device)?)
        }
        None => None,
    };
    let mut virtio: Vec<Arc<Mutex<dyn VirtioTransport>>> = virtio_mem
        .iter()
        .map(|d| d.clone() as Arc<Mutex<dyn VirtioTransport>>)
        .collect();
    if let Some(balloon) = &balloon {
        virtio.push(balloon.clone());
    }
    let mut disks = Vec::with_capacity(config.disks.len());
    for disk_config in &config.disks {
        let disk = Disk::open(disk_config.options()).map_err(|source| BuildError::Disk {
            id: disk_config.id.clone(),
            source,
        })?;
        let device = VirtioBlock::new(BlockConfig {
            id: disk_config.id.clone(),
            disk,
        });
        let transport = attacher.attach(disk_config.id.clone(), device)?;
        virtio.push(transport.clone());
        disks.push(transport);
    }
    let mut nets = Vec::with_capacity(net_attachments.len());
    for net in net_attachments {
        let backend = net.tap.backend().map_err(|source| BuildError::NetBackend {
            id: net.id.clone(),
            source,
        })?;
        let device = VirtioNet::new(NetConfig {
            id: net.id.clone(),
            host_name: net.tap.name().to_string(),
            mac: net.mac,
            backend,
        });
        let transport = attacher.attach(net.id.clone(), device)?;
        virtio.push(transport.clone());
        nets.push(transport);
    }

    let acpi_config = AcpiConfig {
        cpus: config.cpus,
        dsdt: DsdtConfig {
            pci_mmio64: layout.pci_mmio64,
            memory_hotplug: (config.memory.slots > 0)
                .then_some((config.memory.slots, PLATFORM_MMIO_START)),
        },
        numa: numa_nodes(config, &layout),
    };
    let rsdp = acpi::write_acpi_tables(memory.guest_memory(), &acpi_config)?;
    let devices_ready = started.elapsed();
    regs::write_boot_gdt(memory.guest_memory())?;
    regs::write_reset_stub(memory.guest_memory())?;
    let boot_info = boot::load_pvh_kernel(
        memory.guest_memory(),
        &layout.ram,
        &config.kernel,
        config.initramfs.as_deref(),
        &config.cmdline,
        rsdp,
    )?;
    let kernel_loaded = started.elapsed();

    let vcpu_fds = create_vcpus(kvm, &vm_fd, config.cpus, boot_info)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut vcpus = Vec::with_capacity(vcpu_fds.len());
    for (index, fd) in vcpu_fds.into_iter().enumerate() {
        let ctx = VcpuContext {
            index: index as u8,
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            hotplug_ranges: hotplug_ranges.clone(),
            exits: vcpu_exits.clone(),
        };
        vcpus.push(VcpuThread::spawn(fd, ctx).map_err(BuildError::Thread)?);
    }
    // Where a boot's host-side time goes (in the nested lane the kernel load is most of it:
    // every page it fills is first zeroed by the host).
    let built = started.elapsed();
    tracing::debug!(
        "VM built in {:.1} ms: VM, memory, devices and ACPI {:.1} ms, kernel and initramfs \
         {:.1} ms, vCPUs {:.1} ms",
        built.as_secs_f64() * 1e3,
        devices_ready.as_secs_f64() * 1e3,
        (kernel_loaded - devices_ready).as_secs_f64() * 1e3,
        (built - kernel_loaded).as_secs_f64() * 1e3,
    );
    let settings = MemorySettings::of(config);
    let memory = MemoryService::new(
        MemoryDevices {
            manager: memory,
            vm_fd,
            virtio_mem,
            balloon,
            dimms,
        },
        settings,
        events.clone(),
    );
    Ok(RunningVm {
        vcpus,
        stop,
        virtio,
        disks,
        nets,
        _platform: Platform {
            io_bus,
            mmio_bus,
            ged,
            bars,
            pci,
            msi_routing,
            hotplug_ranges,
        },
        memory,
    })
}

/// The NUMA topology the SRAT describes: each node's vCPUs and its share of boot RAM; no
/// SRAT without `--numa`.
///
/// Hotplug ranges (virtio-mem regions, the DIMM area) are left out on purpose: a
/// hot-pluggable SRAT range above 4 GiB raises Linux's `max_possible_pfn` past the 32-bit DMA
/// limit, and the guest then allocates and zeroes a 64 MiB swiotlb bounce buffer at boot
/// (measured: `--memory size=512M,slots=4,maxmem=5G` cost 64 MiB of host RSS at boot). The
/// guest needs none of it: a DIMM's node is its `_PXM`, a virtio-mem device's is its
/// `node_id`, both mapped through the proximity domains the nodes' CPUs and boot memory
/// already declare; and Linux sizes its direct map with room for hotplug anyway.
fn numa_nodes(config: &VmConfig, layout: &GuestLayout) -> Vec<NumaNode> {
    if config.numa.is_empty() {
        return Vec::new();
    }
    let sizes: Vec<u64> = config.numa.iter().map(|n| n.memory).collect();
    let memory = split_boot_ram(&layout.ram, &sizes);
    config
        .numa
        .iter()
        .zip(memory)
        .map(|(node, memory)| NumaNode {
            id: node.id,
            cpus: node.cpus.clone(),
            memory,
            hotplug: Vec::new(),
        })
        .collect()
}

/// Where each virtio-mem region goes (see [`plan_hotplug_area`]).
pub fn virtio_mem_regions(
    devices: &[VirtioMemDeviceConfig],
    layout: &GuestLayout,
) -> Vec<GuestRange> {
    let sizes: Vec<u64> = devices.iter().map(|d| d.size).collect();
    plan_hotplug_area(layout.hotplug_area.start, &sizes, 0).virtio_mem
}

/// What putting a virtio device on PCI takes: BAR space, MSI routes, the MMIO bus, bus 0.
struct VirtioPciAttacher<'a> {
    vm_fd: &'a Arc<VmFd>,
    bars: &'a mut BarAllocator,
    msi_routing: &'a Arc<MsiRouting>,
    mmio_bus: &'a Arc<Bus>,
    pci: &'a Arc<Mutex<PciRoot>>,
}

impl VirtioPciAttacher<'_> {
    /// Wraps `device` in a virtio-pci transport with its own BAR and puts it on bus 0.
    fn attach<D: VirtioDevice + 'static>(
        &mut self,
        id: String,
        device: D,
    ) -> Result<Arc<Mutex<VirtioPciDevice<D>>>, BuildError> {
        let bar = self.bars.allocate_mmio32(BAR_SIZE)?;
        let transport = Arc::new(Mutex::new(VirtioPciDevice::new(
            id,
            device,
            bar,
            self.msi_routing.clone(),
            self.vm_fd.clone(),
            self.mmio_bus.clone(),
        )?));
        self.mmio_bus.insert(transport.clone(), bar, BAR_SIZE)?;
        self.pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(transport.clone())?;
        Ok(transport)
    }
}

fn attach_virtio_mem(
    devices: &[VirtioMemDeviceConfig],
    layout: &GuestLayout,
    vm_fd: &Arc<VmFd>,
    memory: &mut MemoryManager,
    attacher: &mut VirtioPciAttacher,
) -> Result<Vec<Arc<Mutex<VirtioPciDevice<VirtioMem>>>>, BuildError> {
    let mut attached = Vec::new();
    for (config, region) in devices.iter().zip(virtio_mem_regions(devices, layout)) {
        let backing = config.backing;
        let hotplug = memory.add_hotplug_region(
            vm_fd,
            region,
            config.block_size,
            backing,
            config.prealloc,
        )?;
        let mem_error = |source| BuildError::VirtioMem {
            id: config.id.clone(),
            source,
        };
        let device = VirtioMem::new(VirtioMemConfig {
            id: config.id.clone(),
            region,
            block_size: config.block_size,
            node: config.node,
            requested_size: config.requested,
            hotplug,
        })
        .map_err(mem_error)?;
        device.check_region(memory).map_err(mem_error)?;
        attached.push(attacher.attach(config.id.clone(), device)?);
    }
    Ok(attached)
}

fn attach_platform_devices(
    vm_fd: &VmFd,
    io_bus: &Bus,
    mmio_bus: &Bus,
    pci: &Arc<Mutex<PciRoot>>,
    console: &Console,
    exit: &ExitRequester,
) -> Result<Arc<Mutex<GedDevice>>, BuildError> {
    vm_fd
        .register_irqfd(console.irq(), SERIAL_GSI)
        .map_err(kvm_err("wire the serial interrupt"))?;
    io_bus.insert(console.device(), u64::from(SERIAL_PORT), 8)?;
    io_bus.insert(
        Arc::new(Mutex::new(AcpiPowerManagement::new(exit.clone()))),
        u64::from(ACPI_PM_PORT),
        ACPI_PM_SIZE,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(I8042Reset::new(exit.clone()))),
        u64::from(I8042_PORT),
        I8042_PORT_LEN,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone(), exit.clone()))),
        u64::from(PCI_CONFIG_PORT),
        PCI_CONFIG_IO_SIZE,
    )?;
    mmio_bus.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )?;
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm_fd
        .register_irqfd(&ged_irq, GED_GSI)
        .map_err(kvm_err("wire the GED interrupt"))?;
    let ged = Arc::new(Mutex::new(GedDevice::new(ged_irq)));
    mmio_bus.insert(ged.clone(), GED_MMIO_START, GED_MMIO_SIZE)?;
    Ok(ged)
}

fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    count: u8,
    boot_info: boot::BootInfo,
) -> Result<Vec<VcpuFd>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let vcpu = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err(format!("create vCPU {index}")))?;
        let mut cpuid = supported.clone();
        cpuid::configure_vcpu_cpuid(&mut cpuid, index, count);
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_err(format!("set CPUID of vCPU {index}")))?;
        regs::setup_vcpu_common(&vcpu)?;
        if index == 0 {
            regs::setup_pvh_boot_vcpu(&vcpu, boot_info.entry, boot_info.start_info)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
