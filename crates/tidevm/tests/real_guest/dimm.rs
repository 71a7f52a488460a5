//! Issue 5: ACPI DIMM hot(un)plug with the real Linux ACPI memory hotplug driver.

use std::time::Duration;

use tidevm_api::{DimmInfo, DimmState, MemoryStatus, ResizeShortfall, VmInfo};
use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use crate::foundation::{check, mem_total_kib, memtouch, BOOT, CMD};
use crate::virtio_mem::{boot_two_nodes, finish, node_mem_total_kib, wait_mem_total};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("dimm_add_use_remove", add_use_remove),
    (
        "dimm_numa_reboot_and_refused_eject",
        reboot_and_refused_eject,
    ),
    ("dimm_planned_past_virtio_mem", planned_past_virtio_mem),
];

const GIB_KIB: u64 = 1024 * 1024;

fn boot_with_slots<'a>(lane: &'a Lane, memory: &str) -> Result<Guest<'a>> {
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 1,
        memory: memory.into(),
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    Ok(guest)
}

/// `tidevm ctl ...` in the lane with a timeout long enough for `--wait`.
fn ctl_long(guest: &Guest, args: &str) -> Result<(i32, String)> {
    let args: Vec<&str> = args.split_whitespace().collect();
    guest.ctl_waiting(&args, Duration::from_secs(200))
}

fn info(guest: &Guest) -> Result<VmInfo> {
    let (rc, out) = guest.ctl(&["info"])?;
    check(rc == 0, guest, format!("ctl info failed: {out}"))?;
    serde_json::from_str(&out).map_err(|e| guest.failure(format!("bad info JSON ({e}): {out}")))
}

fn dimm(guest: &Guest, id: &str) -> Result<Option<DimmInfo>> {
    Ok(info(guest)?
        .dimms
        .ok_or_else(|| guest.failure("GET /vm/info has no dimms section"))?
        .dimms
        .into_iter()
        .find(|d| d.id == id))
}

fn add(guest: &Guest, size: &str, id: &str) -> Result<String> {
    let (rc, out) = ctl_long(
        guest,
        &format!("dimm-add {size} --id {id} --wait --timeout 150"),
    )?;
    if rc != 0 {
        let acpi = guest
            .run("dmesg | grep -iE 'acpi|memory|ged' | tail -40", CMD)
            .unwrap_or_else(|e| e.to_string());
        return Err(guest.failure(format!(
            "dimm-add {size} {id} failed ({rc}): {out}\nguest ACPI log:\n{acpi}"
        )));
    }
    Ok(out)
}

/// Two 1 GiB DIMMs: MemTotal grows by 2 GiB, the guest writes a pattern through them, one
/// is removed and MemTotal and the host RSS fall.
fn add_use_remove(lane: &Lane) -> Result<()> {
    let guest = boot_with_slots(lane, "512M,slots=4,maxmem=3G")?;
    let devices = guest.run("ls /sys/bus/acpi/devices/ | grep -c PNP0C80", CMD)?;
    check(
        devices.trim() == "4",
        &guest,
        format!("the guest sees {} PNP0C80 devices, not 4", devices.trim()),
    )?;
    let before = mem_total_kib(&guest)?;
    // Two clients add a DIMM with the same id at the same moment: the control loop takes
    // them one after the other, so exactly one gets it and the other a 409 naming the id.
    let (_, raced) = guest.lane().sh(
        &format!(
            "t={tidevm}; s={socket}; d=$(dirname $s)\n\
             $t ctl --api-socket $s dimm-add 1G --id d0 > $d/race-a 2>&1 & a=$!\n\
             $t ctl --api-socket $s dimm-add 1G --id d0 > $d/race-b 2>&1 & b=$!\n\
             wait $a; ra=$?; wait $b; rb=$?\n\
             echo \"rc $ra $rb\"; cat $d/race-a $d/race-b; rm -f $d/race-a $d/race-b",
            tidevm = tidevm_testlane::text::shell_quote(guest.lane().lane_tidevm()),
            socket = tidevm_testlane::text::shell_quote(&guest.api_socket()),
        ),
        CMD,
    )?;
    let exactly_one = raced.contains("rc 0 1") || raced.contains("rc 1 0");
    check(
        exactly_one && raced.contains("a DIMM with id d0 exists"),
        &guest,
        format!("two concurrent adds of d0: {raced}"),
    )?;
    let out = add(&guest, "1G", "d1")?;
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let grown = wait_mem_total(&guest, before + 2 * GIB_KIB)?;
    check(
        grown - before == 2 * GIB_KIB,
        &guest,
        format!("MemTotal grew by {} KiB, not 2 GiB", grown - before),
    )?;
    let online = guest.run(
        "cat /sys/devices/system/memory/memory*/state | grep -c online",
        CMD,
    )?;
    eprintln!("online memory blocks with two DIMMs: {}", online.trim());

    // The guest's 512 MiB of boot RAM cannot hold this: most of it lands on the DIMMs.
    memtouch(&guest, 640, Duration::from_secs(600), "pattern check")?;
    let (d0, d1) = (
        dimm(&guest, "d0")?.ok_or_else(|| guest.failure("d0 is gone"))?,
        dimm(&guest, "d1")?.ok_or_else(|| guest.failure("d1 is gone"))?,
    );
    check(
        d0.state == DimmState::Active && d1.state == DimmState::Active,
        &guest,
        format!("DIMMs not active: {:?} {:?}", d0.state, d1.state),
    )?;
    let victim = if d0.resident_bytes >= d1.resident_bytes {
        d0
    } else {
        d1
    };
    let resident_mib = victim.resident_bytes >> 20;
    check(
        resident_mib >= 64,
        &guest,
        format!(
            "only {resident_mib} MiB of {} resident after the guest wrote 640 MiB",
            victim.id
        ),
    )?;
    let rss_before = guest.vmm_rss_kib()? / 1024;
    let (rc, out) = ctl_long(
        &guest,
        &format!("dimm-del {} --wait --timeout 150", victim.id),
    )?;
    check(
        rc == 0,
        &guest,
        format!("dimm-del {} failed ({rc}): {out}", victim.id),
    )?;
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let after = mem_total_kib(&guest)?;
    check(
        after - before == GIB_KIB,
        &guest,
        format!(
            "MemTotal is {} KiB above boot with one DIMM left",
            after - before
        ),
    )?;
    let rss_after = guest.vmm_rss_kib()? / 1024;
    eprintln!(
        "tidevm RSS {rss_before} -> {rss_after} MiB after removing {} ({resident_mib} MiB resident)",
        victim.id
    );
    check(
        rss_before - rss_after >= resident_mib * 8 / 10,
        &guest,
        format!(
            "RSS fell by {} MiB, less than 80% of the {resident_mib} MiB the DIMM held",
            rss_before - rss_after
        ),
    )?;
    check(
        dimm(&guest, &victim.id)?.is_none(),
        &guest,
        "the removed DIMM is still listed",
    )?;
    // The slot and the room are free again.
    add(&guest, "1G", "d2")?;
    check(
        wait_mem_total(&guest, before + 2 * GIB_KIB)? == before + 2 * GIB_KIB,
        &guest,
        "a DIMM added after a removal did not come online",
    )?;
    finish(&guest)
}

/// A DIMM on NUMA node 1 shows up on that node and survives a reboot (the guest finds it in
/// its boot-time ACPI scan); an eject the guest refuses leaves it in place and the VM
/// running; once allowed, the eject goes through.
fn reboot_and_refused_eject(lane: &Lane) -> Result<()> {
    // Two NUMA nodes, the DIMM on node 1: its memory must show up there (ACPI _PXM).
    let guest = boot_two_nodes(lane, "512M,slots=2,maxmem=2G", "256M", &[])?;
    let before = mem_total_kib(&guest)?;
    let node1_before = node_mem_total_kib(&guest, 1)?;
    let (rc, out) = ctl_long(
        &guest,
        "dimm-add 512M --id d0 --node 1 --wait --timeout 150",
    )?;
    check(
        rc == 0,
        &guest,
        format!("dimm-add on node 1 failed ({rc}): {out}"),
    )?;
    check(
        wait_mem_total(&guest, before + GIB_KIB / 2)? == before + GIB_KIB / 2,
        &guest,
        "MemTotal did not grow by 512 MiB",
    )?;
    let node1 = node_mem_total_kib(&guest, 1)?;
    check(
        node1 - node1_before == GIB_KIB / 2,
        &guest,
        format!(
            "node 1 grew by {} KiB, not by the 512 MiB DIMM",
            node1 - node1_before
        ),
    )?;
    eprintln!("DIMM on node 1: node 1 MemTotal {node1_before} -> {node1} KiB");

    let mark = guest.console_len()?;
    guest.send_line("reboot")?;
    guest.wait_ready_from(mark, BOOT)?;
    let rebooted = wait_mem_total(&guest, before + GIB_KIB / 2)?;
    check(
        rebooted == before + GIB_KIB / 2,
        &guest,
        format!(
            "after the reboot MemTotal is {rebooted} KiB, expected {} KiB with the DIMM",
            before + GIB_KIB / 2
        ),
    )?;
    let state = dimm(&guest, "d0")?.map(|d| d.state);
    check(
        state == Some(DimmState::Active),
        &guest,
        format!("d0 after the reboot: {state:?}"),
    )?;

    // The guest refuses: memory hot-remove switched off in its ACPI layer.
    guest.run("echo 0 > /sys/firmware/acpi/hotplug/memory/enabled", CMD)?;
    let (rc, out) = ctl_long(&guest, "dimm-del d0 --wait --timeout 120")?;
    check(
        rc != 0 && out.contains("refused"),
        &guest,
        format!("a refused eject was not reported ({rc}): {out}"),
    )?;
    eprintln!("refused eject: {}", out.lines().last().unwrap_or(""));
    let kept = dimm(&guest, "d0")?.ok_or_else(|| guest.failure("d0 vanished"))?;
    check(
        kept.state == DimmState::Active && kept.removal_refused.is_some(),
        &guest,
        format!(
            "after the refusal d0 is {:?} ({:?})",
            kept.state, kept.removal_refused
        ),
    )?;
    check(
        mem_total_kib(&guest)? == before + GIB_KIB / 2,
        &guest,
        "MemTotal changed although the eject was refused",
    )?;
    memtouch(
        &guest,
        64,
        Duration::from_secs(300),
        "the guest is not well after the refusal",
    )?;

    guest.run("echo 1 > /sys/firmware/acpi/hotplug/memory/enabled", CMD)?;
    let (rc, out) = ctl_long(&guest, "dimm-del d0 --wait --timeout 150")?;
    check(rc == 0, &guest, format!("dimm-del d0 failed ({rc}): {out}"))?;
    check(
        mem_total_kib(&guest)? == before,
        &guest,
        "MemTotal not back to boot size after the eject",
    )?;
    finish(&guest)
}

pub(crate) fn memory_status(guest: &Guest) -> Result<MemoryStatus> {
    let (rc, out) = guest.ctl(&["memory"])?;
    check(rc == 0, guest, format!("ctl memory failed: {out}"))?;
    serde_json::from_str(&out).map_err(|e| guest.failure(format!("bad memory JSON ({e}): {out}")))
}

fn online_blocks(guest: &Guest) -> Result<u64> {
    let online = guest.run(
        "cat /sys/devices/system/memory/memory*/state | grep -c online",
        CMD,
    )?;
    online
        .trim()
        .parse()
        .map_err(|e| guest.failure(format!("online blocks {online:?}: {e}")))
}

/// Issue 11: one size for the whole guest, past what virtio-mem can plug. A 256 MiB
/// virtio-mem device and two DIMM slots: `ctl memory 1280M --wait` fills virtio-mem and adds
/// a 512 MiB DIMM for the rest; shrinking back to the boot size unplugs virtio-mem first and
/// ejects the DIMM last: refused by the guest at first (a partial result that says why),
/// then allowed, and the host gets the DIMM's memory back.
fn planned_past_virtio_mem(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 1,
        memory: "512M,slots=2,maxmem=2G".into(),
        extra_args: vec!["--virtio-mem".into(), "id=mem0,size=256M".into()],
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let status = memory_status(&guest)?;
    // 512 MiB boot + 256 MiB virtio-mem + a DIMM of all maxmem leaves (1.5 GiB).
    check(
        status.max_bytes == (512 + 256 + 1536) << 20,
        &guest,
        format!(
            "GET /vm/memory max_bytes {} leaves out the DIMM slots",
            status.max_bytes
        ),
    )?;
    let before = mem_total_kib(&guest)?;
    let blocks_before = online_blocks(&guest)?;

    let (rc, out) = ctl_long(&guest, "memory 1280M --wait --timeout 150")?;
    check(
        rc == 0,
        &guest,
        format!("memory 1280M failed ({rc}): {out}"),
    )?;
    check(
        out.contains("set_virtio_mem") && out.contains("add_dimm"),
        &guest,
        format!("the plan to 1280M is not virtio-mem then a DIMM: {out}"),
    )?;
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let grown = wait_mem_total(&guest, before + 768 * 1024)?;
    check(
        grown - before == 768 * 1024,
        &guest,
        format!("MemTotal grew by {} KiB, not 768 MiB", grown - before),
    )?;
    let blocks = online_blocks(&guest)?;
    check(
        blocks - blocks_before == 6,
        &guest,
        format!(
            "{blocks_before} -> {blocks} online memory blocks, not 6 more (2 virtio-mem, 4 DIMM)"
        ),
    )?;
    let status = memory_status(&guest)?;
    let planned = status.dimms.first().cloned();
    check(
        status.dimms.len() == 1
            && planned
                .as_ref()
                .is_some_and(|d| d.size == 512 << 20 && d.state == DimmState::Active)
            && status.virtio_mem[0].plugged_size == 256 << 20,
        &guest,
        format!("after the plan: {status:?}"),
    )?;
    let planned = planned.map(|d| d.id).unwrap_or_default();

    // Most of this lands beyond the 512 MiB boot RAM: on virtio-mem and the DIMM.
    memtouch(&guest, 640, Duration::from_secs(300), "pattern check")?;
    let dimm_resident_mib = dimm(&guest, &planned)?
        .ok_or_else(|| guest.failure("the planned DIMM is not listed"))?
        .resident_bytes
        >> 20;
    let rss_grown = guest.vmm_rss_kib()? / 1024;

    // First with memory hot-remove switched off in the guest: virtio-mem unplugs, the eject
    // is refused, and the partial result says so.
    guest.run("echo 0 > /sys/firmware/acpi/hotplug/memory/enabled", CMD)?;
    let (rc, out) = ctl_long(&guest, "memory 512M --wait --timeout 150")?;
    let unplug = out.find("set_virtio_mem");
    let eject = out.find("eject_dimm");
    check(
        unplug.is_some() && eject.is_some() && unplug < eject,
        &guest,
        format!("the shrink does not unplug virtio-mem before it ejects the DIMM: {out}"),
    )?;
    check(
        rc == 2 && out.contains("refused to eject") && out.contains("settled at 1024 MiB"),
        &guest,
        format!("a refused eject was not reported as a partial result ({rc}): {out}"),
    )?;
    eprintln!("partial: {}", out.lines().last().unwrap_or(""));
    let status = memory_status(&guest)?;
    check(
        status.virtio_mem[0].plugged_size == 0
            && status.target_total_bytes == Some(512 << 20)
            && status.shortfalls.iter().any(|s| {
                s.device == planned && matches!(s.cause, ResizeShortfall::EjectRefused { .. })
            }),
        &guest,
        format!("GET /vm/memory after the refusal: {status:?}"),
    )?;

    guest.run("echo 1 > /sys/firmware/acpi/hotplug/memory/enabled", CMD)?;
    let (rc, out) = ctl_long(&guest, "memory 512M --wait --timeout 150")?;
    check(rc == 0, &guest, format!("memory 512M failed ({rc}): {out}"))?;
    check(
        out.contains("eject_dimm") && !out.contains("set_virtio_mem"),
        &guest,
        format!("the second shrink should only eject the DIMM: {out}"),
    )?;
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let after = mem_total_kib(&guest)?;
    check(
        after == before,
        &guest,
        format!("MemTotal {after} KiB after the shrink, not the boot {before} KiB"),
    )?;
    check(
        online_blocks(&guest)? == blocks_before,
        &guest,
        "online memory blocks not back to the boot count",
    )?;
    let status = memory_status(&guest)?;
    check(
        status.dimms.is_empty() && status.virtio_mem[0].plugged_size == 0,
        &guest,
        format!("after the shrink: {status:?}"),
    )?;
    let rss_after = guest.vmm_rss_kib()? / 1024;
    eprintln!(
        "tidevm RSS {rss_grown} -> {rss_after} MiB after the shrink (the DIMM held {dimm_resident_mib} MiB)"
    );
    check(
        rss_grown.saturating_sub(rss_after) >= dimm_resident_mib * 8 / 10,
        &guest,
        format!(
            "RSS fell by {} MiB, less than 80% of the {dimm_resident_mib} MiB the DIMM held",
            rss_grown.saturating_sub(rss_after)
        ),
    )?;
    finish(&guest)
}
