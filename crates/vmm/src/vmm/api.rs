//! The API edge: API requests to memory-service calls, domain states to API types, and typed
//! errors to HTTP status codes. The memory service and the devices know nothing of HTTP; the
//! only other statuses are `ApiBridge`'s own (504 when the control loop did not answer in
//! time, 500 when it dropped the request).

use tidevm_api::{
    AddDimmBody, ApiError, ApiRequest, ApiResponse, BalloonInfo, BalloonStats, DimmBacking,
    DimmInfo, DimmState as ApiDimmState, DimmsInfo, GuestRange as ApiRange, HostRss, MemoryInfo,
    MemoryViolation, OstReport, VirtioMemCounters, VirtioMemInfo, VmInfo, VmState,
};
use tidevm_api::{
    MemoryBalloon, MemoryDimm, MemoryPlanInfo, MemoryStatus, MemoryStep, MemoryVirtioMem,
    NodeMemory, PayloadInfo,
};

use crate::arch::x86_64::layout::GuestRange;
use crate::config::VmConfig;
use crate::config::HUGETLBFS_PAGE_SIZE;
use crate::memory::planner::{DimmPhase, PlanStep};
use crate::memory::Backing;
use crate::memory::ResidentSplit;
use crate::memory_service::autopilot::PolicyConfig;
use crate::memory_service::{
    DimmRequest, DimmState, DimmStatus, DimmsStatus, MemoryRequestError, MemoryService,
    RequestErrorKind,
};
use crate::vstate::Access;

/// The HTTP status of a refused memory request.
fn status_of(kind: RequestErrorKind) -> u16 {
    match kind {
        RequestErrorKind::NotFound => 404,
        RequestErrorKind::Invalid => 400,
        RequestErrorKind::Conflict => 409,
        RequestErrorKind::Unavailable => 503,
        RequestErrorKind::Internal => 500,
    }
}

/// A refused memory request as the client sees it: its status and the whole cause chain.
pub(super) fn api_error(error: &MemoryRequestError) -> ApiError {
    ApiError::new(status_of(error.kind()), crate::error_chain(error))
}

/// A request for a VM that is not running (between a stop and the next boot).
pub(super) fn not_running() -> ApiError {
    ApiError::conflict("the VM is not running")
}

fn range(r: &GuestRange) -> ApiRange {
    ApiRange {
        start: r.start,
        size: r.size,
    }
}

fn host_rss(split: ResidentSplit) -> HostRss {
    HostRss {
        total_bytes: split.total,
        guest_memory_bytes: split.guest,
        vmm_bytes: split.total.saturating_sub(split.guest),
    }
}

fn backing_of(api: DimmBacking) -> Backing {
    match api {
        DimmBacking::Anon => Backing::Anonymous,
        DimmBacking::Memfd => Backing::Memfd,
        DimmBacking::Hugetlbfs => Backing::Hugetlbfs {
            page_size: HUGETLBFS_PAGE_SIZE,
        },
    }
}

fn backing_to_api(backing: Backing) -> DimmBacking {
    match backing {
        Backing::Anonymous => DimmBacking::Anon,
        Backing::Memfd => DimmBacking::Memfd,
        Backing::Hugetlbfs { .. } => DimmBacking::Hugetlbfs,
    }
}

fn dimm_info(d: DimmStatus) -> DimmInfo {
    DimmInfo {
        id: d.id,
        slot: d.slot,
        range: range(&d.range),
        node: d.node,
        backing: backing_to_api(d.backing),
        prealloc: d.prealloc,
        state: match d.state {
            DimmState::Inserting => ApiDimmState::Inserting,
            DimmState::Active => ApiDimmState::Active,
            DimmState::Removing => ApiDimmState::Removing,
        },
        resident_bytes: d.resident_bytes,
        last_ost: d.last_ost.map(|o| OstReport {
            event: o.event,
            status: o.status,
            meaning: o.meaning,
        }),
        removal_refused: d.removal_refused.map(|o| o.meaning),
    }
}

fn dimms_info(s: DimmsStatus) -> DimmsInfo {
    DimmsInfo {
        slots: s.slots,
        maxmem_bytes: s.maxmem_bytes,
        plugged_bytes: s.plugged_bytes,
        area: range(&s.area),
        dimms: s.dimms.into_iter().map(dimm_info).collect(),
    }
}

/// Answers a request about memory (anything but the VM's life cycle and `GET /vm/info`).
pub(super) fn memory_request(
    memory: &mut MemoryService,
    request: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    let done = |result: Result<(), MemoryRequestError>| {
        result
            .map(|()| ApiResponse::Empty)
            .map_err(|e| api_error(&e))
    };
    match request {
        ApiRequest::BalloonStatus => balloon_info(memory),
        ApiRequest::SetBalloon { target_size } => done(memory.set_balloon(target_size)),
        ApiRequest::ResizeVirtioMem { id, requested_size } => {
            done(memory.resize_virtio_mem(&id, requested_size))
        }
        ApiRequest::AddDimm(body) => add_dimm(memory, body),
        ApiRequest::RemoveDimm { id } => remove_dimm(memory, &id),
        ApiRequest::MemoryStatus => memory_status(memory).map(ApiResponse::Memory),
        ApiRequest::SetMemory(body) => set_memory(memory, body.size, body.node),
        ApiRequest::SetMemoryPolicy { policy } => {
            let policy = match policy.trim() {
                "off" => None,
                text => Some(
                    PolicyConfig::parse(text)
                        .map_err(|e| ApiError::bad_request(format!("invalid policy: {e}")))?,
                ),
            };
            memory
                .check_memory_policy(policy.as_ref())
                .map_err(|e| api_error(&e))?;
            memory.set_memory_policy(policy);
            Ok(ApiResponse::Empty)
        }
        ApiRequest::VmInfo | ApiRequest::Shutdown | ApiRequest::Reboot | ApiRequest::Metrics => {
            Err(ApiError::internal(
                "a life-cycle or metrics request reached the memory service",
            ))
        }
    }
}

/// `GET /vm/memory`.
fn memory_status(memory: &MemoryService) -> Result<MemoryStatus, ApiError> {
    let state = memory.memory_state();
    let (min_bytes, max_bytes) = state
        .reachable(None)
        .map_err(|e| api_error(&MemoryRequestError::Plan(e)))?;
    let balloon_config = memory.settings().balloon.as_ref();
    Ok(MemoryStatus {
        boot_ram_bytes: state.boot_bytes(),
        virtio_mem: state
            .virtio_mem
            .iter()
            .map(|d| MemoryVirtioMem {
                id: d.id.clone(),
                node: d.node,
                block_size: d.block_size,
                region_size: d.region_size,
                plugged_size: d.plugged,
                requested_size: d.requested,
            })
            .collect(),
        dimms: state
            .dimms
            .iter()
            .map(|d| MemoryDimm {
                id: d.id.clone(),
                size: d.size,
                node: d.node,
                state: match d.phase {
                    DimmPhase::Inserting => ApiDimmState::Inserting,
                    DimmPhase::Active => ApiDimmState::Active,
                    DimmPhase::Ejecting => ApiDimmState::Removing,
                },
            })
            .collect(),
        balloon: state.balloon.as_ref().map(|b| MemoryBalloon {
            target_bytes: b.target,
            actual_bytes: b.actual,
            max_target_bytes: b.max_target,
            deflate_on_oom: balloon_config.is_some_and(|c| c.deflate_on_oom),
            free_page_reporting: balloon_config.is_some_and(|c| c.free_page_reporting),
        }),
        requested_total_bytes: state.requested_total(),
        actual_total_bytes: state.actual_total(),
        nodes: state
            .requested_by_node()
            .into_iter()
            .map(|(node, requested_bytes)| NodeMemory {
                node,
                requested_bytes,
            })
            .collect(),
        min_bytes,
        max_bytes,
        target_total_bytes: memory.memory_target(),
        shortfalls: memory.shortfalls(),
    })
}

/// `PUT /vm/memory`.
fn set_memory(
    memory: &mut MemoryService,
    size: u64,
    node: Option<u32>,
) -> Result<ApiResponse, ApiError> {
    let plan = memory.set_memory(size, node).map_err(|e| api_error(&e))?;
    Ok(ApiResponse::MemoryPlan(MemoryPlanInfo {
        target_total_bytes: plan.target_total,
        steps: plan
            .steps
            .into_iter()
            .map(|step| match step {
                PlanStep::SetVirtioMem { id, requested } => MemoryStep::SetVirtioMem {
                    id,
                    requested_size: requested,
                },
                PlanStep::SetBalloon { target } => MemoryStep::SetBalloon {
                    target_size: target,
                },
                PlanStep::AddDimm { id, size, node } => MemoryStep::AddDimm { id, size, node },
                PlanStep::EjectDimm { id, size } => MemoryStep::EjectDimm { id, size },
            })
            .collect(),
    }))
}

/// `POST`/`PUT /vm/dimms`.
pub(super) fn add_dimm(
    memory: &mut MemoryService,
    body: AddDimmBody,
) -> Result<ApiResponse, ApiError> {
    let request = DimmRequest {
        size: body.size,
        node: body.node,
        id: body.id,
        backing: backing_of(body.backing),
        prealloc: body.prealloc,
    };
    memory
        .add_dimm(request)
        .map(|d| ApiResponse::Dimm(dimm_info(d)))
        .map_err(|e| api_error(&e))
}

/// `DELETE /vm/dimms/{id}`.
pub(super) fn remove_dimm(memory: &mut MemoryService, id: &str) -> Result<ApiResponse, ApiError> {
    memory
        .remove_dimm(id)
        .map(|d| ApiResponse::Dimm(dimm_info(d)))
        .map_err(|e| api_error(&e))
}

/// `GET /vm/balloon`.
pub(super) fn balloon_info(memory: &mut MemoryService) -> Result<ApiResponse, ApiError> {
    let (status, _ram, audit) = memory.balloon_status().map_err(|e| api_error(&e))?;
    let mut warnings = Vec::new();
    if status.reused.reused_pages > 0 {
        warnings.push(format!(
            "the guest wrote {} pages it had inflated, without deflating them first",
            status.reused.reused_pages
        ));
    }
    warnings.extend(audit);
    if let Some(stats) = &status.stats {
        if stats.stale {
            warnings.push("the guest's statistics are stale: it stopped answering".into());
        }
        warnings.extend(stats.inconsistencies.iter().cloned());
    }
    Ok(ApiResponse::Balloon(BalloonInfo {
        target_bytes: status.target_bytes,
        actual_bytes: status.actual_bytes,
        inflated_bytes: status.inflated_bytes,
        discarded_bytes: status.discarded_bytes,
        reported_free_bytes: status.reported_free_bytes,
        bad_pfns: status.bad_pfns,
        discard_syscalls: status.discard_syscalls,
        discard_ns: status.discard_time.as_nanos() as u64,
        stats: status.stats.map(|s| BalloonStats {
            age_seconds: s.age.as_secs(),
            values: s.values,
        }),
        warnings,
        host_rss: host_rss(memory.resident()),
        reused_pages: status.reused.reused_pages,
        reused_ranges: status.reused.reused_ranges.iter().map(range).collect(),
        refaulted_zero_pages: status.reused.refaulted_zero_pages,
    }))
}

fn virtio_mem_info(memory: &MemoryService) -> Vec<VirtioMemInfo> {
    memory
        .virtio_mem_statuses()
        .into_iter()
        .map(|(status, m)| {
            let all = [m.plug, m.unplug, m.unplug_all, m.state];
            VirtioMemInfo {
                counters: VirtioMemCounters {
                    ack: all.iter().map(|c| c.ack).sum(),
                    nack: all.iter().map(|c| c.nack).sum(),
                    busy: all.iter().map(|c| c.busy).sum(),
                    error: all.iter().map(|c| c.error).sum(),
                    malformed: m.malformed,
                    bytes_plugged: m.bytes_plugged,
                    bytes_unplugged: m.bytes_unplugged,
                    plug_handling_ns: m.plug_time.as_nanos() as u64,
                    unplug_handling_ns: m.unplug_time.as_nanos() as u64,
                },
                id: status.id,
                node: status.node.unwrap_or(0),
                region: range(&status.region),
                block_size: status.block_size,
                plugged_size: status.plugged_size,
                requested_size: status.requested_size,
                usable_region_size: status.usable_region_size,
                last_busy_reason: status.last_busy_reason.map(|e| crate::error_chain(&*e)),
            }
        })
        .collect()
}

/// The disks for `GET /vm/info`.
fn disks_info(disks: &[DiskHandle]) -> Vec<tidevm_api::DiskInfo> {
    disks
        .iter()
        .map(|d| {
            let transport = d.lock().unwrap_or_else(|e| e.into_inner());
            let device = transport.device();
            let disk = device.disk();
            let m = device.metrics();
            tidevm_api::DiskInfo {
                id: device.id().to_owned(),
                path: disk.options().path.display().to_string(),
                readonly: disk.options().readonly,
                direct: disk.options().direct,
                capacity_bytes: disk.capacity(),
                // 512 or 4096.
                block_size: disk.block_size() as u32,
                counters: tidevm_api::DiskCounters {
                    read_requests: m.requests.read,
                    write_requests: m.requests.write,
                    flush_requests: m.requests.flush,
                    get_id_requests: m.requests.get_id,
                    discard_requests: m.requests.discard,
                    write_zeroes_requests: m.requests.write_zeroes,
                    unsupported_requests: m.requests.unsupported,
                    bytes_read: m.bytes_read,
                    bytes_written: m.bytes_written,
                    bytes_discarded: m.bytes_discarded,
                    bytes_zeroed: m.bytes_zeroed,
                    io_errors: m.io_errors,
                    malformed: m.malformed,
                    dropped: m.dropped,
                    host_errors: m.host_errors,
                },
            }
        })
        .collect()
}

/// The networks for `GET /vm/info`.
fn nets_info(nets: &[NetHandle]) -> Vec<tidevm_api::NetInfo> {
    nets.iter()
        .map(|n| {
            let transport = n.lock().unwrap_or_else(|e| e.into_inner());
            let device = transport.device();
            let m = device.metrics();
            tidevm_api::NetInfo {
                id: device.id().to_owned(),
                tap: device.host_name().to_owned(),
                mac: device.mac().to_string(),
                counters: tidevm_api::NetCounters {
                    rx_frames: m.rx_frames,
                    rx_bytes: m.rx_bytes,
                    rx_dropped: m.rx_dropped,
                    tx_frames: m.tx_frames,
                    tx_bytes: m.tx_bytes,
                    tx_dropped: m.tx_dropped,
                    malformed: m.malformed,
                    backend_errors: m.backend_errors,
                },
            }
        })
        .collect()
}

/// A virtio-net device on PCI.
pub(super) type NetHandle = std::sync::Arc<
    std::sync::Mutex<
        crate::devices::virtio::transport_pci::VirtioPciDevice<
            crate::devices::virtio::net::VirtioNet,
        >,
    >,
>;

/// A virtio-blk disk on PCI.
pub(super) type DiskHandle = std::sync::Arc<
    std::sync::Mutex<
        crate::devices::virtio::transport_pci::VirtioPciDevice<
            crate::devices::virtio::block::VirtioBlock,
        >,
    >,
>;

/// `GET /vm/info`: `memory` is `None` between a stop and the next boot.
pub(super) fn vm_info(
    memory: Option<&MemoryService>,
    disks: &[DiskHandle],
    nets: &[NetHandle],
    config: &VmConfig,
) -> VmInfo {
    let vcpus = u32::from(config.cpus);
    let boot_ram_bytes = config.memory.size;
    let payload = Some(PayloadInfo {
        kernel: config.kernel.display().to_string(),
        initramfs: config
            .initramfs
            .as_ref()
            .map(|path| path.display().to_string()),
        cmdline: config.cmdline.clone(),
    });
    let Some(memory) = memory else {
        return VmInfo {
            state: VmState::ShuttingDown,
            vcpus,
            memory: MemoryInfo {
                boot_ram_bytes,
                ram_ranges: Vec::new(),
                hotplug_area: ApiRange { start: 0, size: 0 },
                host_rss: HostRss::default(),
            },
            virtio_mem: Vec::new(),
            memory_violations: Vec::new(),
            memory_violation_count: 0,
            dimms: None,
            payload,
            disks: Vec::new(),
            nets: Vec::new(),
        };
    };
    let (ram, hotplug_area) = memory.layout();
    let violations = memory.violations();
    VmInfo {
        state: VmState::Running,
        vcpus,
        memory: MemoryInfo {
            boot_ram_bytes,
            ram_ranges: ram.iter().map(range).collect(),
            hotplug_area: range(&hotplug_area),
            host_rss: host_rss(memory.resident()),
        },
        virtio_mem: virtio_mem_info(memory),
        memory_violations: violations
            .recent
            .iter()
            .map(|v| MemoryViolation {
                gpa: v.gpa,
                write: v.access == Access::Write,
                access: match v.access {
                    Access::Read => "read",
                    Access::Write => "write",
                    Access::Unknown => "unknown",
                }
                .into(),
                vcpu: u32::from(v.vcpu),
                device: v.device.clone(),
            })
            .collect(),
        memory_violation_count: violations.count,
        dimms: memory.dimms_status().map(dimms_info),
        payload,
        disks: disks_info(disks),
        nets: nets_info(nets),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_kind_has_its_status() {
        let cases = [
            (MemoryRequestError::NoBalloon, 404),
            (MemoryRequestError::DimmSize(5), 400),
            (MemoryRequestError::SlotsFull(2), 409),
            (MemoryRequestError::NoDimmController, 500),
        ];
        for (error, status) in cases {
            let api = api_error(&error);
            assert_eq!(api.status, status, "{error}");
            assert_eq!(api.message, error.to_string());
        }
    }

    /// `PUT /vm/memory` out of reach is a 400 whose message names the limit; a plan's DIMM
    /// the host cannot back is a 503, not the VMM's fault.
    #[test]
    fn plan_refusals_are_4xx_naming_the_limit() {
        use crate::memory::planner::{plan, DimmSlots, MemoryState};
        const GIB: u64 = 1 << 30;
        let state = MemoryState {
            boot_by_node: vec![(0, GIB)],
            dimm_slots: Some(DimmSlots {
                free: vec![0, 1],
                maxmem: 3 * GIB,
            }),
            ..Default::default()
        };
        for (target, names) in [
            (4 * GIB, "maximum reachable 3221225472 bytes (every virtio-mem region fully plugged and DIMMs up to maxmem)"),
            (GIB / 2, "minimum reachable 1073741824"),
            (GIB + (100 << 20), "steps of 134217728 bytes (the DIMM size"),
        ] {
            let error = MemoryRequestError::Plan(plan(&state, target, None).unwrap_err());
            let api = api_error(&error);
            assert_eq!(api.status, 400, "{}", api.message);
            assert!(api.message.contains(names), "{}", api.message);
        }
        let error = MemoryRequestError::Plan(plan(&state, 2 * GIB, Some(3)).unwrap_err());
        assert_eq!(api_error(&error).status, 400);
        assert!(api_error(&error)
            .message
            .contains("NUMA node 3 does not exist"));
        let host = MemoryRequestError::PlanStep {
            step: "AddDimm".into(),
            done: 1,
            source: Box::new(MemoryRequestError::NoRoom(GIB)),
        };
        assert_eq!(api_error(&host).status, 409);
        let internal = MemoryRequestError::PlanStep {
            step: "SetBalloon".into(),
            done: 0,
            source: Box::new(MemoryRequestError::NoBalloon),
        };
        assert_eq!(api_error(&internal).status, 500);
    }
}
