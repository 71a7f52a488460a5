//! The autopilot's policy: from what the guest and the host report at one instant, the guest
//! memory size the VM should have (`--memory-policy auto,...`).
//!
//! [`decide`] is pure and deterministic: it reads no clock and no file. Time comes in
//! [`Inputs::now`] (a monotonic [`Duration`] since the policy started), and everything it
//! must remember between calls is in [`PolicyState`]. It only decides a *target*: the
//! guest-visible total memory (boot RAM minus the balloon, plus plugged virtio-mem memory and
//! DIMMs). Turning a target into plugs, unplugs and balloon moves is the planner's job, not
//! this module's. [`Autopilot`] bundles the configuration and the state with the bookkeeping
//! a caller needs on each timer tick (the free page reporting counter, the stats' age).
//!
//! # Rules
//!
//! With `floor` the memory the guest must always have available, and `used` the guest-visible
//! total minus what the guest reports available (its anonymous memory, kernel and unreclaimable
//! caches), in this order:
//!
//! 1. **Clamp.** A total above `max` or below `min` is brought back into range, even without
//!    statistics.
//! 2. **No fresh statistics, no decision.** Without a sample at most three intervals old the
//!    policy holds: it cannot tell what the guest needs, and shrinking blind could kill it.
//! 3. **Grow fast, in one jump.** When available memory falls below `floor + headroom`, or
//!    the guest had new OOM kills, or new reclaim stalls (Linux 6.10+ `alloc_stalls`,
//!    `direct_scan`, `direct_reclaim`) or a burst of major faults while available memory is
//!    below `floor + growth-margin`, the target becomes `used + floor + growth-margin`: what
//!    the guest needs now plus room for the next seconds, not a small step. An OOM kill also
//!    grows by at least `growth-margin` over the current total, because the kill has already
//!    freed the memory that was missing. Growth is never rate limited.
//! 4. **Shrink slowly, and only surplus.** Only after the guest's *free* memory has stayed
//!    above `floor + growth-margin + band` (`total - min` instead of `band`, when that is
//!    less) for `shrink-hold`, at most `shrink-step` per interval, and never below `total - free + floor + growth-margin`: a normal shrink takes
//!    free memory only, and leaves the guest its page cache.
//! 5. **Under host pressure, shrink harder.** When the host's memory PSI (`some` or `full`
//!    avg10) or its MemAvailable crosses a threshold, shrinking needs no hold, steps up to
//!    `pressure-step`, and may go down to `used + floor`, which takes the guest's reclaimable
//!    page cache too (what the guest counts as available but not free). The floor still
//!    holds: during pressure the policy grows only when available memory is below the floor
//!    itself (or on OOM kills), and then only to `used + floor + headroom`.
//!
//! Every target is aligned to 128 MiB (a Linux memory block) and kept in `[min, max]`. Grow
//! targets are rounded up, shrink bounds are rounded up too, so rounding never takes memory
//! the rules meant to leave.
//!
//! Hysteresis: after a grow, available memory is `floor + growth-margin`, above the grow
//! threshold (`floor + headroom`, and `growth-margin > headroom` is enforced by the parser);
//! after a shrink, free memory is at least `floor + growth-margin`, below the shrink
//! threshold by `band`. Between the two thresholds the policy does nothing. Host pressure is
//! entered at its thresholds and left only below half of them (PSI) or above 5/4 of the
//! MemAvailable threshold.
//!
//! Free page reporting is carried in [`Inputs`] and in every decision's [`Evidence`], but no
//! rule uses it: reported pages were already given back to the host, so they change neither
//! what the guest needs nor what a shrink would gain the host.
//!
//! # Compared with other policies
//!
//! - **ChromeOS concierge** (`balloon_policy.cc`). Its balance-available policy moves the
//!   balloon so that the guest's and the host's available memory above their critical margins
//!   stay balanced, in steps capped near the critical margins; its limit-cache policy caps
//!   the guest's page cache depending on the host's pressure level. Both can only inflate or
//!   deflate a balloon inside memory the guest booted with, and they react to the host's
//!   low-memory levels rather than to the guest's reclaim stalls. Here the guest can also grow
//!   past its boot size (virtio-mem, DIMMs) and shrink in whole memory blocks that leave the
//!   guest (no balloon pages it still pays the memmap for), growth is sized from the guest's
//!   own need in one jump, and the cache is only taken under host pressure, as concierge's
//!   limit-cache does, but bounded by a floor instead of fixed cache targets.
//! - **oVirt MOM** (`balloon.rules`). It grows or shrinks the balloon by a fraction of the
//!   guest's memory (`max_balloon_change_percent`, 5 %) per cycle, steered by the guest's
//!   free percentage and the host's free percentage (`pressure_threshold`,
//!   `pressure_critical`). A fixed fraction per cycle makes growth as slow as shrinking: a
//!   guest that needs 2 GiB more waits many cycles and reclaims, or OOMs, meanwhile. Here
//!   growth jumps to the need at once, and only shrinking is stepped. MOM looks at free
//!   memory, which Linux keeps low by design (the page cache fills it); this policy grows on
//!   *available* memory and stall counters, and shrinks on *free* memory, so a cache-full but
//!   healthy guest neither grows nor is squeezed.
//! - **Hyper-V Dynamic Memory.** The guest reports its committed memory; the host keeps a
//!   buffer (a percentage, 20 % by default) above it, adds memory by hot-add or by deflating
//!   its balloon and removes it only by ballooning: hot-added memory never leaves. Here the
//!   margin is in bytes (a percentage of a big guest is a lot of idle memory, of a small one
//!   too little), memory leaves by unplug as well as by the balloon, and the guest's reclaim
//!   stalls and OOM kills count, not only its commit charge.
//!
//! The reasons are the same in all three cases: an OOM kill or a reclaim stall costs the
//! guest far more than a few hundred MiB held too long costs the host, so growth must be
//! immediate and sized, and shrinking patient and bounded; and only a VMM that can plug and
//! unplug can follow a guest above its boot size and give whole blocks back.

use std::time::Duration;

use crate::config::parse_size;
use crate::devices::virtio::balloon::BalloonStatus;

/// Targets are whole Linux memory blocks.
pub const POLICY_ALIGN: u64 = 128 << 20;
/// Longest duration a policy option takes (a day); longer ones are typing errors.
pub const MAX_POLICY_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Two arrival times of statistics closer than this are one sample seen twice.
const SAME_SAMPLE_JITTER: Duration = Duration::from_millis(100);
/// Statistics older than this many intervals are stale.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// A percentage with two decimals, as PSI prints it: `1250` is 12.50 %.
pub type Centipercent = u32;

/// `--memory-policy auto,min=SIZE,max=SIZE[,...]`. Every size is a multiple of 128 MiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Smallest guest-visible total.
    pub min: u64,
    /// Largest guest-visible total.
    pub max: u64,
    /// Memory the guest must always have available (`floor=`, default 256 MiB).
    pub floor: u64,
    /// Growth starts when available memory is below `floor + headroom` (`headroom=`, 256 MiB).
    pub headroom: u64,
    /// A grow leaves `floor + growth_margin` available (`growth-margin=`, 512 MiB).
    pub growth_margin: u64,
    /// Shrinking needs free memory above `floor + growth_margin + band` (`band=`, 256 MiB),
    /// or above `floor + growth_margin + total - min` when that is less.
    pub band: u64,
    /// How often the policy may step a shrink, and what "fresh" statistics means
    /// (`interval=`, 2 s).
    pub interval: Duration,
    /// Largest shrink per interval (`shrink-step=`, 256 MiB).
    pub shrink_step: u64,
    /// How long the surplus must last before a shrink (`shrink-hold=`, 30 s).
    pub shrink_hold: Duration,
    /// Largest shrink per interval under host pressure (`pressure-step=`, 1 GiB).
    pub pressure_step: u64,
    /// Host pressure when memory PSI `some` avg10 reaches this (`psi-some=`, 10 %; 0 turns
    /// the check off).
    pub psi_some: Centipercent,
    /// Host pressure when memory PSI `full` avg10 reaches this (`psi-full=`, 5 %; 0 turns
    /// the check off).
    pub psi_full: Centipercent,
    /// Host pressure when the host's MemAvailable falls below this (`host-low=`, 512 MiB; 0
    /// turns the check off).
    pub host_low: u64,
    /// Major faults per second that count as a burst (`fault-rate=`, 1000).
    pub fault_rate: u64,
}

/// Why a `--memory-policy` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyConfigError {
    /// The first word is not a known policy.
    #[error("--memory-policy must start with 'auto' (the only policy), not '{0}'")]
    UnknownPolicy(String),
    /// An item without `=`.
    #[error("--memory-policy: '{0}' is not key=value")]
    NotKeyValue(String),
    /// A key this policy does not have.
    #[error(
        "--memory-policy: unknown key '{0}' (known: min, max, floor, headroom, growth-margin, \
         band, interval, shrink-step, shrink-hold, pressure-step, psi-some, psi-full, host-low, \
         fault-rate)"
    )]
    UnknownKey(String),
    /// A key given twice.
    #[error("--memory-policy: {0} is given twice")]
    Repeated(&'static str),
    /// `min=` or `max=` is missing.
    #[error("--memory-policy: {0}= is required")]
    Missing(&'static str),
    /// Not a size.
    #[error("--memory-policy: {key}='{value}' is not a size (e.g. 512M, 2G)")]
    InvalidSize {
        /// The key.
        key: &'static str,
        /// What was given.
        value: String,
    },
    /// A guest size that is not whole memory blocks.
    #[error("--memory-policy: {key}={value} is not a multiple of 128 MiB (a Linux memory block)")]
    Unaligned {
        /// The key.
        key: &'static str,
        /// What was given.
        value: String,
    },
    /// Not a duration.
    #[error(
        "--memory-policy: {key}='{value}' is not a duration like 500ms, 2s or 1m, up to a day"
    )]
    InvalidDuration {
        /// The key.
        key: &'static str,
        /// What was given.
        value: String,
    },
    /// Zero where zero means nothing would ever happen.
    #[error("--memory-policy: {0} must not be zero")]
    Zero(&'static str),
    /// Not a percentage.
    #[error(
        "--memory-policy: {key}='{value}' is not a percentage between 0 and 100 (e.g. 10, 2.5)"
    )]
    InvalidPercent {
        /// The key.
        key: &'static str,
        /// What was given.
        value: String,
    },
    /// Not a count.
    #[error("--memory-policy: {key}='{value}' is not a whole number")]
    InvalidCount {
        /// The key.
        key: &'static str,
        /// What was given.
        value: String,
    },
    /// `min` above `max`.
    #[error("--memory-policy: min {min} is above max {max}")]
    MinAboveMax {
        /// min, formatted.
        min: String,
        /// max, formatted.
        max: String,
    },
    /// A grow would end inside the grow threshold and grow again at once.
    #[error(
        "--memory-policy: growth-margin {margin} must be larger than headroom {headroom}, or \
         every grow would leave the guest below its grow threshold"
    )]
    MarginNotAboveHeadroom {
        /// growth-margin, formatted.
        margin: String,
        /// headroom, formatted.
        headroom: String,
    },
}

impl Default for PolicyConfig {
    /// The defaults of every optional key, with `min` and `max` at 0 (the parser requires
    /// both).
    fn default() -> Self {
        PolicyConfig {
            min: 0,
            max: 0,
            floor: 256 << 20,
            headroom: 256 << 20,
            growth_margin: 512 << 20,
            band: 256 << 20,
            interval: Duration::from_secs(2),
            shrink_step: 256 << 20,
            shrink_hold: Duration::from_secs(30),
            pressure_step: 1 << 30,
            psi_some: 1000,
            psi_full: 500,
            host_low: 512 << 20,
            fault_rate: 1000,
        }
    }
}

impl PolicyConfig {
    /// Parses the `--memory-policy` value.
    pub fn parse(value: &str) -> Result<Self, PolicyConfigError> {
        let mut items = value.split(',');
        let policy = items.next().unwrap_or_default();
        if policy != "auto" {
            return Err(PolicyConfigError::UnknownPolicy(policy.to_owned()));
        }
        let mut config = PolicyConfig::default();
        let mut seen: Vec<&'static str> = Vec::new();
        let (mut min, mut max) = (None, None);
        for item in items.filter(|i| !i.is_empty()) {
            let (key, v) = item
                .split_once('=')
                .ok_or_else(|| PolicyConfigError::NotKeyValue(item.to_owned()))?;
            let key = KEYS
                .iter()
                .copied()
                .find(|k| *k == key)
                .ok_or_else(|| PolicyConfigError::UnknownKey(key.to_owned()))?;
            if seen.contains(&key) {
                return Err(PolicyConfigError::Repeated(key));
            }
            seen.push(key);
            match key {
                "min" => min = Some(block_size(key, v)?),
                "max" => max = Some(block_size(key, v)?),
                "floor" => config.floor = block_size(key, v)?,
                "headroom" => config.headroom = block_size(key, v)?,
                "growth-margin" => config.growth_margin = block_size(key, v)?,
                "band" => config.band = block_size(key, v)?,
                "shrink-step" => config.shrink_step = nonzero(key, block_size(key, v)?)?,
                "pressure-step" => config.pressure_step = nonzero(key, block_size(key, v)?)?,
                "interval" => {
                    config.interval = parse_duration(key, v)?;
                    if config.interval.is_zero() {
                        return Err(PolicyConfigError::Zero(key));
                    }
                }
                "shrink-hold" => config.shrink_hold = parse_duration(key, v)?,
                "psi-some" => config.psi_some = parse_percent(key, v)?,
                "psi-full" => config.psi_full = parse_percent(key, v)?,
                "host-low" => {
                    config.host_low = parse_size(v).map_err(|_| PolicyConfigError::InvalidSize {
                        key,
                        value: v.to_owned(),
                    })?
                }
                "fault-rate" => {
                    let count = v
                        .parse::<u64>()
                        .map_err(|_| PolicyConfigError::InvalidCount {
                            key,
                            value: v.to_owned(),
                        })?;
                    config.fault_rate = nonzero(key, count)?;
                }
                _ => return Err(PolicyConfigError::UnknownKey(key.to_owned())),
            }
        }
        config.min = nonzero("min", min.ok_or(PolicyConfigError::Missing("min"))?)?;
        config.max = max.ok_or(PolicyConfigError::Missing("max"))?;
        if config.min > config.max {
            return Err(PolicyConfigError::MinAboveMax {
                min: crate::config::format_size(config.min),
                max: crate::config::format_size(config.max),
            });
        }
        if config.growth_margin <= config.headroom {
            return Err(PolicyConfigError::MarginNotAboveHeadroom {
                margin: crate::config::format_size(config.growth_margin),
                headroom: crate::config::format_size(config.headroom),
            });
        }
        Ok(config)
    }
}

const KEYS: [&str; 14] = [
    "min",
    "max",
    "floor",
    "headroom",
    "growth-margin",
    "band",
    "interval",
    "shrink-step",
    "shrink-hold",
    "pressure-step",
    "psi-some",
    "psi-full",
    "host-low",
    "fault-rate",
];

fn block_size(key: &'static str, value: &str) -> Result<u64, PolicyConfigError> {
    let bytes = parse_size(value).map_err(|_| PolicyConfigError::InvalidSize {
        key,
        value: value.to_owned(),
    })?;
    if !bytes.is_multiple_of(POLICY_ALIGN) {
        return Err(PolicyConfigError::Unaligned {
            key,
            value: value.to_owned(),
        });
    }
    Ok(bytes)
}

fn nonzero(key: &'static str, value: u64) -> Result<u64, PolicyConfigError> {
    if value == 0 {
        return Err(PolicyConfigError::Zero(key));
    }
    Ok(value)
}

/// `500ms`, `2s`, `1m` (at most a day).
fn parse_duration(key: &'static str, value: &str) -> Result<Duration, PolicyConfigError> {
    let invalid = || PolicyConfigError::InvalidDuration {
        key,
        value: value.to_owned(),
    };
    let (digits, unit_ms) = if let Some(d) = value.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = value.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = value.strip_suffix('m') {
        (d, 60_000)
    } else {
        return Err(invalid());
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let millis = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_ms))
        .ok_or_else(invalid)?;
    let duration = Duration::from_millis(millis);
    if duration > MAX_POLICY_DURATION {
        return Err(invalid());
    }
    Ok(duration)
}

fn parse_percent(key: &'static str, value: &str) -> Result<Centipercent, PolicyConfigError> {
    parse_centi(value)
        .filter(|c| *c <= 10_000)
        .ok_or_else(|| PolicyConfigError::InvalidPercent {
            key,
            value: value.to_owned(),
        })
}

/// `12`, `12.5`, `12.50` as hundredths (`1250`). More than two decimals, signs, exponents
/// and values beyond `u32` are refused.
fn parse_centi(text: &str) -> Option<u32> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 2 {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let fraction: u32 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<u32>().ok()? * 10,
        _ => fraction.parse().ok()?,
    };
    whole.checked_mul(100)?.checked_add(fraction)
}

// ---------------------------------------------------------------------------------------------
// Host pressure: /proc/pressure/memory and /proc/meminfo.

/// The host's memory pressure at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPressure {
    /// `/proc/pressure/memory`, when the kernel has PSI.
    pub psi: Option<MemoryPsi>,
    /// The host's MemAvailable in bytes, when readable.
    pub mem_available: Option<u64>,
}

/// The avg10 values of `/proc/pressure/memory`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryPsi {
    /// Share of the last 10 s in which some task stalled on memory.
    pub some_avg10: Centipercent,
    /// Share in which all non-idle tasks stalled (0 when the kernel prints no `full` line).
    pub full_avg10: Centipercent,
}

/// Why host pressure could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostPressureError {
    /// A /proc file could not be read (PSI is off with `psi=0` or without CONFIG_PSI).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A /proc file does not look as expected.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Where memory PSI is.
pub const PSI_MEMORY_PATH: &str = "/proc/pressure/memory";
/// Where MemAvailable is.
pub const MEMINFO_PATH: &str = "/proc/meminfo";

/// Parses `/proc/pressure/memory`:
/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and the same with `full`.
pub fn parse_memory_psi(text: &str) -> Result<MemoryPsi, HostPressureError> {
    let format = |reason: String| HostPressureError::Format {
        path: PSI_MEMORY_PATH,
        reason,
    };
    let avg10 = |line: &str| -> Result<Centipercent, HostPressureError> {
        let field = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))
            .ok_or_else(|| format(format!("no avg10 in '{line}'")))?;
        parse_centi(field).ok_or_else(|| format(format!("avg10 '{field}' is not a percentage")))
    };
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        match line.split_whitespace().next() {
            Some("some") => some = Some(avg10(line)?),
            Some("full") => full = Some(avg10(line)?),
            _ => {}
        }
    }
    Ok(MemoryPsi {
        some_avg10: some.ok_or_else(|| format("no 'some' line".into()))?,
        full_avg10: full.unwrap_or(0),
    })
}

/// Parses the `MemAvailable:  123456 kB` line of `/proc/meminfo`, in bytes.
pub fn parse_mem_available(text: &str) -> Result<u64, HostPressureError> {
    let format = |reason: String| HostPressureError::Format {
        path: MEMINFO_PATH,
        reason,
    };
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .ok_or_else(|| format("no MemAvailable line".into()))?;
    let mut fields = line.split_whitespace();
    let kib = fields
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| format(format!("MemAvailable '{}' is not a number", line.trim())))?;
    if fields.next() != Some("kB") {
        return Err(format(format!(
            "MemAvailable '{}' is not in kB",
            line.trim()
        )));
    }
    kib.checked_mul(1024)
        .ok_or_else(|| format(format!("MemAvailable {kib} kB overflows")))
}

/// Reads and parses `/proc/pressure/memory`.
pub fn read_memory_psi() -> Result<MemoryPsi, HostPressureError> {
    let text =
        std::fs::read_to_string(PSI_MEMORY_PATH).map_err(|source| HostPressureError::Read {
            path: PSI_MEMORY_PATH,
            source,
        })?;
    parse_memory_psi(&text)
}

/// Reads the host's MemAvailable.
pub fn read_mem_available() -> Result<u64, HostPressureError> {
    let text = std::fs::read_to_string(MEMINFO_PATH).map_err(|source| HostPressureError::Read {
        path: MEMINFO_PATH,
        source,
    })?;
    parse_mem_available(&text)
}

// ---------------------------------------------------------------------------------------------
// Inputs and decisions.

/// The guest's balloon statistics, as the policy uses them. Counters are cumulative since the
/// guest booted; `None` where the guest's kernel does not send the tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestSample {
    /// When the statistics arrived, on the clock of [`Inputs::now`].
    pub at: Duration,
    /// `available_memory` (MemAvailable), bytes.
    pub available: u64,
    /// `free_memory` (MemFree), bytes.
    pub free: u64,
    /// `disk_caches` (file-backed pages, including shmem), bytes.
    pub caches: Option<u64>,
    /// `major_faults`.
    pub major_faults: Option<u64>,
    /// `oom_kills` (Linux 6.10+).
    pub oom_kills: Option<u64>,
    /// `alloc_stalls` (6.10+).
    pub alloc_stalls: Option<u64>,
    /// `direct_scan`, bytes scanned by direct reclaim (6.10+).
    pub direct_scan: Option<u64>,
    /// `direct_reclaim`, bytes reclaimed by direct reclaim (6.10+).
    pub direct_reclaim: Option<u64>,
}

impl GuestSample {
    /// Maps the statistics by name (see `balloon::stats::TAG_NAMES`). `None` without
    /// `available_memory` and `free_memory`, which every Linux since 4.6 sends.
    pub fn from_stats(
        values: &std::collections::BTreeMap<String, u64>,
        at: Duration,
    ) -> Option<Self> {
        let get = |name: &str| values.get(name).copied();
        Some(GuestSample {
            at,
            available: get("available_memory")?,
            free: get("free_memory")?,
            caches: get("disk_caches"),
            major_faults: get("major_faults"),
            oom_kills: get("oom_kills"),
            alloc_stalls: get("alloc_stalls"),
            direct_scan: get("direct_scan"),
            direct_reclaim: get("direct_reclaim"),
        })
    }
}

/// What the policy sees at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// Time since the policy started (monotonic).
    pub now: Duration,
    /// The guest-visible total now: boot RAM minus the balloon, plus plugged memory.
    pub current_total: u64,
    /// The latest statistics, whatever their age (the policy judges freshness).
    pub guest: Option<GuestSample>,
    /// Bytes free page reporting gave back since the previous call.
    pub reported_free_since_last: u64,
    /// The host's pressure, when read.
    pub host: Option<HostPressure>,
}

/// Why the policy wants a new total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeReason {
    /// Available memory below `floor + headroom` (below `floor` under host pressure).
    LowAvailable,
    /// New reclaim stalls while available memory is short.
    ReclaimStalls,
    /// New OOM kills.
    OomKills,
    /// Major faults above `fault-rate` while available memory is short.
    MajorFaultBurst,
    /// Free memory above the shrink threshold for `shrink-hold`.
    SustainedSurplus,
    /// The host is under memory pressure.
    HostPressure,
    /// The total is below `min`.
    BelowMin,
    /// The total is above `max`.
    AboveMax,
}

impl ResizeReason {
    /// Whether this reason adds memory.
    pub fn grows(self) -> bool {
        matches!(
            self,
            ResizeReason::LowAvailable
                | ResizeReason::ReclaimStalls
                | ResizeReason::OomKills
                | ResizeReason::MajorFaultBurst
                | ResizeReason::BelowMin
        )
    }
}

/// What bounded a target, when something did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `min`.
    Min,
    /// `max`: the guest wanted more.
    Max,
    /// The shrink step of this interval.
    Step,
    /// What the guest needs (`floor` and its margin).
    GuestNeed,
}

/// The statistics as the policy read them, for events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestEvidence {
    /// Age of the sample at decision time.
    pub age: Duration,
    /// Available memory.
    pub available: u64,
    /// Free memory.
    pub free: u64,
    /// The part of available memory that is not free (reclaimable cache).
    pub reclaimable: u64,
    /// Total minus available.
    pub used: u64,
    /// OOM kills since the previous sample.
    pub new_oom_kills: u64,
    /// Allocation stalls since the previous sample.
    pub new_alloc_stalls: u64,
    /// Bytes scanned by direct reclaim since the previous sample.
    pub new_direct_scan: u64,
    /// Bytes reclaimed by direct reclaim since the previous sample.
    pub new_direct_reclaim: u64,
    /// Major faults per second since the previous sample.
    pub major_faults_per_sec: u64,
}

impl GuestEvidence {
    /// Whether the guest's allocations had to reclaim memory themselves since the previous
    /// sample.
    pub fn stalled(&self) -> bool {
        self.new_alloc_stalls > 0 || self.new_direct_scan > 0 || self.new_direct_reclaim > 0
    }
}

/// The inputs behind a decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// When.
    pub now: Duration,
    /// The total then.
    pub current_total: u64,
    /// The guest's statistics, when fresh.
    pub guest: Option<GuestEvidence>,
    /// The host's pressure, when read.
    pub host: Option<HostPressure>,
    /// Whether the policy counted the host as under pressure.
    pub host_pressure: bool,
    /// Bytes reported free since the previous call.
    pub reported_free_since_last: u64,
    /// How long free memory has been above the shrink threshold.
    pub surplus_for: Option<Duration>,
}

/// The policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the current total (or the target already asked for).
    Hold,
    /// Ask the planner for a new total.
    Resize {
        /// The guest-visible total to reach, a multiple of 128 MiB in `[min, max]`.
        target: u64,
        /// Why.
        reason: ResizeReason,
        /// What bounded the target, if anything.
        limit: Option<Limit>,
        /// The inputs that caused it.
        evidence: Evidence,
    },
}

/// What the policy remembers between calls. Start from `PolicyState::default()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// The previous sample's counters, for deltas.
    last_sample: Option<GuestSample>,
    /// Since when (sample time) free memory has been above the shrink threshold.
    surplus_since: Option<Duration>,
    /// The last target asked for, when, and whether it grew.
    last_change: Option<(Duration, u64, bool)>,
    /// Whether the host counted as under pressure at the last call.
    host_pressure: bool,
}

fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(POLICY_ALIGN).saturating_mul(POLICY_ALIGN)
}

/// Counter increase; a counter that went back (the guest rebooted) counts as no increase.
fn delta(new: Option<u64>, old: Option<u64>) -> u64 {
    match (new, old) {
        (Some(n), Some(o)) => n.saturating_sub(o),
        _ => 0,
    }
}

fn host_pressure(config: &PolicyConfig, host: Option<&HostPressure>, was: bool) -> bool {
    let Some(host) = host else {
        return false;
    };
    // Entered at the thresholds, left only well below them, so that a host hovering at a
    // threshold does not flip the policy between its two modes every interval.
    let (psi_some, psi_full, host_low) = if was {
        (
            config.psi_some / 2,
            config.psi_full / 2,
            config.host_low.saturating_add(config.host_low / 4),
        )
    } else {
        (config.psi_some, config.psi_full, config.host_low)
    };
    // A threshold of 0 turns its check off (halving keeps a configured threshold above 0).
    let crossed = |value: Centipercent, configured: Centipercent, threshold: Centipercent| {
        configured > 0 && value >= threshold.max(1)
    };
    let psi = host.psi.is_some_and(|p| {
        crossed(p.some_avg10, config.psi_some, psi_some)
            || crossed(p.full_avg10, config.psi_full, psi_full)
    });
    let low = config.host_low > 0 && host.mem_available.is_some_and(|a| a < host_low);
    psi || low
}

impl PolicyState {
    /// Reads a sample: its evidence if fresh, and updates the counters' baseline.
    fn observe(&mut self, config: &PolicyConfig, input: &Inputs) -> Option<GuestEvidence> {
        let sample = input.guest?;
        let age = input.now.saturating_sub(sample.at);
        if age > config.interval.saturating_mul(STALE_AFTER_INTERVALS) {
            return None;
        }
        let previous = self.last_sample.filter(|p| p.at <= sample.at);
        // The first sample is the baseline: counts since boot are not news.
        let previous = previous.unwrap_or(sample);
        let elapsed_ms = (sample.at - previous.at).as_millis() as u64;
        let major_faults_per_sec = delta(sample.major_faults, previous.major_faults)
            .saturating_mul(1000)
            .checked_div(elapsed_ms)
            .unwrap_or(0);
        self.last_sample = Some(sample);
        Some(GuestEvidence {
            age,
            available: sample.available,
            free: sample.free,
            reclaimable: sample
                .available
                .saturating_sub(sample.free)
                .min(sample.caches.unwrap_or(u64::MAX)),
            used: input.current_total.saturating_sub(sample.available),
            new_oom_kills: delta(sample.oom_kills, previous.oom_kills),
            new_alloc_stalls: delta(sample.alloc_stalls, previous.alloc_stalls),
            new_direct_scan: delta(sample.direct_scan, previous.direct_scan),
            new_direct_reclaim: delta(sample.direct_reclaim, previous.direct_reclaim),
            major_faults_per_sec,
        })
    }
}

/// Decides the guest-visible total for this instant. See the module docs for the rules.
pub fn decide(config: &PolicyConfig, state: &mut PolicyState, input: &Inputs) -> Decision {
    let guest = state.observe(config, input);
    let pressure = host_pressure(config, input.host.as_ref(), state.host_pressure);
    state.host_pressure = pressure;
    let current = input.current_total;
    // The band keeps the policy from chasing small surpluses, but a surplus that reaches
    // `min` is never too small: without this, a guest that cannot have that much free memory
    // (a 1 GiB guest, with the defaults) would stay a block above `min` for good.
    let shrink_threshold = config
        .floor
        .saturating_add(config.growth_margin)
        .saturating_add(config.band.min(current.saturating_sub(config.min)));
    match guest {
        Some(g) if !pressure && g.free > shrink_threshold => {
            let since = guest_time(input);
            state.surplus_since.get_or_insert(since);
        }
        _ => state.surplus_since = None,
    }
    let evidence = Evidence {
        now: input.now,
        current_total: current,
        guest,
        host: input.host,
        host_pressure: pressure,
        reported_free_since_last: input.reported_free_since_last,
        surplus_for: state
            .surplus_since
            .map(|since| guest_time(input).saturating_sub(since)),
    };
    let max = config.max;
    let min = config.min;

    let Some(g) = guest else {
        // Without fresh statistics only the configured range is enforced.
        return if current > max {
            change(
                state,
                input.now,
                current,
                max,
                ResizeReason::AboveMax,
                None,
                evidence,
            )
        } else if current < min {
            change(
                state,
                input.now,
                current,
                min,
                ResizeReason::BelowMin,
                None,
                evidence,
            )
        } else {
            Decision::Hold
        };
    };

    // Growth: what the guest needs, in one jump.
    let floor = config.floor;
    let (low_threshold, goal, short_threshold) = if pressure {
        (floor, floor.saturating_add(config.headroom), floor)
    } else {
        (
            floor.saturating_add(config.headroom),
            floor.saturating_add(config.growth_margin),
            floor.saturating_add(config.growth_margin),
        )
    };
    let need = align_up(g.used.saturating_add(goal));
    let short = g.available < short_threshold;
    let grow_reason = if g.new_oom_kills > 0 {
        Some(ResizeReason::OomKills)
    } else if g.stalled() && short {
        Some(ResizeReason::ReclaimStalls)
    } else if g.available < low_threshold {
        Some(ResizeReason::LowAvailable)
    } else if g.major_faults_per_sec >= config.fault_rate && short {
        Some(ResizeReason::MajorFaultBurst)
    } else {
        None
    };
    if let Some(reason) = grow_reason {
        let wanted = if reason == ResizeReason::OomKills {
            need.max(align_up(current.saturating_add(config.growth_margin)))
        } else {
            need
        };
        let (target, limit) = if wanted > max {
            (max, Some(Limit::Max))
        } else if wanted < min {
            (min, Some(Limit::Min))
        } else {
            (wanted, None)
        };
        let in_flight = state
            .last_change
            .is_some_and(|(_, last, grew)| grew && last > current && target <= last);
        if target > current && !in_flight {
            state.surplus_since = None;
            return change(state, input.now, current, target, reason, limit, evidence);
        }
        if current > max {
            return change(
                state,
                input.now,
                current,
                max,
                ResizeReason::AboveMax,
                None,
                evidence,
            );
        }
        // Short, but the target is asked for already or the total is at max: never shrink
        // a guest that is short.
        return Decision::Hold;
    }

    if current > max {
        return change(
            state,
            input.now,
            current,
            max,
            ResizeReason::AboveMax,
            None,
            evidence,
        );
    }
    if current < min {
        return change(
            state,
            input.now,
            current,
            min,
            ResizeReason::BelowMin,
            None,
            evidence,
        );
    }

    // Shrinking: at most one step per interval, and only once the previous step is done
    // (within a block): an unplug the guest is slow to grant must not pile up steps.
    let stepped_recently = state
        .last_change
        .is_some_and(|(at, _, _)| input.now.saturating_sub(at) < config.interval);
    let shrink_in_flight = state
        .last_change
        .is_some_and(|(_, last, grew)| !grew && current >= last.saturating_add(POLICY_ALIGN));
    if stepped_recently || shrink_in_flight {
        return Decision::Hold;
    }
    let base = current;
    let (reason, step, bound) = if pressure {
        // Down to what the guest cannot give back without swapping: its page cache goes.
        (
            ResizeReason::HostPressure,
            config.pressure_step,
            align_up(g.used.saturating_add(floor)),
        )
    } else {
        let held = evidence
            .surplus_for
            .is_some_and(|held| held >= config.shrink_hold);
        if !held {
            return Decision::Hold;
        }
        // Free memory only: the guest keeps its cache.
        let used_with_cache = current.saturating_sub(g.free);
        (
            ResizeReason::SustainedSurplus,
            config.shrink_step,
            align_up(used_with_cache.saturating_add(goal)),
        )
    };
    let stepped = align_up(base.saturating_sub(step));
    let (target, limit) = [
        (stepped, Limit::Step),
        (bound, Limit::GuestNeed),
        (min, Limit::Min),
    ]
    .into_iter()
    .max_by_key(|(bytes, _)| *bytes)
    .unwrap_or((current, Limit::Step));
    if target >= base {
        return Decision::Hold;
    }
    change(
        state,
        input.now,
        current,
        target,
        reason,
        Some(limit),
        evidence,
    )
}

/// The time of the sample, or now without one.
fn guest_time(input: &Inputs) -> Duration {
    input.guest.map_or(input.now, |g| g.at)
}

fn change(
    state: &mut PolicyState,
    now: Duration,
    current: u64,
    target: u64,
    reason: ResizeReason,
    limit: Option<Limit>,
    evidence: Evidence,
) -> Decision {
    if state.last_change.is_some_and(|(_, last, _)| last == target) && target != current {
        // Asked for already and not reached yet: the planner is on it.
        return Decision::Hold;
    }
    state.last_change = Some((now, target, target > current));
    Decision::Resize {
        target,
        reason,
        limit,
        evidence,
    }
}

// ---------------------------------------------------------------------------------------------
// The service's side.

/// The policy of one VM with the bookkeeping its caller needs: what the service calls on
/// each timer tick once a planner carries the targets out.
#[derive(Clone, Debug)]
pub struct Autopilot {
    config: PolicyConfig,
    state: PolicyState,
    /// The balloon's cumulative reported-free counter at the previous call.
    reported_free_seen: Option<u64>,
    /// When the last statistics arrived.
    last_arrival: Option<Duration>,
}

impl Autopilot {
    /// A fresh policy.
    pub fn new(config: PolicyConfig) -> Self {
        Autopilot {
            config,
            state: PolicyState::default(),
            reported_free_seen: None,
            last_arrival: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Decides for this tick. `now` is the time since the autopilot started, `current_total`
    /// the guest-visible total, `balloon` the balloon's status (its statistics and free page
    /// reporting counter), `host` what [`read_memory_psi`] and [`read_mem_available`] gave.
    pub fn tick(
        &mut self,
        now: Duration,
        current_total: u64,
        balloon: Option<&BalloonStatus>,
        host: Option<HostPressure>,
    ) -> Decision {
        let reported_total = balloon.map(|b| b.reported_free_bytes);
        let reported_free_since_last = match (reported_total, self.reported_free_seen) {
            (Some(total), Some(seen)) => total.saturating_sub(seen),
            _ => 0,
        };
        self.reported_free_seen = reported_total;
        let stats = balloon.and_then(|b| b.stats.as_ref());
        // The same statistics seen again keep their first arrival time: `now - age` moves by
        // the jitter between the two clock reads, and would otherwise look like a new sample
        // arriving a few microseconds after the last one (and shorten the interval over which
        // fault rates are computed). Samples come at least a second apart (stats-interval is
        // in whole seconds), so anything closer is the same one.
        let at = stats.map(|s| {
            let at = now.saturating_sub(s.age);
            match self.last_arrival {
                Some(last) if at.abs_diff(last) < SAME_SAMPLE_JITTER => last,
                _ => at,
            }
        });
        self.last_arrival = at.or(self.last_arrival);
        let guest = stats
            .zip(at)
            .and_then(|(s, at)| GuestSample::from_stats(&s.values, at));
        let input = Inputs {
            now,
            current_total,
            guest,
            reported_free_since_last,
            host,
        };
        decide(&self.config, &mut self.state, &input)
    }
}

#[cfg(test)]
mod tests;
