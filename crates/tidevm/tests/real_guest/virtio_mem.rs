//! Issue 3: virtio-mem with the real Linux driver.

use std::time::Duration;

use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use crate::foundation::{check, mem_total_kib, BOOT, CMD};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[("virtio_mem_plug_unplug", plug_unplug)];

fn boot_with<'a>(lane: &'a Lane, memory: &str, extra_args: &[&str]) -> Result<Guest<'a>> {
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 1,
        memory: memory.into(),
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    Ok(guest)
}

/// Resizes `id` to `size` through the CLI and waits for the guest to get there.
pub fn resize(guest: &Guest, id: &str, size: &str) -> Result<String> {
    let (rc, out) = guest.ctl(&["resize-mem", id, size, "--wait", "--timeout", "240"])?;
    check(
        rc == 0,
        guest,
        format!("resize-mem {id} {size} failed ({rc}): {out}"),
    )?;
    Ok(out)
}

fn plug_unplug(lane: &Lane) -> Result<()> {
    let guest = boot_with(lane, "512M", &["--virtio-mem", "id=mem0,size=8G"])?;
    let lsmod = guest.run("ls /sys/bus/virtio/drivers/virtio_mem/", CMD)?;
    check(
        lsmod.contains("virtio"),
        &guest,
        format!("virtio_mem did not bind: {lsmod}"),
    )?;
    let before = mem_total_kib(&guest)?;
    let rss_before = guest.vmm_rss_kib()?;

    resize(&guest, "mem0", "4G")?;
    let plugged = mem_total_kib(&guest)?;
    check(
        plugged - before == 4 * 1024 * 1024,
        &guest,
        format!("MemTotal grew by {} KiB, not 4 GiB", plugged - before),
    )?;
    let online = guest.run(
        "cat /sys/devices/system/memory/memory*/state | grep -c online",
        CMD,
    )?;
    eprintln!(
        "memory blocks online after plugging 4 GiB: {}",
        online.trim()
    );

    resize(&guest, "mem0", "1G")?;
    let shrunk = mem_total_kib(&guest)?;
    check(
        shrunk - before == 1024 * 1024,
        &guest,
        format!(
            "MemTotal is {} KiB above boot after unplugging to 1 GiB",
            shrunk - before
        ),
    )?;
    let rss_after = guest.vmm_rss_kib()?;
    eprintln!("tidevm RSS: {rss_before} KiB at boot, {rss_after} KiB with 1 GiB plugged");

    let (rc, info) = guest.ctl(&["info"])?;
    check(
        rc == 0 && info.contains("\"plugged_size\": 1073741824"),
        &guest,
        format!("info: {info}"),
    )?;
    guest.poweroff(Duration::from_secs(120)).map(|_| ())
}
