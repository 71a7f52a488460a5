//! Issue 2: the guest boots, sees its memory, CPUs, ACPI and PCI; power-off, reboot and the API.

use std::time::Duration;

use tidevm_testlane::{Guest, GuestOptions, Lane, Result};

use crate::Scenario;

pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("boot_1cpu_512m", boot_1cpu_512m),
    ("boot_2cpu_6g_and_reboot", boot_2cpu_6g_and_reboot),
    ("api_socket_in_use", api_socket_in_use),
];

pub const BOOT: Duration = Duration::from_secs(240);
pub const CMD: Duration = Duration::from_secs(60);

pub fn check(condition: bool, guest: &Guest, what: impl Into<String>) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(guest.failure(what))
    }
}

/// MemTotal in KiB, from the guest's /proc/meminfo.
/// Runs the guest's `memtouch MIB` (write a pattern through MIB MiB, read it back) and fails
/// unless every word came back; `what` says what the check is about in the failure.
pub fn memtouch(guest: &Guest, mib: u64, timeout: Duration, what: &str) -> Result<String> {
    let touched = guest.run(&format!("memtouch {mib}"), timeout)?;
    check(
        touched.contains(", 0 bad words"),
        guest,
        format!("{what}: {touched}"),
    )?;
    Ok(touched)
}

/// tidevm's resident memory on the host, in MiB (signed, for the differences tests take).
pub fn rss_mib(guest: &Guest) -> Result<i64> {
    Ok(guest.vmm_rss_kib()? as i64 / 1024)
}

pub fn mem_total_kib(guest: &Guest) -> Result<u64> {
    meminfo_kib(guest, "MemTotal")
}

/// A `/proc/meminfo` field of the guest, in KiB.
pub fn meminfo_kib(guest: &Guest, field: &str) -> Result<u64> {
    let line = guest.run(&format!("grep '^{field}:' /proc/meminfo"), CMD)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| guest.failure(format!("cannot parse {field} from {line:?}")))
}

/// The first word of `md5sum` output.
pub fn md5_of(output: &str) -> String {
    output
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn boot<'a>(lane: &'a Lane, cpus: u32, memory: &str) -> Result<Guest<'a>> {
    let guest = lane.boot_guest(&GuestOptions {
        cpus,
        memory: memory.into(),
        ..GuestOptions::default()
    })?;
    guest.wait_ready(BOOT)?;
    Ok(guest)
}

/// The kernel's view of the platform: ACPI tables found, PCI root bridge, GED, no errors.
fn check_platform(guest: &Guest) -> Result<()> {
    let dmesg = guest.run("dmesg", CMD)?;
    for needle in [
        "ACPI: FACP",
        "ACPI: APIC",
        "ACPI: MCFG",
        "ACPI: DSDT",
        "PCI Root Bridge [PCI0]",
        "pci 0000:00:00.0: [1b36:0008]",
    ] {
        check(
            dmesg.contains(needle),
            guest,
            format!("dmesg lacks {needle:?}"),
        )?;
    }
    let ged = guest.run(
        "ls /sys/bus/platform/devices/ | grep -c ACPI0013 || true",
        CMD,
    )?;
    check(
        ged.trim() != "0",
        guest,
        "no ACPI0013 (GED) platform device",
    )?;
    // The device existing is not enough: its driver must have bound (a GED whose _CRS the
    // driver cannot parse fails its probe, and the first event then oopses the guest).
    let ged_driver = guest.run(
        "ls /sys/bus/platform/drivers/acpi-ged/ | grep -c ACPI0013 || true",
        CMD,
    )?;
    check(
        ged_driver.trim() != "0",
        guest,
        "the acpi-ged driver did not bind to the GED",
    )?;
    // Checked here rather than with the guest's grep: the output stays exactly what the kernel
    // logged.
    let problems: Vec<&str> = dmesg
        .lines()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            // "_OSC: platform retains control of PCIe features (AE_NOT_FOUND)" is the
            // kernel noting that we offer no _OSC method, which is fine: it is not an error.
            if lower.contains("_osc: platform retains control") {
                return false;
            }
            [
                "acpi error",
                "acpi bios error",
                "probe with driver",
                "unable to parse",
                "ae_not_found",
                "firmware bug",
            ]
            .iter()
            .any(|bad| lower.contains(bad))
                || (lower.contains("mmconfig") && lower.contains("not reserved"))
        })
        .collect();
    check(
        problems.is_empty(),
        guest,
        format!("dmesg reports errors:\n{}", problems.join("\n")),
    )?;
    Ok(())
}

fn boot_1cpu_512m(lane: &Lane) -> Result<()> {
    let guest = boot(lane, 1, "512M")?;
    let cpus = guest.run("nproc", CMD)?;
    check(cpus.trim() == "1", &guest, format!("nproc says {cpus}"))?;
    let total = mem_total_kib(&guest)?;
    // The kernel keeps its image, page tables and memmap: up to ~15% of a small guest.
    check(
        total <= 512 * 1024 && total > 430 * 1024,
        &guest,
        format!("MemTotal {total} KiB for 512 MiB"),
    )?;
    check_platform(&guest)?;

    let (rc, info) = guest.ctl(&["info"])?;
    check(rc == 0, &guest, format!("ctl info failed: {info}"))?;
    for needle in [
        "\"state\": \"running\"",
        "\"vcpus\": 1",
        "\"boot_ram_bytes\": 536870912",
    ] {
        check(
            info.contains(needle),
            &guest,
            format!("info lacks {needle}: {info}"),
        )?;
    }
    let rss = guest.vmm_rss_kib()?;
    eprintln!("tidevm RSS with a 512 MiB guest booted: {rss} KiB");

    let code = guest.poweroff(Duration::from_secs(120))?;
    check(code == 0, &guest, format!("poweroff exit code {code}"))
}

fn boot_2cpu_6g_and_reboot(lane: &Lane) -> Result<()> {
    let guest = boot(lane, 2, "6G")?;
    let cpus = guest.run("nproc", CMD)?;
    check(cpus.trim() == "2", &guest, format!("nproc says {cpus}"))?;
    let total = mem_total_kib(&guest)?;
    check(
        total <= 6 * 1024 * 1024 && total > 5 * 1024 * 1024 + 700 * 1024,
        &guest,
        format!("MemTotal {total} KiB for 6 GiB across the hole"),
    )?;
    let iomem = guest.run("grep 'System RAM' /proc/iomem", CMD)?;
    check(
        iomem.contains("100000000-"),
        &guest,
        format!("no RAM above 4 GiB in /proc/iomem:\n{iomem}"),
    )?;

    // A reboot from inside the guest resets the VM in the same process.
    let mark = guest.console_len()?;
    guest.send_line("reboot")?;
    guest.wait_ready_from(mark, BOOT)?;
    check(
        guest.exit_status_now()?.is_none(),
        &guest,
        "tidevm exited on reboot",
    )?;
    let total_after = mem_total_kib(&guest)?;
    check(
        total_after == total,
        &guest,
        "MemTotal changed across reboot",
    )?;

    // The API: reboot, then shut down.
    let mark = guest.console_len()?;
    let (rc, out) = guest.ctl(&["reboot"])?;
    check(rc == 0, &guest, format!("ctl reboot: {out}"))?;
    guest.wait_ready_from(mark, BOOT)?;
    let (rc, out) = guest.ctl(&["shutdown"])?;
    check(rc == 0, &guest, format!("ctl shutdown: {out}"))?;
    let code = guest.wait_exit(Duration::from_secs(60))?;
    check(
        code == 0,
        &guest,
        format!("exit code after API shutdown {code}"),
    )
}

/// A second VMM on a busy API socket fails with one clear line and leaves the first alone.
fn api_socket_in_use(lane: &Lane) -> Result<()> {
    let guest = boot(lane, 1, "256M")?;
    let socket = guest.api_socket();
    let (rc, out) = lane.sh(
        &format!(
            "{} run --kernel /nonexistent --memory size=256M --api-socket {socket} 2>&1; echo rc=$?",
            lane_tidevm(lane)
        ),
        CMD,
    )?;
    let _ = rc;
    check(
        out.contains("rc=1") && out.lines().filter(|l| l.contains("error")).count() == 1,
        &guest,
        format!("unexpected output: {out}"),
    )?;
    let (rc, info) = guest.ctl(&["info"])?;
    check(
        rc == 0 && info.contains("running"),
        &guest,
        "first VM's API gone",
    )?;
    guest.poweroff(Duration::from_secs(120)).map(|_| ())
}

fn lane_tidevm(lane: &Lane) -> String {
    lane.lane_tidevm().to_string()
}
