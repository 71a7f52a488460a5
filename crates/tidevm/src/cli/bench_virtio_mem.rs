//! `tidevm bench virtio-mem`: how long a resize takes from the API request until the guest
//! has plugged (or unplugged) the memory, how much of it tidevm itself spends, and what the
//! host's RSS does.

use clap::Args;
use serde_json::Value;
use tidevm_testlane::{Guest, GuestOptions, Lane};

use super::bench::{
    boot_ready, failed_runs, one_line, read_host_rss, run_rounds, timed_ctl_wait, CommonArgs,
    Metric, RunRecord, Unit,
};

/// Options of `tidevm bench virtio-mem`.
#[derive(Debug, Args)]
pub struct VirtioMemArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// How much to plug and unplug each run.
    #[arg(long, default_value = "4G")]
    pub(super) size: String,
    /// Boot memory of the guest.
    #[arg(long, default_value = "512M")]
    pub(super) memory: String,
}

/// Boots one guest with an 8 GiB-region device and resizes it `runs` times.
pub(super) fn run(lane: &Lane, args: &VirtioMemArgs) -> Vec<RunRecord> {
    let options = GuestOptions {
        memory: args.memory.clone(),
        extra_args: vec!["--virtio-mem".into(), "id=mem0,size=8G".into()],
        ..GuestOptions::default()
    };
    let guest = match boot_ready(lane, &options) {
        Ok(guest) => guest,
        Err(e) => return failed_runs(args.common.runs, &e),
    };
    run_rounds("virtio-mem", &[&guest], args.common.runs, |_run| {
        resize_round(&guest, &args.size)
    })
}

/// The device's counters from `tidevm ctl info`.
fn counters(guest: &Guest<'_>) -> Result<Value, String> {
    let (rc, output) = guest.ctl(&["info"]).map_err(|e| one_line(&e))?;
    let start = output
        .find('{')
        .filter(|_| rc == 0)
        .ok_or("tidevm ctl info failed")?;
    let info: Value = serde_json::from_str(&output[start..]).map_err(|e| e.to_string())?;
    Ok(info["virtio_mem"][0]["counters"].clone())
}

fn handling_ns(counters: &Value) -> f64 {
    (counters["plug_handling_ns"].as_u64().unwrap_or(0)
        + counters["unplug_handling_ns"].as_u64().unwrap_or(0)) as f64
}

/// Resizes to `size` through the API and waits for the device to report it plugged;
/// returns the lane-side time.
fn timed_resize(guest: &Guest<'_>, size: &str) -> Result<f64, String> {
    timed_ctl_wait(guest, &["resize-mem", "mem0", size])
}

fn resize_round(guest: &Guest<'_>, size: &str) -> Result<Vec<Metric>, String> {
    let (_, _, rss_before) = read_host_rss(guest)?;
    let before = counters(guest)?;
    let plug = timed_resize(guest, size)?;
    let plugged = counters(guest)?;
    let unplug = timed_resize(guest, "0")?;
    let after = counters(guest)?;
    let (_, _, rss_after) = read_host_rss(guest)?;
    let plug_vmm = (handling_ns(&plugged) - handling_ns(&before)) / 1e9;
    let unplug_vmm = (handling_ns(&after) - handling_ns(&plugged)) / 1e9;
    let metric = |key, label, unit, value| Metric {
        key,
        label,
        unit,
        value,
    };
    Ok(vec![
        metric(
            "plug",
            "API request to plugged (lane side)",
            Unit::Seconds,
            plug,
        ),
        metric(
            "plug_vmm",
            "  of which tidevm handling requests",
            Unit::Seconds,
            plug_vmm,
        ),
        metric(
            "unplug",
            "API request to unplugged (lane side)",
            Unit::Seconds,
            unplug,
        ),
        metric(
            "unplug_vmm",
            "  of which tidevm handling requests",
            Unit::Seconds,
            unplug_vmm,
        ),
        metric(
            "rss_before",
            "tidevm RSS before",
            Unit::Bytes,
            rss_before as f64,
        ),
        metric(
            "rss_after",
            "tidevm RSS after plug+unplug",
            Unit::Bytes,
            rss_after as f64,
        ),
    ])
}
