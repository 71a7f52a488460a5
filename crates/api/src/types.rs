//! Requests, responses and the wire schemas of the control API.
//!
//! The server parses HTTP requests into [`ApiRequest`]s and hands them to a
//! [`RequestHandler`] that the VMM implements; the handler answers with an
//! [`ApiResponse`] or an [`ApiError`].

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A parsed, validated request for the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm/info`: describe the VM.
    VmInfo,
    /// `PUT /vm/shutdown`: stop the VM and exit the VMM.
    Shutdown,
    /// `PUT /vm/reboot`: reset the VM.
    Reboot,
    /// `GET /vm/balloon`: the balloon's target, what the guest claims, what the host
    /// measured, and the guest's memory statistics.
    BalloonStatus,
    /// `PUT /vm/balloon`: set the balloon's target size.
    SetBalloon {
        /// Bytes the guest should give back to the host.
        target_size: u64,
    },
    /// `PUT /vm/virtio-mem/{id}`: change how much memory the guest should
    /// have plugged from the virtio-mem device `id`.
    ResizeVirtioMem {
        /// Id of the virtio-mem device.
        id: String,
        /// Requested plugged size in bytes.
        requested_size: u64,
    },
    /// `PUT /vm/dimms`: hot-add a DIMM and notify the guest.
    AddDimm(AddDimmBody),
    /// `DELETE /vm/dimms/{id}`: ask the guest to eject a DIMM.
    RemoveDimm {
        /// Id of the DIMM.
        id: String,
    },
    /// `GET /metrics` (on the API socket, or on the `--metrics-listen` port): the VMM's
    /// metrics in the Prometheus text format.
    Metrics,
    /// `GET /vm/memory`: the guest's memory from every source, the total and the limits.
    MemoryStatus,
    /// `PUT /vm/memory`: bring the guest's total memory to `size` (the VMM plans the
    /// virtio-mem and balloon changes).
    SetMemory(SetMemoryBody),
    /// `PUT /vm/memory/policy`: turn the memory autopilot on with `policy` (the syntax of
    /// `--memory-policy`, e.g. `auto,min=1G,max=8G`) or off (`off`).
    SetMemoryPolicy {
        /// The policy, or `off`.
        policy: String,
    },
}

/// Body of `PUT /vm/memory/policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMemoryPolicyBody {
    /// `auto,min=SIZE,max=SIZE[,...]` as `--memory-policy` takes it, or `off`.
    pub policy: String,
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiResponse {
    /// Nothing to return: HTTP 204.
    Empty,
    /// The VM description: HTTP 200 with a [`VmInfo`] body.
    VmInfo(VmInfo),
    /// The balloon: HTTP 200 with a [`BalloonInfo`] body.
    Balloon(BalloonInfo),
    /// A DIMM just added (HTTP 201) or asked to leave (HTTP 202), with a [`DimmInfo`] body.
    Dimm(DimmInfo),
    /// Metrics in the Prometheus text format, version 0.0.4: HTTP 200 with
    /// [`METRICS_CONTENT_TYPE`].
    Metrics(String),
    /// The guest's memory: HTTP 200 with a [`MemoryStatus`] body.
    Memory(MemoryStatus),
    /// The steps taken towards a new total: HTTP 200 with a [`MemoryPlanInfo`] body.
    MemoryPlan(MemoryPlanInfo),
}

/// Body of `PUT /vm/memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMemoryBody {
    /// The guest's new total memory in bytes (integer, or a string like `"6G"`).
    #[serde(deserialize_with = "deserialize_byte_size")]
    pub size: u64,
    /// Change only this NUMA node's virtio-mem devices (and the balloon); `size` is still
    /// the guest's total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
}

/// One virtio-mem device in [`MemoryStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryVirtioMem {
    /// Device id.
    pub id: String,
    /// Guest NUMA node.
    pub node: u32,
    /// Plug granularity in bytes.
    pub block_size: u64,
    /// Most the device can plug, in bytes.
    pub region_size: u64,
    /// Bytes the guest has plugged now.
    pub plugged_size: u64,
    /// Bytes the host asked for.
    pub requested_size: u64,
}

/// One DIMM in [`MemoryStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDimm {
    /// DIMM id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Guest NUMA node.
    pub node: u32,
    /// Where it is in its life (an inserting DIMM is asked for but not yet in the guest's
    /// total; a removing one is still in it but no longer asked for).
    pub state: DimmState,
}

/// The balloon in [`MemoryStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBalloon {
    /// Bytes the host asked the guest to give back.
    pub target_bytes: u64,
    /// Bytes the guest says it has given back.
    pub actual_bytes: u64,
    /// Largest target accepted (the boot memory).
    pub max_target_bytes: u64,
    /// Whether the guest may deflate when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Whether the guest reports its free pages.
    pub free_page_reporting: bool,
}

/// Requested memory of one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMemory {
    /// Node id.
    pub node: u32,
    /// Boot RAM, virtio-mem requested and DIMMs of the node, in bytes (the balloon is not
    /// counted per node: the guest chooses which pages it gives back).
    pub requested_bytes: u64,
}

/// Body of `GET /vm/memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Boot RAM in bytes.
    pub boot_ram_bytes: u64,
    /// virtio-mem devices.
    pub virtio_mem: Vec<MemoryVirtioMem>,
    /// DIMMs plugged now.
    pub dimms: Vec<MemoryDimm>,
    /// The balloon, if the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<MemoryBalloon>,
    /// What the guest is asked to have: boot + virtio-mem requested + DIMMs − balloon
    /// target.
    pub requested_total_bytes: u64,
    /// What the guest has now: boot + virtio-mem plugged + DIMMs − balloon actual.
    pub actual_total_bytes: u64,
    /// Requested memory per NUMA node.
    pub nodes: Vec<NodeMemory>,
    /// Smallest total `PUT /vm/memory` can reach (with the DIMMs ejected).
    pub min_bytes: u64,
    /// Largest total `PUT /vm/memory` can reach (with what free DIMM slots can add under
    /// maxmem).
    pub max_bytes: u64,
    /// The total of the last plan (`PUT /vm/memory`, `vm.resize` or the autopilot), if one
    /// was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_total_bytes: Option<u64>,
    /// Resizes that stopped short of their target, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shortfalls: Vec<MemoryShortfall>,
}

/// A resize that stopped short, in [`MemoryStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryShortfall {
    /// The mechanism (`virtio-mem`, `balloon`, `dimm`).
    pub mechanism: String,
    /// The device.
    pub device: String,
    /// Why.
    pub cause: ResizeShortfall,
}

/// Why a resize stopped short of its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResizeShortfall {
    /// The guest stopped unplugging virtio-mem memory: what it still has plugged beyond the
    /// request holds pages it cannot offline (unmovable kernel allocations, pinned pages).
    /// Linux tries again by itself, with a back-off.
    UnplugStalled {
        /// Bytes plugged.
        plugged_bytes: u64,
        /// Bytes requested.
        requested_bytes: u64,
        /// Seconds without progress.
        stalled_seconds: u64,
    },
    /// The guest stopped plugging virtio-mem memory short of the request (driver not
    /// loaded, or memory it cannot online).
    PlugStalled {
        /// Bytes plugged.
        plugged_bytes: u64,
        /// Bytes requested.
        requested_bytes: u64,
        /// Seconds without progress.
        stalled_seconds: u64,
    },
    /// The host could not back memory the guest asked to plug (the device answered BUSY).
    HostBusy {
        /// The host's error.
        message: String,
    },
    /// The balloon stopped moving short of its target.
    BalloonStalled {
        /// Bytes the guest says it has given back.
        actual_bytes: u64,
        /// Bytes asked for.
        target_bytes: u64,
        /// Seconds without progress.
        stalled_seconds: u64,
    },
    /// The guest refused to eject a DIMM (its `_OST` answer); the DIMM stays, usable.
    EjectRefused {
        /// The ACPI event answered.
        ost_event: u32,
        /// The `_OST` status code.
        ost_status: u32,
        /// Both, in words.
        meaning: String,
    },
    /// The guest did not take a DIMM in (an `_OST` failure for the device check).
    InsertRefused {
        /// The `_OST` status code.
        ost_status: u32,
        /// Its meaning.
        meaning: String,
    },
}

impl fmt::Display for ResizeShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        match self {
            ResizeShortfall::UnplugStalled {
                plugged_bytes,
                requested_bytes,
                stalled_seconds,
            } => write!(
                f,
                "the guest stopped unplugging at {} MiB of the requested {} MiB {stalled_seconds} s                  ago: the rest holds memory it cannot offline (unmovable pages)",
                plugged_bytes / MIB,
                requested_bytes / MIB
            ),
            ResizeShortfall::PlugStalled {
                plugged_bytes,
                requested_bytes,
                stalled_seconds,
            } => write!(
                f,
                "the guest stopped plugging at {} MiB of the requested {} MiB {stalled_seconds} s                  ago (driver not loaded, or memory it cannot online)",
                plugged_bytes / MIB,
                requested_bytes / MIB
            ),
            ResizeShortfall::HostBusy { message } => {
                write!(f, "the host could not back the memory (BUSY): {message}")
            }
            ResizeShortfall::BalloonStalled {
                actual_bytes,
                target_bytes,
                stalled_seconds,
            } => write!(
                f,
                "the balloon stopped at {} MiB of its {} MiB target {stalled_seconds} s ago",
                actual_bytes / MIB,
                target_bytes / MIB
            ),
            ResizeShortfall::EjectRefused { meaning, .. } => {
                write!(f, "the guest refused to eject the DIMM: {meaning}")
            }
            ResizeShortfall::InsertRefused { meaning, .. } => {
                write!(f, "the guest did not take the DIMM in: {meaning}")
            }
        }
    }
}

/// One step of a memory plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum MemoryStep {
    /// A virtio-mem device's requested size was set.
    SetVirtioMem {
        /// Device id.
        id: String,
        /// New requested size in bytes.
        requested_size: u64,
    },
    /// The balloon's target was set.
    SetBalloon {
        /// New target in bytes.
        target_size: u64,
    },
    /// A DIMM was added (where virtio-mem had no room).
    AddDimm {
        /// DIMM id.
        id: String,
        /// Size in bytes.
        size: u64,
        /// Guest NUMA node.
        node: u32,
    },
    /// The guest was asked to eject a DIMM (after the other shrinking steps).
    EjectDimm {
        /// DIMM id.
        id: String,
        /// Size in bytes.
        size: u64,
    },
}

/// Body of the answer to `PUT /vm/memory`: what was asked of the devices, in order. The
/// guest carries the steps out asynchronously; `GET /vm/memory` shows how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlanInfo {
    /// The total asked for, in bytes.
    pub target_total_bytes: u64,
    /// The steps (empty when the guest was already asked for this total).
    pub steps: Vec<MemoryStep>,
}

/// What the VM boots (as `vm.info` of Cloud Hypervisor's API shows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadInfo {
    /// Kernel path.
    pub kernel: String,
    /// Initramfs path, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
}

/// `Content-Type` of `GET /metrics`: the Prometheus text format, version 0.0.4 (what the
/// VMM's encoder, `prometheus-client`'s `prometheus_text`, writes).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Body of `PUT /vm/balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBalloonBody {
    /// Target balloon size in bytes (integer, or a string like `"1G"`).
    #[serde(deserialize_with = "deserialize_byte_size")]
    pub target_size: u64,
}

/// What `GET /vm/balloon` returns. The guest's claims (`actual_bytes`, `stats`) are shown
/// next to what the host measured itself; they are never trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// Requested balloon size.
    pub target_bytes: u64,
    /// Balloon size the guest claims (its `actual` config field).
    pub actual_bytes: u64,
    /// Balloon size the host counted from acknowledged inflates minus deflates.
    pub inflated_bytes: u64,
    /// Guest memory the host really discarded for inflates.
    pub discarded_bytes: u64,
    /// Free memory the guest reported and the host discarded (free page reporting).
    pub reported_free_bytes: u64,
    /// PFNs the guest sent that were not its RAM (rejected, counted).
    pub bad_pfns: u64,
    /// Discard system calls made (one per contiguous range, not per page).
    pub discard_syscalls: u64,
    /// Time tidevm spent in those system calls, in ns.
    #[serde(default)]
    pub discard_ns: u64,
    /// The guest's last memory statistics (its claims), if any.
    pub stats: Option<BalloonStats>,
    /// What the host noticed: the guest reusing inflated pages, claims that do not match.
    pub warnings: Vec<String>,
    /// The VMM's resident memory, measured by the host.
    pub host_rss: HostRss,
    /// Inflated pages the guest wrote without deflating them first (exact, page by page).
    #[serde(default)]
    pub reused_pages: u64,
    /// The first ranges of those pages, guest-physical.
    #[serde(default)]
    pub reused_ranges: Vec<GuestRange>,
    /// Inflated pages holding host memory again with nothing written (guest reads, host
    /// huge pages refaulted around a write).
    #[serde(default)]
    pub refaulted_zero_pages: u64,
}

/// The guest's memory statistics, as it reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Seconds since the guest sent them.
    pub age_seconds: u64,
    /// Values by name (bytes or counts, as the virtio spec defines them).
    pub values: std::collections::BTreeMap<String, u64>,
}

/// Life-cycle state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running.
    Running,
    /// A reboot was requested and is in progress.
    Rebooting,
    /// A shutdown was requested and is in progress.
    #[serde(alias = "shuttingdown")]
    ShuttingDown,
}

/// A range of guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRange {
    /// First guest-physical address of the range.
    pub start: u64,
    /// Length of the range in bytes.
    pub size: u64,
}

/// Layout of the guest's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// RAM given to the guest at boot, in bytes (excluding hotplugged memory).
    pub boot_ram_bytes: u64,
    /// Guest-physical ranges backed by boot RAM.
    pub ram_ranges: Vec<GuestRange>,
    /// Guest-physical range reserved for hotplugged memory.
    pub hotplug_area: GuestRange,
    /// What the VMM process holds in host RAM, measured by the VMM from its own smaps.
    #[serde(default)]
    pub host_rss: HostRss,
}

/// Resident host memory of the VMM process, split into guest memory and the VMM itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRss {
    /// Everything resident (VmRSS), in bytes.
    pub total_bytes: u64,
    /// Resident pages of guest RAM mappings (boot RAM and hotplug regions), in bytes.
    pub guest_memory_bytes: u64,
    /// The VMM's own memory: `total_bytes - guest_memory_bytes`.
    pub vmm_bytes: u64,
}

/// Per-device virtio-mem counters (since the VM booted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemCounters {
    /// Requests answered ACK.
    pub ack: u64,
    /// Requests answered NACK (plugging past requested_size).
    pub nack: u64,
    /// Requests answered BUSY (the host could not supply memory).
    pub busy: u64,
    /// Requests answered ERROR (malformed or invalid).
    pub error: u64,
    /// Descriptor chains too malformed to answer.
    pub malformed: u64,
    /// Bytes plugged and unplugged.
    pub bytes_plugged: u64,
    /// Bytes unplugged.
    pub bytes_unplugged: u64,
    /// Wall time tidevm spent handling PLUG requests (its own share of a resize), in ns.
    pub plug_handling_ns: u64,
    /// Same for UNPLUG and UNPLUG_ALL, including the host's page freeing.
    pub unplug_handling_ns: u64,
}

/// A virtio-blk disk and its counters (since the VM booted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disk id (also the guest's GET_ID string, cut to 20 bytes).
    pub id: String,
    /// Image file or block device on the host.
    pub path: String,
    /// The guest may not write.
    pub readonly: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Bytes the guest sees.
    pub capacity_bytes: u64,
    /// Block size the guest is told (512, or 4096 with direct).
    pub block_size: u32,
    /// What the guest asked and what it got.
    #[serde(default)]
    pub counters: DiskCounters,
}

/// Per-disk counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    /// IN requests.
    pub read_requests: u64,
    /// OUT requests.
    pub write_requests: u64,
    /// FLUSH requests.
    pub flush_requests: u64,
    /// GET_ID requests.
    pub get_id_requests: u64,
    /// DISCARD requests.
    pub discard_requests: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes_requests: u64,
    /// Requests of a type the device does not support.
    pub unsupported_requests: u64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: u64,
    /// Bytes written to the disk by the guest.
    pub bytes_written: u64,
    /// Bytes discarded.
    pub bytes_discarded: u64,
    /// Bytes zeroed with WRITE_ZEROES.
    pub bytes_zeroed: u64,
    /// Requests answered with an I/O error (bad range, host failure, read-only disk,
    /// inaccessible guest buffer, malformed chain).
    pub io_errors: u64,
    /// Descriptor chains that were not a well-formed request.
    pub malformed: u64,
    /// Chains returned without a status (no usable status byte).
    pub dropped: u64,
    /// Failures of the host's read, write, sync or fallocate calls.
    pub host_errors: u64,
}

/// A virtio-net device and its counters (since the VM booted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    /// Network id.
    pub id: String,
    /// The host's TAP interface (for `tap=auto`, the one tidevm created).
    pub tap: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// What the guest sent and received.
    #[serde(default)]
    pub counters: NetCounters,
}

/// Per-network counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the host that did not reach the guest (larger than its buffer, or its
    /// buffer became inaccessible).
    pub rx_dropped: u64,
    /// Frames the guest sent to the host.
    pub tx_frames: u64,
    /// Their bytes (without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames the guest sent that did not go out (over 64 KiB, refused by the host, or in
    /// memory that is not accessible).
    pub tx_dropped: u64,
    /// Descriptor chains that could not carry a frame (wrong direction, indirect, shorter
    /// than the header, or in memory that is not accessible).
    pub malformed: u64,
    /// Host read or write failures.
    pub backend_errors: u64,
}

/// One guest access to memory it does not own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryViolation {
    /// Guest-physical address accessed; `null` when KVM gave none (a bare EFAULT).
    pub gpa: Option<u64>,
    /// Whether it was known to be a write (`access` says whether it was known at all).
    pub write: bool,
    /// `read`, `write`, or `unknown` (a memory fault exit carries no direction).
    #[serde(default = "unknown_access")]
    pub access: String,
    /// The vCPU that made it.
    pub vcpu: u32,
    /// The virtio-mem device whose unplugged block it hit, if any.
    pub device: Option<String>,
}

fn unknown_access() -> String {
    "unknown".into()
}

/// State of one virtio-mem device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemInfo {
    /// Device id, as used in `PUT /vm/virtio-mem/{id}`.
    pub id: String,
    /// Guest NUMA node the device's memory belongs to.
    pub node: u32,
    /// Guest-physical range the device may plug memory into.
    pub region: GuestRange,
    /// Plug granularity in bytes.
    pub block_size: u64,
    /// Bytes the guest has plugged now.
    pub plugged_size: u64,
    /// Bytes the host asked the guest to have plugged.
    pub requested_size: u64,
    /// Bytes of the region the guest may use for plugging.
    pub usable_region_size: u64,
    /// Why the device last answered BUSY to the guest (e.g. the host could not supply
    /// memory), until a later plug or unplug succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_busy_reason: Option<String>,
    /// What the device answered the guest so far, and the VMM's own time spent on it.
    #[serde(default)]
    pub counters: VirtioMemCounters,
}

/// Body of `GET /vm/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Life-cycle state.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Memory layout.
    pub memory: MemoryInfo,
    /// virtio-mem devices, in creation order.
    #[serde(default)]
    pub virtio_mem: Vec<VirtioMemInfo>,
    /// Guest accesses to hotplug memory it did not own (most recent last, at most 16 kept).
    #[serde(default)]
    pub memory_violations: Vec<MemoryViolation>,
    /// How many such accesses there were in all since the VMM started.
    #[serde(default)]
    pub memory_violation_count: u64,
    /// ACPI DIMM hotplug, when the VM has slots (`--memory ...,slots=N,maxmem=SIZE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimms: Option<DimmsInfo>,
    /// What the VM boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadInfo>,
    /// virtio-blk disks, in command-line order.
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// virtio-net devices, in command-line order.
    #[serde(default)]
    pub nets: Vec<NetInfo>,
}

/// Body of `PUT /vm/virtio-mem/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVirtioMemBody {
    /// Requested plugged size in bytes. On the wire either an integer number
    /// of bytes or a string with a binary unit such as `"4G"` or `"512MiB"`.
    #[serde(deserialize_with = "deserialize_byte_size")]
    pub requested_size: u64,
}

/// How a DIMM's memory is backed on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DimmBacking {
    /// Private anonymous memory.
    #[default]
    Anon,
    /// A shared memfd.
    Memfd,
    /// 2 MiB pages from the host's hugetlbfs pool (always populated when added).
    Hugetlbfs,
}

/// Body of `PUT /vm/dimms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDimmBody {
    /// Size in bytes, a multiple of 128 MiB (integer, or a string like `"1G"`).
    #[serde(deserialize_with = "deserialize_byte_size")]
    pub size: u64,
    /// Guest NUMA node (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
    /// Host backing (default `anon`).
    #[serde(default)]
    pub backing: DimmBacking,
    /// Fault the whole DIMM in on the host before the guest is told about it.
    #[serde(default)]
    pub prealloc: bool,
    /// Id to give the DIMM (default: `dimm<slot>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Where a DIMM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DimmState {
    /// Added on the host; the guest has not yet acknowledged it.
    Inserting,
    /// The guest took it (or found it at boot).
    Active,
    /// The guest was asked to eject it and has not finished.
    Removing,
}

/// What the guest last reported about a DIMM through ACPI `_OST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OstReport {
    /// Source event: 1 device check (insertion), 3 eject request, 0x103 OSPM eject.
    pub event: u32,
    /// Status code: 0 success, 0x80.. event-specific failures, 0x84 ejection in progress.
    pub status: u32,
    /// The status in words.
    pub meaning: String,
}

/// One DIMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimmInfo {
    /// Id, as used in `DELETE /vm/dimms/{id}`.
    pub id: String,
    /// ACPI slot number (the guest sees device `MPxx` with this `_UID`).
    pub slot: u32,
    /// Guest-physical range.
    pub range: GuestRange,
    /// Guest NUMA node.
    pub node: u32,
    /// Host backing.
    pub backing: DimmBacking,
    /// Whether it was populated before the guest saw it.
    pub prealloc: bool,
    /// Life-cycle state.
    pub state: DimmState,
    /// Host memory resident in the DIMM's mapping, in bytes.
    pub resident_bytes: u64,
    /// The guest's last `_OST` report for this DIMM, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ost: Option<OstReport>,
    /// Why the last removal did not happen (the guest refused or failed to eject), until the
    /// next request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_refused: Option<String>,
}

/// ACPI DIMM hotplug: the slots, the limit, and the DIMMs plugged now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimmsInfo {
    /// Number of DIMM slots.
    pub slots: u32,
    /// Boot memory plus every DIMM may not exceed this, in bytes.
    pub maxmem_bytes: u64,
    /// Bytes in DIMMs now.
    pub plugged_bytes: u64,
    /// Guest-physical range DIMMs are placed in.
    pub area: GuestRange,
    /// The DIMMs, by slot.
    pub dimms: Vec<DimmInfo>,
}

/// Body of every error response: `{"error": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable description of what went wrong.
    pub error: String,
}

/// A failed request: an HTTP status and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    /// HTTP status code, 4xx or 5xx.
    pub status: u16,
    /// Human-readable description of what went wrong.
    pub message: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or its values are invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: the route or the addressed object does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 405: the route exists but not with this method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, message)
    }

    /// 409: the request conflicts with the VM's current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 413: the request body is too large.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(413, message)
    }

    /// 500: the VMM failed to carry out a valid request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

/// The VMM side of the API: carries out parsed requests.
///
/// `handle` may block (it typically forwards the request to the VMM's control
/// loop and waits for the answer); the server calls it off its event loop.
pub trait RequestHandler: Send + Sync + 'static {
    /// Carry out `request`.
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;

    /// A new subscription to the VMM's events (`GET /vm/events`): one JSON [`Event`] per
    /// line. `Err` when the VMM publishes none or has as many subscribers as it serves.
    fn subscribe_events(&self) -> Result<std::sync::mpsc::Receiver<String>, ApiError> {
        Err(ApiError::not_found("this VMM publishes no events"))
    }
}

/// One event of `GET /vm/events`, as a JSON line: `{"seq": n, "ms": t, "event": "...", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Sequence number, from 1, without gaps unless events were lost (see `Lost`).
    pub seq: u64,
    /// Milliseconds since the VMM started.
    pub ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What the VMM reports as it happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A resize was asked of a mechanism (`virtio-mem`, `balloon`, `dimm`).
    ResizeStarted {
        /// The mechanism.
        mechanism: String,
        /// The device (virtio-mem id, DIMM id, `balloon`).
        device: String,
        /// The size asked for, in bytes.
        target_bytes: u64,
    },
    /// The guest moved towards a target.
    ResizeProgress {
        /// The mechanism.
        mechanism: String,
        /// The device.
        device: String,
        /// Where it is now, in bytes.
        current_bytes: u64,
        /// The target, in bytes.
        target_bytes: u64,
    },
    /// The guest reached a target.
    ResizeFinished {
        /// The mechanism.
        mechanism: String,
        /// The device.
        device: String,
        /// The size reached, in bytes.
        bytes: u64,
    },
    /// A resize stopped short (the guest stopped unplugging, refused an eject, the host
    /// answered BUSY, ...). Published once per cause; the resize may still go on later.
    ResizeFailed {
        /// The mechanism.
        mechanism: String,
        /// The device.
        device: String,
        /// Why, in words.
        reason: String,
        /// Why, typed.
        cause: ResizeShortfall,
    },
    /// `PUT /vm/memory` planned a total: its steps follow as `resize_started` events.
    MemoryPlanned {
        /// The total asked for, in bytes.
        target_total_bytes: u64,
        /// The steps, in words.
        steps: Vec<String>,
    },
    /// Everything a plan asked for has arrived, or what has not stopped short: the total
    /// reached, and why it is short of the target when it is. Published again if the
    /// outcome changes (a stalled unplug that goes on after all).
    MemoryPlanFinished {
        /// The plan's total, in bytes.
        target_total_bytes: u64,
        /// What the guest has, in bytes.
        actual_total_bytes: u64,
        /// Whether the target was reached.
        complete: bool,
        /// What stopped short, and why.
        shortfalls: Vec<MemoryShortfall>,
    },
    /// The guest answered an ACPI event about a DIMM slot (`_OST`).
    Ost {
        /// The slot.
        slot: u32,
        /// The ACPI event.
        acpi_event: u32,
        /// The status code.
        status: u32,
        /// Both, in words.
        meaning: String,
    },
    /// The guest touched memory it does not own.
    MemoryViolation {
        /// Guest-physical address, if KVM gave one.
        gpa: Option<u64>,
        /// `read`, `write` or `unknown`.
        access: String,
        /// The vCPU.
        vcpu: u32,
    },
    /// The balloon noticed something about the guest (reused pages, stale statistics).
    BalloonWarning {
        /// What.
        message: String,
    },
    /// The memory autopilot decided something, with what made it decide.
    AutopilotDecision {
        /// The decision, in words.
        decision: String,
        /// The target it set, if any, in bytes.
        target_bytes: Option<u64>,
        /// The inputs, as name/value pairs.
        inputs: std::collections::BTreeMap<String, i64>,
    },
    /// This subscriber did not read fast enough: `count` events were dropped for it.
    Lost {
        /// Events dropped.
        count: u64,
    },
}

/// Parse a byte size: a plain number of bytes, or a number followed by a
/// binary unit (`K`, `M`, `G`, `T`, optionally spelled `KiB`, `KB`, ...).
/// Returns `None` if the text is not a size or does not fit in a `u64`.
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let number: u64 = digits.parse().ok()?;
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// How much of a bad size string an error repeats.
const SHOWN_BAD_SIZE_CHARS: usize = 40;

fn deserialize_byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct ByteSizeVisitor;

    impl Visitor<'_> for ByteSizeVisitor {
        type Value = u64;

        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str(r#"a number of bytes, or a string such as "512M" or "4G""#)
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
            Ok(value)
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
            u64::try_from(value).map_err(|_| E::invalid_value(de::Unexpected::Signed(value), &self))
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
            parse_byte_size(value).ok_or_else(|| {
                // A client's bad size is named in the answer, but only its start: a body of
                // megabytes must not come back whole.
                let shown: String = value.chars().take(SHOWN_BAD_SIZE_CHARS).collect();
                let shown = if shown.len() < value.len() {
                    format!("{shown}...")
                } else {
                    shown
                };
                E::invalid_value(de::Unexpected::Str(&shown), &self)
            })
        }
    }

    deserializer.deserialize_any(ByteSizeVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_binary_units() {
        assert_eq!(parse_byte_size("0"), Some(0));
        assert_eq!(parse_byte_size("4096"), Some(4096));
        assert_eq!(parse_byte_size("4G"), Some(4 << 30));
        assert_eq!(parse_byte_size("4 GiB"), Some(4 << 30));
        assert_eq!(parse_byte_size("512m"), Some(512 << 20));
        assert_eq!(parse_byte_size("2KB"), Some(2048));
        assert_eq!(parse_byte_size("1T"), Some(1 << 40));
        assert_eq!(parse_byte_size(""), None);
        assert_eq!(parse_byte_size("G"), None);
        assert_eq!(parse_byte_size("-1"), None);
        assert_eq!(parse_byte_size("1.5G"), None);
        assert_eq!(parse_byte_size("4X"), None);
        assert_eq!(parse_byte_size("99999999999999999999"), None);
        assert_eq!(parse_byte_size("20000000T"), None);
    }

    #[test]
    fn resize_body_accepts_numbers_and_unit_strings() {
        let parse = |json: &str| serde_json::from_str::<ResizeVirtioMemBody>(json);
        assert_eq!(
            parse(r#"{"requested_size": 1073741824}"#)
                .unwrap()
                .requested_size,
            1 << 30
        );
        assert_eq!(
            parse(r#"{"requested_size": "1G"}"#).unwrap().requested_size,
            1 << 30
        );
        assert!(parse(r#"{"requested_size": -1}"#).is_err());
        assert!(parse(r#"{"requested_size": 1.5}"#).is_err());
        assert!(parse(r#"{"requested_size": "lots"}"#).is_err());
        assert!(parse(r#"{"requested_size": null}"#).is_err());
        assert!(parse(r#"{}"#).is_err());
        assert!(parse(r#"{"requested_size": 1, "extra": 2}"#).is_err());
    }

    #[test]
    fn a_bad_size_is_named_but_not_echoed_whole() {
        let parse = |json: &str| serde_json::from_str::<ResizeVirtioMemBody>(json);
        let long = format!(r#"{{"requested_size": "{}"}}"#, "9x".repeat(30_000));
        let message = parse(&long).unwrap_err().to_string();
        assert!(
            message.contains("9x9x9x") && message.contains("..."),
            "{message}"
        );
        assert!(message.len() < 300, "{} bytes: {message}", message.len());
        let short = parse(r#"{"requested_size": "lots"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("\"lots\"") && !short.contains("..."),
            "{short}"
        );
    }

    #[test]
    fn vm_state_is_snake_case_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&VmState::ShuttingDown).unwrap(),
            r#""shutting_down""#
        );
        assert_eq!(
            serde_json::to_string(&VmState::Running).unwrap(),
            r#""running""#
        );
        let lenient: VmState = serde_json::from_str(r#""shuttingdown""#).unwrap();
        assert_eq!(lenient, VmState::ShuttingDown);
    }

    #[test]
    fn vm_info_without_virtio_mem_field_deserializes() {
        let json = r#"{"state":"running","vcpus":2,
            "memory":{"boot_ram_bytes":1024,"ram_ranges":[{"start":0,"size":1024}],
                      "hotplug_area":{"start":4096,"size":8192}}}"#;
        let info: VmInfo = serde_json::from_str(json).unwrap();
        assert!(info.virtio_mem.is_empty());
        assert_eq!(info.memory.hotplug_area.size, 8192);
    }
}
