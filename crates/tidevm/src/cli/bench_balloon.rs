//! `tidevm bench balloon`: inflating and deflating the balloon, side by side in two guests
//! that differ only in how tidevm discards inflated pages: merged ranges (tidevm's way, one
//! syscall per contiguous range) and one syscall per 4 KiB page (QEMU's way).
//!
//! Each run has the guest write `--touch` MiB and free it, so the balloon takes pages the
//! host really holds; then it inflates `--size`, and deflates to 0.

use std::time::Duration;

use clap::Args;
use tidevm_api::BalloonInfo;
use tidevm_testlane::{Guest, GuestOptions, L1Thp, Lane};

use super::bench::{
    boot_ready, failed_runs, one_line, read_host_rss, run_rounds, timed_ctl_wait, CommonArgs,
    Metric, RunRecord, Unit,
};

/// Options of `tidevm bench balloon`.
#[derive(Debug, Args)]
pub struct BalloonArgs {
    #[command(flatten)]
    pub(super) common: CommonArgs,
    /// How much to inflate each run.
    #[arg(long, default_value = "2G")]
    pub(super) size: String,
    /// How much memory the guest writes (and frees) before each inflate, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub(super) touch: u64,
    /// Boot memory of each guest (must exceed SIZE).
    #[arg(long, default_value = "3G")]
    pub(super) memory: String,
}

/// The metric keys of one discard mode.
struct Mode {
    balloon_option: &'static str,
    inflate: (&'static str, &'static str),
    deflate: (&'static str, &'static str),
    syscalls_per_gib: (&'static str, &'static str),
    discard_time: (&'static str, &'static str),
    reclaimed: (&'static str, &'static str),
}

const MERGED: Mode = Mode {
    balloon_option: "discard=merged",
    inflate: ("merged_inflate", "merged: API request to inflated"),
    deflate: ("merged_deflate", "merged: API request to deflated"),
    syscalls_per_gib: (
        "merged_syscalls_per_gib",
        "merged: discard syscalls per GiB",
    ),
    discard_time: ("merged_discard", "merged: time in discard syscalls"),
    reclaimed: ("merged_reclaimed", "merged: host RSS reclaimed by inflate"),
};

const PER_PAGE: Mode = Mode {
    balloon_option: "discard=per-page",
    inflate: ("per_page_inflate", "per page: API request to inflated"),
    deflate: ("per_page_deflate", "per page: API request to deflated"),
    syscalls_per_gib: (
        "per_page_syscalls_per_gib",
        "per page: discard syscalls per GiB",
    ),
    discard_time: ("per_page_discard", "per page: time in discard syscalls"),
    reclaimed: (
        "per_page_reclaimed",
        "per page: host RSS reclaimed by inflate",
    ),
};

/// Boots one guest per discard mode and runs both `runs` times.
pub(super) fn run(lane: &Lane, args: &BalloonArgs) -> Vec<RunRecord> {
    let runs = args.common.runs;
    let Some(size) = tidevm_api::parse_byte_size(&args.size) else {
        return failed_runs(runs, &format!("invalid --size {}", args.size));
    };
    let boot = |mode: &Mode| {
        boot_ready(
            lane,
            &GuestOptions {
                memory: args.memory.clone(),
                extra_args: vec!["--balloon".into(), mode.balloon_option.into()],
                // Inflating after the guest touched memory needs L1 THP off in the lane.
                l1_thp: L1Thp::Never,
                ..GuestOptions::default()
            },
        )
    };
    let merged = match boot(&MERGED) {
        Ok(guest) => guest,
        Err(e) => return failed_runs(runs, &e),
    };
    let per_page = match boot(&PER_PAGE) {
        Ok(guest) => guest,
        Err(e) => {
            let _ = merged.poweroff(Duration::from_secs(120));
            return failed_runs(runs, &e);
        }
    };
    run_rounds("balloon", &[&merged, &per_page], runs, |_run| {
        let mut metrics = mode_round(&merged, &MERGED, &args.size, size, args.touch)?;
        metrics.extend(mode_round(
            &per_page, &PER_PAGE, &args.size, size, args.touch,
        )?);
        Ok(metrics)
    })
}

fn balloon_info(guest: &Guest<'_>) -> Result<BalloonInfo, String> {
    let (rc, out) = guest.ctl(&["balloon-stats"]).map_err(|e| one_line(&e))?;
    if rc != 0 {
        return Err(format!("tidevm ctl balloon-stats failed: {}", out.trim()));
    }
    serde_json::from_str(&out).map_err(|e| format!("balloon-stats: bad JSON: {e}"))
}

fn mode_round(
    guest: &Guest<'_>,
    mode: &Mode,
    size_text: &str,
    size: u64,
    touch_mib: u64,
) -> Result<Vec<Metric>, String> {
    let touched = guest
        .run(&format!("memtouch {touch_mib}"), Duration::from_secs(900))
        .map_err(|e| one_line(&e))?;
    if !touched.contains(", 0 bad words") {
        return Err(format!("memtouch failed: {}", touched.trim()));
    }
    let before = balloon_info(guest)?;
    let (_, _, rss_before) = read_host_rss(guest)?;
    let inflate = timed_ctl_wait(guest, &["balloon", size_text])?;
    let inflated = balloon_info(guest)?;
    let (_, _, rss_inflated) = read_host_rss(guest)?;
    let deflate = timed_ctl_wait(guest, &["balloon", "0"])?;
    let gib = size as f64 / f64::from(1u32 << 30);
    let metric = |(key, label): (&'static str, &'static str), unit, value| Metric {
        key,
        label,
        unit,
        value,
    };
    Ok(vec![
        metric(mode.inflate, Unit::Seconds, inflate),
        metric(mode.deflate, Unit::Seconds, deflate),
        metric(
            mode.syscalls_per_gib,
            Unit::Count,
            (inflated.discard_syscalls - before.discard_syscalls) as f64 / gib,
        ),
        metric(
            mode.discard_time,
            Unit::Seconds,
            (inflated.discard_ns - before.discard_ns) as f64 / 1e9,
        ),
        metric(
            mode.reclaimed,
            Unit::Bytes,
            rss_before.saturating_sub(rss_inflated) as f64,
        ),
    ])
}
