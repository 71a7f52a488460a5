//! The memory service: every memory request of a running VM (virtio-mem resizes, the
//! balloon, ACPI DIMMs, memory violations) goes here, not through the control loop.
//!
//! It owns the [`MemoryManager`] (the only code that maps, protects, discards and sets KVM
//! slots) and the memory devices, finds devices by id, and answers with typed errors; the API
//! edge (`vmm::api`) turns those into HTTP status codes. What must survive a reboot (requested
//! sizes, DIMMs, the balloon target, the violation log) is kept in [`MemorySettings`], which
//! the control loop carries into the next boot.
//!
//! [`autopilot`] holds the `--memory-policy` policy (a pure function from the guest's and the
//! host's reports to a target total) and [`autopilot::Autopilot::tick`]; `autopilot_run` calls
//! it on the service's timer and hands each target to the planner (`plan`), like a
//! `PUT /vm/memory`, so with DIMM slots configured the autopilot adds and ejects DIMMs too.

pub mod autopilot;
mod autopilot_run;
mod dimms;
mod errors;
mod plan;
mod progress;
#[cfg(test)]
mod tests_service;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

pub use self::dimms::{DimmRequest, DimmState, DimmStatus, DimmsStatus, OstStatus};
pub use self::errors::{MemoryRequestError, RequestErrorKind};
use crate::arch::x86_64::layout::GuestRange;
use crate::builder::DimmHotplug;
use crate::config::{
    BalloonDeviceConfig, DimmConfig, MemoryConfig, ViolationPolicy, VirtioMemDeviceConfig, VmConfig,
};
use crate::devices::virtio::balloon::device::STATS_QUEUE;
use crate::devices::virtio::balloon::{BalloonDevice, BalloonStatus};
use crate::devices::virtio::mem::{VirtioMem, VirtioMemMetrics, VirtioMemStatus};
use crate::devices::virtio::transport_pci::VirtioPciDevice;
use crate::events::EventBus;
use crate::memory::{MemoryManager, ResidentSplit};
use crate::vstate::Access;
use tidevm_api::Event;

/// A virtio-mem device on PCI.
pub type VirtioMemHandle = Arc<Mutex<VirtioPciDevice<VirtioMem>>>;
/// The balloon on PCI.
pub type BalloonHandle = Arc<Mutex<VirtioPciDevice<BalloonDevice>>>;

/// How many memory violations the API keeps.
pub const MAX_VIOLATIONS_KEPT: usize = 16;

/// A guest access to memory it does not own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Guest-physical address, when KVM gave one.
    pub gpa: Option<u64>,
    /// Read, write, or unknown.
    pub access: Access,
    /// The vCPU.
    pub vcpu: u8,
    /// The virtio-mem device whose region holds the address, if any.
    pub device: Option<String>,
}

/// The most recent violations and their count since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViolationLog {
    /// The last [`MAX_VIOLATIONS_KEPT`].
    pub recent: Vec<Violation>,
    /// All since start.
    pub count: u64,
}

/// What of the memory configuration a running VM changes, kept across reboots.
#[derive(Clone, Debug)]
pub struct MemorySettings {
    /// Boot RAM, DIMM slots and maxmem.
    pub memory: MemoryConfig,
    /// virtio-mem devices, with their requested sizes.
    pub virtio_mem: Vec<VirtioMemDeviceConfig>,
    /// Plugged DIMMs.
    pub dimms: Vec<DimmConfig>,
    /// The balloon, with its target.
    pub balloon: Option<BalloonDeviceConfig>,
    /// NUMA nodes (at least 1).
    pub numa_nodes: u32,
    /// Boot RAM per NUMA node (one node 0 without `--numa`).
    pub boot_by_node: Vec<(u32, u64)>,
    /// What a guest touching memory it does not own costs it.
    pub violation_policy: ViolationPolicy,
    /// The memory autopilot's policy, when it is on.
    pub memory_policy: Option<autopilot::PolicyConfig>,
    /// Violations so far (they outlive a reboot: they describe the guest, not one boot).
    pub violations: ViolationLog,
}

impl MemorySettings {
    /// The memory part of `config`.
    pub fn of(config: &VmConfig) -> Self {
        MemorySettings {
            memory: config.memory.clone(),
            virtio_mem: config.virtio_mem.clone(),
            dimms: config.dimms.clone(),
            balloon: config.balloon.clone(),
            numa_nodes: config.numa.len().max(1) as u32,
            boot_by_node: if config.numa.is_empty() {
                vec![(0, config.memory.size)]
            } else {
                config.numa.iter().map(|n| (n.id, n.memory)).collect()
            },
            violation_policy: config.violation_policy,
            memory_policy: config.memory_policy.clone(),
            violations: ViolationLog::default(),
        }
    }

    /// Writes what changed back into `config`, for the next boot.
    pub fn write_back(&self, config: &mut VmConfig) {
        config.memory_policy = self.memory_policy.clone();
        config.virtio_mem = self.virtio_mem.clone();
        config.dimms = self.dimms.clone();
        config.balloon = self.balloon.clone();
    }
}

/// The memory devices of a running VM, as the builder made them.
pub struct MemoryDevices {
    /// The memory manager.
    pub manager: MemoryManager,
    /// The KVM VM (DIMMs add slots to it).
    pub vm_fd: Arc<VmFd>,
    /// virtio-mem devices, in configuration order.
    pub virtio_mem: Vec<VirtioMemHandle>,
    /// The balloon.
    pub balloon: Option<BalloonHandle>,
    /// ACPI DIMM hotplug, when the VM has slots.
    pub dimms: Option<DimmHotplug>,
}

/// What happened on a timer tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// When to tick again (`None`: no timer).
    pub next_in: Option<Duration>,
    /// The balloon's reuse scan found the guest writing inflated pages and its policy is to
    /// stop the VM.
    pub stop_for_reuse: bool,
}

/// What the control loop should do after a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationOutcome {
    /// Recorded; the VM goes on.
    Continue,
    /// The policy stops the VM.
    Stop,
}

/// The memory of one running VM. See the module docs.
pub struct MemoryService {
    manager: MemoryManager,
    vm_fd: Arc<VmFd>,
    virtio_mem: Vec<VirtioMemHandle>,
    balloon: Option<BalloonHandle>,
    dimms: Option<DimmHotplug>,
    settings: MemorySettings,
    next_stats: Option<Instant>,
    events: Arc<EventBus>,
    progress: progress::Progress,
    autopilot: Option<autopilot_run::Running>,
    /// The total of the last plan carried out (`PUT /vm/memory`, the autopilot), to tell a
    /// partial result from a finished one.
    memory_target: Option<u64>,
}

impl std::fmt::Debug for MemoryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryService")
            .field("virtio_mem", &self.virtio_mem.len())
            .field("balloon", &self.balloon.is_some())
            .field("dimms", &self.settings.dimms.len())
            .finish()
    }
}

/// The guest RAM the balloon's RSS audit measures against: boot RAM, plugged virtio-mem
/// memory and every DIMM. DIMMs are guest mappings too, so their resident memory is in the
/// guest-memory RSS; leaving them out made a guest using its DIMMs look like one using
/// inflated pages.
fn guest_ram_bytes(boot: u64, virtio_mem_plugged: u64, dimms: &[u64]) -> u64 {
    dimms
        .iter()
        .fold(boot.saturating_add(virtio_mem_plugged), |total, d| {
            total.saturating_add(*d)
        })
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryService {
    /// The service for one boot.
    pub fn new(devices: MemoryDevices, settings: MemorySettings, events: Arc<EventBus>) -> Self {
        MemoryService {
            manager: devices.manager,
            vm_fd: devices.vm_fd,
            virtio_mem: devices.virtio_mem,
            balloon: devices.balloon,
            dimms: devices.dimms,
            next_stats: None,
            autopilot: settings
                .memory_policy
                .clone()
                .map(|p| autopilot_run::Running::new(p, Instant::now())),
            settings,
            events,
            progress: progress::Progress::default(),
            memory_target: None,
        }
    }

    /// A device was asked directly (`PUT /vm/balloon`, `/vm/virtio-mem/{id}`, `/vm/dimms`,
    /// Cloud Hypervisor's `desired_balloon`, or a plan's own step): the last plan's total is
    /// no longer what the guest is asked for. `set_memory` sets it again after its steps.
    fn forget_memory_target(&mut self) {
        self.memory_target = None;
    }

    /// Publishes `event` on the event stream.
    fn publish(&self, event: Event) {
        self.events.publish(event);
    }

    /// The settings to carry into the next boot.
    pub fn settings(&self) -> &MemorySettings {
        &self.settings
    }

    /// The memory manager, for queue processing on the control thread.
    pub fn manager_mut(&mut self) -> &mut MemoryManager {
        &mut self.manager
    }

    /// The memory manager.
    pub fn manager(&self) -> &MemoryManager {
        &self.manager
    }

    /// Host resident memory, split into guest memory and the VMM's own.
    pub fn resident(&self) -> ResidentSplit {
        self.manager.resident()
    }

    fn virtio_mem_by_id(&self, id: &str) -> Result<(usize, &VirtioMemHandle), MemoryRequestError> {
        self.settings
            .virtio_mem
            .iter()
            .position(|d| d.id == id)
            .and_then(|i| self.virtio_mem.get(i).map(|h| (i, h)))
            .ok_or_else(|| MemoryRequestError::UnknownVirtioMem(id.to_owned()))
    }

    fn balloon(&self) -> Result<&BalloonHandle, MemoryRequestError> {
        self.balloon.as_ref().ok_or(MemoryRequestError::NoBalloon)
    }

    /// Asks the guest to reach `bytes` of plugged memory in virtio-mem device `id`.
    pub fn resize_virtio_mem(&mut self, id: &str, bytes: u64) -> Result<(), MemoryRequestError> {
        let (index, handle) = self.virtio_mem_by_id(id)?;
        let mut transport = lock(handle);
        let signal = transport
            .device_mut()
            .set_requested_size(bytes)
            .map_err(|source| MemoryRequestError::VirtioMem {
                id: id.to_owned(),
                source,
            })?;
        transport.raise(signal, 0);
        drop(transport);
        self.forget_memory_target();
        // Remembered for the next boot: after a reboot the guest plugs back up to it.
        self.settings.virtio_mem[index].requested = bytes;
        tracing::info!("virtio-mem {id}: requested size now {bytes} bytes");
        self.publish(Event::ResizeStarted {
            mechanism: progress::VIRTIO_MEM.into(),
            device: id.to_owned(),
            target_bytes: bytes,
        });
        Ok(())
    }

    /// The virtio-mem devices' state and counters, in configuration order.
    pub fn virtio_mem_statuses(&self) -> Vec<(VirtioMemStatus, VirtioMemMetrics)> {
        self.virtio_mem
            .iter()
            .map(|handle| {
                let transport = lock(handle);
                (
                    transport.device().status(),
                    transport.device().metrics().clone(),
                )
            })
            .collect()
    }

    /// Sets the balloon's target and tells the guest.
    pub fn set_balloon(&mut self, bytes: u64) -> Result<(), MemoryRequestError> {
        let boot = self.settings.memory.size;
        if bytes > boot {
            return Err(MemoryRequestError::BalloonAboveBoot {
                target: bytes,
                boot,
            });
        }
        let mut transport = lock(self.balloon()?);
        let signal = transport.device_mut().set_target(bytes)?;
        transport.raise(signal, 0);
        drop(transport);
        self.forget_memory_target();
        if let Some(balloon) = self.settings.balloon.as_mut() {
            balloon.size = bytes;
        }
        tracing::info!("balloon target now {bytes} bytes");
        self.publish(Event::ResizeStarted {
            mechanism: progress::BALLOON.into(),
            device: progress::BALLOON.into(),
            target_bytes: bytes,
        });
        Ok(())
    }

    /// The balloon's state after a fresh reuse scan (so that what it shows is exact now),
    /// and the guest RAM it is measured against: boot RAM, plugged virtio-mem memory and
    /// DIMMs (DIMM memory is in the guest mappings' RSS too).
    pub fn balloon_status(
        &mut self,
    ) -> Result<(BalloonStatus, u64, Option<String>), MemoryRequestError> {
        let balloon = self.balloon()?.clone();
        let mut transport = lock(&balloon);
        // A stop policy acts on the next stats poll, not on a client's read.
        transport.device_mut().scan_for_reuse(&self.manager);
        let status = transport.device().status();
        let plugged: u64 = self
            .virtio_mem_statuses()
            .iter()
            .map(|(s, _)| s.plugged_size)
            .sum();
        let dimm_sizes: Vec<u64> = self.settings.dimms.iter().map(|d| d.size).collect();
        let ram = guest_ram_bytes(self.settings.memory.size, plugged, &dimm_sizes);
        let audit = transport.device().audit(self.manager.resident().guest, ram);
        Ok((status, ram, audit))
    }

    /// Runs what is due on the timer: the balloon's statistics request and reuse scan, and
    /// the progress events of resizes under way (looked at every [`progress::INTERVAL`]
    /// while one is).
    pub fn tick(&mut self, now: Instant) -> Tick {
        let stats = self.tick_balloon(now);
        let autopilot = self.tick_autopilot(now);
        let in_flight = self.report_progress(now);
        let next_in = [
            stats.next_in,
            autopilot,
            in_flight.then_some(progress::INTERVAL),
        ]
        .into_iter()
        .flatten()
        .min();
        Tick { next_in, ..stats }
    }

    fn tick_balloon(&mut self, now: Instant) -> Tick {
        let Some(balloon) = self.balloon.clone() else {
            return Tick::default();
        };
        let mut transport = lock(&balloon);
        let Some(interval) = transport.device().stats_interval() else {
            return Tick::default();
        };
        let due = *self.next_stats.get_or_insert(now + interval);
        if now < due {
            return Tick {
                next_in: Some(due - now),
                stop_for_reuse: false,
            };
        }
        let guest_memory = self.manager.guest_memory().clone();
        transport.activate_and_drain(&guest_memory, &mut self.manager);
        let signal = transport
            .device_mut()
            .request_stats(&guest_memory, &self.manager);
        transport.raise(signal, STATS_QUEUE);
        let reused_before = transport.device().status().reused.reused_pages;
        let stop_for_reuse = transport.device_mut().scan_for_reuse(&self.manager);
        let reused = transport.device().status().reused.reused_pages;
        drop(transport);
        if reused > reused_before {
            self.publish(Event::BalloonWarning {
                message: format!(
                    "the guest wrote {reused} pages it had inflated, without deflating them first"
                ),
            });
        }
        self.next_stats = Some(now + interval);
        Tick {
            next_in: Some(interval),
            stop_for_reuse,
        }
    }

    /// Records a guest access to memory it does not own (kept for the API and logged), and
    /// `unreported` earlier ones the vCPU only counted.
    pub fn record_violation(
        &mut self,
        gpa: Option<u64>,
        access: Access,
        vcpu: u8,
        unreported: u64,
    ) -> ViolationOutcome {
        let device = gpa.and_then(|gpa| {
            self.virtio_mem_statuses()
                .into_iter()
                .find_map(|(s, _)| s.region.contains(gpa).then_some(s.id))
        });
        crate::guest_warn!(
            "guest vCPU {vcpu} {} unplugged memory it does not own at {} (device {})",
            match access {
                Access::Read => "read",
                Access::Write => "wrote",
                Access::Unknown => "touched",
            },
            gpa.map_or_else(
                || "an address KVM did not give".to_owned(),
                |g| format!("{g:#x}")
            ),
            device.as_deref().unwrap_or("?")
        );
        let log = &mut self.settings.violations;
        log.count += 1 + unreported;
        if log.recent.len() == MAX_VIOLATIONS_KEPT {
            log.recent.remove(0);
        }
        log.recent.push(Violation {
            gpa,
            access,
            vcpu,
            device,
        });
        self.publish(Event::MemoryViolation {
            gpa,
            access: match access {
                Access::Read => "read",
                Access::Write => "write",
                Access::Unknown => "unknown",
            }
            .into(),
            vcpu: u32::from(vcpu),
        });
        match self.settings.violation_policy {
            ViolationPolicy::Stop => ViolationOutcome::Stop,
            ViolationPolicy::Report => ViolationOutcome::Continue,
        }
    }

    /// Continues the violation log of the boot before (a reboot does not make the guest
    /// innocent).
    pub fn carry_violations(&mut self, log: ViolationLog) {
        self.settings.violations = log;
    }

    /// The violations so far.
    pub fn violations(&self) -> &ViolationLog {
        &self.settings.violations
    }

    /// Boot RAM ranges and the hotplug area.
    pub fn layout(&self) -> (Vec<GuestRange>, GuestRange) {
        let layout = self.manager.layout();
        (layout.ram.clone(), layout.hotplug_area)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile-guest defect 5: the audit's RAM left DIMMs out.
    #[test]
    fn the_audit_counts_dimms_as_guest_ram() {
        const GIB: u64 = 1 << 30;
        assert_eq!(guest_ram_bytes(GIB, 2 * GIB, &[]), 3 * GIB);
        assert_eq!(guest_ram_bytes(GIB, 0, &[GIB, GIB / 2]), 5 * GIB / 2);
        assert_eq!(guest_ram_bytes(u64::MAX, 1, &[1]), u64::MAX, "saturates");
    }
}
