//! Issue 11: Cloud Hypervisor's own client, `ch-remote`, resizes a real guest through
//! tidevm's Cloud Hypervisor-compatible routes, including a real shrink.

use std::time::Duration;

use tidevm_testlane::text::shell_quote;
use tidevm_testlane::{Guest, GuestOptions, L1Thp, Lane, Result};

use crate::foundation::{check, mem_total_kib, memtouch, rss_mib, BOOT};
use crate::virtio_mem::{finish, wait_mem_total};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[("ch_compat_ch_remote_resizes", ch_remote_resizes)];

const GIB_KIB: u64 = 1024 * 1024;

/// Runs ch-remote; `None` when the lane has none.
fn ch_remote(guest: &Guest, args: &[&str]) -> Result<Option<(i32, String)>> {
    guest.ch_remote(args, Duration::from_secs(60))
}

/// Runs ch-remote and insists it succeeded; returns what it printed.
fn ch_remote_ok(guest: &Guest, args: &[&str]) -> Result<String> {
    let (rc, out) =
        ch_remote(guest, args)?.ok_or_else(|| guest.failure("the lane lost its ch-remote"))?;
    check(
        rc == 0,
        guest,
        format!("ch-remote {args:?} failed ({rc}): {out}"),
    )?;
    Ok(out)
}

/// `ch-remote info`, parsed.
fn ch_info(guest: &Guest) -> Result<serde_json::Value> {
    let out = ch_remote_ok(guest, &["info"])?;
    serde_json::from_str(out.trim())
        .map_err(|e| guest.failure(format!("ch-remote info printed no JSON ({e}): {out}")))
}

/// Waits (through `tidevm ctl memory --wait`) until virtio-mem has plugged what is
/// requested and the balloon reached its target; ch-remote itself returns at once.
fn wait_settled(guest: &Guest, what: &str) -> Result<()> {
    let (rc, out) = guest.ctl_waiting(
        &["memory", "--wait", "--timeout", "280"],
        Duration::from_secs(300),
    )?;
    check(rc == 0, guest, format!("{what}: not settled ({rc}): {out}"))?;
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    eprintln!("{what}: {last}");
    Ok(())
}

fn measure(guest: &Guest, step: &str) -> Result<(u64, i64)> {
    let total = mem_total_kib(guest)?;
    let rss = rss_mib(guest)?;
    let actual = ch_info(guest)?["memory_actual_size"].as_u64().unwrap_or(0);
    eprintln!(
        "ch_compat {step}: MemTotal {total} KiB, tidevm RSS {rss} MiB, \
         memory_actual_size {} MiB",
        actual >> 20
    );
    Ok((total, rss))
}

/// 1 GiB boot memory, a 4 GiB virtio-mem device and a balloon. ch-remote pings, reads the
/// VM's info, grows it to 3 GiB, shrinks it back to 1 GiB (host RSS falls), sets the
/// balloon, resizes the zone, shrinks below the boot size (balloon), and a refused resize
/// makes it fail with the limit.
fn ch_remote_resizes(lane: &Lane) -> Result<()> {
    if lane.lane_ch_remote().is_none() {
        eprintln!(
            "SKIPPED: ch_compat: no ch-remote (../shared/anchors-bin/ch-remote next to the \
             workspace, or TIDEVM_CH_REMOTE): Cloud Hypervisor client compatibility NOT tested"
        );
        return Ok(());
    }
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 1,
        memory: "1G".into(),
        extra_args: [
            "--virtio-mem",
            "id=mem0,size=4G",
            "--balloon",
            "stats-interval=2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        // The balloon inflates after the guest touched 768 MiB: THP off in the nested lane.
        l1_thp: L1Thp::Never,
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    // The event stream, recorded for the whole scenario and checked at the end.
    let events_log = format!("{}.events", guest.api_socket());
    lane.sh(
        &format!(
            "({} ctl --api-socket {} events > {} 2>&1 &)",
            shell_quote(lane.lane_tidevm()),
            shell_quote(&guest.api_socket()),
            shell_quote(&events_log)
        ),
        Duration::from_secs(60),
    )?;

    let ping = ch_remote_ok(&guest, &["ping"])?;
    check(
        ping.contains("\"version\""),
        &guest,
        format!("ping: {ping}"),
    )?;
    let info = ch_info(&guest)?;
    let memory = &info["config"]["memory"];
    check(
        info["state"] == "Running"
            && memory["size"] == 1u64 << 30
            && memory["hotplug_size"] == 4u64 << 30
            && memory["hotplug_method"] == "VirtioMem"
            && info["config"]["balloon"]["size"] == 0
            && info["config"]["cpus"]["boot_vcpus"] == 1
            && info["memory_actual_size"] == 1u64 << 30,
        &guest,
        format!("ch-remote info: {info}"),
    )?;
    let (boot_total, boot_rss) = measure(&guest, "booted")?;

    // Grow to 3 GiB in all: virtio-mem plugs 2 GiB.
    ch_remote_ok(&guest, &["resize", "--memory", "3G"])?;
    wait_settled(&guest, "resize --memory 3G")?;
    let grown = wait_mem_total(&guest, boot_total + 2 * GIB_KIB)?;
    check(
        grown == boot_total + 2 * GIB_KIB,
        &guest,
        format!("MemTotal {grown} KiB after --memory 3G, boot {boot_total} KiB"),
    )?;
    check(
        ch_info(&guest)?["memory_actual_size"] == 3u64 << 30,
        &guest,
        "memory_actual_size is not 3 GiB",
    )?;
    // User memory prefers ZONE_MOVABLE, where the plugged blocks are.
    memtouch(
        &guest,
        768,
        Duration::from_secs(900),
        "pattern in plugged memory",
    )?;
    let (_, grown_rss) = measure(&guest, "--memory 3G, 768 MiB touched")?;

    // A real shrink back to 1 GiB: the plugged memory goes, and the host gets it back.
    ch_remote_ok(&guest, &["resize", "--memory", "1G"])?;
    wait_settled(&guest, "resize --memory 1G")?;
    let (shrunk, shrunk_rss) = measure(&guest, "--memory 1G")?;
    check(
        shrunk == boot_total,
        &guest,
        format!("MemTotal {shrunk} KiB after --memory 1G, boot {boot_total} KiB"),
    )?;
    check(
        grown_rss - shrunk_rss >= 400,
        &guest,
        format!(
            "tidevm RSS fell by only {} MiB after unplugging 2 GiB with 768 MiB touched",
            grown_rss - shrunk_rss
        ),
    )?;

    // The balloon, set directly.
    ch_remote_ok(&guest, &["resize", "--balloon", "512M"])?;
    wait_settled(&guest, "resize --balloon 512M")?;
    let (ballooned, _) = measure(&guest, "--balloon 512M")?;
    check(
        boot_total - ballooned >= 500 * 1024,
        &guest,
        format!(
            "MemTotal fell by only {} KiB with a 512 MiB balloon",
            boot_total - ballooned
        ),
    )?;
    let info = ch_info(&guest)?;
    check(
        info["config"]["balloon"]["size"] == 512u64 << 20
            && info["memory_actual_size"] == 512u64 << 20,
        &guest,
        format!("ch-remote info with the balloon: {info}"),
    )?;

    // The zone is the virtio-mem device.
    ch_remote_ok(&guest, &["resize-zone", "--id", "mem0", "--size", "1G"])?;
    wait_settled(&guest, "resize-zone mem0 1G")?;
    let zoned = wait_mem_total(&guest, ballooned + GIB_KIB)?;
    measure(&guest, "resize-zone mem0 1G")?;
    check(
        zoned == ballooned + GIB_KIB,
        &guest,
        format!("MemTotal {zoned} KiB after resize-zone, {ballooned} KiB before"),
    )?;

    // Below the boot size, which Cloud Hypervisor refuses: unplug, then the balloon.
    ch_remote_ok(&guest, &["resize", "--memory", "768M"])?;
    wait_settled(&guest, "resize --memory 768M")?;
    let (below_boot, _) = measure(&guest, "--memory 768M")?;
    check(
        below_boot + 200 * 1024 <= boot_total && below_boot + 300 * 1024 >= boot_total,
        &guest,
        format!("MemTotal {below_boot} KiB for 768M, boot {boot_total} KiB"),
    )?;
    check(
        ch_info(&guest)?["memory_actual_size"] == 768u64 << 20,
        &guest,
        "memory_actual_size is not 768 MiB",
    )?;

    // A refusal is a failure for ch-remote, with the limit in its message.
    let (rc, out) = ch_remote(&guest, &["resize", "--memory", "6G"])?.unwrap_or_default();
    check(
        rc != 0 && out.contains("maximum reachable"),
        &guest,
        format!("resize --memory 6G: ({rc}) {out}"),
    )?;
    let counters = ch_remote_ok(&guest, &["counters"])?;
    check(
        counters.contains("\"mem0\"") && counters.contains("\"balloon\""),
        &guest,
        format!("counters: {counters}"),
    )?;
    eprintln!("ch_compat: boot RSS {boot_rss} MiB");
    check_events(lane, &guest, &events_log)?;
    finish(&guest)
}

/// The event stream saw the plans, each mechanism's resizes start and finish, and
/// progress of the long unplug.
fn check_events(lane: &Lane, guest: &Guest, log: &str) -> Result<()> {
    let (_, events) = lane.sh(
        &format!("cat {}", shell_quote(log)),
        Duration::from_secs(60),
    )?;
    let count = |needle: &str| events.lines().filter(|l| l.contains(needle)).count();
    eprintln!(
        "ch_compat events: {} lines, {} plans, {} started, {} progress, {} finished",
        events.lines().count(),
        count("\"memory_planned\""),
        count("\"resize_started\""),
        count("\"resize_progress\""),
        count("\"resize_finished\"")
    );
    let has = |event: &str, mechanism: Option<&str>| {
        events.lines().any(|l| {
            l.contains(&format!("\"event\":\"{event}\""))
                && mechanism.is_none_or(|m| l.contains(&format!("\"mechanism\":\"{m}\"")))
        })
    };
    let wanted = [
        ("memory_planned", None),
        ("resize_started", Some("virtio-mem")),
        ("resize_finished", Some("virtio-mem")),
        ("resize_started", Some("balloon")),
        ("resize_finished", Some("balloon")),
    ];
    for (event, mechanism) in wanted {
        check(
            has(event, mechanism),
            guest,
            format!("no {event} ({mechanism:?}) on the event stream:\n{events}"),
        )?;
    }
    Ok(())
}
