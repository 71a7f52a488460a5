//! Issue 4: virtio-balloon with the real Linux driver.

use std::time::Duration;

use tidevm_testlane::{GuestOptions, Lane, Result};

use crate::foundation::{check, mem_total_kib, BOOT, CMD};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[("balloon_inflate_deflate", inflate_deflate)];

fn rss_mib(guest: &tidevm_testlane::Guest) -> Result<i64> {
    Ok(guest.vmm_rss_kib()? as i64 / 1024)
}

/// The guest uses and frees 600 MiB; inflating the balloon by 512 MiB returns that memory to
/// the host (RSS falls), MemTotal drops; deflating restores it. Sized down from the issue's
/// 1.5 GiB because the nested lane writes guest memory at a tenth of native speed, and heavy
/// inflates there have crashed the L1 host itself.
fn inflate_deflate(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "1G".into(),
        extra_args: vec!["--balloon".into(), "stats-interval=2s".into()],
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let bound = guest.run("ls /sys/bus/virtio/drivers/virtio_balloon/", CMD)?;
    check(
        bound.contains("virtio"),
        &guest,
        format!("virtio_balloon did not bind: {bound}"),
    )?;
    let before = mem_total_kib(&guest)?;
    let touched = guest.run("memtouch 600", Duration::from_secs(600))?;
    check(
        touched.contains(", 0 bad words"),
        &guest,
        format!("pattern: {touched}"),
    )?;
    let rss_used = rss_mib(&guest)?;

    let lane_ctl = |args: &str, timeout: u64| {
        let args: Vec<&str> = args.split_whitespace().collect();
        guest.ctl_waiting(&args, Duration::from_secs(timeout))
    };
    let (rc, out) = lane_ctl("balloon 512M --wait --timeout 280", 300)?;
    check(rc == 0, &guest, format!("inflate by 512 MiB: {out}"))?;
    let inflated_total = mem_total_kib(&guest)?;
    let rss_inflated = rss_mib(&guest)?;
    eprintln!(
        "balloon: MemTotal {before} -> {inflated_total} KiB, tidevm RSS {rss_used} -> {rss_inflated} MiB"
    );
    check(
        before - inflated_total >= 500 * 1024,
        &guest,
        format!("MemTotal fell by only {} KiB", before - inflated_total),
    )?;
    check(
        rss_used - rss_inflated >= 460,
        &guest,
        format!(
            "RSS fell by only {} MiB after inflating 512 MiB (want at least 90 %)",
            rss_used - rss_inflated
        ),
    )?;
    let (_, stats) = lane_ctl("balloon-stats", 60)?;
    eprintln!("balloon-stats after inflate: {}", stats.replace('\n', " "));
    check(
        stats.contains("\"inflated_bytes\": 536870912"),
        &guest,
        format!("balloon-stats: {stats}"),
    )?;
    check(
        stats.contains("\"free_memory\"") && stats.contains("\"age_seconds\""),
        &guest,
        format!("no guest statistics in balloon-stats: {stats}"),
    )?;

    let (rc, out) = lane_ctl("balloon 0 --wait --timeout 280", 300)?;
    check(rc == 0, &guest, format!("deflate: {out}"))?;
    let deflated_total = mem_total_kib(&guest)?;
    check(
        deflated_total == before,
        &guest,
        format!("MemTotal {deflated_total} KiB after deflating, {before} KiB at boot"),
    )?;
    if guest.poweroff(Duration::from_secs(120)).is_err() {
        let _ = guest.kill();
    }
    Ok(())
}
