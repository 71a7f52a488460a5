//! Issue 11: the memory autopilot in a real guest. A workload ramps to 1.5 GiB in a guest that
//! boots with 1 GiB; the autopilot plugs virtio-mem ahead of it (no OOM kill, no failed
//! allocation), and after the release the memory goes back to the host: the plugged part by
//! the autopilot's unplug, the boot RAM the workload also used by free page reporting
//! (without it, a first run kept 723 MiB resident against 97 MiB when ready).

use std::time::{Duration, Instant};

use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use tidevm_api::DimmState;

use crate::dimm::memory_status;
use crate::foundation::{check, mem_total_kib, BOOT, CMD};
use crate::virtio_mem::finish;
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("autopilot_follows_a_ramp", follows_a_ramp),
    ("autopilot_adds_and_ejects_a_dimm", adds_and_ejects_a_dimm),
];

/// What the `memphase` workload left: its "done" line (empty if it never finished), the last
/// lines of its log, and the guest's count of OOM messages.
struct Memphase {
    done: String,
    log: String,
    ooms: String,
}

/// Runs `memphase PHASES` in the background in the guest and calls `sample` every 3 s while
/// it runs (for at most 10 minutes), so the host can watch the guest meanwhile.
fn run_memphase(
    guest: &Guest,
    phases: &str,
    mut sample: impl FnMut() -> Result<()>,
) -> Result<Memphase> {
    guest.run(
        &format!("(memphase {phases} > /tmp/memphase.log 2>&1 &)"),
        CMD,
    )?;
    let started = Instant::now();
    let mut done = String::new();
    while started.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_secs(3));
        sample()?;
        done = guest.run("grep 'memphase done' /tmp/memphase.log || true", CMD)?;
        if done.contains("memphase done") {
            break;
        }
    }
    let log = guest.run("tail -3 /tmp/memphase.log", CMD)?;
    let ooms = guest.run(
        "dmesg | grep -ciE 'out of memory|killed process' || true",
        CMD,
    )?;
    Ok(Memphase { done, log, ooms })
}

fn follows_a_ramp(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "1G".into(),
        extra_args: [
            "--virtio-mem",
            "id=mem0,size=3G",
            "--balloon",
            // Free page reporting gives back the boot RAM the workload freed: the autopilot
            // unplugs hotplugged memory, but boot RAM is only returned page by page.
            "stats-interval=1s,free-page-reporting=on",
            "--memory-policy",
            "auto,min=1G,max=3G,interval=2s,shrink-hold=10s,shrink-step=512M",
        ]
        .map(String::from)
        .to_vec(),
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let boot_total = mem_total_kib(&guest)?;
    let rss_ready = guest.vmm_rss_kib()?;
    // The workload runs in the background; the host watches MemTotal and RSS meanwhile.
    let started = Instant::now();
    let mut peak_total = boot_total;
    let mut peak_rss = rss_ready;
    let Memphase { done, log, ooms } =
        run_memphase(&guest, "ramp:1536:20 hold:15 release idle:5", || {
            peak_total = peak_total.max(mem_total_kib(&guest)?);
            peak_rss = peak_rss.max(guest.vmm_rss_kib()?);
            Ok(())
        })?;
    eprintln!(
        "autopilot: MemTotal {boot_total} KiB at boot, peak {peak_total} KiB; RSS {} MiB \
         ready, peak {} MiB; memphase: {}",
        rss_ready >> 10,
        peak_rss >> 10,
        log.trim().replace('\n', " | ")
    );
    check(
        done.contains("failed_allocs=0"),
        &guest,
        format!("the workload did not finish cleanly: {log}"),
    )?;
    check(
        ooms.trim() == "0",
        &guest,
        format!("{} OOM messages in the guest", ooms.trim()),
    )?;
    check(
        peak_total >= boot_total + 512 * 1024,
        &guest,
        format!("MemTotal never grew by 512 MiB: peak {peak_total} KiB, boot {boot_total} KiB"),
    )?;
    // After the release the autopilot gives the memory back: MemTotal returns to the boot
    // size, and the host's RSS falls by most of what the workload had.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut total, mut rss) = (mem_total_kib(&guest)?, guest.vmm_rss_kib()?);
    while (total > boot_total || rss > rss_ready + 256 * 1024) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(5));
        total = mem_total_kib(&guest)?;
        rss = guest.vmm_rss_kib()?;
    }
    let returned = started.elapsed();
    eprintln!(
        "autopilot: after the release MemTotal {total} KiB, RSS {} MiB ({:.0} s after the \
         workload started)",
        rss >> 10,
        returned.as_secs_f64()
    );
    if total != boot_total {
        // What the VMM asked for tells a policy that held apart from a guest that did not
        // unplug.
        let (_, memory) = guest.ctl(&["memory"])?;
        let free = guest.run("grep -E 'MemFree|MemAvailable' /proc/meminfo", CMD)?;
        eprintln!("autopilot: tidevm memory {memory}\nguest: {free}");
    }
    check(
        total == boot_total,
        &guest,
        format!("MemTotal {total} KiB after the release, {boot_total} KiB at boot"),
    )?;
    check(
        rss <= rss_ready + 256 * 1024,
        &guest,
        format!(
            "RSS {} MiB after the release, {} MiB when ready",
            rss >> 10,
            rss_ready >> 10
        ),
    )?;
    finish(&guest)
}

/// The autopilot past virtio-mem: a 1 GiB guest whose virtio-mem device holds only 512 MiB
/// ramps to 1.5 GiB, so the autopilot must add a DIMM for the rest; after the release it
/// must unplug and eject it again (the guest offlines the DIMM's movable memory), and the
/// host's RSS must fall back near where it was when the guest was ready.
fn adds_and_ejects_a_dimm(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "1G,slots=2,maxmem=3G".into(),
        extra_args: [
            "--virtio-mem",
            "id=mem0,size=512M",
            "--balloon",
            "stats-interval=1s,free-page-reporting=on",
            "--memory-policy",
            "auto,min=1G,max=3G,interval=2s,shrink-hold=10s,shrink-step=512M",
        ]
        .map(String::from)
        .to_vec(),
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let boot_total = mem_total_kib(&guest)?;
    let rss_ready = guest.vmm_rss_kib()?;
    let started = Instant::now();
    let mut peak_total = boot_total;
    let mut peak_dimms = Vec::new();
    let Memphase { done, log, ooms } =
        run_memphase(&guest, "ramp:1536:20 hold:20 release idle:5", || {
            peak_total = peak_total.max(mem_total_kib(&guest)?);
            let status = memory_status(&guest)?;
            let active: Vec<_> = status
                .dimms
                .iter()
                .filter(|d| d.state == DimmState::Active)
                .map(|d| (d.id.clone(), d.size >> 20))
                .collect();
            if active.len() > peak_dimms.len() {
                peak_dimms = active;
            }
            Ok(())
        })?;
    eprintln!(
        "autopilot with DIMMs: MemTotal {boot_total} KiB at boot, peak {peak_total} KiB; \
         active DIMMs at the peak (id, MiB): {peak_dimms:?}; memphase: {}",
        log.trim().replace('\n', " | ")
    );
    check(
        done.contains("failed_allocs=0") && ooms.trim() == "0",
        &guest,
        format!(
            "the workload did not finish cleanly ({} OOM messages): {log}",
            ooms.trim()
        ),
    )?;
    check(
        !peak_dimms.is_empty(),
        &guest,
        "the autopilot never added a DIMM, though virtio-mem holds only 512 MiB",
    )?;
    check(
        peak_total >= boot_total + 768 * 1024,
        &guest,
        format!("MemTotal never grew past virtio-mem's 512 MiB: peak {peak_total} KiB"),
    )?;
    // After the release: virtio-mem unplugged, every DIMM ejected, MemTotal at the boot size.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut status = memory_status(&guest)?;
    let mut total = mem_total_kib(&guest)?;
    let mut rss = guest.vmm_rss_kib()?;
    while (total > boot_total || !status.dimms.is_empty() || rss > rss_ready + 256 * 1024)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_secs(5));
        status = memory_status(&guest)?;
        total = mem_total_kib(&guest)?;
        rss = guest.vmm_rss_kib()?;
    }
    let online = guest.run(
        "cat /sys/devices/system/memory/memory*/state | grep -c online",
        CMD,
    )?;
    eprintln!(
        "autopilot with DIMMs: after the release MemTotal {total} KiB, {} DIMMs, virtio-mem \
         {} MiB plugged, {} online memory blocks, tidevm RSS {} MiB ({} when ready; {:.0} s after the workload \
         started)",
        status.dimms.len(),
        status
            .virtio_mem
            .first()
            .map_or(0, |v| v.plugged_size >> 20),
        online.trim(),
        rss >> 10,
        rss_ready >> 10,
        started.elapsed().as_secs_f64()
    );
    check(
        status.dimms.is_empty() && total == boot_total,
        &guest,
        format!(
            "after the release MemTotal {total} KiB (boot {boot_total}), DIMMs {:?}",
            status.dimms
        ),
    )?;
    check(
        rss <= rss_ready + 256 * 1024,
        &guest,
        format!(
            "RSS {} MiB after the release, {} MiB when ready",
            rss >> 10,
            rss_ready >> 10
        ),
    )?;
    finish(&guest)
}
