//! Issue 3: virtio-mem with the real Linux driver.

use std::time::Duration;

use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use crate::foundation::{check, mem_total_kib, memtouch, rss_mib, BOOT, CMD};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("virtio_mem_plug_unplug", plug_unplug),
    (
        "virtio_mem_reboot_with_memory_plugged",
        reboot_with_memory_plugged,
    ),
    ("virtio_mem_numa_two_nodes", numa_two_nodes),
    ("virtio_mem_hugetlbfs", hugetlbfs_backing),
];

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

/// Waits until the guest's MemTotal is `expected` KiB: the device reports a block plugged
/// when it acknowledges it, and the guest onlines the memory a moment later.
pub fn wait_mem_total(guest: &Guest, expected: u64) -> Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let total = mem_total_kib(guest)?;
        if total == expected || std::time::Instant::now() > deadline {
            return Ok(total);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Powers the guest off at the end of a scenario whose subject is not power-off (the
/// foundation scenarios assert that); a guest that does not go down is killed, with a note.
pub fn finish(guest: &Guest) -> Result<()> {
    guest.check_no_triple_fault_since(0)?;
    if let Err(e) = guest.poweroff(Duration::from_secs(120)) {
        eprintln!(
            "NOTE: the guest did not power off cleanly; killed it ({})",
            e.to_string().lines().next().unwrap_or("")
        );
        let _ = guest.kill();
    }
    Ok(())
}

/// Resizes `id` to `size` through the CLI and waits for the guest to get there.
pub fn resize(guest: &Guest, id: &str, size: &str) -> Result<String> {
    // Unplugging gigabytes in the nested lane takes a while: more than the harness's quick
    // command timeout, so call the CLI through the lane with a longer one.
    let (rc, out) = guest.ctl_waiting(
        &["resize-mem", id, size, "--wait", "--timeout", "280"],
        Duration::from_secs(300),
    )?;
    check(
        rc == 0,
        guest,
        format!("resize-mem {id} {size} failed ({rc}): {out}"),
    )?;
    Ok(out)
}

fn plugged_bytes(guest: &Guest, id: &str) -> Result<u64> {
    let (rc, info) = guest.ctl(&["info"])?;
    check(rc == 0, guest, format!("ctl info failed: {info}"))?;
    let key = format!("\"id\": \"{id}\"");
    let after = info
        .split(&key)
        .nth(1)
        .ok_or_else(|| guest.failure(format!("no device {id} in {info}")))?;
    after
        .split("\"plugged_size\": ")
        .nth(1)
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| guest.failure(format!("no plugged_size in {info}")))
}

/// Plug 4 GiB and use it, unplug to 1 GiB and to 0 and see the host RSS fall, then plug and
/// unplug again without the RSS growing. The workloads are small on purpose: the nested lane
/// runs the guest at a tenth of native speed.
fn plug_unplug(lane: &Lane) -> Result<()> {
    let guest = boot_with(lane, "512M", &["--virtio-mem", "id=mem0,size=8G"])?;
    let bound = guest.run("ls /sys/bus/virtio/drivers/virtio_mem/", CMD)?;
    check(
        bound.contains("virtio"),
        &guest,
        format!("virtio_mem did not bind: {bound}"),
    )?;
    let before = mem_total_kib(&guest)?;

    resize(&guest, "mem0", "4G")?;
    let plugged = wait_mem_total(&guest, before + 4 * 1024 * 1024)?;
    check(
        plugged - before == 4 * 1024 * 1024,
        &guest,
        format!("MemTotal grew by {} KiB, not 4 GiB", plugged - before),
    )?;
    let blocks = guest.run("ls -d /sys/devices/system/memory/memory* | wc -l", CMD)?;
    eprintln!("memory blocks with 4 GiB plugged: {}", blocks.trim());

    // User memory prefers ZONE_MOVABLE, where the plugged blocks are: the pattern lands there.
    memtouch(&guest, 384, Duration::from_secs(600), "pattern check")?;
    let rss_filled = rss_mib(&guest)?;

    resize(&guest, "mem0", "1G")?;
    let shrunk = wait_mem_total(&guest, before + 1024 * 1024)?;
    check(
        shrunk - before == 1024 * 1024,
        &guest,
        format!(
            "MemTotal is {} KiB above boot with 1 GiB plugged",
            shrunk - before
        ),
    )?;
    resize(&guest, "mem0", "0")?;
    check(
        mem_total_kib(&guest)? == before,
        &guest,
        "MemTotal not back to boot size",
    )?;
    let rss_empty = rss_mib(&guest)?;
    eprintln!(
        "tidevm RSS: {rss_filled} MiB after touching 384 MiB, {rss_empty} MiB after unplugging all"
    );
    check(
        rss_filled - rss_empty >= 300,
        &guest,
        format!(
            "RSS fell by only {} MiB after unplugging 384 MiB of touched memory",
            rss_filled - rss_empty
        ),
    )?;

    // Repeated plug/unplug must not leak host memory (and, in the nested lane, these cycles
    // are what once made the guest triple-fault: see `Lane::boot_guest`).
    for cycle in 1..=4 {
        resize(&guest, "mem0", "512M")?;
        let touched = guest.run("memtouch 128", Duration::from_secs(300))?;
        resize(&guest, "mem0", "0")?;
        eprintln!(
            "cycle {cycle}: {} RSS {} MiB",
            touched.trim(),
            rss_mib(&guest)?
        );
    }
    let rss_cycled = rss_mib(&guest)?;
    check(
        rss_cycled - rss_empty <= 32,
        &guest,
        format!("RSS grew from {rss_empty} to {rss_cycled} MiB over the cycles"),
    )?;
    finish(&guest)
}

/// A reboot unplugs everything; the rebooted guest plugs back up to the requested size.
fn reboot_with_memory_plugged(lane: &Lane) -> Result<()> {
    let guest = boot_with(lane, "512M", &["--virtio-mem", "id=mem0,size=4G"])?;
    let boot = mem_total_kib(&guest)?;
    resize(&guest, "mem0", "2G")?;
    check(
        wait_mem_total(&guest, boot + 2 * 1024 * 1024)? == boot + 2 * 1024 * 1024,
        &guest,
        "MemTotal did not grow by 2 GiB before the reboot",
    )?;
    let mark = guest.console_len()?;
    guest.send_line("reboot")?;
    guest.wait_ready_from(mark, BOOT)?;
    // The new boot starts with nothing plugged; the driver plugs back up to requested_size.
    resize(&guest, "mem0", "2G")?;
    check(
        plugged_bytes(&guest, "mem0")? == 2 << 30,
        &guest,
        "not 2 GiB plugged after reboot",
    )?;
    let after = wait_mem_total(&guest, boot + 2 * 1024 * 1024)?;
    check(
        after == boot + 2 * 1024 * 1024,
        &guest,
        format!(
            "MemTotal {after} KiB after reboot, expected {} KiB",
            boot + 2 * 1024 * 1024
        ),
    )?;
    finish(&guest)
}

/// Boots a guest with two vCPUs and two NUMA nodes of `node_memory` each (`memory` is the
/// `--memory` value, their sum plus any hotplug options), and waits for its shell.
pub fn boot_two_nodes<'a>(
    lane: &'a Lane,
    memory: &str,
    node_memory: &str,
    extra_args: &[&str],
) -> Result<Guest<'a>> {
    let mut args: Vec<String> = (0..2)
        .flat_map(|n| {
            [
                "--numa".into(),
                format!("node={n},cpus={n},memory={node_memory}"),
            ]
        })
        .collect();
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 2,
        memory: memory.into(),
        extra_args: args,
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    Ok(guest)
}

/// MemTotal of NUMA node `node` in KiB, from sysfs.
pub fn node_mem_total_kib(guest: &Guest, node: u32) -> Result<u64> {
    let line = guest.run(
        &format!("grep MemTotal /sys/devices/system/node/node{node}/meminfo"),
        CMD,
    )?;
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| guest.failure(format!("cannot parse node {node} MemTotal from {line:?}")))
}

/// Two nodes, one virtio-mem device each: memory plugged into each shows up on its node.
fn numa_two_nodes(lane: &Lane) -> Result<()> {
    let guest = boot_two_nodes(
        lane,
        "1G",
        "512M",
        &[
            "--virtio-mem",
            "id=mem0,size=2G,node=0",
            "--virtio-mem",
            "id=mem1,size=2G,node=1",
        ],
    )?;
    let nodes = guest.run("ls -d /sys/devices/system/node/node*", CMD)?;
    check(
        nodes.contains("node0") && nodes.contains("node1"),
        &guest,
        format!("guest does not see two nodes: {nodes}"),
    )?;
    let cpu1_node = guest.run("ls -d /sys/devices/system/node/node1/cpu1", CMD)?;
    check(
        cpu1_node.contains("cpu1"),
        &guest,
        "vCPU 1 is not on node 1",
    )?;
    let (node0, node1) = (
        node_mem_total_kib(&guest, 0)?,
        node_mem_total_kib(&guest, 1)?,
    );
    resize(&guest, "mem0", "512M")?;
    resize(&guest, "mem1", "1G")?;
    std::thread::sleep(Duration::from_secs(2));
    let grown0 = node_mem_total_kib(&guest, 0)? - node0;
    let grown1 = node_mem_total_kib(&guest, 1)? - node1;
    check(
        grown0 == 512 * 1024 && grown1 == 1024 * 1024,
        &guest,
        format!("node 0 grew by {grown0} KiB (want 512 MiB), node 1 by {grown1} KiB (want 1 GiB)"),
    )?;
    resize(&guest, "mem1", "0")?;
    check(
        node_mem_total_kib(&guest, 1)? == node1,
        &guest,
        "node 1 did not shrink back",
    )?;
    finish(&guest)
}

/// Free 2 MiB huge pages on the lane's host.
fn free_hugepages(lane: &Lane) -> Result<u64> {
    let (_, out) = lane.sh("grep HugePages_Free /proc/meminfo", CMD)?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// hugetlbfs backing: plugging takes 2 MiB pages from the host's pool, unplugging gives them
/// back.
fn hugetlbfs_backing(lane: &Lane) -> Result<()> {
    const PAGES: u64 = 600;
    let (rc, out) = lane.sh(
        &format!(
            "echo {PAGES} > /proc/sys/vm/nr_hugepages 2>&1; grep HugePages_Total /proc/meminfo"
        ),
        CMD,
    )?;
    let total: u64 = out
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if rc != 0 || total < 512 {
        let reason = format!(
            "cannot reserve 512 huge pages on the lane host ({})",
            out.trim()
        );
        eprintln!("\n*** SKIPPED: virtio_mem_hugetlbfs: {reason} ***\n");
        println!("SKIPPED: virtio_mem_hugetlbfs: {reason}");
        return Ok(());
    }
    let result = (|| {
        let guest = boot_with(
            lane,
            "512M",
            &["--virtio-mem", "id=mem0,size=2G,backing=hugetlbfs"],
        )?;
        let before = mem_total_kib(&guest)?;
        let free_before = free_hugepages(lane)?;
        resize(&guest, "mem0", "1G")?;
        check(
            mem_total_kib(&guest)? - before == 1024 * 1024,
            &guest,
            "MemTotal did not grow by 1 GiB",
        )?;
        let taken = free_before - free_hugepages(lane)?;
        check(
            taken == 512,
            &guest,
            format!("plugging 1 GiB took {taken} huge pages, not 512"),
        )?;
        memtouch(&guest, 128, Duration::from_secs(300), "pattern check")?;
        resize(&guest, "mem0", "0")?;
        let back = free_hugepages(lane)?;
        check(
            back == free_before,
            &guest,
            format!("{back} huge pages free after unplug, {free_before} before"),
        )?;
        finish(&guest)
    })();
    let _ = lane.sh("echo 0 > /proc/sys/vm/nr_hugepages", CMD);
    result
}
