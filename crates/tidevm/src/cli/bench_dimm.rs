//! `tidevm bench dimm`: how long an ACPI DIMM hot-add takes from the API request until the
//! guest has the memory online, and how long a hot-remove takes until the guest has ejected
//! it, with the host RSS before and after.

use std::time::Duration;

use clap::Args;
use tidevm_testlane::{Guest, GuestOptions, Lane};

use super::bench::{
    boot_ready, failed_runs, one_line, read_host_rss, run_rounds, timed_ctl_wait, CommonArgs,
    Metric, RunRecord, Unit,
};

/// Options of `tidevm bench dimm`.
#[derive(Debug, Args)]
pub struct DimmArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// Size of the DIMM added and removed each run (a multiple of 128 MiB).
    #[arg(long, default_value = "1G")]
    pub(super) size: String,
    /// Boot memory of the guest.
    #[arg(long, default_value = "512M")]
    pub(super) memory: String,
}

/// Boots one guest with DIMM slots and adds and removes a DIMM `runs` times.
pub(super) fn run(lane: &Lane, args: &DimmArgs) -> Vec<RunRecord> {
    let runs = args.common.runs;
    let Some(size) = tidevm_api::parse_byte_size(&args.size) else {
        return failed_runs(runs, &format!("invalid --size {}", args.size));
    };
    let Some(boot) = tidevm_api::parse_byte_size(&args.memory) else {
        return failed_runs(runs, &format!("invalid --memory {}", args.memory));
    };
    let options = GuestOptions {
        memory: format!(
            "{},slots=2,maxmem={}M",
            args.memory,
            (boot + 2 * size) >> 20
        ),
        ..GuestOptions::default()
    };
    let guest = match boot_ready(lane, &options) {
        Ok(guest) => guest,
        Err(e) => return failed_runs(runs, &e),
    };
    run_rounds("dimm", &[&guest], args.common.runs, |run| {
        add_remove_round(&guest, &args.size, size, run)
    })
}

fn mem_total_kib(guest: &Guest<'_>) -> Result<u64, String> {
    let line = guest
        .run("grep MemTotal /proc/meminfo", Duration::from_secs(60))
        .map_err(|e| one_line(&e))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot parse MemTotal from {line:?}"))
}

fn add_remove_round(
    guest: &Guest<'_>,
    size_text: &str,
    size: u64,
    run: u32,
) -> Result<Vec<Metric>, String> {
    let (_, _, rss_before) = read_host_rss(guest)?;
    let before = mem_total_kib(guest)?;
    let id = format!("bench{run}");
    // The guest acknowledges the insertion (`_OST`) after it has added and onlined the
    // memory, so `--wait` ends when MemTotal has grown; checked right after.
    let add = timed_ctl_wait(guest, &["dimm-add", size_text, "--id", &id])?;
    let grown = mem_total_kib(guest)?;
    if grown - before != size >> 10 {
        return Err(format!(
            "MemTotal grew by {} KiB, not {} KiB",
            grown - before,
            size >> 10
        ));
    }
    let (_, _, rss_plugged) = read_host_rss(guest)?;
    let remove = timed_ctl_wait(guest, &["dimm-del", &id])?;
    let (_, _, rss_after) = read_host_rss(guest)?;
    if mem_total_kib(guest)? != before {
        return Err("MemTotal did not come back after the removal".into());
    }
    let metric = |key, label, unit, value| Metric {
        key,
        label,
        unit,
        value,
    };
    Ok(vec![
        metric(
            "add",
            "API request to memory online (lane side)",
            Unit::Seconds,
            add,
        ),
        metric(
            "remove",
            "API request to ejected and freed (lane side)",
            Unit::Seconds,
            remove,
        ),
        metric(
            "rss_before",
            "tidevm RSS before",
            Unit::Bytes,
            rss_before as f64,
        ),
        metric(
            "rss_plugged",
            "tidevm RSS with the DIMM",
            Unit::Bytes,
            rss_plugged as f64,
        ),
        metric(
            "rss_after",
            "tidevm RSS after removal",
            Unit::Bytes,
            rss_after as f64,
        ),
    ])
}
