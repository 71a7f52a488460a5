//! Cloud Hypervisor-compatible routes (`/api/v1/...`) on tidevm's API socket.
//!
//! Cloud Hypervisor's clients (`ch-remote`, Kata Containers' driver, anything generated from
//! its OpenAPI document) resize a VM's memory through a handful of routes. This module
//! answers them with Cloud Hypervisor's JSON shapes and status codes by translating each
//! call into tidevm's own [`ApiRequest`]s, so the VMM knows nothing of Cloud Hypervisor:
//!
//! | route | tidevm requests |
//! |---|---|
//! | `GET vmm.ping` | none (answered here) |
//! | `GET vm.info` | `VmInfo`, `MemoryStatus` |
//! | `PUT vm.resize` | `VmInfo` (vCPUs), `SetMemory` (`desired_ram`), `SetBalloon` (`desired_balloon`) |
//! | `PUT vm.resize-zone` | `ResizeVirtioMem` (the zone is a virtio-mem device id) |
//! | `GET vm.counters` | `VmInfo`, `BalloonStatus` |
//! | `PUT vm.shutdown`, `PUT vmm.shutdown` | `Shutdown` (tidevm's VMM exits with its VM) |
//! | `PUT vm.reboot` | `Reboot` |
//!
//! Where tidevm differs: `desired_ram` below the boot size really shrinks the guest (the
//! balloon takes what virtio-mem cannot give back) instead of being refused; a refusal from
//! the VMM is a 500 as in Cloud Hypervisor (its `ch-remote` treats only 5xx as failure, so a
//! 4xx would make a refused resize look successful); changing the vCPU count is not
//! supported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{
    ApiError, ApiRequest, ApiResponse, MemoryStatus, RequestHandler, SetMemoryBody, VmInfo, VmState,
};

/// The Cloud Hypervisor routes served, as (method, path).
pub(crate) const CH_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/vmm.ping"),
    ("GET", "/api/v1/vm.info"),
    ("PUT", "/api/v1/vm.resize"),
    ("PUT", "/api/v1/vm.resize-zone"),
    ("GET", "/api/v1/vm.counters"),
    ("PUT", "/api/v1/vm.shutdown"),
    ("PUT", "/api/v1/vm.reboot"),
    ("PUT", "/api/v1/vmm.shutdown"),
];

/// A Cloud Hypervisor route with its parsed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChCall {
    Ping,
    Info,
    Resize(ChResize),
    ResizeZone(ChResizeZone),
    Counters,
    VmShutdown,
    VmReboot,
    VmmShutdown,
}

/// What a Cloud Hypervisor route answers on success.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ChReply {
    /// 204 with an empty body.
    Empty,
    /// 200 with this JSON body.
    Json(serde_json::Value),
}

/// Body of `PUT vm.resize`. Unknown fields are ignored, as Cloud Hypervisor does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChResize {
    #[serde(default)]
    pub desired_vcpus: Option<u32>,
    #[serde(default)]
    pub desired_ram: Option<u64>,
    #[serde(default)]
    pub desired_balloon: Option<u64>,
}

/// Body of `PUT vm.resize-zone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChResizeZone {
    pub id: String,
    pub desired_ram: u64,
}

/// `vmm.ping`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChPing {
    pub version: String,
    pub build_version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// `vm.info`'s answer (`VmInfo` in Cloud Hypervisor's document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChVmInfo {
    pub config: ChVmConfig,
    pub state: String,
    pub memory_actual_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChVmConfig {
    pub payload: ChPayload,
    pub cpus: ChCpus,
    pub memory: ChMemory,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<ChBalloon>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChPayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChCpus {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChMemory {
    /// Boot RAM.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_method: Option<String>,
    pub shared: bool,
    pub hugepages: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChBalloon {
    pub size: u64,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
}

/// The call for `method` on `path` (which starts with `/api/v1/`), with its body parsed.
pub(crate) fn parse(method: &str, path: &str, body: &[u8]) -> Result<ChCall, ApiError> {
    let Some(&(expected_method, _)) = CH_ROUTES.iter().find(|(_, route)| *route == path) else {
        let routes: Vec<String> = CH_ROUTES
            .iter()
            .map(|(method, path)| format!("{method} {path}"))
            .collect();
        return Err(ApiError::not_found(format!(
            "tidevm serves these Cloud Hypervisor routes only: {}",
            routes.join(", ")
        )));
    };
    if method != expected_method {
        return Err(ApiError::method_not_allowed(format!(
            "method {method} is not allowed on {path}; use {expected_method}"
        )));
    }
    let name = path.trim_start_matches("/api/v1/");
    match name {
        "vmm.ping" => Ok(ChCall::Ping),
        "vm.info" => Ok(ChCall::Info),
        "vm.counters" => Ok(ChCall::Counters),
        // Cloud Hypervisor ignores these routes' bodies; so does tidevm.
        "vm.shutdown" => Ok(ChCall::VmShutdown),
        "vm.reboot" => Ok(ChCall::VmReboot),
        "vmm.shutdown" => Ok(ChCall::VmmShutdown),
        "vm.resize" => {
            let resize: ChResize = parse_object(body, r#"{"desired_ram": <bytes>, ...}"#)?;
            if resize == ChResize::default() {
                return Err(ApiError::bad_request(
                    "nothing to resize: give desired_vcpus, desired_ram or desired_balloon",
                ));
            }
            Ok(ChCall::Resize(resize))
        }
        "vm.resize-zone" => {
            let zone: ChResizeZone =
                parse_object(body, r#"{"id": "<zone>", "desired_ram": <bytes>}"#)?;
            Ok(ChCall::ResizeZone(zone))
        }
        _ => Err(ApiError::internal(format!(
            "route {path} is listed but not parsed"
        ))),
    }
}

fn parse_object<T: serde::de::DeserializeOwned>(
    body: &[u8],
    expected: &str,
) -> Result<T, ApiError> {
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!(
            "invalid request body ({error}): expected {expected}"
        ))
    })?;
    if !json.is_object() {
        return Err(ApiError::bad_request(format!(
            "invalid request body: expected {expected}"
        )));
    }
    serde_json::from_value(json)
        .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))
}

/// Carries `call` out through tidevm's own requests. Errors from the VMM become 500, as
/// Cloud Hypervisor answers a refused request.
pub(crate) fn execute(call: ChCall, handler: &dyn RequestHandler) -> Result<ChReply, ApiError> {
    let ask = |request: ApiRequest| {
        handler.handle(request).map_err(|error| {
            if error.status >= 500 {
                error
            } else {
                ApiError::internal(error.message)
            }
        })
    };
    let vm_info = || match ask(ApiRequest::VmInfo)? {
        ApiResponse::VmInfo(info) => Ok(info),
        other => Err(unexpected("VmInfo", &other)),
    };
    let memory = || match ask(ApiRequest::MemoryStatus)? {
        ApiResponse::Memory(memory) => Ok(memory),
        other => Err(unexpected("MemoryStatus", &other)),
    };
    match call {
        ChCall::Ping => to_json(&ChPing {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build_version: format!("tidevm {}", env!("CARGO_PKG_VERSION")),
            pid: i64::from(std::process::id()),
            features: Vec::new(),
        }),
        ChCall::Info => to_json(&vm_info_of(&vm_info()?, &memory()?)),
        ChCall::Counters => {
            let info = vm_info()?;
            let mut counters: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            for device in &info.virtio_mem {
                let c = device.counters;
                counters.insert(
                    device.id.clone(),
                    BTreeMap::from([
                        ("ack".to_owned(), c.ack),
                        ("nack".to_owned(), c.nack),
                        ("busy".to_owned(), c.busy),
                        ("error".to_owned(), c.error),
                        ("malformed".to_owned(), c.malformed),
                        ("bytes_plugged".to_owned(), c.bytes_plugged),
                        ("bytes_unplugged".to_owned(), c.bytes_unplugged),
                        ("plugged_size".to_owned(), device.plugged_size),
                        ("requested_size".to_owned(), device.requested_size),
                    ]),
                );
            }
            if memory()?.balloon.is_some() {
                if let ApiResponse::Balloon(b) = ask(ApiRequest::BalloonStatus)? {
                    counters.insert(
                        "balloon".to_owned(),
                        BTreeMap::from([
                            ("target_bytes".to_owned(), b.target_bytes),
                            ("actual_bytes".to_owned(), b.actual_bytes),
                            ("inflated_bytes".to_owned(), b.inflated_bytes),
                            ("discarded_bytes".to_owned(), b.discarded_bytes),
                            ("reported_free_bytes".to_owned(), b.reported_free_bytes),
                            ("bad_pfns".to_owned(), b.bad_pfns),
                            ("discard_syscalls".to_owned(), b.discard_syscalls),
                        ]),
                    );
                }
            }
            to_json(&counters)
        }
        ChCall::Resize(resize) => {
            if let Some(desired) = resize.desired_vcpus {
                let vcpus = vm_info()?.vcpus;
                if desired != vcpus {
                    return Err(ApiError::internal(format!(
                        "changing the vCPU count is not supported by tidevm (the VM has \
                         {vcpus}, {desired} asked)"
                    )));
                }
            }
            // Memory first, then the balloon, in Cloud Hypervisor's order: a
            // desired_balloon given together with desired_ram overrides the balloon part
            // of the memory plan.
            if let Some(size) = resize.desired_ram {
                ask(ApiRequest::SetMemory(SetMemoryBody { size, node: None }))?;
            }
            if let Some(target_size) = resize.desired_balloon {
                ask(ApiRequest::SetBalloon { target_size })?;
            }
            Ok(ChReply::Empty)
        }
        ChCall::ResizeZone(zone) => {
            ask(ApiRequest::ResizeVirtioMem {
                id: zone.id,
                requested_size: zone.desired_ram,
            })?;
            Ok(ChReply::Empty)
        }
        ChCall::VmShutdown | ChCall::VmmShutdown => {
            ask(ApiRequest::Shutdown)?;
            Ok(ChReply::Empty)
        }
        ChCall::VmReboot => {
            ask(ApiRequest::Reboot)?;
            Ok(ChReply::Empty)
        }
    }
}

fn unexpected(asked: &str, answer: &ApiResponse) -> ApiError {
    let kind = match answer {
        ApiResponse::Empty => "nothing",
        ApiResponse::VmInfo(_) => "VmInfo",
        ApiResponse::Balloon(_) => "Balloon",
        ApiResponse::Dimm(_) => "Dimm",
        ApiResponse::Memory(_) => "Memory",
        ApiResponse::MemoryPlan(_) => "MemoryPlan",
        ApiResponse::Metrics(_) => "Metrics",
    };
    ApiError::internal(format!("the VMM answered {asked} with {kind}"))
}

fn to_json<T: Serialize>(value: &T) -> Result<ChReply, ApiError> {
    serde_json::to_value(value)
        .map(ChReply::Json)
        .map_err(|error| ApiError::internal(format!("cannot serialize the response: {error}")))
}

/// Cloud Hypervisor's `VmInfo` from tidevm's VM and memory descriptions.
pub(crate) fn vm_info_of(info: &VmInfo, memory: &MemoryStatus) -> ChVmInfo {
    let region_total: u64 = memory.virtio_mem.iter().map(|d| d.region_size).sum();
    let requested_total: u64 = memory.virtio_mem.iter().map(|d| d.requested_size).sum();
    let plugged_total: u64 = memory.virtio_mem.iter().map(|d| d.plugged_size).sum();
    let dimm_total: u64 = memory.dimms.iter().map(|d| d.size).sum();
    let dimm_slots = info.dimms.as_ref();
    let (hotplug_size, hotplugged_size, hotplug_method) = if !memory.virtio_mem.is_empty() {
        (
            Some(region_total),
            Some(requested_total),
            Some("VirtioMem".to_owned()),
        )
    } else if let Some(dimms) = dimm_slots {
        (
            Some(dimms.maxmem_bytes.saturating_sub(memory.boot_ram_bytes)),
            Some(dimm_total),
            Some("Acpi".to_owned()),
        )
    } else {
        (None, None, None)
    };
    let state = match info.state {
        VmState::Running | VmState::Rebooting => "Running",
        VmState::ShuttingDown => "Shutdown",
    };
    let balloon_actual = memory.balloon.map_or(0, |b| b.actual_bytes);
    ChVmInfo {
        config: ChVmConfig {
            payload: info
                .payload
                .as_ref()
                .map(|p| ChPayload {
                    kernel: Some(p.kernel.clone()),
                    cmdline: Some(p.cmdline.clone()),
                    initramfs: p.initramfs.clone(),
                })
                .unwrap_or_default(),
            cpus: ChCpus {
                boot_vcpus: info.vcpus,
                max_vcpus: info.vcpus,
            },
            memory: ChMemory {
                size: memory.boot_ram_bytes,
                hotplug_size,
                hotplugged_size,
                hotplug_method,
                shared: false,
                hugepages: false,
            },
            balloon: memory.balloon.map(|b| ChBalloon {
                size: b.target_bytes,
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
            }),
        },
        state: state.to_owned(),
        // Cloud Hypervisor's formula, plus DIMMs (guest RAM too; CH's ACPI hotplug counts
        // them in its boot size instead).
        memory_actual_size: (memory.boot_ram_bytes + plugged_total + dimm_total)
            .saturating_sub(balloon_actual),
    }
}
