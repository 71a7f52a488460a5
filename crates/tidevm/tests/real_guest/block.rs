//! Issue 12: virtio-blk with the real Linux driver: a raw image written and read back in the
//! guest, checked on the host file and in a new VMM process; a discard that punches a hole
//! in the image; a read-only disk the guest cannot write; the data across a reboot (the VM
//! rebuilt in the same process); and a guest whose root file system is an ext4 disk.

use std::time::Duration;

use tidevm_api::{DiskInfo, VmInfo};
use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use crate::foundation::{check, md5_of, BOOT, CMD};
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("block_write_read_readonly_new_vmm", write_read),
    ("block_data_survives_reboot", survives_reboot),
    ("block_root_disk_write_reboot", root_disk),
];

/// Images in the lane (L1's /run, or this host's for the direct lane).
const DATA_IMAGE: &str = "/run/tidevm-blk-data.img";
const RO_IMAGE: &str = "/run/tidevm-blk-ro.img";
const ROOT_IMAGE: &str = "/run/tidevm-root.img";
/// Where the pattern goes on the data disk, in MiB, and its size.
const PATTERN_AT_MIB: u64 = 8;
const PATTERN_MIB: u64 = 4;
const IO: Duration = Duration::from_secs(180);

fn info(guest: &Guest) -> Result<VmInfo> {
    let (rc, out) = guest.ctl(&["info"])?;
    check(rc == 0, guest, format!("ctl info failed: {out}"))?;
    serde_json::from_str(&out).map_err(|e| guest.failure(format!("bad info JSON ({e}): {out}")))
}

fn disk(guest: &Guest, id: &str) -> Result<DiskInfo> {
    info(guest)?
        .disks
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| guest.failure(format!("GET /vm/info lists no disk {id}")))
}

/// Where the discard test writes and then discards a copy of the pattern, in MiB.
const DISCARD_AT_MIB: u64 = 32;

/// The data image's allocated size on the lane's host, in KiB (`du`, not its length).
fn allocated_kib(lane: &Lane, guest: &Guest) -> Result<u64> {
    let (rc, out) = lane.sh(&format!("du -k {DATA_IMAGE}"), CMD)?;
    out.split_whitespace()
        .next()
        .and_then(|kib| kib.parse().ok())
        .filter(|_| rc == 0)
        .ok_or_else(|| guest.failure(format!("du -k {DATA_IMAGE}: {out}")))
}

/// Writes a random pattern to /dev/vda and makes it durable; returns its checksum.
fn write_pattern(guest: &Guest) -> Result<String> {
    let written = guest.run(
        &format!(
            "dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MIB} 2>/dev/null && \
             md5sum /tmp/pattern"
        ),
        IO,
    )?;
    guest.run(
        &format!(
            "dd if=/tmp/pattern of=/dev/vda bs=1M seek={PATTERN_AT_MIB} conv=notrunc,fsync \
             2>/dev/null && sync"
        ),
        IO,
    )?;
    Ok(md5_of(&written))
}

/// The pattern's checksum as the guest reads it back from /dev/vda, past its page cache.
fn guest_reads_pattern(guest: &Guest) -> Result<String> {
    let out = guest.run(
        &format!(
            "dd if=/dev/vda bs=1M skip={PATTERN_AT_MIB} count={PATTERN_MIB} iflag=direct \
             2>/dev/null | md5sum"
        ),
        IO,
    )?;
    Ok(md5_of(&out))
}

fn boot<'a>(lane: &'a Lane, disks: &[&str]) -> Result<Guest<'a>> {
    let mut extra_args = Vec::new();
    for d in disks {
        extra_args.push("--disk".to_string());
        extra_args.push(d.to_string());
    }
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 1,
        memory: "512M".into(),
        extra_args,
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    Ok(guest)
}

/// Reboots the guest from inside; on a timeout, says what the VMM and the console show.
fn reboot(lane: &Lane, guest: &Guest, disk_id: &str) -> Result<()> {
    let mark = guest.console_len()?;
    guest.send_line("reboot")?;
    let Err(e) = guest.wait_ready_from(mark, BOOT) else {
        return Ok(());
    };
    let socket = guest.api_socket();
    let dir = socket.trim_end_matches("/api.sock");
    let (_, state) = lane.sh(
        &format!(
            "grep State /proc/{pid}/status; wc -c < {dir}/console.log; \
             tail -n 30 {dir}/console.log | cut -c1-160",
            pid = guest.pid(),
        ),
        CMD,
    )?;
    let counters = disk(guest, disk_id).map_or_else(|e| e.to_string(), |d| format!("{d:?}"));
    Err(guest.failure(format!(
        "reboot: {e}\nconsole bytes before the reboot: {mark}\nVMM and console now:\n{state}\n\
         disk now: {counters}"
    )))
}

fn write_read(lane: &Lane) -> Result<()> {
    with_images(lane, scenario)
}

fn survives_reboot(lane: &Lane) -> Result<()> {
    with_images(lane, reboot_scenario)
}

/// Runs `scenario` with fresh images, removed afterwards.
fn with_images(lane: &Lane, scenario: fn(&Lane) -> Result<()>) -> Result<()> {
    let (rc, out) = lane.sh(
        &format!(
            "rm -f {DATA_IMAGE} {RO_IMAGE} && truncate -s 64M {DATA_IMAGE} && \
             truncate -s 16M {RO_IMAGE}"
        ),
        CMD,
    )?;
    if rc != 0 {
        return Err(lane_failure(lane, format!("creating the images: {out}")));
    }
    let result = scenario(lane);
    let _ = lane.sh(&format!("rm -f {DATA_IMAGE} {RO_IMAGE}"), CMD);
    result
}

fn lane_failure(lane: &Lane, message: String) -> tidevm_testlane::LaneError {
    tidevm_testlane::LaneError::Failed(format!(
        "{message}\nL1 console:\n{}",
        lane.l1_console_tail(20)
    ))
}

fn scenario(lane: &Lane) -> Result<()> {
    let guest = boot(
        lane,
        &[
            &format!("path={DATA_IMAGE},id=data"),
            &format!("path={RO_IMAGE},id=ro,readonly=on"),
        ],
    )?;
    // The driver sees both disks as configured: size, serial (GET_ID), read-only flag,
    // discard support.
    let size = guest.run("cat /sys/block/vda/size", CMD)?;
    check(size.trim() == "131072", &guest, format!("vda size {size}"))?;
    let serial = guest.run("cat /sys/block/vda/serial", CMD)?;
    check(
        serial.trim() == "data",
        &guest,
        format!("vda serial {serial}"),
    )?;
    let ro = guest.run("cat /sys/block/vdb/ro", CMD)?;
    check(ro.trim() == "1", &guest, format!("vdb ro {ro}"))?;
    let discard = guest.run("cat /sys/block/vda/queue/discard_max_bytes", CMD)?;
    check(
        discard.trim().parse::<u64>().is_ok_and(|n| n > 0),
        &guest,
        format!("vda discard_max_bytes {discard}"),
    )?;

    // Write a random pattern, make it durable, read it back past the page cache.
    let written = write_pattern(&guest)?;
    let read = guest_reads_pattern(&guest)?;
    check(
        read == written && written.len() == 32,
        &guest,
        format!("read back {read}, wrote {written}"),
    )?;
    // The host file holds the same bytes.
    let (rc, host) = lane.sh(
        &format!(
            "dd if={DATA_IMAGE} bs=1M skip={PATTERN_AT_MIB} count={PATTERN_MIB} 2>/dev/null \
             | md5sum"
        ),
        CMD,
    )?;
    check(
        rc == 0 && md5_of(&host) == written,
        &guest,
        format!("host image has {host}, guest wrote {written}"),
    )?;
    // A discard punches a hole in the image: L1's /run is a tmpfs, which supports it.
    guest.run(
        &format!(
            "dd if=/tmp/pattern of=/dev/vda bs=1M seek={DISCARD_AT_MIB} conv=notrunc,fsync \
             2>/dev/null && sync"
        ),
        IO,
    )?;
    let allocated_before = allocated_kib(lane, &guest)?;
    guest.run(
        &format!(
            "blkdiscard -o {} -l {} /dev/vda",
            DISCARD_AT_MIB << 20,
            PATTERN_MIB << 20
        ),
        IO,
    )?;
    let allocated_after = allocated_kib(lane, &guest)?;
    eprintln!(
        "discard of {PATTERN_MIB} MiB: image allocated {allocated_before} -> {allocated_after} KiB"
    );
    check(
        allocated_before >= allocated_after + (PATTERN_MIB << 10),
        &guest,
        format!(
            "the discard did not free the image's blocks: {allocated_before} -> \
             {allocated_after} KiB"
        ),
    )?;

    // The read-only disk: the guest cannot write it, and nothing changed on the host.
    let (status, out) = guest.run_status(
        "dd if=/dev/urandom of=/dev/vdb bs=4k count=1 conv=fsync",
        IO,
    )?;
    check(
        status != 0,
        &guest,
        format!("writing the read-only disk succeeded: {out}"),
    )?;
    let (_, ro_host) = lane.sh(
        &format!(
            "a=$(md5sum < {RO_IMAGE}); b=$(head -c 16777216 /dev/zero | md5sum); \
             [ \"$a\" = \"$b\" ] && echo all-zero || echo \"changed: $a\""
        ),
        CMD,
    )?;
    check(
        ro_host.trim() == "all-zero",
        &guest,
        format!("read-only image: {ro_host}"),
    )?;

    // The host's counters.
    let data = disk(&guest, "data")?;
    let c = data.counters;
    let pattern_bytes = PATTERN_MIB << 20;
    check(
        !data.readonly
            && data.capacity_bytes == 64 << 20
            && c.bytes_written >= pattern_bytes
            && c.bytes_read >= pattern_bytes
            && c.write_requests > 0
            && c.read_requests > 0
            && c.flush_requests > 0
            && c.get_id_requests > 0
            && c.discard_requests > 0
            && c.io_errors == 0
            && c.malformed == 0,
        &guest,
        format!("data disk counters: {data:?}"),
    )?;
    let ro_disk = disk(&guest, "ro")?;
    check(
        ro_disk.readonly && ro_disk.counters.write_requests == 0,
        &guest,
        format!("read-only disk counters: {ro_disk:?}"),
    )?;
    eprintln!("disk counters after the writes: {data:?}");

    let code = guest.poweroff(Duration::from_secs(120))?;
    check(code == 0, &guest, format!("poweroff exit code {code}"))?;
    drop(guest);

    // A new VMM process on the same image.
    let guest = boot(lane, &[&format!("path={DATA_IMAGE},id=data")])?;
    let again = guest_reads_pattern(&guest)?;
    check(
        again == written,
        &guest,
        format!("new VMM read {again}, wrote {written}"),
    )?;
    let code = guest.poweroff(Duration::from_secs(120))?;
    check(code == 0, &guest, format!("poweroff exit code {code}"))
}

/// A reboot rebuilds the VM in the same process and opens the image again: what the guest
/// wrote before is there after.
fn reboot_scenario(lane: &Lane) -> Result<()> {
    let guest = boot(lane, &[&format!("path={DATA_IMAGE},id=data")])?;
    let written = write_pattern(&guest)?;
    reboot(lane, &guest, "data")?;
    let after_reboot = guest_reads_pattern(&guest)?;
    check(
        after_reboot == written && written.len() == 32,
        &guest,
        format!("after reboot read {after_reboot}, wrote {written}"),
    )?;
    let data = disk(&guest, "data")?;
    check(
        data.counters.bytes_read >= PATTERN_MIB << 20 && data.counters.io_errors == 0,
        &guest,
        format!("counters after the reboot: {data:?}"),
    )?;
    let code = guest.poweroff(Duration::from_secs(120))?;
    check(code == 0, &guest, format!("poweroff exit code {code}"))
}

fn root_disk(lane: &Lane) -> Result<()> {
    lane.copy_root_disk_to(ROOT_IMAGE, CMD)?;
    let result = root_disk_scenario(lane);
    let _ = lane.sh(&format!("rm -f {ROOT_IMAGE}"), CMD);
    result
}

/// The root file system is the project's ext4 disk image: the initramfs's /init mounts
/// /dev/vda and switches to it. A file written and fsynced there is read back after a
/// reboot.
fn root_disk_scenario(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "512M".into(),
        extra_args: vec!["--disk".into(), format!("path={ROOT_IMAGE},id=root")],
        extra_cmdline: "root=/dev/vda".into(),
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let root_is_the_disk = |guest: &Guest| -> Result<()> {
        let mount = guest.run("grep ' / ' /proc/mounts", CMD)?;
        check(
            mount.contains("/dev/vda / ext4 rw"),
            guest,
            format!("/ is not the ext4 disk, read-write: {mount}"),
        )
    };
    root_is_the_disk(&guest)?;
    let written = guest.run(
        "dd if=/dev/urandom of=/root/data bs=1M count=2 conv=fsync 2>/dev/null && \
         md5sum /root/data",
        IO,
    )?;
    reboot(lane, &guest, "root")?;
    root_is_the_disk(&guest)?;
    let read = guest.run("md5sum /root/data", IO)?;
    eprintln!(
        "root disk: wrote {}, read after the reboot {}",
        md5_of(&written),
        md5_of(&read)
    );
    check(
        md5_of(&read) == md5_of(&written) && md5_of(&written).len() == 32,
        &guest,
        format!("after the reboot /root/data is {read}, it was {written}"),
    )?;
    let root = disk(&guest, "root")?;
    check(
        root.counters.io_errors == 0 && root.counters.flush_requests > 0,
        &guest,
        format!("root disk counters: {root:?}"),
    )?;
    let code = guest.poweroff(Duration::from_secs(120))?;
    check(code == 0, &guest, format!("poweroff exit code {code}"))
}
