//! `tidevm bench rss`: host memory a guest leaves behind, and what DIMM slots cost.
//!
//! Three guests per run, one after the other (512 MiB boot memory each):
//! - `plain`: a 4 GiB virtio-mem device; RSS when ready, after +2 GiB, after back to 0. What
//!   stays above "ready" is the guest's memmap for the hot-added range: allocated from boot
//!   memory, freed in the guest on unplug, and never given back to the host;
//! - `reporting`: the same with a balloon doing free page reporting (no target): the freed
//!   memmap pages are reported and discarded, so RSS should come back;
//! - `slots`: `--memory size=512M,slots=4,maxmem=5G` and nothing plugged: RSS when ready,
//!   split into guest memory and the VMM's own, against the plain guest's.

use std::time::Duration;

use clap::Args;
use tidevm_testlane::{Guest, GuestOptions, Lane};

use super::bench::{
    boot_ready, one_line, read_host_rss, timed_ctl_wait, CommonArgs, Metric, RunRecord, Unit,
};

/// Options of `tidevm bench rss`.
#[derive(Debug, Args)]
pub struct RssArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// How long to let free page reporting work after the unplug, in seconds.
    #[arg(long, default_value_t = 30)]
    pub(super) settle: u64,
}

fn metric(key: &'static str, label: &'static str, unit: Unit, value: f64) -> Metric {
    Metric {
        key,
        label,
        unit,
        value,
    }
}

/// Total RSS (bytes) from the API's own measurement.
fn total_rss(guest: &Guest<'_>) -> Result<u64, String> {
    Ok(read_host_rss(guest)?.2)
}

/// Ready, +2 GiB, back to 0; returns (ready, plugged, after) total RSS.
fn round_trip(guest: &Guest<'_>, settle: Duration) -> Result<(u64, u64, u64), String> {
    // Let the boot's own allocations settle before taking the baseline.
    std::thread::sleep(Duration::from_secs(5));
    let ready = total_rss(guest)?;
    timed_ctl_wait(guest, &["resize-mem", "mem0", "2G"])?;
    let plugged = total_rss(guest)?;
    timed_ctl_wait(guest, &["resize-mem", "mem0", "0"])?;
    std::thread::sleep(settle);
    let after = total_rss(guest)?;
    Ok((ready, plugged, after))
}

fn one_run(lane: &Lane, args: &RssArgs) -> Result<Vec<Metric>, String> {
    let settle = Duration::from_secs(args.settle);
    let boot = |extra: &[&str], memory: &str| {
        boot_ready(
            lane,
            &GuestOptions {
                memory: memory.into(),
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
                ..GuestOptions::default()
            },
        )
    };
    let bytes = |b: u64| b as f64;
    let mut metrics = Vec::new();

    let plain = boot(&["--virtio-mem", "id=mem0,size=4G"], "512M")?;
    std::thread::sleep(Duration::from_secs(5));
    // The split when ready, to set the slots guest against.
    let (plain_vmm, plain_guest, _) = read_host_rss(&plain)?;
    let (ready, plugged, after) = round_trip(&plain, settle)?;
    let _ = plain.poweroff(Duration::from_secs(120));
    metrics.push(metric(
        "plain_ready",
        "plain: RSS ready",
        Unit::Bytes,
        bytes(ready),
    ));
    metrics.push(metric(
        "plain_plugged",
        "plain: RSS at +2 GiB",
        Unit::Bytes,
        bytes(plugged),
    ));
    metrics.push(metric(
        "plain_after",
        "plain: RSS back at 0",
        Unit::Bytes,
        bytes(after),
    ));
    metrics.push(metric(
        "plain_left",
        "plain: left behind",
        Unit::Bytes,
        after.saturating_sub(ready) as f64,
    ));

    let reporting = boot(
        &[
            "--virtio-mem",
            "id=mem0,size=4G",
            "--balloon",
            "free-page-reporting=on,stats-interval=0s",
        ],
        "512M",
    )?;
    let (ready, _, after) = round_trip(&reporting, settle)?;
    let _ = reporting.poweroff(Duration::from_secs(120));
    metrics.push(metric(
        "reporting_left",
        "free page reporting: left behind",
        Unit::Bytes,
        after.saturating_sub(ready) as f64,
    ));

    let slots = boot(&[], "512M,slots=4,maxmem=5G")?;
    std::thread::sleep(Duration::from_secs(5));
    let (slots_vmm, slots_guest, slots_total) = read_host_rss(&slots)?;
    let _ = slots.poweroff(Duration::from_secs(120));
    metrics.push(metric(
        "slots_ready",
        "slots=4,maxmem=5G: RSS ready",
        Unit::Bytes,
        bytes(slots_total),
    ));
    metrics.push(metric(
        "slots_guest_extra",
        "slots: guest memory RSS above plain",
        Unit::Bytes,
        slots_guest as f64 - plain_guest as f64,
    ));
    metrics.push(metric(
        "slots_vmm_extra",
        "slots: VMM's own RSS above plain",
        Unit::Bytes,
        slots_vmm as f64 - plain_vmm as f64,
    ));
    Ok(metrics)
}

/// Runs the three guests `runs` times.
pub(super) fn run(lane: &Lane, args: &RssArgs) -> Vec<RunRecord> {
    (1..=args.common.runs)
        .map(|run| {
            eprintln!("==== bench rss: run {run}/{} ====", args.common.runs);
            let result = one_run(lane, args).map_err(|e| one_line(&e));
            if let Err(error) = &result {
                eprintln!("bench rss: run {run} failed: {error}");
            }
            RunRecord {
                result,
                notes: Vec::new(),
            }
        })
        .collect()
}
