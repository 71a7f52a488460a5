//! A VM's configuration, validated before anything is created.

use crate::memory::Backing;
use crate::memory_service::autopilot::PolicyConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors in the configuration given by the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size string that is not a number with an optional K/M/G/T suffix.
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    InvalidSize(String),
    /// A `key=value` option list that could not be parsed.
    #[error("invalid --{option} value '{value}': {reason}")]
    InvalidOption {
        /// The option name.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Memory size out of bounds.
    #[error("memory size {size} is invalid: {reason}")]
    InvalidMemory {
        /// The size given, as written.
        size: String,
        /// What is wrong.
        reason: String,
    },
    /// vCPU count out of bounds.
    #[error("--cpus {0} is invalid: between 1 and {MAX_VCPUS} vCPUs are supported")]
    InvalidCpus(u32),
    /// A disk image cannot be opened as asked (missing, read-only, O_DIRECT refused).
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::DiskError),
    /// A file that must exist does not.
    #[error("{what} {path} does not exist or is not readable")]
    MissingFile {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
}

/// Most vCPUs a VM may have (APIC IDs must fit the MADT's 8-bit field).
pub const MAX_VCPUS: u32 = 254;
/// Smallest boot memory a Linux guest can use.
pub const MIN_MEMORY: u64 = 128 << 20;

/// Where the guest console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout (and stdin for input).
    Stdout,
    /// Appended to a file (no input).
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time gets the console.
    Socket(PathBuf),
    /// A TCP address the VMM listens on; one client at a time gets the console.
    Tcp(SocketAddr),
    /// Discarded.
    Off,
}

impl SerialConfig {
    /// Parses `stdout`, `off`, `file=PATH`, `socket=PATH` or `tcp=ADDR`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidOption {
            option: "serial",
            value: value.to_string(),
            reason: reason.to_string(),
        };
        match value.split_once('=') {
            None if value == "stdout" => Ok(SerialConfig::Stdout),
            None if value == "off" => Ok(SerialConfig::Off),
            Some(("file", path)) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
            Some(("socket", path)) if !path.is_empty() => Ok(SerialConfig::Socket(path.into())),
            Some(("tcp", addr)) => addr
                .parse()
                .map(SerialConfig::Tcp)
                .map_err(|_| invalid("tcp= needs an address like 127.0.0.1:4444")),
            _ => Err(invalid(
                "expected stdout, off, file=PATH, socket=PATH or tcp=ADDR",
            )),
        }
    }
}

/// Boot memory, and the room for DIMMs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Boot RAM in bytes.
    pub size: u64,
    /// ACPI DIMM slots (0: no DIMM hotplug).
    pub slots: u32,
    /// Boot RAM plus every DIMM may not exceed this (0 when there are no slots).
    pub maxmem: u64,
}

/// DIMMs are whole Linux memory blocks (x86-64).
pub const DIMM_ALIGN: u64 = 128 << 20;
/// Most DIMM slots (QEMU's limit too).
pub const MAX_DIMM_SLOTS: u32 = 256;

impl MemoryConfig {
    /// Parses `size=2G[,slots=8,maxmem=34G]` (or just `2G`).
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidOption {
            option: "memory",
            value: value.to_string(),
            reason,
        };
        let mut size = None;
        let mut slots = None;
        let mut maxmem = None;
        for item in value.split(',') {
            match item.split_once('=') {
                Some(("size", s)) => size = Some(parse_size(s)?),
                Some(("slots", s)) => {
                    slots =
                        Some(s.parse::<u32>().map_err(|_| {
                            invalid(format!("slots={s} is not a number of DIMM slots"))
                        })?)
                }
                Some(("maxmem", s)) => maxmem = Some(parse_size(s)?),
                None if size.is_none() => size = Some(parse_size(item)?),
                _ => {
                    return Err(invalid(format!(
                        "unknown key in '{item}' (known: size, slots, maxmem)"
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| invalid("size= is required".into()))?;
        let (slots, maxmem) = match (slots, maxmem) {
            (None, None) => (0, 0),
            (Some(slots), Some(maxmem)) => {
                if !(1..=MAX_DIMM_SLOTS).contains(&slots) {
                    return Err(invalid(format!(
                        "slots must be between 1 and {MAX_DIMM_SLOTS}"
                    )));
                }
                if size
                    .checked_add(DIMM_ALIGN)
                    .is_none_or(|least| maxmem < least)
                {
                    return Err(invalid(format!(
                        "maxmem must leave room for at least one 128 MiB DIMM above size ({})",
                        format_size(size)
                    )));
                }
                (slots, maxmem)
            }
            _ => return Err(invalid("slots= and maxmem= go together".into())),
        };
        Ok(MemoryConfig {
            size,
            slots,
            maxmem,
        })
    }

    /// Bytes that DIMMs may add up to.
    pub fn dimm_budget(&self) -> u64 {
        self.maxmem.saturating_sub(self.size) / DIMM_ALIGN * DIMM_ALIGN
    }
}

/// A DIMM the VM has now: added through the API, kept here so that a reboot brings it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimmConfig {
    /// Name in the API.
    pub id: String,
    /// ACPI slot.
    pub slot: u32,
    /// Guest-physical start.
    pub start: u64,
    /// Size in bytes (a multiple of 128 MiB).
    pub size: u64,
    /// NUMA node.
    pub node: u32,
    /// Host backing.
    pub backing: Backing,
    /// Populate before the guest sees it.
    pub prealloc: bool,
}

/// Parses `512M`, `2G`, `1048576`, `4KiB`... (binary units).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let invalid = || ConfigError::InvalidSize(text.to_string());
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1 << shift).ok_or_else(invalid)
}

/// The huge page size `backing=hugetlbfs` means.
pub const HUGETLBFS_PAGE_SIZE: u64 = 2 << 20;

/// One virtio-mem device: `id=mem0,size=16G[,node=0][,block-size=2M][,requested=0]
/// [,backing=anon|memfd|hugetlbfs][,prealloc=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioMemDeviceConfig {
    /// Name in the API.
    pub id: String,
    /// Region size: the most this device can ever plug.
    pub size: u64,
    /// NUMA node (ACPI proximity domain) the memory belongs to.
    pub node: Option<u32>,
    /// Plug granularity.
    pub block_size: u64,
    /// Plugged size asked of the guest (changes at run time through the API).
    pub requested: u64,
    /// Host backing.
    pub backing: Backing,
    /// Populate blocks when they are plugged (answer BUSY if the host cannot).
    pub prealloc: bool,
}

/// Default virtio-mem block: a transparent huge page, the Linux driver's sub-block size.
pub const DEFAULT_VIRTIO_MEM_BLOCK: u64 = 2 << 20;

impl VirtioMemDeviceConfig {
    /// Parses the `--virtio-mem` value.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidOption {
            option: "virtio-mem",
            value: value.to_string(),
            reason,
        };
        let mut config = VirtioMemDeviceConfig {
            id: String::new(),
            size: 0,
            node: None,
            block_size: DEFAULT_VIRTIO_MEM_BLOCK,
            requested: 0,
            backing: Backing::Anonymous,
            prealloc: false,
        };
        for item in value.split(',') {
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| invalid(format!("'{item}' is not key=value")))?;
            match key {
                "id" => config.id = val.to_string(),
                "size" => config.size = parse_size(val)?,
                "node" => {
                    config.node = Some(
                        val.parse()
                            .map_err(|_| invalid(format!("node '{val}' is not a number")))?,
                    )
                }
                "block-size" => config.block_size = parse_size(val)?,
                "requested" => config.requested = parse_size(val)?,
                "backing" => {
                    config.backing = match val {
                        "anon" | "anonymous" => Backing::Anonymous,
                        "memfd" => Backing::Memfd,
                        "hugetlbfs" => Backing::Hugetlbfs {
                            page_size: HUGETLBFS_PAGE_SIZE,
                        },
                        _ => {
                            return Err(invalid(format!(
                                "unknown backing '{val}' (anon, memfd, hugetlbfs)"
                            )))
                        }
                    }
                }
                "prealloc" => {
                    config.prealloc = match val {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => {
                            return Err(invalid(format!("prealloc must be on or off, not '{val}'")))
                        }
                    }
                }
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        let id_ok = !config.id.is_empty()
            && config.id.len() <= 64
            && config
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            return Err(invalid(
                "id= is required: 1-64 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        if !config.block_size.is_power_of_two() || config.block_size < 4096 {
            return Err(invalid(
                "block-size must be a power of two of at least 4K".into(),
            ));
        }
        if config.size == 0 || !config.size.is_multiple_of(128 << 20) {
            return Err(invalid(
                "size must be a non-zero multiple of 128M (Linux memory blocks)".into(),
            ));
        }
        if !config.size.is_multiple_of(config.block_size) || config.block_size > config.size {
            return Err(invalid("size must be a multiple of block-size".into()));
        }
        if config.requested > config.size || !config.requested.is_multiple_of(config.block_size) {
            return Err(invalid(
                "requested must be a multiple of block-size and at most size".into(),
            ));
        }
        Ok(config)
    }
}

/// The balloon: `size=SIZE,deflate-on-oom=on|off,free-page-reporting=on|off,stats-interval=5s,
/// discard=merged|per-page,on-reuse=report|stop|uncount` (every key optional).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonDeviceConfig {
    /// Initial target.
    pub size: u64,
    /// Let the guest take pages back under memory pressure.
    pub deflate_on_oom: bool,
    /// Discard memory the guest reports free.
    pub free_page_reporting: bool,
    /// How often to poll the guest's statistics (None: no stats queue).
    pub stats_interval: Option<std::time::Duration>,
    /// One discard syscall per 4 KiB page instead of per contiguous range: QEMU's way, for
    /// benchmarks that compare the two.
    pub per_page_discard: bool,
    /// What to do when the guest touches pages it inflated (`on-reuse=report|stop|uncount`).
    pub on_reuse: crate::devices::virtio::balloon::ReusePolicy,
}

impl BalloonDeviceConfig {
    /// Parses the `--balloon` value (empty means all defaults).
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidOption {
            option: "balloon",
            value: value.to_string(),
            reason,
        };
        let on_off = |key: &str, v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(invalid(format!("{key} must be on or off, not '{v}'"))),
        };
        let mut config = BalloonDeviceConfig {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_interval: Some(std::time::Duration::from_secs(5)),
            per_page_discard: false,
            on_reuse: Default::default(),
        };
        for item in value.split(',').filter(|i| !i.is_empty()) {
            let (key, v) = item
                .split_once('=')
                .ok_or_else(|| invalid(format!("'{item}' is not key=value")))?;
            match key {
                "size" => config.size = parse_size(v)?,
                "deflate-on-oom" => config.deflate_on_oom = on_off(key, v)?,
                "free-page-reporting" => config.free_page_reporting = on_off(key, v)?,
                "discard" => {
                    config.per_page_discard = match v {
                        "merged" => false,
                        "per-page" => true,
                        _ => {
                            return Err(invalid(format!(
                                "discard must be merged or per-page, not '{v}'"
                            )))
                        }
                    }
                }
                "on-reuse" => {
                    use crate::devices::virtio::balloon::ReusePolicy;
                    config.on_reuse = match v {
                        "report" => ReusePolicy::Report,
                        "stop" => ReusePolicy::Stop,
                        "uncount" => ReusePolicy::Uncount,
                        _ => {
                            return Err(invalid(format!(
                                "on-reuse must be report, stop or uncount, not '{v}'"
                            )))
                        }
                    }
                }
                "stats-interval" => {
                    let digits = v.strip_suffix('s').unwrap_or(v);
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(invalid(format!("stats-interval '{v}' is not like 5s")));
                    }
                    let seconds = digits
                        .parse::<u64>()
                        .ok()
                        .filter(|seconds| *seconds <= MAX_STATS_INTERVAL_SECS)
                        .ok_or_else(|| {
                            invalid(format!(
                                "stats-interval '{v}' is too long: at most \
                                 {MAX_STATS_INTERVAL_SECS}s (a day), or 0s for no statistics"
                            ))
                        })?;
                    config.stats_interval =
                        (seconds > 0).then(|| std::time::Duration::from_secs(seconds));
                }
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        if !config.size.is_multiple_of(4096) {
            return Err(invalid("size must be a multiple of 4K".into()));
        }
        Ok(config)
    }
}

/// One virtio-blk disk: `path=FILE[,readonly=on][,id=ID][,direct=on]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Name in the API and the guest's GET_ID string (`disk0`, `disk1`... by default).
    pub id: String,
    /// Raw image file or block device.
    pub path: PathBuf,
    /// The guest may not write.
    pub readonly: bool,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
}

impl DiskConfig {
    /// Parses a `--disk` value; `index` (its place among the disks) names it when no id is
    /// given.
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidOption {
            option: "disk",
            value: value.to_string(),
            reason,
        };
        let on_off = |key: &str, v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(invalid(format!("{key} must be on or off, not '{v}'"))),
        };
        let mut path = None;
        let mut config = DiskConfig {
            id: format!("disk{index}"),
            path: PathBuf::new(),
            readonly: false,
            direct: false,
        };
        for item in value.split(',') {
            let (key, v) = item
                .split_once('=')
                .ok_or_else(|| invalid(format!("'{item}' is not key=value")))?;
            match key {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "path" => return Err(invalid("path= is empty".into())),
                "id" => config.id = v.to_string(),
                "readonly" => config.readonly = on_off(key, v)?,
                "direct" => config.direct = on_off(key, v)?,
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        config.path = path.ok_or_else(|| invalid("path= is required".into()))?;
        let id_ok = !config.id.is_empty()
            && config.id.len() <= 64
            && config
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            return Err(invalid(
                "id must be 1-64 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        Ok(config)
    }

    /// How to open the disk.
    pub fn options(&self) -> crate::devices::virtio::block::DiskOptions {
        crate::devices::virtio::block::DiskOptions {
            path: self.path.clone(),
            readonly: self.readonly,
            direct: self.direct,
        }
    }
}

/// One virtio-net device: `tap=NAME|auto[,mac=XX:XX:XX:XX:XX:XX][,id=ID]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDeviceConfig {
    /// Name in the API (`net0`, `net1`... by default).
    pub id: String,
    /// The TAP interface: an existing one, or `auto` to create `tidevm<N>`.
    pub tap: crate::devices::virtio::net::TapName,
    /// The guest's MAC address; a random locally administered one when not given (kept
    /// across reboots).
    pub mac: Option<crate::devices::virtio::net::MacAddr>,
}

impl NetDeviceConfig {
    /// Parses a `--net` value; `index` (its place among the networks) names it when no id is
    /// given.
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        use crate::devices::virtio::net::{tap::check_name, MacAddr, TapName};
        let invalid = |reason: String| ConfigError::InvalidOption {
            option: "net",
            value: value.to_string(),
            reason,
        };
        let mut tap = None;
        let mut config = NetDeviceConfig {
            id: format!("net{index}"),
            tap: TapName::Auto,
            mac: None,
        };
        for item in value.split(',') {
            let (key, v) = item
                .split_once('=')
                .ok_or_else(|| invalid(format!("'{item}' is not key=value")))?;
            match key {
                "tap" if v == "auto" => tap = Some(TapName::Auto),
                "tap" => {
                    check_name(v).map_err(|e| invalid(e.to_string()))?;
                    tap = Some(TapName::Existing(v.to_string()));
                }
                "mac" => {
                    let mac = MacAddr::parse(v).ok_or_else(|| {
                        invalid(format!(
                            "mac '{v}' is not a unicast address like 02:00:00:00:00:01"
                        ))
                    })?;
                    config.mac = Some(mac);
                }
                "id" => config.id = v.to_string(),
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        config.tap = tap.ok_or_else(|| invalid("tap= is required (a name, or auto)".into()))?;
        if !valid_id(&config.id) {
            return Err(invalid(
                "id must be 1-64 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        Ok(config)
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Longest `stats-interval` of the balloon: a day.
pub const MAX_STATS_INTERVAL_SECS: u64 = 24 * 60 * 60;

/// One NUMA node: `node=ID,cpus=LIST,memory=SIZE` (cpus as `0`, `0-3` or `0:2:5`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNodeConfig {
    /// Node id = ACPI proximity domain (nodes are numbered 0..n).
    pub id: u32,
    /// vCPU indices on this node.
    pub cpus: Vec<u8>,
    /// Boot RAM on this node.
    pub memory: u64,
}

impl NumaNodeConfig {
    /// Parses the `--numa` value.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidOption {
            option: "numa",
            value: value.to_string(),
            reason,
        };
        let (mut id, mut cpus, mut memory) = (None, Vec::new(), None);
        for item in value.split(',') {
            match item.split_once('=') {
                Some(("node", v)) => {
                    id = Some(
                        v.parse()
                            .map_err(|_| invalid(format!("node '{v}' is not a number")))?,
                    )
                }
                Some(("cpus", v)) => {
                    cpus =
                        parse_cpu_list(v).ok_or_else(|| invalid(format!("bad cpu list '{v}'")))?
                }
                Some(("memory", v)) => memory = Some(parse_size(v)?),
                _ => {
                    return Err(invalid(format!(
                        "unknown item '{item}' (node=, cpus=, memory=)"
                    )))
                }
            }
        }
        Ok(NumaNodeConfig {
            id: id.ok_or_else(|| invalid("node= is required".into()))?,
            cpus,
            memory: memory.ok_or_else(|| invalid("memory= is required".into()))?,
        })
    }
}

fn parse_cpu_list(text: &str) -> Option<Vec<u8>> {
    let mut cpus = Vec::new();
    for part in text.split(':') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u8, u8) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Everything needed to build and boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The uncompressed ELF vmlinux (PVH).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u8,
    /// Boot memory.
    pub memory: MemoryConfig,
    /// The guest console.
    pub serial: SerialConfig,
    /// virtio-mem devices.
    pub virtio_mem: Vec<VirtioMemDeviceConfig>,
    /// What to do when the guest touches memory it does not own.
    pub violation_policy: ViolationPolicy,
    /// NUMA nodes (empty: one node, no SRAT).
    pub numa: Vec<NumaNodeConfig>,
    /// The balloon, if any.
    pub balloon: Option<BalloonDeviceConfig>,
    /// DIMMs plugged now (empty at start; the API adds and removes them).
    pub dimms: Vec<DimmConfig>,
    /// The autopilot's policy (`--memory-policy`). Parsed and validated only: nothing acts
    /// on it until a planner carries its targets out.
    pub memory_policy: Option<PolicyConfig>,
    /// virtio-blk disks, in command-line order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in command-line order.
    pub nets: Vec<NetDeviceConfig>,
}

/// What happens when the guest touches hotplug memory that is not plugged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ViolationPolicy {
    /// Log it and show it in the API; the access reads as all ones and writes are dropped.
    /// That works where the block's 128 MiB chunk has no KVM slot (an MMIO exit). Inside a
    /// partly plugged chunk the access is a memory fault that cannot be completed, so the VM
    /// stops whatever the policy.
    #[default]
    Report,
    /// Also stop the VM.
    Stop,
}

impl VmConfig {
    /// Checks everything that can be checked before touching KVM.
    pub fn validate(&self, host_memory: Option<u64>) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&u32::from(self.cpus)) {
            return Err(ConfigError::InvalidCpus(u32::from(self.cpus)));
        }
        let size = self.memory.size;
        let shown = format_size(size);
        if size < MIN_MEMORY {
            return Err(ConfigError::InvalidMemory {
                size: shown,
                reason: "a Linux guest needs at least 128 MiB".into(),
            });
        }
        if !size.is_multiple_of(2 << 20) {
            return Err(ConfigError::InvalidMemory {
                size: shown,
                reason: "it must be a multiple of 2 MiB".into(),
            });
        }
        if let Some(host) = host_memory {
            if size > host {
                return Err(ConfigError::InvalidMemory {
                    size: shown,
                    reason: format!("the host has only {} of RAM", format_size(host)),
                });
            }
        }
        self.validate_numa()?;
        if let Some(balloon) = &self.balloon {
            if balloon.size > size {
                return Err(ConfigError::InvalidOption {
                    option: "balloon",
                    value: format_size(balloon.size),
                    reason: format!("larger than the boot memory {shown}"),
                });
            }
        }
        // Sizes come from the command line: a sum that overflows is as much too big as one
        // above the area, and must not wrap around the check.
        let total_hotplug =
            self.virtio_mem
                .iter()
                .try_fold(self.memory.dimm_budget(), |total, d| {
                    d.size
                        .checked_next_multiple_of(crate::arch::x86_64::layout::HOTPLUG_AREA_ALIGN)
                        .and_then(|size| total.checked_add(size))
                });
        if total_hotplug.is_none_or(|total| total > crate::arch::x86_64::layout::HOTPLUG_AREA_SIZE)
        {
            return Err(ConfigError::InvalidMemory {
                size: total_hotplug.map_or_else(|| "more than 16 EiB".into(), format_size),
                reason: format!(
                    "virtio-mem regions and maxmem exceed the {} hotplug area",
                    format_size(crate::arch::x86_64::layout::HOTPLUG_AREA_SIZE)
                ),
            });
        }
        self.validate_memory_policy()?;
        for (i, device) in self.virtio_mem.iter().enumerate() {
            if self.virtio_mem[..i].iter().any(|d| d.id == device.id) {
                return Err(ConfigError::InvalidOption {
                    option: "virtio-mem",
                    value: device.id.clone(),
                    reason: "two devices have this id".into(),
                });
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            if self.disks[..i].iter().any(|d| d.id == disk.id) {
                return Err(ConfigError::InvalidOption {
                    option: "disk",
                    value: disk.id.clone(),
                    reason: "two disks have this id".into(),
                });
            }
        }
        for (i, net) in self.nets.iter().enumerate() {
            let earlier = &self.nets[..i];
            let reason = if earlier.iter().any(|n| n.id == net.id) {
                "two networks have this id"
            } else if matches!(net.tap, crate::devices::virtio::net::TapName::Existing(_))
                && earlier.iter().any(|n| n.tap == net.tap)
            {
                "two networks use this TAP"
            } else {
                continue;
            };
            return Err(ConfigError::InvalidOption {
                option: "net",
                value: net.id.clone(),
                reason: reason.into(),
            });
        }
        // Opened once now, so that a missing or read-only image fails before anything boots;
        // the builder opens it again for the device.
        for disk in &self.disks {
            crate::devices::virtio::block::Disk::open(disk.options())?;
        }
        for (what, path) in [
            ("kernel", Some(&self.kernel)),
            ("initramfs", self.initramfs.as_ref()),
        ] {
            if let Some(path) = path {
                if std::fs::File::open(path).is_err() {
                    return Err(ConfigError::MissingFile {
                        what,
                        path: path.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl VmConfig {
    fn validate_memory_policy(&self) -> Result<(), ConfigError> {
        match &self.memory_policy {
            Some(policy) => check_memory_policy(
                policy,
                self.balloon.as_ref(),
                &self.memory,
                &self.virtio_mem,
            ),
            None => Ok(()),
        }
    }

    fn validate_numa(&self) -> Result<(), ConfigError> {
        let invalid = |value: String, reason: String| ConfigError::InvalidOption {
            option: "numa",
            value,
            reason,
        };
        if self.numa.is_empty() {
            if let Some(d) = self
                .virtio_mem
                .iter()
                .find(|d| d.node.is_some_and(|n| n != 0))
            {
                return Err(ConfigError::InvalidOption {
                    option: "virtio-mem",
                    value: d.id.clone(),
                    reason: "a node other than 0 needs --numa nodes".into(),
                });
            }
            return Ok(());
        }
        for (i, node) in self.numa.iter().enumerate() {
            if node.id as usize != i {
                return Err(invalid(
                    format!("node={}", node.id),
                    "nodes must be given in order, numbered from 0".into(),
                ));
            }
        }
        let mut seen = vec![false; usize::from(self.cpus)];
        for node in &self.numa {
            for &cpu in &node.cpus {
                match seen.get_mut(usize::from(cpu)) {
                    Some(s) if !*s => *s = true,
                    Some(_) => {
                        return Err(invalid(
                            format!("cpus of node {}", node.id),
                            format!("vCPU {cpu} is on two nodes"),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            format!("cpus of node {}", node.id),
                            format!("vCPU {cpu} does not exist (--cpus {})", self.cpus),
                        ))
                    }
                }
            }
        }
        if let Some(cpu) = seen.iter().position(|s| !s) {
            return Err(invalid(String::new(), format!("vCPU {cpu} is on no node")));
        }
        let total = self
            .numa
            .iter()
            .try_fold(0u64, |total, node| total.checked_add(node.memory));
        if total != Some(self.memory.size) {
            return Err(invalid(
                String::new(),
                format!(
                    "the nodes' memory adds up to {}, but --memory is {}",
                    total.map_or_else(|| "more than 16 EiB".into(), format_size),
                    format_size(self.memory.size)
                ),
            ));
        }
        if let Some(d) = self
            .virtio_mem
            .iter()
            .find(|d| d.node.is_some_and(|n| n as usize >= self.numa.len()))
        {
            return Err(ConfigError::InvalidOption {
                option: "virtio-mem",
                value: d.id.clone(),
                reason: format!("node {} is not a --numa node", d.node.unwrap_or(0)),
            });
        }
        Ok(())
    }
}

/// Formats a byte count for people: `512 MiB`, `6 GiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            return if bytes.is_multiple_of(scale) {
                format!("{} {unit}", bytes / scale)
            } else {
                format!("{:.1} {unit}", bytes as f64 / scale as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// The policy needs the guest's statistics at least once per interval (they are its view
/// of the guest), and a `max` the VM's devices can reach.
pub fn check_memory_policy(
    policy: &PolicyConfig,
    balloon: Option<&BalloonDeviceConfig>,
    memory: &MemoryConfig,
    virtio_mem: &[VirtioMemDeviceConfig],
) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidOption {
        option: "memory-policy",
        value: format!(
            "min={},max={}",
            format_size(policy.min),
            format_size(policy.max)
        ),
        reason,
    };
    let stats = balloon.and_then(|b| b.stats_interval);
    match stats {
        None => {
            return Err(invalid(
                "it needs --balloon with statistics (stats-interval above 0s): the \
                 guest's statistics are what the policy decides from"
                    .into(),
            ))
        }
        Some(stats) if stats > policy.interval => {
            return Err(invalid(format!(
                "the balloon's stats-interval ({}s) is longer than the policy's interval \
                 ({} ms): set --balloon stats-interval to at most the policy's interval, \
                 or a longer interval=",
                stats.as_secs(),
                policy.interval.as_millis()
            )))
        }
        Some(_) => {}
    }
    let reachable = virtio_mem
        .iter()
        .try_fold(
            memory.size.saturating_add(memory.dimm_budget()),
            |total, d| total.checked_add(d.size),
        )
        .unwrap_or(u64::MAX);
    if policy.max > reachable {
        return Err(invalid(format!(
            "max is more than the {} the VM can reach (boot memory, virtio-mem regions \
             and the DIMM budget of --memory maxmem)",
            format_size(reachable)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "2X", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(MemoryConfig::parse("size=6G").unwrap().size, 6 << 30);
        assert_eq!(MemoryConfig::parse("1G").unwrap().size, 1 << 30);
        assert!(MemoryConfig::parse("size=1G,foo=2").is_err());
        assert!(MemoryConfig::parse("slots=2").is_err());
        let m = MemoryConfig::parse("size=2G,slots=8,maxmem=34G").unwrap();
        assert_eq!((m.size, m.slots, m.maxmem), (2 << 30, 8, 34 << 30));
        assert_eq!(m.dimm_budget(), 32 << 30);
        assert_eq!(MemoryConfig::parse("1G").unwrap().slots, 0);
        for bad in [
            "size=1G,slots=8",
            "size=1G,maxmem=4G",
            "size=1G,slots=0,maxmem=4G",
            "size=1G,slots=999,maxmem=4G",
            "size=1G,slots=x,maxmem=4G",
            "size=1G,slots=2,maxmem=1G",
            "size=1G,slots=2,maxmem=lots",
        ] {
            assert!(MemoryConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn balloon_options() {
        let b = BalloonDeviceConfig::parse(
            "size=1G,deflate-on-oom=on,free-page-reporting=on,stats-interval=2s,discard=per-page",
        )
        .unwrap();
        assert_eq!(b.size, 1 << 30);
        assert!(b.deflate_on_oom && b.free_page_reporting && b.per_page_discard);
        assert_eq!(b.stats_interval, Some(std::time::Duration::from_secs(2)));
        let d = BalloonDeviceConfig::parse("").unwrap();
        assert!(!d.deflate_on_oom && !d.free_page_reporting && !d.per_page_discard);
        for bad in ["discard=some", "deflate-on-oom=maybe", "colour=red", "size"] {
            assert!(BalloonDeviceConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn virtio_mem_options() {
        let d = VirtioMemDeviceConfig::parse(
            "id=mem0,size=16G,node=1,requested=4G,backing=memfd,prealloc=on",
        )
        .unwrap();
        assert_eq!(d.size, 16 << 30);
        assert_eq!(d.node, Some(1));
        assert_eq!(d.requested, 4 << 30);
        assert_eq!(d.backing, Backing::Memfd);
        assert!(d.prealloc);
        assert_eq!(d.block_size, 2 << 20);
        for bad in [
            "size=16G",
            "id=mem0",
            "id=mem0,size=100M",
            "id=mem0,size=1G,block-size=3M",
            "id=mem0,size=1G,requested=2G",
            "id=mem0,size=1G,requested=1M",
            "id=mem0,size=1G,backing=nvme",
            "id=mem0,size=1G,colour=red",
            "id=a/b,size=1G",
        ] {
            assert!(VirtioMemDeviceConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_options() {
        let d = DiskConfig::parse("path=/x.img,readonly=on,id=root,direct=on", 3).unwrap();
        assert_eq!(
            d,
            DiskConfig {
                id: "root".into(),
                path: "/x.img".into(),
                readonly: true,
                direct: true,
            }
        );
        let d = DiskConfig::parse("path=/x.img", 3).unwrap();
        assert_eq!(
            (d.id.as_str(), d.readonly, d.direct),
            ("disk3", false, false)
        );
        for (bad, why) in [
            ("", "is not key=value"),
            ("readonly=on", "path= is required"),
            ("path=", "path= is empty"),
            ("path=/x,cache=none", "unknown key 'cache'"),
            ("path=/x,readonly=yes", "readonly must be on or off"),
            ("path=/x,id=", "id must be"),
            ("path=/x,id=a/b", "id must be"),
        ] {
            let e = DiskConfig::parse(bad, 0).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--disk"), "{bad}: {e}");
        }
    }

    #[test]
    fn net_options() {
        use crate::devices::virtio::net::{MacAddr, TapName};
        let n = NetDeviceConfig::parse("tap=tap3,mac=02:AB:cd:00:00:01,id=lan", 0).unwrap();
        assert_eq!(
            n,
            NetDeviceConfig {
                id: "lan".into(),
                tap: TapName::Existing("tap3".into()),
                mac: Some(MacAddr([0x02, 0xab, 0xcd, 0, 0, 1])),
            }
        );
        let n = NetDeviceConfig::parse("tap=auto", 2).unwrap();
        assert_eq!((n.id.as_str(), n.tap, n.mac), ("net2", TapName::Auto, None));
        for (bad, why) in [
            ("tap=tap0,speed=10", "unknown key 'speed'"),
            ("tap=tap0,mac=01:00:00:00:00:01", "not a unicast address"),
            ("tap=tap0,mac=02:00:00:00:00", "not a unicast address"),
            ("tap=tap0,mac=02:00:00:00:00:0g", "not a unicast address"),
            ("mac=02:00:00:00:00:01", "tap= is required"),
            ("tap=a/b", "invalid TAP name"),
            ("tap=much-too-long-name", "invalid TAP name"),
            ("tap=tap0,id=", "id must be"),
            ("tap", "not key=value"),
        ] {
            let e = NetDeviceConfig::parse(bad, 0).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--net"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: one line: {e}");
        }
    }

    #[test]
    fn nets_are_checked_for_duplicate_ids_and_taps() {
        let mut config = small_config();
        config.nets = vec![
            NetDeviceConfig::parse("tap=t0", 0).unwrap(),
            NetDeviceConfig::parse("tap=t1", 1).unwrap(),
            NetDeviceConfig::parse("tap=auto", 2).unwrap(),
            NetDeviceConfig::parse("tap=auto", 3).unwrap(),
        ];
        config.validate(None).unwrap();
        config.nets[1] = NetDeviceConfig::parse("tap=t0", 1).unwrap();
        let e = config.validate(None).unwrap_err().to_string();
        assert!(e.contains("two networks use this TAP"), "{e}");
        config.nets[1] = NetDeviceConfig::parse("tap=t1,id=net0", 1).unwrap();
        let e = config.validate(None).unwrap_err().to_string();
        assert!(e.contains("two networks have this id"), "{e}");
    }

    #[test]
    fn disks_are_checked_for_duplicate_ids_and_missing_files() {
        let image = std::env::temp_dir().join(format!("tidevm-config-{}.img", std::process::id()));
        std::fs::write(&image, [0u8; 4096]).unwrap();
        let disk = |id: &str, path: &std::path::Path| DiskConfig {
            id: id.into(),
            path: path.into(),
            readonly: false,
            direct: false,
        };
        let mut config = small_config();
        config.disks = vec![disk("a", &image), disk("b", &image)];
        config.validate(None).unwrap();
        config.disks = vec![disk("a", &image), disk("a", &image)];
        let e = config.validate(None).unwrap_err().to_string();
        assert!(
            e.contains("two disks have this id") && e.contains("--disk"),
            "{e}"
        );
        let missing = image.with_extension("missing");
        config.disks = vec![disk("a", &missing)];
        let e = config.validate(None).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Disk(crate::devices::virtio::block::DiskError::NotFound { .. })
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        std::fs::remove_file(&image).unwrap();
    }

    #[test]
    fn serial_options() {
        assert_eq!(SerialConfig::parse("stdout").unwrap(), SerialConfig::Stdout);
        assert_eq!(
            SerialConfig::parse("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(matches!(
            SerialConfig::parse("tcp=127.0.0.1:4000").unwrap(),
            SerialConfig::Tcp(_)
        ));
        assert!(SerialConfig::parse("tcp=nonsense").is_err());
        assert!(SerialConfig::parse("file=").is_err());
        assert!(SerialConfig::parse("pty").is_err());
    }

    fn small_config() -> VmConfig {
        VmConfig {
            kernel: "/proc/self/exe".into(),
            initramfs: None,
            cmdline: String::new(),
            cpus: 1,
            memory: MemoryConfig {
                size: 1 << 30,
                ..MemoryConfig::default()
            },
            serial: SerialConfig::Off,
            virtio_mem: Vec::new(),
            violation_policy: ViolationPolicy::Report,
            numa: Vec::new(),
            balloon: None,
            disks: Vec::new(),
            nets: Vec::new(),
            dimms: Vec::new(),
            memory_policy: None,
        }
    }

    #[test]
    fn huge_stats_intervals_are_refused_with_the_limit() {
        let b = BalloonDeviceConfig::parse(&format!("stats-interval={MAX_STATS_INTERVAL_SECS}s"))
            .unwrap();
        assert_eq!(
            b.stats_interval,
            Some(std::time::Duration::from_secs(MAX_STATS_INTERVAL_SECS))
        );
        for huge in [
            format!("{}s", MAX_STATS_INTERVAL_SECS + 1),
            format!("{}s", u64::MAX),
            format!("{}", u64::MAX),
        ] {
            let error = BalloonDeviceConfig::parse(&format!("stats-interval={huge}"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("--balloon"), "{error}");
            assert!(error.contains("stats-interval"), "{error}");
            assert!(
                error.contains(&MAX_STATS_INTERVAL_SECS.to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn numa_memory_that_wraps_around_is_refused() {
        let mut config = small_config();
        config.numa = vec![
            NumaNodeConfig::parse("node=0,cpus=0,memory=8388608T").unwrap(),
            NumaNodeConfig::parse("node=1,memory=9223372037928517632").unwrap(),
        ];
        // 2^63 + (2^63 + 1 GiB) is 1 GiB modulo 2^64: the --memory size.
        let error = config.validate(None).unwrap_err().to_string();
        assert!(error.contains("--numa"), "{error}");
        assert!(error.contains("adds up to more than"), "{error}");
    }

    #[test]
    fn virtio_mem_sizes_that_wrap_around_are_refused() {
        let mut config = small_config();
        for sizes in [
            &["16777215T"][..],
            &["8388608T", "8388608T"][..],
            &["18446744073575333888"][..],
        ] {
            config.virtio_mem = sizes
                .iter()
                .enumerate()
                .map(|(i, size)| {
                    VirtioMemDeviceConfig::parse(&format!("id=m{i},size={size}")).unwrap()
                })
                .collect();
            let error = config.validate(None).unwrap_err().to_string();
            assert!(error.contains("hotplug area"), "{sizes:?}: {error}");
        }
        config.virtio_mem.clear();
        config.memory = MemoryConfig::parse("size=1G,slots=1,maxmem=16777215T").unwrap();
        config.virtio_mem = vec![VirtioMemDeviceConfig::parse("id=m,size=16777215T").unwrap()];
        let error = config.validate(None).unwrap_err().to_string();
        assert!(error.contains("hotplug area"), "{error}");
    }

    #[test]
    fn memory_sizes_near_2_pow_64_are_refused() {
        for value in [
            "size=18446744073709551615,slots=1,maxmem=1G",
            "size=18446744073709551615,slots=1,maxmem=18446744073709551615",
            "size=16777215T,slots=1,maxmem=16777215T",
        ] {
            let error = MemoryConfig::parse(value).unwrap_err().to_string();
            assert!(error.contains("--memory"), "{value}: {error}");
            assert!(error.contains("maxmem"), "{value}: {error}");
        }
    }

    #[test]
    fn validation_rejects_what_cannot_boot() {
        let mut config = VmConfig {
            kernel: "/proc/self/exe".into(),
            initramfs: None,
            cmdline: String::new(),
            cpus: 1,
            memory: MemoryConfig {
                size: 1 << 30,
                ..MemoryConfig::default()
            },
            serial: SerialConfig::Off,
            virtio_mem: Vec::new(),
            violation_policy: ViolationPolicy::Report,
            numa: Vec::new(),
            balloon: None,
            disks: Vec::new(),
            nets: Vec::new(),
            dimms: Vec::new(),
            memory_policy: None,
        };
        assert!(config.validate(Some(4 << 30)).is_ok());
        let err = config.validate(Some(512 << 20)).unwrap_err().to_string();
        assert!(err.contains("the host has only 512 MiB"), "{err}");
        config.memory.size = 64 << 20;
        assert!(config.validate(None).is_err());
        config.memory.size = (1 << 30) + 4096;
        assert!(config.validate(None).is_err());
        config.memory.size = 1 << 30;
        config.cpus = 0;
        assert!(config.validate(None).is_err());
        config.cpus = 1;
        // The memory policy: it needs balloon statistics at least once per interval, and a
        // max the devices reach.
        config.memory_policy = Some(PolicyConfig::parse("auto,min=1G,max=3G").unwrap());
        let err = config.validate(None).unwrap_err().to_string();
        assert!(
            err.contains("--memory-policy") && err.contains("statistics"),
            "{err}"
        );
        config.balloon = Some(BalloonDeviceConfig::parse("").unwrap());
        let err = config.validate(None).unwrap_err().to_string();
        assert!(err.contains("stats-interval (5s)"), "{err}");
        config.balloon = Some(BalloonDeviceConfig::parse("stats-interval=2s").unwrap());
        let err = config.validate(None).unwrap_err().to_string();
        assert!(err.contains("max is more than the 1 GiB"), "{err}");
        config.virtio_mem = vec![VirtioMemDeviceConfig::parse("id=m0,size=2G").unwrap()];
        assert!(config.validate(None).is_ok());
        config.memory_policy = Some(PolicyConfig::parse("auto,min=1G,max=4G").unwrap());
        assert!(config.validate(None).is_err());
        config.memory_policy = None;
        config.balloon = None;
        config.virtio_mem = Vec::new();
        config.kernel = "/nonexistent/vmlinux".into();
        assert!(config
            .validate(None)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/vmlinux"));
    }
}
