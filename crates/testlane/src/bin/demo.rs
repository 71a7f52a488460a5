//! tidevm-demo: boots a 2-vCPU, 1 GiB Linux guest under tidevm in the test
//! lane this machine supports, shows its boot, resizes its memory with each
//! mechanism (virtio-mem, an ACPI DIMM, the balloon), prints a table of what
//! each step took and did to the guest's MemTotal and tidevm's RSS, and powers
//! it off.
//!
//! Usage: tidevm-demo [--tidevm PATH]

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use tidevm_testlane::{tidevm_binary, Guest, GuestOptions, L1Thp, Lane, LaneError, GUEST_PROMPT};

/// One resize step of the demo and what it did.
struct StepResult {
    what: &'static str,
    seconds: f64,
    mem_total_kib: (u64, u64),
    rss_kib: (u64, u64),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(LaneError::Skip(reason)) => {
            eprintln!("SKIPPED: the demo cannot run here: {reason}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<Option<PathBuf>, LaneError> {
    let mut args = std::env::args().skip(1);
    let mut tidevm = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tidevm" => {
                tidevm =
                    Some(PathBuf::from(args.next().ok_or_else(|| {
                        LaneError::Failed("--tidevm needs a path".into())
                    })?))
            }
            "-h" | "--help" => {
                println!("usage: tidevm-demo [--tidevm PATH]");
                std::process::exit(0);
            }
            other => return Err(LaneError::Failed(format!("unknown argument {other}"))),
        }
    }
    Ok(tidevm)
}

fn step(title: &str) {
    println!("\n=== {title} ===");
}

fn run() -> Result<(), LaneError> {
    let tidevm = match parse_args()? {
        Some(path) => path,
        None => tidevm_binary()?,
    };
    step("starting the test lane");
    let lane = Lane::start(&tidevm)?;

    step(
        "booting a guest: 2 vCPUs, 1 GiB, a virtio-mem device of up to 2 GiB, \
         2 DIMM slots (maxmem 2 GiB) and a balloon",
    );
    let started = Instant::now();
    let guest = lane.boot_guest(&GuestOptions {
        cpus: 2,
        memory: "1G,slots=2,maxmem=2G".into(),
        extra_args: [
            "--virtio-mem",
            "id=mem0,size=2G",
            "--balloon",
            "stats-interval=2s",
        ]
        .map(String::from)
        .to_vec(),
        // The balloon step discards 4 KiB pages: THP off in the nested lane's L1 host.
        l1_thp: L1Thp::Never,
        ..GuestOptions::default()
    })?;
    stream_boot(&guest, lane.scaled(Duration::from_secs(20)))?;
    println!(
        "\n(guest ready {:.1} s after tidevm started)",
        started.elapsed().as_secs_f64()
    );

    let command_timeout = lane.scaled(Duration::from_secs(4));
    step("guest: head -3 /proc/meminfo");
    println!("{}", guest.run("head -3 /proc/meminfo", command_timeout)?);

    let steps: [(&str, &str); 6] = [
        ("virtio-mem +1 GiB", "resize-mem mem0 1G"),
        ("virtio-mem back to 0", "resize-mem mem0 0"),
        ("DIMM +512 MiB", "dimm-add 512M --id demo"),
        ("DIMM removed", "dimm-del demo"),
        ("balloon inflated 256 MiB", "balloon 256M"),
        ("balloon deflated", "balloon 0"),
    ];
    let mut results = Vec::new();
    for (what, command) in steps {
        step(&format!("tidevm ctl {command} --wait"));
        results.push(resize_step(&lane, &guest, what, command, command_timeout)?);
    }

    step("summary (times measured in the lane, from the API request until the guest is done)");
    print_summary(&results);

    step("powering off");
    let code = guest.poweroff(lane.scaled(Duration::from_secs(10)))?;
    println!("tidevm exited with code {code}");
    if code != 0 {
        return Err(guest.failure(format!("tidevm exited with {code} after poweroff")));
    }
    Ok(())
}

fn mem_total_kib(guest: &Guest<'_>, timeout: Duration) -> Result<u64, LaneError> {
    let line = guest.run("grep MemTotal /proc/meminfo", timeout)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| guest.failure(format!("cannot parse MemTotal from {line:?}")))
}

/// Runs `tidevm ctl <command> --wait` in the lane; returns the step with the time ctl
/// reports ("... after N s") and MemTotal and RSS before and after.
fn resize_step(
    lane: &Lane,
    guest: &Guest<'_>,
    what: &'static str,
    command: &str,
    command_timeout: Duration,
) -> Result<StepResult, LaneError> {
    let total_before = mem_total_kib(guest, command_timeout)?;
    let rss_before = guest.vmm_rss_kib()?;
    let (status, out) = lane.sh(
        &format!(
            "{} ctl --api-socket {} {command} --wait --timeout 280 2>&1",
            lane.lane_tidevm(),
            guest.api_socket()
        ),
        lane.scaled(Duration::from_secs(30))
            .max(Duration::from_secs(300)),
    )?;
    println!("{}", out.trim());
    if status != 0 {
        return Err(guest.failure(format!("tidevm ctl {command} exited with {status}")));
    }
    let seconds = out
        .lines()
        .rev()
        .find_map(|line| {
            line.split(" after ")
                .nth(1)?
                .trim_end_matches(" s")
                .parse()
                .ok()
        })
        .ok_or_else(|| guest.failure(format!("no time in the output of {command}: {out}")))?;
    // The guest onlines or offlines memory a moment after the device answers.
    thread::sleep(Duration::from_secs(2));
    let total_after = mem_total_kib(guest, command_timeout)?;
    let rss_after = guest.vmm_rss_kib()?;
    println!(
        "MemTotal {total_before} -> {total_after} KiB, tidevm RSS {rss_before} -> {rss_after} KiB"
    );
    Ok(StepResult {
        what,
        seconds,
        mem_total_kib: (total_before, total_after),
        rss_kib: (rss_before, rss_after),
    })
}

fn print_summary(results: &[StepResult]) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{:<26} {:>8} {:>22} {:>22}",
        "step", "time", "guest MemTotal (MiB)", "tidevm RSS (MiB)"
    );
    for r in results {
        println!(
            "{:<26} {:>6.2} s {:>9.0} -> {:>9.0} {:>9.0} -> {:>9.0}",
            r.what,
            r.seconds,
            mib(r.mem_total_kib.0),
            mib(r.mem_total_kib.1),
            mib(r.rss_kib.0),
            mib(r.rss_kib.1),
        );
    }
}

/// Prints the console as it grows until the guest shell is ready.
fn stream_boot(guest: &Guest<'_>, timeout: Duration) -> Result<(), LaneError> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    loop {
        let chunk = guest.console_from(offset)?;
        offset += chunk.len() as u64;
        print!("{chunk}");
        if let Some(code) = guest.exit_status_now()? {
            return Err(guest.failure(format!("tidevm exited with {code} during boot")));
        }
        if guest.wait_for_from(GUEST_PROMPT, 0, Duration::ZERO).is_ok() {
            // Print whatever arrived between the two reads.
            print!("{}", guest.console_from(offset)?);
            println!();
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(guest.failure(format!("the guest shell was not ready within {timeout:?}")));
        }
        thread::sleep(Duration::from_millis(500));
    }
}
