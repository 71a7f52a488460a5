//! `tidevm bench`: measurements of tidevm with real Linux guests, in the test lane this
//! machine offers (direct on hardware KVM, or nested in an L1 test host under QEMU TCG).
//!
//! Every benchmark starts the lane once, runs its scenario `--runs` times, reports each run
//! (a failed run is reported and counted, never a panic) and prints median/min/max.
//!
//! Adding a benchmark (`bench virtio-mem`, `bench balloon`, `bench dimm`): add a variant to
//! [`BenchCommand`] with its own `Args` struct, and a function that takes the running
//! [`Lane`] and returns one [`RunRecord`] per run; [`bench`] starts the lane, and
//! [`print_report`] prints any set of named [`Metric`]s.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tidevm_testlane::text::shell_quote;
use tidevm_testlane::{Guest, GuestOptions, Lane, LaneError, LaneKind, LaneOptions, GUEST_READY};

/// Options of `tidevm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Boot time to the guest's ready marker, and tidevm's own RSS apart from guest memory.
    Boot(BootArgs),
    /// Boot time side by side with Cloud Hypervisor: the same guest in both, interleaved in
    /// the same lane, with tidevm's time as a fraction of CH's.
    BootVsCh(super::bench_boot_vs::BootVsArgs),
    /// Where a boot's time goes: the guest's own timeline with initcall_debug (slowest
    /// initcalls, longest gaps) and the vCPU exits by reason at the ready prompt.
    BootProfile(super::bench_boot_profile::BootProfileArgs),
    /// virtio-mem: time from the API request until the guest has plugged SIZE, and back to
    /// 0; tidevm's own share of that time; host RSS.
    VirtioMem(super::bench_virtio_mem::VirtioMemArgs),
    /// ACPI DIMM: time from the API request until the guest has a DIMM of SIZE online, and
    /// until it has ejected it; host RSS.
    Dimm(super::bench_dimm::DimmArgs),
    /// virtio-balloon: inflate SIZE and deflate, in two guests side by side, one discarding
    /// merged ranges (tidevm) and one discarding page by page (QEMU's way); syscalls per GiB,
    /// time in them, host RSS reclaimed.
    Balloon(super::bench_balloon::BalloonArgs),
    /// Soak: batches of virtio-mem, balloon and DIMM resize cycles in one guest; failed
    /// requests, the VMM's RSS slope, fds and threads.
    Soak(super::bench_soak::SoakArgs),
    /// The memory autopilot against static sizing: a phased workload in a real guest; host
    /// memory over the run, OOM kills, failed allocations, how soon memory came back; a plot.
    Autopilot(super::bench_autopilot::AutopilotArgs),
    /// Host memory left behind by a virtio-mem round trip (with and without free page
    /// reporting), and the RSS cost of DIMM slots.
    Rss(super::bench_rss::RssArgs),
}

/// Options shared by every benchmark.
#[derive(Debug, Args)]
pub(super) struct CommonArgs {
    /// How many times to run the scenario.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) runs: u32,
    /// Print one JSON document on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of `tidevm bench boot`.
#[derive(Debug, Args)]
struct BootArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Boot memory of the guest, as `--memory size=` takes it.
    #[arg(long, default_value = "512M")]
    memory: String,
}

/// Runs a benchmark; returns 0 when every run succeeded.
pub fn bench(args: BenchArgs) -> anyhow::Result<u8> {
    let exe = std::env::current_exe().context("cannot find the tidevm binary")?;
    let options = LaneOptions {
        qemu: matches!(&args.command, BenchCommand::BootVsCh(vs) if vs.qemu),
    };
    let lane = match Lane::start_with(&exe, options) {
        Ok(lane) => lane,
        Err(LaneError::Skip(reason)) => {
            anyhow::bail!("no test lane can run a real guest on this machine: {reason}")
        }
        Err(LaneError::Failed(message)) => {
            // The lane's errors carry console tails over several lines; keep the
            // error itself on one line and the detail before it.
            eprintln!("{message}");
            anyhow::bail!("could not start the test lane (details above)")
        }
    };
    let (name, common, params, records) = match &args.command {
        BenchCommand::Boot(boot) => (
            "boot",
            &boot.common,
            json!({ "cpus": boot.cpus, "memory": boot.memory }),
            bench_boot(&lane, boot),
        ),
        BenchCommand::BootVsCh(vs) => (
            "boot-vs-ch",
            &vs.common,
            json!({ "cmdline": vs.cmdline }),
            super::bench_boot_vs::run(&lane, vs),
        ),
        BenchCommand::BootProfile(profile) => (
            "boot-profile",
            &profile.common,
            json!({ "cmdline": profile.cmdline }),
            super::bench_boot_profile::run(&lane, profile),
        ),
        BenchCommand::VirtioMem(mem) => (
            "virtio-mem",
            &mem.common,
            json!({ "size": mem.size, "memory": mem.memory }),
            super::bench_virtio_mem::run(&lane, mem),
        ),
        BenchCommand::Balloon(balloon) => (
            "balloon",
            &balloon.common,
            json!({ "size": balloon.size, "touch_mib": balloon.touch, "memory": balloon.memory }),
            super::bench_balloon::run(&lane, balloon),
        ),
        BenchCommand::Rss(rss) => (
            "rss",
            &rss.common,
            json!({ "settle_seconds": rss.settle }),
            super::bench_rss::run(&lane, rss),
        ),
        BenchCommand::Autopilot(auto) => (
            "autopilot",
            &auto.common,
            json!({
                "min": auto.min,
                "max": auto.max,
                "floor": auto.floor,
                "workload": auto.workload,
            }),
            super::bench_autopilot::run(&lane, auto),
        ),
        BenchCommand::Soak(soak) => (
            "soak",
            &soak.common,
            json!({
                "mem_cycles": soak.mem_cycles,
                "balloon_cycles": soak.balloon_cycles,
                "dimm_cycles": soak.dimm_cycles,
            }),
            super::bench_soak::run(&lane, soak),
        ),
        BenchCommand::Dimm(dimm) => (
            "dimm",
            &dimm.common,
            json!({ "size": dimm.size, "memory": dimm.memory }),
            super::bench_dimm::run(&lane, dimm),
        ),
    };
    print_report(name, &lane, common, &params, &records);
    Ok(if records.iter().all(|r| r.result.is_ok()) {
        0
    } else {
        1
    })
}

/// A measured quantity of one run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Metric {
    /// Stable key for JSON.
    pub(super) key: &'static str,
    /// Label for the table.
    pub(super) label: &'static str,
    pub(super) unit: Unit,
    pub(super) value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Seconds,
    Bytes,
    /// A plain number (syscalls, events).
    Count,
    /// One quantity over another (times as a fraction of another VMM's).
    Ratio,
    /// Memory over time, in GiB·s.
    GibSeconds,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Seconds => format!("{value:.2} s"),
            Unit::Bytes => format!("{:.1} MiB", value / f64::from(1u32 << 20)),
            Unit::Count => format!("{value:.0}"),
            Unit::Ratio => format!("{value:.3}x"),
            Unit::GibSeconds => format!("{value:.1} GiB·s"),
        }
    }
    fn json_suffix(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
            Unit::Bytes => "bytes",
            Unit::Count => "count",
            Unit::Ratio => "ratio",
            Unit::GibSeconds => "gib_s",
        }
    }
}

/// What one run produced: its metrics, or why it failed.
#[derive(Debug)]
pub(super) struct RunRecord {
    pub(super) result: Result<Vec<Metric>, String>,
    /// Remarks that do not fail the run.
    pub(super) notes: Vec<String>,
}

fn lane_description(lane: &Lane) -> &'static str {
    match lane.kind() {
        LaneKind::Direct => "direct (hardware KVM on this machine)",
        LaneKind::Nested => {
            "nested (tidevm inside an L1 Linux under QEMU TCG with emulated AMD SVM; \
             about 10x slower than native, compare VMMs side by side rather than absolutes)"
        }
    }
}

fn lane_name(lane: &Lane) -> &'static str {
    match lane.kind() {
        LaneKind::Direct => "direct",
        LaneKind::Nested => "nested",
    }
}

/// `tidevm bench boot`.
fn bench_boot(lane: &Lane, args: &BootArgs) -> Vec<RunRecord> {
    let options = GuestOptions {
        cpus: args.cpus,
        memory: args.memory.clone(),
        ..GuestOptions::default()
    };
    (1..=args.common.runs)
        .map(|run| {
            eprintln!("==== bench boot: run {run}/{} ====", args.common.runs);
            let mut notes = Vec::new();
            let result = boot_once(lane, &options, &mut notes).map_err(|e| one_line(&e));
            if let Err(error) = &result {
                eprintln!("bench boot: run {run} failed: {error}");
            }
            RunRecord { result, notes }
        })
        .collect()
}

/// Boots one guest, measures it and powers it off.
fn boot_once(
    lane: &Lane,
    options: &GuestOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Metric>, String> {
    let ready_timeout = lane.scaled(Duration::from_secs(40));
    let started = Instant::now();
    let guest = lane.boot_guest(options).map_err(|e| e.to_string())?;
    // Lane side: a watcher in the lane notes the lane's uptime when the ready marker reaches
    // the console log; the VMM's start time comes from /proc/PID/stat. Both have the
    // lane kernel's 10 ms resolution and no agent round trips in them.
    let watcher = start_ready_watcher(lane, &guest);
    if let Err(e) = &watcher {
        notes.push(format!("no lane-side time: {e}"));
    }
    let ready = guest.wait_ready(ready_timeout);
    let host_boot = started.elapsed().as_secs_f64();
    if let Err(error) = ready {
        let _ = guest.kill();
        return Err(format!("guest not ready: {error}"));
    }
    let mut metrics = vec![Metric {
        key: "boot_host",
        label: "boot to ready+prompt (host side)",
        unit: Unit::Seconds,
        value: host_boot,
    }];
    if let Ok(process_start) = watcher {
        match lane_ready_seconds(lane, &guest, process_start) {
            Ok((seconds, late)) => {
                if late {
                    notes.push("lane-side time is an upper bound (watcher started late)".into());
                }
                metrics.push(Metric {
                    key: "boot_lane",
                    label: "boot to ready marker (lane side)",
                    unit: Unit::Seconds,
                    value: seconds,
                });
            }
            Err(e) => notes.push(format!("no lane-side time: {e}")),
        }
    }
    let rss = read_host_rss(&guest);
    let off = guest.poweroff(lane.scaled(Duration::from_secs(20)));
    match off {
        Ok(0) => {}
        Ok(code) => notes.push(format!("tidevm exited with {code} after poweroff")),
        Err(e) => {
            let _ = guest.kill();
            notes.push(format!("poweroff failed, killed tidevm: {}", one_line(&e)));
        }
    }
    let (vmm, guest_memory, total) = rss?;
    metrics.extend([
        Metric {
            key: "vmm_rss",
            label: "VMM RSS without guest memory",
            unit: Unit::Bytes,
            value: vmm as f64,
        },
        Metric {
            key: "guest_memory_rss",
            label: "guest memory RSS",
            unit: Unit::Bytes,
            value: guest_memory as f64,
        },
        Metric {
            key: "total_rss",
            label: "total RSS",
            unit: Unit::Bytes,
            value: total as f64,
        },
    ]);
    Ok(metrics)
}

/// Starts the lane-side watcher of the ready marker; returns the VMM's start time in
/// seconds of lane uptime.
fn start_ready_watcher(lane: &Lane, guest: &Guest<'_>) -> Result<f64, String> {
    let dir = guest_dir(guest);
    let script = format!(
        "d={dir}\n\
         setsid sh -c 'first=1; while ! grep -q {ready} \"$0/console.log\"; do first=0; \
         sleep 0.01 2>/dev/null || usleep 10000; done; \
         read up rest < /proc/uptime; echo \"$up $first\" > \"$0/bench-ready.tmp\"; \
         mv \"$0/bench-ready.tmp\" \"$0/bench-ready\"' \"$d\" </dev/null >/dev/null 2>&1 &\n\
         cut -d' ' -f22 /proc/{pid}/stat\n",
        dir = shell_quote(&dir),
        ready = GUEST_READY,
        pid = guest.pid(),
    );
    let (rc, output) = lane
        .sh(&script, Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!("watcher script failed ({rc}): {}", output.trim()));
    }
    let ticks: f64 = output
        .trim()
        .parse()
        .map_err(|_| format!("unexpected start time {:?}", output.trim()))?;
    // USER_HZ is 100 on x86-64.
    Ok(ticks / 100.0)
}

/// The lane-side boot time, and whether the watcher found the marker on its first look.
fn lane_ready_seconds(
    lane: &Lane,
    guest: &Guest<'_>,
    process_start: f64,
) -> Result<(f64, bool), String> {
    let file = shell_quote(&format!("{}/bench-ready", guest_dir(guest)));
    let script = format!(
        "i=0; while [ ! -s {file} ] && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.1; done; cat {file}"
    );
    let (rc, output) = lane
        .sh(&script, Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!("watcher left no result: {}", output.trim()));
    }
    let mut words = output.split_whitespace();
    let ready: f64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("unexpected watcher output {:?}", output.trim()))?;
    let late = words.next() == Some("1");
    Ok((ready - process_start, late))
}

/// `memory.host_rss` of `tidevm ctl info`: (vmm, guest memory, total) bytes.
pub(super) fn read_host_rss(guest: &Guest<'_>) -> Result<(u64, u64, u64), String> {
    let (rc, output) = guest.ctl(&["info"]).map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!("tidevm ctl info failed ({rc}): {}", output.trim()));
    }
    let start = output
        .find('{')
        .ok_or_else(|| format!("tidevm ctl info printed no JSON: {}", output.trim()))?;
    let info: Value = serde_json::Deserializer::from_str(&output[start..])
        .into_iter::<Value>()
        .next()
        .ok_or("tidevm ctl info printed no JSON")?
        .map_err(|e| format!("tidevm ctl info: bad JSON: {e}"))?;
    let field = |name: &str| {
        info["memory"]["host_rss"][name]
            .as_u64()
            .ok_or_else(|| format!("tidevm ctl info has no memory.host_rss.{name}"))
    };
    Ok((
        field("vmm_bytes")?,
        field("guest_memory_bytes")?,
        field("total_bytes")?,
    ))
}

fn guest_dir(guest: &Guest<'_>) -> String {
    let socket = guest.api_socket();
    match socket.rsplit_once('/') {
        Some((dir, _)) => dir.to_string(),
        None => ".".to_string(),
    }
}

/// `runs` records that all failed with `error` (the scenario could not even start).
pub(super) fn failed_runs(runs: u32, error: &str) -> Vec<RunRecord> {
    (0..runs)
        .map(|_| RunRecord {
            result: Err(error.to_string()),
            notes: Vec::new(),
        })
        .collect()
}

/// Boots a guest with `options` and waits for its ready marker; on failure the guest is gone
/// and the error is one line.
pub(super) fn boot_ready<'lane>(
    lane: &'lane Lane,
    options: &GuestOptions,
) -> Result<Guest<'lane>, String> {
    let guest = lane.boot_guest(options).map_err(|e| one_line(&e))?;
    if let Err(e) = guest.wait_ready(lane.scaled(Duration::from_secs(40))) {
        let _ = guest.kill();
        return Err(one_line(&e));
    }
    Ok(guest)
}

/// Runs `round` for runs 1..=`runs` on booted guests (reporting failures as they happen),
/// then powers the guests off.
pub(super) fn run_rounds(
    bench: &str,
    guests: &[&Guest<'_>],
    runs: u32,
    mut round: impl FnMut(u32) -> Result<Vec<Metric>, String>,
) -> Vec<RunRecord> {
    let records = (1..=runs)
        .map(|run| {
            eprintln!("==== bench {bench}: run {run}/{runs} ====");
            let marks: Vec<u64> = guests
                .iter()
                .map(|g| g.console_len().unwrap_or(0))
                .collect();
            // A guest that crashed and was reset mid-round makes its figures meaningless
            // (its counters restart): such a round fails.
            let result = round(run).and_then(|metrics| {
                for (guest, mark) in guests.iter().zip(&marks) {
                    guest
                        .check_no_triple_fault_since(*mark)
                        .map_err(|e| one_line(&e))?;
                }
                Ok(metrics)
            });
            if let Err(error) = &result {
                eprintln!("bench {bench}: run {run} failed: {error}");
            }
            RunRecord {
                result,
                notes: Vec::new(),
            }
        })
        .collect();
    for guest in guests {
        let _ = guest.poweroff(Duration::from_secs(120));
    }
    records
}

/// Runs `tidevm ctl <args> --wait` in the lane and returns the time it reports on its last
/// "... after N s" line: measured inside the lane from just before its API request until
/// the wait ended, so no agent round trip is included.
pub(super) fn timed_ctl_wait(guest: &Guest<'_>, args: &[&str]) -> Result<f64, String> {
    let mut args = args.to_vec();
    args.extend(["--wait", "--timeout", "280"]);
    let (rc, out) = guest
        .ctl_waiting(&args, Duration::from_secs(300))
        .map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!(
            "{} did not complete: {}",
            args.join(" "),
            out.trim()
        ));
    }
    out.lines()
        .rev()
        .find_map(|line| {
            let seconds = line.split(" after ").nth(1)?.trim_end_matches(" s");
            seconds.parse::<f64>().ok()
        })
        .ok_or_else(|| format!("no timing in {out:?}"))
}

/// The first line of an error (lane errors append console tails).
pub(super) fn one_line(error: &impl std::fmt::Display) -> String {
    error.to_string().lines().next().unwrap_or("").to_string()
}

/// Median, min and max of `values` (not empty).
fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

/// Every metric key that appears in `records`, in order of first appearance.
fn metric_kinds(records: &[RunRecord]) -> Vec<Metric> {
    let mut kinds: Vec<Metric> = Vec::new();
    for metric in records
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .flatten()
    {
        if !kinds.iter().any(|k| k.key == metric.key) {
            kinds.push(*metric);
        }
    }
    kinds
}

fn values_of(records: &[RunRecord], key: &str) -> Vec<f64> {
    records
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .flat_map(|metrics| metrics.iter().filter(|m| m.key == key).map(|m| m.value))
        .collect()
}

fn print_report(
    name: &str,
    lane: &Lane,
    common: &CommonArgs,
    params: &Value,
    records: &[RunRecord],
) {
    let failed = records.iter().filter(|r| r.result.is_err()).count();
    let kinds = metric_kinds(records);
    if common.json {
        let runs: Vec<Value> = records
            .iter()
            .map(|r| match &r.result {
                Ok(metrics) => {
                    let mut run = serde_json::Map::new();
                    run.insert("ok".into(), true.into());
                    for m in metrics {
                        run.insert(
                            format!("{}_{}", m.key, m.unit.json_suffix()),
                            m.value.into(),
                        );
                    }
                    run.insert("notes".into(), json!(r.notes));
                    Value::Object(run)
                }
                Err(error) => json!({ "ok": false, "error": error, "notes": r.notes }),
            })
            .collect();
        let mut summaries = serde_json::Map::new();
        for kind in &kinds {
            let (median, min, max) = summary(&mut values_of(records, kind.key));
            summaries.insert(
                format!("{}_{}", kind.key, kind.unit.json_suffix()),
                json!({ "median": median, "min": min, "max": max }),
            );
        }
        let report = json!({
            "benchmark": name,
            "lane": lane_name(lane),
            "parameters": params,
            "runs": records.len(),
            "failed_runs": failed,
            "summary": summaries,
            "run_results": runs,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return;
    }
    let mut out = String::new();
    let _ = writeln!(out, "tidevm bench {name}: {params}");
    let _ = writeln!(out, "lane: {}", lane_description(lane));
    for (i, record) in records.iter().enumerate() {
        match &record.result {
            Ok(metrics) => {
                let parts: Vec<String> = metrics
                    .iter()
                    .map(|m| format!("{} {}", m.key, m.unit.format(m.value)))
                    .collect();
                let _ = writeln!(out, "run {}: {}", i + 1, parts.join(", "));
            }
            Err(error) => {
                let _ = writeln!(out, "run {}: FAILED: {error}", i + 1);
            }
        }
        for note in &record.notes {
            let _ = writeln!(out, "       note: {note}");
        }
    }
    let _ = writeln!(
        out,
        "{} runs, {} ok, {failed} failed",
        records.len(),
        records.len() - failed
    );
    if !kinds.is_empty() {
        let _ = writeln!(
            out,
            "{:<36} {:>12} {:>12} {:>12}",
            "", "median", "min", "max"
        );
    }
    for kind in &kinds {
        let (median, min, max) = summary(&mut values_of(records, kind.key));
        let _ = writeln!(
            out,
            "{:<36} {:>12} {:>12} {:>12}",
            kind.label,
            kind.unit.format(median),
            kind.unit.format(min),
            kind.unit.format(max)
        );
    }
    print!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_counts() {
        assert_eq!(summary(&mut [3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&mut [4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(summary(&mut [7.0]), (7.0, 7.0, 7.0));
    }

    #[test]
    fn failed_runs_do_not_count_in_metrics() {
        let metric = |value| Metric {
            key: "boot_host",
            label: "boot",
            unit: Unit::Seconds,
            value,
        };
        let records = vec![
            RunRecord {
                result: Ok(vec![metric(2.0)]),
                notes: vec![],
            },
            RunRecord {
                result: Err("no".into()),
                notes: vec![],
            },
            RunRecord {
                result: Ok(vec![metric(4.0)]),
                notes: vec![],
            },
        ];
        assert_eq!(metric_kinds(&records).len(), 1);
        assert_eq!(values_of(&records, "boot_host"), vec![2.0, 4.0]);
    }
}
