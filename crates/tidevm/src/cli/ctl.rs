//! `tidevm ctl`: a client for the control API.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use std::time::{Duration, Instant};

use tidevm_api::{AddDimmBody, ApiClient, DimmBacking, DimmInfo, DimmState};

/// Options of `tidevm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Print the VM's state, vCPUs and memory layout as JSON.
    Info,
    /// Print the VM's events as they happen, one JSON object per line (resizes, plans,
    /// _OST answers, violations, balloon warnings, autopilot decisions).
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Stop the VM now (no guest shutdown).
    Shutdown,
    /// Reset the VM and boot it again.
    Reboot,
    /// Set the balloon's target (memory the guest gives back), e.g. 1G; 0 deflates it.
    Balloon {
        /// The target size.
        size: String,
        /// Wait until the guest's balloon reaches it (by the host's own count).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print the balloon: target, the guest's claims and statistics, the host's measurements.
    BalloonStats,
    /// Print the VMM's metrics in the Prometheus text format (as GET /metrics serves them).
    Metrics,
    /// Ask the guest to resize a virtio-mem device's plugged memory to SIZE (e.g. 4G, 0).
    ResizeMem {
        /// The device id (from --virtio-mem id=...).
        id: String,
        /// The new requested size.
        size: String,
        /// Wait until the guest has plugged or unplugged it (or say why not).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Without SIZE, print the guest's memory (boot, virtio-mem, DIMMs, balloon, totals,
    /// limits) as JSON; with SIZE (e.g. 6G), bring the guest's total memory to it: tidevm
    /// plans the virtio-mem and balloon changes and prints them.
    Memory {
        /// The guest's new total memory.
        size: Option<String>,
        /// Change only this NUMA node's virtio-mem devices (SIZE is still the total).
        #[arg(long, requires = "size")]
        node: Option<u32>,
        /// Wait until the guest has plugged what is requested and the balloon reached its
        /// target (without SIZE: the target set before), printing progress.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Turn the memory autopilot on with POLICY (as `--memory-policy` takes it, e.g.
    /// auto,min=1G,max=8G) or off (`off`).
    MemoryPolicy {
        /// The policy, or `off`.
        policy: String,
    },
    /// Hot-add a DIMM of SIZE (a multiple of 128M, e.g. 1G) and notify the guest (ACPI).
    DimmAdd {
        /// The DIMM's size.
        size: String,
        /// Guest NUMA node (default 0).
        #[arg(long)]
        node: Option<u32>,
        /// How the host backs the DIMM's memory.
        #[arg(long, value_enum, default_value_t = BackingArg::Anon)]
        backing: BackingArg,
        /// Fault the whole DIMM in on the host before the guest is told about it.
        #[arg(long)]
        prealloc: bool,
        /// Id to give the DIMM (default: dimm<slot>).
        #[arg(long)]
        id: Option<String>,
        /// Wait until the guest has taken the DIMM (state active).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Ask the guest to eject the DIMM ID (ACPI).
    DimmDel {
        /// The DIMM's id (from `info`, or `dimm-add --id`).
        id: String,
        /// Wait until the guest has ejected it (or refused to).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// `--backing` of `dimm-add`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackingArg {
    /// Private anonymous memory.
    Anon,
    /// A shared memfd.
    Memfd,
    /// 2 MiB pages from the host's hugetlbfs pool.
    Hugetlbfs,
}

impl From<BackingArg> for DimmBacking {
    fn from(backing: BackingArg) -> DimmBacking {
        match backing {
            BackingArg::Anon => DimmBacking::Anon,
            BackingArg::Memfd => DimmBacking::Memfd,
            BackingArg::Hugetlbfs => DimmBacking::Hugetlbfs,
        }
    }
}

/// Runs one API call and prints its result.
pub fn ctl(args: CtlArgs) -> anyhow::Result<u8> {
    let client = ApiClient::new(args.api_socket);
    match args.command {
        CtlCommand::MemoryPolicy { policy } => {
            let (status, body) = client.call(
                "PUT",
                "/vm/memory/policy",
                Some(serde_json::json!({ "policy": policy })),
            )?;
            if !(200..300).contains(&status) {
                anyhow::bail!(
                    "{}",
                    body["error"]
                        .as_str()
                        .unwrap_or("the VMM refused the policy")
                );
            }
        }
        CtlCommand::Info => {
            let info = client.vm_info()?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        CtlCommand::Events { count } => {
            let mut left = count;
            client.events(|line| {
                println!("{line}");
                left = left.map(|n| n.saturating_sub(1));
                left != Some(0)
            })?;
        }
        CtlCommand::Shutdown => client.shutdown()?,
        CtlCommand::Reboot => client.reboot()?,
        CtlCommand::Balloon {
            size,
            wait,
            timeout,
        } => {
            let bytes = tidevm_api::parse_byte_size(&size).ok_or_else(|| {
                anyhow::anyhow!("invalid size '{size}': expected e.g. 512M, 1G or 0")
            })?;
            client.set_balloon(bytes)?;
            if wait {
                return wait_for_balloon(&client, bytes, Duration::from_secs(timeout));
            }
        }
        CtlCommand::Metrics => print!("{}", client.metrics()?),
        CtlCommand::BalloonStats => {
            let info = client.balloon()?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        CtlCommand::ResizeMem {
            id,
            size,
            wait,
            timeout,
        } => {
            let bytes = tidevm_api::parse_byte_size(&size).ok_or_else(|| {
                anyhow::anyhow!("invalid size '{size}': expected e.g. 512M, 4G or 0")
            })?;
            let started = Instant::now();
            client.resize_virtio_mem(&id, bytes)?;
            if wait {
                return wait_for_plugged(
                    &client,
                    &id,
                    bytes,
                    started,
                    Duration::from_secs(timeout),
                );
            }
        }
        CtlCommand::Memory {
            size: None,
            wait,
            timeout,
            ..
        } => {
            let started = Instant::now();
            let memory = client.memory()?;
            println!("{}", serde_json::to_string_pretty(&memory)?);
            if wait {
                return wait_for_memory(&client, started, Duration::from_secs(timeout));
            }
        }
        CtlCommand::Memory {
            size: Some(size),
            node,
            wait,
            timeout,
        } => {
            let bytes = tidevm_api::parse_byte_size(&size).ok_or_else(|| {
                anyhow::anyhow!("invalid size '{size}': expected e.g. 2G, 6G or 1536M")
            })?;
            let started = Instant::now();
            let plan = client.set_memory(bytes, node)?;
            println!("{}", serde_json::to_string_pretty(&plan)?);
            if wait {
                return wait_for_memory(&client, started, Duration::from_secs(timeout));
            }
        }
        CtlCommand::DimmAdd {
            size,
            node,
            backing,
            prealloc,
            id,
            wait,
            timeout,
        } => {
            let bytes = tidevm_api::parse_byte_size(&size).ok_or_else(|| {
                anyhow::anyhow!("invalid size '{size}': expected e.g. 128M, 512M or 1G")
            })?;
            let body = AddDimmBody {
                size: bytes,
                node,
                backing: backing.into(),
                prealloc,
                id,
            };
            let started = Instant::now();
            let dimm = client.add_dimm(&body)?;
            println!("{}", serde_json::to_string_pretty(&dimm)?);
            if wait {
                return wait_for_dimm_active(
                    &client,
                    &dimm.id,
                    started,
                    Duration::from_secs(timeout),
                );
            }
        }
        CtlCommand::DimmDel { id, wait, timeout } => {
            let started = Instant::now();
            let dimm = client.remove_dimm(&id)?;
            println!("{}", serde_json::to_string_pretty(&dimm)?);
            if wait {
                return wait_for_dimm_removed(
                    &client,
                    &dimm.id,
                    started,
                    Duration::from_secs(timeout),
                );
            }
        }
    }
    Ok(0)
}

/// How often `dimm-add --wait` and `dimm-del --wait` look at the DIMM.
const DIMM_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The DIMM `id` as `/vm/info` shows it now, if it is there.
fn find_dimm(client: &ApiClient, id: &str) -> anyhow::Result<Option<DimmInfo>> {
    let info = client.vm_info()?;
    Ok(info
        .dimms
        .and_then(|dimms| dimms.dimms.into_iter().find(|dimm| dimm.id == id)))
}

fn dimm_state_name(state: DimmState) -> &'static str {
    match state {
        DimmState::Inserting => "inserting",
        DimmState::Active => "active",
        DimmState::Removing => "removing",
    }
}

/// "it is removing; last _OST from the guest: ..." for timeout messages.
fn dimm_situation(dimm: &DimmInfo) -> String {
    let ost = match &dimm.last_ost {
        Some(ost) => format!(
            "last _OST from the guest: event {:#x}, status {:#x} ({})",
            ost.event, ost.status, ost.meaning
        ),
        None => "no _OST report from the guest".to_owned(),
    };
    format!("it is {}; {ost}", dimm_state_name(dimm.state))
}

/// Polls `/vm/info` until the DIMM `id` is active; returns 0 then, 2 (with its state and
/// the guest's last `_OST`) when the guest does not take it in time.
fn wait_for_dimm_active(
    client: &ApiClient,
    id: &str,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<u8> {
    loop {
        let dimm = find_dimm(client, id)?
            .ok_or_else(|| anyhow::anyhow!("dimm {id} disappeared while waiting for it"))?;
        if dimm.state == DimmState::Active {
            println!(
                "dimm {id} active after {:.2} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if started.elapsed() >= timeout {
            eprintln!(
                "tidevm: error: the guest did not take dimm {id} within {} s: {} (the guest \
                 kernel may lack ACPI memory hotplug)",
                timeout.as_secs(),
                dimm_situation(&dimm)
            );
            return Ok(2);
        }
        std::thread::sleep(DIMM_POLL_INTERVAL);
    }
}

/// Polls `/vm/info` until the DIMM `id` is gone; returns 0 then, 2 when the guest refused
/// to eject it or did not finish in time (the VM goes on, with the DIMM).
fn wait_for_dimm_removed(
    client: &ApiClient,
    id: &str,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<u8> {
    loop {
        let Some(dimm) = find_dimm(client, id)? else {
            println!(
                "dimm {id} removed after {:.2} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        };
        if let Some(reason) = &dimm.removal_refused {
            eprintln!("tidevm: error: the guest refused to eject dimm {id}: {reason}");
            return Ok(2);
        }
        if started.elapsed() >= timeout {
            eprintln!(
                "tidevm: error: the guest did not eject dimm {id} within {} s: {}",
                timeout.as_secs(),
                dimm_situation(&dimm)
            );
            return Ok(2);
        }
        std::thread::sleep(DIMM_POLL_INTERVAL);
    }
}

/// Polls the balloon until the host's count of inflated memory reaches `target`.
fn wait_for_balloon(client: &ApiClient, target: u64, timeout: Duration) -> anyhow::Result<u8> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let info = client.balloon()?;
        if last != Some(info.inflated_bytes) {
            eprintln!(
                "balloon: {} MiB inflated (guest claims {} MiB) of {} MiB target ({:.1} s)",
                info.inflated_bytes >> 20,
                info.actual_bytes >> 20,
                target >> 20,
                started.elapsed().as_secs_f64()
            );
            last = Some(info.inflated_bytes);
        }
        if info.inflated_bytes == target {
            println!(
                "balloon: {} MiB after {:.2} s",
                target >> 20,
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if started.elapsed() >= timeout {
            eprintln!(
                "tidevm: error: the balloon reached {} MiB of {} MiB in {} s (the guest may \
                 lack free memory to give, or deflated on OOM)",
                info.inflated_bytes >> 20,
                target >> 20,
                timeout.as_secs()
            );
            return Ok(2);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the device until its plugged size reaches `target`, printing progress; returns 0
/// when reached, 2 (with the reason) when the guest does not get there in time.
fn wait_for_plugged(
    client: &ApiClient,
    id: &str,
    target: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let mut last_plugged = None;
    loop {
        let info = client.vm_info()?;
        let device = info
            .virtio_mem
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| anyhow::anyhow!("virtio-mem device {id} disappeared"))?;
        if last_plugged != Some(device.plugged_size) {
            eprintln!(
                "{id}: plugged {} MiB of {} MiB requested ({:.1} s)",
                device.plugged_size >> 20,
                device.requested_size >> 20,
                started.elapsed().as_secs_f64()
            );
            last_plugged = Some(device.plugged_size);
        }
        if device.plugged_size == target {
            println!(
                "{id}: {} MiB plugged after {:.2} s",
                target >> 20,
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if started.elapsed() >= timeout {
            let why = device.last_busy_reason.clone().unwrap_or_else(|| {
                if device.plugged_size > target {
                    "the guest could not unplug more (memory in use by the guest kernel, \
                     or not movable)"
                        .into()
                } else {
                    "the guest did not plug more (driver not loaded, or memory not onlined)".into()
                }
            });
            eprintln!(
                "tidevm: error: {id} reached {} MiB of the requested {} MiB in {} s: {why}",
                device.plugged_size >> 20,
                target >> 20,
                timeout.as_secs()
            );
            return Ok(2);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where a memory resize is: each virtio-mem device's plugged and requested sizes, each
/// DIMM's state and the balloon's actual and target, in MiB.
fn memory_progress(memory: &tidevm_api::MemoryStatus) -> String {
    let mut parts: Vec<String> = memory
        .virtio_mem
        .iter()
        .map(|d| {
            format!(
                "{} {}/{} MiB",
                d.id,
                d.plugged_size >> 20,
                d.requested_size >> 20
            )
        })
        .collect();
    parts.extend(memory.dimms.iter().map(|d| {
        let state = match d.state {
            DimmState::Inserting => "inserting",
            DimmState::Active => "active",
            DimmState::Removing => "ejecting",
        };
        format!("{} {} MiB {state}", d.id, d.size >> 20)
    }));
    if let Some(balloon) = &memory.balloon {
        parts.push(format!(
            "balloon {}/{} MiB",
            balloon.actual_bytes >> 20,
            balloon.target_bytes >> 20
        ));
    }
    let target = memory
        .target_total_bytes
        .unwrap_or(memory.requested_total_bytes);
    format!(
        "total {} of {} MiB ({})",
        memory.actual_total_bytes >> 20,
        target >> 20,
        parts.join(", ")
    )
}

/// Each shortfall as one line: `mechanism device: why`.
fn shortfall_lines(memory: &tidevm_api::MemoryStatus) -> Vec<String> {
    memory
        .shortfalls
        .iter()
        .map(|s| format!("{} {}: {}", s.mechanism, s.device, s.cause))
        .collect()
}

/// Whether every device has arrived where it was asked to be, or stopped for good (a DIMM
/// the guest would not take in stays inserting).
fn memory_settled(memory: &tidevm_api::MemoryStatus) -> bool {
    let refused_insert = |id: &str| {
        memory.shortfalls.iter().any(|s| {
            s.device == id && matches!(s.cause, tidevm_api::ResizeShortfall::InsertRefused { .. })
        })
    };
    memory
        .virtio_mem
        .iter()
        .all(|d| d.plugged_size == d.requested_size)
        && memory
            .balloon
            .is_none_or(|b| b.actual_bytes == b.target_bytes)
        && memory
            .dimms
            .iter()
            .all(|d| d.state == DimmState::Active || refused_insert(&d.id))
}

/// How long `--wait` gives the VMM to say why the guest settled short of a plan's total.
const SHORTFALL_GRACE: Duration = Duration::from_secs(2);

/// Polls `/vm/memory` until every virtio-mem device has plugged what is requested, every
/// DIMM is in or out, and the balloon's actual size (the guest's claim) reached its target.
/// Returns 0 when the plan's total was reached; 2, with the reasons, when the guest settled
/// short of it (an eject refused) or did not get there in time (an unplug stalled, ...).
fn wait_for_memory(client: &ApiClient, started: Instant, timeout: Duration) -> anyhow::Result<u8> {
    let mut last = String::new();
    let mut told = Vec::new();
    let mut short_since: Option<Instant> = None;
    loop {
        let memory = client.memory()?;
        let progress = memory_progress(&memory);
        if progress != last {
            eprintln!("{progress} ({:.1} s)", started.elapsed().as_secs_f64());
            last = progress;
        }
        let reasons = shortfall_lines(&memory);
        // Each cause once per device; a stall's seconds change at every look.
        for (shortfall, line) in memory.shortfalls.iter().zip(&reasons) {
            let key = (
                shortfall.mechanism.clone(),
                shortfall.device.clone(),
                std::mem::discriminant(&shortfall.cause),
            );
            if !told.contains(&key) {
                eprintln!("  short: {line}");
                told.push(key);
            }
        }
        let target = memory.target_total_bytes;
        if memory_settled(&memory) {
            let reached = memory.actual_total_bytes;
            // Shortfalls explain a total short of the target; one left from an earlier
            // request (a DIMM whose eject was refused and is kept now) does not make it so.
            let short = target.is_some_and(|t| t != reached);
            // The VMM records why on its next look at the devices (every 0.5 s): give it
            // that long before saying nobody knows.
            let settled_at = *short_since.get_or_insert_with(Instant::now);
            if short && reasons.is_empty() && settled_at.elapsed() < SHORTFALL_GRACE {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            if short {
                eprintln!(
                    "tidevm: error: the guest settled at {} MiB of the requested {} MiB: {}",
                    reached >> 20,
                    target.unwrap_or(memory.requested_total_bytes) >> 20,
                    if reasons.is_empty() {
                        "no device reported why".to_owned()
                    } else {
                        reasons.join("; ")
                    }
                );
                return Ok(2);
            }
            println!(
                "memory: {} MiB after {:.2} s",
                reached >> 20,
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        short_since = None;
        if started.elapsed() >= timeout {
            eprintln!(
                "tidevm: error: the guest did not reach the requested memory within {} s: {}{}",
                timeout.as_secs(),
                last,
                if reasons.is_empty() {
                    " (see `tidevm ctl info` for a virtio-mem device's last busy reason)".to_owned()
                } else {
                    format!("; {}", reasons.join("; "))
                }
            );
            return Ok(2);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
