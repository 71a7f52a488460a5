//! Issue 12, the point of a disk: the guest's page cache. A 2 GiB guest reads a 1 GiB file
//! from an ext2 file system on a virtio-blk disk and its page cache grows, and with it the
//! VMM's RSS; inflating the balloon makes the guest reclaim that cache and the RSS falls;
//! after a second read, dropping the caches in the guest gives the memory back to the host by
//! free page reporting alone (no balloon target).

use std::time::{Duration, Instant};

use tidevm_testlane::{Guest, GuestOptions, L1Thp, Lane, Result};

use crate::foundation::{check, mem_total_kib, meminfo_kib, rss_mib, BOOT, CMD};
use crate::virtio_mem::finish;
use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] =
    &[("page_cache_balloon_and_reporting", balloon_and_reporting)];

/// The image in the lane (L1's /run, a tmpfs): sparse until the guest writes its file.
const IMAGE: &str = "/run/tidevm-cache.img";
const IMAGE_MIB: u64 = 1200;
const FILE_MIB: u64 = 1024;
const IO: Duration = Duration::from_secs(400);

/// Runs a guest command and returns how long it took, in seconds.
fn timed(guest: &Guest, command: &str) -> Result<f64> {
    let started = Instant::now();
    guest.run(command, IO)?;
    Ok(started.elapsed().as_secs_f64())
}

/// Polls the VMM's RSS every 2 s until it is at most `limit_mib` or `timeout` passes; returns
/// the last reading.
fn rss_falls_to(guest: &Guest, limit_mib: i64, timeout: Duration) -> Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let rss = rss_mib(guest)?;
        if rss <= limit_mib || Instant::now() > deadline {
            return Ok(rss);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn balloon_and_reporting(lane: &Lane) -> Result<()> {
    let (rc, out) = lane.sh(
        &format!("rm -f {IMAGE} && truncate -s {IMAGE_MIB}M {IMAGE}"),
        CMD,
    )?;
    if rc != 0 {
        return Err(tidevm_testlane::LaneError::Failed(format!(
            "creating {IMAGE} in the lane: {out}"
        )));
    }
    let result = scenario(lane);
    let _ = lane.sh(&format!("rm -f {IMAGE}"), CMD);
    result
}

fn scenario(lane: &Lane) -> Result<()> {
    let guest = lane.boot_guest(&GuestOptions {
        memory: "2G".into(),
        extra_args: [
            "--disk",
            &format!("path={IMAGE},id=cache"),
            "--balloon",
            "stats-interval=1s,free-page-reporting=on",
        ]
        .map(String::from)
        .to_vec(),
        // Balloon discards after the guest touched its memory: see L1Thp::Never.
        l1_thp: L1Thp::Never,
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    let rss_ready = rss_mib(&guest)?;

    // The file is written by the guest (real blocks on the disk, not a hole), then every
    // cache of it is dropped and reported, so that the read below starts from cold.
    guest.run(
        "mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt",
        IO,
    )?;
    let write_s = timed(
        &guest,
        &format!("dd if=/dev/zero of=/mnt/big bs=1M count={FILE_MIB} conv=fsync 2>/dev/null"),
    )?;
    guest.run("sync && echo 3 > /proc/sys/vm/drop_caches", CMD)?;
    let rss_cold = rss_falls_to(&guest, rss_ready + 128, Duration::from_secs(120))?;
    let cached_cold = meminfo_kib(&guest, "Cached")? >> 10;
    eprintln!(
        "page cache: {FILE_MIB} MiB written in {write_s:.1} s; caches dropped: guest Cached \
         {cached_cold} MiB, tidevm RSS {rss_ready} MiB ready -> {rss_cold} MiB"
    );

    // 1. Reading the file fills the guest's page cache, and the host pays for it.
    let read_s = timed(&guest, "cat /mnt/big > /dev/null")?;
    let cached_read = meminfo_kib(&guest, "Cached")? >> 10;
    let rss_read = rss_mib(&guest)?;
    eprintln!(
        "page cache: read {FILE_MIB} MiB in {read_s:.1} s ({:.0} MiB/s): guest Cached \
         {cached_cold} -> {cached_read} MiB, tidevm RSS {rss_cold} -> {rss_read} MiB",
        FILE_MIB as f64 / read_s
    );
    check(
        cached_read >= cached_cold + FILE_MIB * 9 / 10,
        &guest,
        format!(
            "the page cache grew by only {} MiB",
            cached_read - cached_cold
        ),
    )?;
    check(
        rss_read - rss_cold >= FILE_MIB as i64 * 8 / 10,
        &guest,
        format!("tidevm's RSS grew by only {} MiB", rss_read - rss_cold),
    )?;

    // 2. A balloon of 1.5 GiB leaves the guest 512 MiB: it must reclaim most of the cache.
    let total_before = mem_total_kib(&guest)? >> 10;
    let started = Instant::now();
    let (rc, out) = guest.ctl_waiting(
        &["balloon", "1536M", "--wait", "--timeout", "280"],
        Duration::from_secs(300),
    )?;
    check(rc == 0, &guest, format!("inflate by 1.5 GiB: {out}"))?;
    let inflate_s = started.elapsed().as_secs_f64();
    let cached_inflated = meminfo_kib(&guest, "Cached")? >> 10;
    let rss_inflated = rss_mib(&guest)?;
    let total_inflated = mem_total_kib(&guest)? >> 10;
    eprintln!(
        "page cache: balloon 1536 MiB in {inflate_s:.1} s: guest MemTotal {total_before} -> \
         {total_inflated} MiB, Cached {cached_read} -> {cached_inflated} MiB, tidevm RSS \
         {rss_read} -> {rss_inflated} MiB"
    );
    check(
        cached_read - cached_inflated.min(cached_read) >= 600,
        &guest,
        format!("the balloon reclaimed only {cached_read} -> {cached_inflated} MiB of cache"),
    )?;
    check(
        rss_read - rss_inflated >= 600,
        &guest,
        format!("tidevm's RSS fell only {rss_read} -> {rss_inflated} MiB"),
    )?;
    let (rc, out) = guest.ctl_waiting(
        &["balloon", "0", "--wait", "--timeout", "120"],
        Duration::from_secs(140),
    )?;
    check(rc == 0, &guest, format!("deflate: {out}"))?;

    // 3. Read again (the cache comes back), then drop the caches with no balloon target:
    // free page reporting hands the freed pages to the host.
    let reread_s = timed(&guest, "cat /mnt/big > /dev/null")?;
    let cached_again = meminfo_kib(&guest, "Cached")? >> 10;
    let rss_again = rss_mib(&guest)?;
    check(
        cached_again >= FILE_MIB * 9 / 10,
        &guest,
        format!("after the deflate the read cached only {cached_again} MiB"),
    )?;
    let started = Instant::now();
    guest.run("echo 3 > /proc/sys/vm/drop_caches", CMD)?;
    let rss_dropped = rss_falls_to(&guest, rss_again - 700, Duration::from_secs(120))?;
    let report_s = started.elapsed().as_secs_f64();
    let cached_dropped = meminfo_kib(&guest, "Cached")? >> 10;
    let (_, stats) = guest.ctl(&["balloon-stats"])?;
    let reported = stats
        .lines()
        .find(|l| l.contains("\"reported_free_bytes\""))
        .unwrap_or_default()
        .trim()
        .to_string();
    eprintln!(
        "page cache: read again in {reread_s:.1} s; drop_caches: Cached {cached_again} -> \
         {cached_dropped} MiB, tidevm RSS {rss_again} -> {rss_dropped} MiB in {report_s:.1} s \
         by free page reporting ({reported})"
    );
    check(
        rss_again - rss_dropped >= 700,
        &guest,
        format!(
            "free page reporting gave back only {rss_again} -> {rss_dropped} MiB after the \
             caches were dropped"
        ),
    )?;
    guest.run("umount /mnt", CMD)?;
    finish(&guest)
}
