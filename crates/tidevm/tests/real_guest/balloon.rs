//! Issue 4: virtio-balloon with the real Linux driver.

use std::time::Duration;

use tidevm_api::BalloonInfo;
use tidevm_testlane::{Guest, GuestOptions, L1Thp, Lane, LaneKind, Result};

use crate::foundation::{check, mem_total_kib, memtouch, rss_mib, BOOT, CMD};
use crate::virtio_mem::finish;
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("balloon_inflate_deflate", inflate_deflate),
    (
        "balloon_stats_and_free_page_reporting",
        stats_and_free_page_reporting,
    ),
    ("balloon_deflate_on_oom", deflate_on_oom),
];

const MIB: u64 = 1 << 20;

fn boot_with_balloon<'a>(lane: &'a Lane, balloon: &str) -> Result<Guest<'a>> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "1G".into(),
        extra_args: vec!["--balloon".into(), balloon.into()],
        l1_thp: L1Thp::Never,
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    check_l1_thp_off(lane, &guest)?;
    Ok(guest)
}

/// Balloon scenarios need THP off in the nested lane's L1 (see [`L1Thp::Never`]); the other
/// scenarios run with it on, so check that the per-guest setting took.
fn check_l1_thp_off(lane: &Lane, guest: &Guest) -> Result<()> {
    if lane.kind() != LaneKind::Nested {
        return Ok(());
    }
    let (_, thp) = lane.sh("cat /sys/kernel/mm/transparent_hugepage/enabled", CMD)?;
    check(
        thp.contains("[never]"),
        guest,
        format!("L1 THP should be off for balloon work: {thp}"),
    )
}

fn balloon_info(guest: &Guest) -> Result<BalloonInfo> {
    let (rc, out) = guest.ctl(&["balloon-stats"])?;
    check(rc == 0, guest, format!("balloon-stats failed: {out}"))?;
    serde_json::from_str(&out)
        .map_err(|e| guest.failure(format!("bad balloon-stats JSON ({e}): {out}")))
}

/// Polls the balloon (every 500 ms, up to `timeout`) until `done` says yes; returns the last
/// reading either way.
fn poll_balloon(
    guest: &Guest,
    timeout: Duration,
    done: impl Fn(&BalloonInfo) -> bool,
) -> Result<BalloonInfo> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let info = balloon_info(guest)?;
        if done(&info) || std::time::Instant::now() > deadline {
            return Ok(info);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn guest_free(info: &BalloonInfo) -> Option<u64> {
    info.stats.as_ref()?.values.get("free_memory").copied()
}

/// The guest's statistics follow what it does (its free memory falls while it holds 300 MiB
/// and comes back when it lets go), and free page reporting hands the freed memory back to
/// the host with no balloon target at all.
fn stats_and_free_page_reporting(lane: &Lane) -> Result<()> {
    let guest = boot_with_balloon(lane, "free-page-reporting=on,stats-interval=1s")?;
    let first = poll_balloon(&guest, Duration::from_secs(30), |i| guest_free(i).is_some())?;
    let free_idle =
        guest_free(&first).ok_or_else(|| guest.failure("no guest statistics within 30 s"))?;

    // In a subshell: the harness appends "; echo ..." to the command.
    guest.run("(memtouch 300 25 >/dev/null 2>&1 &)", CMD)?;
    let holding = poll_balloon(&guest, Duration::from_secs(60), |i| {
        guest_free(i).is_some_and(|f| f + 250 * MIB <= free_idle)
    })?;
    let free_holding = guest_free(&holding).unwrap_or(free_idle);
    eprintln!(
        "guest free_memory: {} MiB idle, {} MiB while holding 300 MiB",
        free_idle / MIB,
        free_holding / MIB
    );
    check(
        free_holding + 250 * MIB <= free_idle,
        &guest,
        format!(
            "the guest's free_memory did not follow its use: {} -> {} MiB",
            free_idle / MIB,
            free_holding / MIB
        ),
    )?;
    let rss_holding = rss_mib(&guest)?;
    // The guest reported its never-used memory at boot already: count only what comes after.
    let reported_holding = holding.reported_free_bytes;

    // memtouch lets go; the guest reports the free pages and the host discards them.
    let released = poll_balloon(&guest, Duration::from_secs(120), |i| {
        i.reported_free_bytes >= reported_holding + 250 * MIB
            && guest_free(i).is_some_and(|f| f + 100 * MIB >= free_idle)
    })?;
    let rss_released = rss_mib(&guest)?;
    let reported = released.reported_free_bytes - reported_holding;
    eprintln!(
        "free page reporting: {} MiB reported and discarded after the release; tidevm RSS {rss_holding} -> {rss_released} MiB; guest free_memory back to {} MiB",
        reported / MIB,
        guest_free(&released).unwrap_or(0) / MIB
    );
    check(
        reported >= 250 * MIB,
        &guest,
        format!(
            "only {} MiB reported free after the guest freed 300 MiB",
            reported / MIB
        ),
    )?;
    check(
        rss_holding - rss_released >= 200,
        &guest,
        format!(
            "RSS fell by only {} MiB with free page reporting",
            rss_holding - rss_released
        ),
    )?;
    check(
        released.target_bytes == 0 && released.inflated_bytes == 0,
        &guest,
        "free page reporting must not need a balloon target",
    )?;
    finish(&guest)
}

/// With deflate-on-oom, a guest squeezed by the balloon takes pages back when it needs them
/// instead of killing anything; the host sees the balloon shrink below its target.
fn deflate_on_oom(lane: &Lane) -> Result<()> {
    let guest = boot_with_balloon(lane, "deflate-on-oom=on,stats-interval=2s")?;
    let (rc, out) = guest.ctl_waiting(
        &["balloon", "640M", "--wait", "--timeout", "280"],
        Duration::from_secs(300),
    )?;
    check(rc == 0, &guest, format!("inflate to 640 MiB: {out}"))?;
    let squeezed = balloon_info(&guest)?;
    // Less than 400 MiB is left to the guest: writing 400 MiB needs pages from the balloon.
    let touched = memtouch(
        &guest,
        400,
        Duration::from_secs(600),
        "memtouch under pressure",
    )?;
    let after = balloon_info(&guest)?;
    check(
        after.reused_pages == 0,
        &guest,
        format!(
            "deflate on OOM is not reuse: the driver deflates before it uses a page, yet {} \
             pages were reported at {:?}",
            after.reused_pages, after.reused_ranges
        ),
    )?;
    let dmesg = guest.run(
        "dmesg | grep -ciE 'out of memory|killed process' || true",
        CMD,
    )?;
    eprintln!(
        "deflate on OOM: balloon {} -> {} MiB (host count; target {} MiB); {}",
        squeezed.inflated_bytes / MIB,
        after.inflated_bytes / MIB,
        after.target_bytes / MIB,
        touched.trim()
    );
    check(
        after.inflated_bytes + 32 * MIB <= squeezed.inflated_bytes,
        &guest,
        format!(
            "the balloon did not give pages back under pressure: {} -> {} MiB",
            squeezed.inflated_bytes / MIB,
            after.inflated_bytes / MIB
        ),
    )?;
    check(
        dmesg.trim() == "0",
        &guest,
        format!(
            "the guest killed something instead of deflating ({} lines)",
            dmesg.trim()
        ),
    )?;
    finish(&guest)
}

/// The case: a 2 GiB guest uses and frees 1.5 GiB; inflating the balloon to leave it
/// 512 MiB returns that memory to the host (RSS falls by at least 1 GiB), MemTotal drops, the
/// guest's `actual` reaches the target; deflating restores it.
fn inflate_deflate(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "2G".into(),
        extra_args: vec!["--balloon".into(), "stats-interval=2s".into()],
        l1_thp: L1Thp::Never,
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    check_l1_thp_off(lane, &guest)?;
    let bound = guest.run("ls /sys/bus/virtio/drivers/virtio_balloon/", CMD)?;
    check(
        bound.contains("virtio"),
        &guest,
        format!("virtio_balloon did not bind: {bound}"),
    )?;
    let before = mem_total_kib(&guest)?;
    memtouch(&guest, 1536, Duration::from_secs(900), "pattern")?;
    let rss_used = rss_mib(&guest)?;

    let lane_ctl = |args: &str, timeout: u64| {
        let args: Vec<&str> = args.split_whitespace().collect();
        guest.ctl_waiting(&args, Duration::from_secs(timeout))
    };
    let (rc, out) = lane_ctl("balloon 1536M --wait --timeout 280", 300)?;
    check(rc == 0, &guest, format!("inflate by 1.5 GiB: {out}"))?;
    let inflated_total = mem_total_kib(&guest)?;
    let rss_inflated = rss_mib(&guest)?;
    eprintln!(
        "balloon: MemTotal {before} -> {inflated_total} KiB, tidevm RSS {rss_used} -> {rss_inflated} MiB"
    );
    check(
        before - inflated_total >= 1524 * 1024,
        &guest,
        format!("MemTotal fell by only {} KiB", before - inflated_total),
    )?;
    check(
        rss_used - rss_inflated >= 1024,
        &guest,
        format!(
            "RSS fell by only {} MiB after inflating 1.5 GiB (want at least 1 GiB)",
            rss_used - rss_inflated
        ),
    )?;
    let (_, stats) = lane_ctl("balloon-stats", 60)?;
    eprintln!("balloon-stats after inflate: {}", stats.replace('\n', " "));
    check(
        stats.contains("\"inflated_bytes\": 1610612736")
            && stats.contains("\"actual_bytes\": 1610612736"),
        &guest,
        format!("balloon-stats: {stats}"),
    )?;
    check(
        stats.contains("\"free_memory\"") && stats.contains("\"age_seconds\""),
        &guest,
        format!("no guest statistics in balloon-stats: {stats}"),
    )?;
    // The honest Linux driver never writes a page it inflated: the exact reuse detection
    // must not accuse it (a false positive here would make the detection worthless).
    check(
        stats.contains("\"reused_pages\": 0"),
        &guest,
        format!("reuse detection accused the Linux driver: {stats}"),
    )?;

    let (rc, out) = lane_ctl("balloon 0 --wait --timeout 280", 300)?;
    check(rc == 0, &guest, format!("deflate: {out}"))?;
    let deflated_total = mem_total_kib(&guest)?;
    check(
        deflated_total == before,
        &guest,
        format!("MemTotal {deflated_total} KiB after deflating, {before} KiB at boot"),
    )?;
    finish(&guest)
}
